"""ScanJoiner: pairing, batching, timeouts, capacity, and an account of every item."""

from __future__ import annotations

import threading
from types import SimpleNamespace as NS

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamclust.adapters.join import Batch, ScanJoiner, join_streams

H, W, C = 4, 3, 5


def frame(p):
    return np.full((H, W), p % 65536, dtype=np.uint16)


def spectrum(p):
    return np.full(C, p + 1000, dtype=np.uint32)


def all_rows(batches):
    return [(int(p), b, i) for b in batches for i, p in enumerate(b.positions)]


def test_pairs_in_any_order_and_batches_in_preallocated_arrays():
    j = ScanJoiner(10, batch_size=4)
    for p in [3, 1, 4, 0, 9, 2, 6, 5, 8, 7]:
        j.add_frame(p, frame(p))
    out = []
    for p in [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]:
        j.add_spectrum(p, spectrum(p))
        out += j.poll()
    assert [len(b) for b in out] == [4, 4]
    out += j.flush()
    assert [len(b) for b in out] == [4, 4, 2]
    for b in out:
        assert isinstance(b, Batch)
        assert b.frames.shape == (len(b), H, W) and b.frames.dtype == np.uint16
        assert b.spectra.shape == (len(b), C) and b.spectra.dtype == np.uint32
        assert b.has_frame.all() and b.has_spectrum.all()
        for i, p in enumerate(b.positions):
            assert (b.frames[i] == p).all() and (b.spectra[i] == p + 1000).all()
    assert sorted(p for p, _, _ in all_rows(out)) == list(range(10))
    s = j.stats
    assert s["joined"] == 10 and s["batches"] == 3
    assert j.check_invariants()


def test_batch_rows_are_copies_not_views_of_the_inputs():
    j = ScanJoiner(1, batch_size=1)
    img = frame(0)
    j.add_frame(0, img)
    j.add_spectrum(0, spectrum(0))
    (b,) = j.poll()
    img[...] = 7
    assert (b.frames[0] == 0).all()


def test_duplicates_out_of_range_and_rejected_shapes_are_counted():
    j = ScanJoiner(3, batch_size=8)
    assert j.add_frame(0, frame(0))
    assert not j.add_frame(0, frame(0))          # duplicate while pending
    assert j.add_spectrum(0, spectrum(0))         # joins
    assert not j.add_spectrum(0, spectrum(0))     # duplicate after join
    assert not j.add_frame(0, frame(0))           # duplicate after join
    assert not j.add_frame(3, frame(3))           # out of range
    assert not j.add_spectrum(-1, spectrum(0))    # out of range
    assert not j.add_frame(1, np.zeros((H + 1, W), np.uint16))  # wrong shape
    assert not j.add_spectrum(1, np.zeros((C, 1)))              # wrong ndim
    assert j.add_frame(1, frame(1))               # the position is still open after a rejection
    s = j.stats
    assert (s["duplicate_frames"], s["duplicate_spectra"]) == (2, 1)
    assert (s["out_of_range_frames"], s["out_of_range_spectra"], s["out_of_range"]) == (1, 1, 2)
    assert (s["rejected_frames"], s["rejected_spectra"]) == (1, 1)
    assert s["pending_frames"] == 1
    j.check_invariants()
    j.flush()
    assert j.stats["flushed_frames"] == 1 and j.stats["frames_without_spectrum"] == 1
    j.check_invariants()


def test_timeout_expires_partners_and_late_arrivals_are_counted_late():
    j = ScanJoiner(4, batch_size=2, timeout_s=1.0)
    j.add_frame(0, frame(0), t=0.0)
    j.add_frame(1, frame(1), t=0.5)
    j.add_spectrum(2, spectrum(2), t=0.6)
    assert j.poll(now=1.2) == []
    s = j.stats
    assert s["expired_frames"] == 1 and s["pending_frames"] == 1 and s["pending_spectra"] == 1
    j.add_spectrum(0, spectrum(0), t=1.3)  # its frame already given up
    assert j.stats["late_spectra"] == 1 and j.stats["spectra_without_frame"] == 1
    j.add_spectrum(1, spectrum(1), t=1.4)  # in time: joins
    assert j.stats["joined"] == 1
    j.poll(now=10.0)  # a spectrum outlives a silent frame stream for spectrum_timeout_s (30 s)
    assert j.stats["expired_spectra"] == 0
    j.poll(now=40.0)
    s = j.stats
    assert s["expired_spectra"] == 1 and s["pending_spectra"] == 0
    j.check_invariants()


def test_capacity_evicts_the_oldest_item_of_its_own_kind():
    # frames and spectra have their own bounds: a frame stream running behind must not push the
    # waiting spectra out (measured at 256 x 256: 39,822 positions analysed as two halves)
    j = ScanJoiner(100, max_pending=3, max_pending_spectra=2, timeout_s=1e9)
    j.add_spectrum(50, spectrum(50), t=0.5)
    j.add_frame(0, frame(0), t=1.0)
    j.add_frame(1, frame(1), t=2.0)
    j.add_frame(2, frame(2), t=3.0)
    j.add_frame(3, frame(3), t=4.0)  # 4 frames > 3: frame 0 goes, the older spectrum stays
    s = j.stats
    assert s["evicted_frames"] == 1 and s["evicted_spectra"] == 0 and s["evicted_at_capacity"] == 1
    assert s["pending_frames"] == 3 and s["pending_spectra"] == 1
    j.add_spectrum(60, spectrum(60), t=5.0)
    j.add_spectrum(61, spectrum(61), t=6.0)  # 3 spectra > 2: spectrum 50 goes
    s = j.stats
    assert s["evicted_spectra"] == 1 and s["pending_spectra"] == 2 and s["pending_frames"] == 3
    assert j.n_pending == 5
    j.add_frame(50, frame(50), t=7.0)  # partner was evicted: late, not pending
    assert j.stats["late_frames"] == 1
    j.check_invariants()


def test_emit_mode_hands_out_unpaired_items_with_zeroed_partner_and_masks():
    j = ScanJoiner(6, batch_size=10, on_missing="emit")
    for p in (0, 1, 2):
        j.add_frame(p, frame(p))
    for p in (1, 2, 4):
        j.add_spectrum(p, spectrum(p))
    (b,) = j.flush()
    rows = {int(p): i for i, p in enumerate(b.positions)}
    assert set(rows) == {0, 1, 2, 4}
    assert b.has_frame[rows[0]] and not b.has_spectrum[rows[0]] and (b.spectra[rows[0]] == 0).all()
    assert b.has_spectrum[rows[4]] and not b.has_frame[rows[4]] and (b.frames[rows[4]] == 0).all()
    assert (b.frames[rows[0]] == 0).all() and (b.spectra[rows[4]] == 1004).all()
    s = j.stats
    assert s["emitted_frame_only"] == 1 and s["emitted_spectrum_only"] == 1 and s["joined"] == 2
    assert s["positions_without_any"] == 2
    j.check_invariants()


def test_invariant_check_detects_a_broken_account():
    j = ScanJoiner(2)
    j.add_frame(0, frame(0))
    j._c["joined"] += 1  # simulate a bug: an item counted twice
    with pytest.raises(AssertionError, match="frames_in"):
        j.check_invariants()


# -- property test over random arrival orders, drops, duplicates and polls --------------------------------
@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 40))
    events = []
    for kind in ("f", "s"):
        for p in range(n):
            copies = draw(st.sampled_from([0, 1, 1, 1, 2, 3]))  # dropped, normal, duplicated
            events += [(kind, p)] * copies
    events += [(draw(st.sampled_from("fs")), draw(st.sampled_from([-1, n, n + 5])))
               for _ in range(draw(st.integers(0, 3)))]
    order = draw(st.permutations(events))
    polls = draw(st.lists(st.integers(0, max(len(order), 1)), max_size=5))
    return n, order, set(polls)


@settings(max_examples=150, deadline=None)
@given(scenarios(), st.sampled_from(["drop", "emit"]), st.integers(1, 9), st.sampled_from([2, 5, 10_000]),
       st.sampled_from([3.0, 1e9]), st.sampled_from([1, 4, 10_000]))
def test_every_item_is_accounted_for(scenario, on_missing, batch_size, max_pending, timeout_s, max_spectra):
    n, order, polls = scenario
    j = ScanJoiner(n, batch_size=batch_size, max_pending=max_pending, max_pending_spectra=max_spectra,
                   timeout_s=timeout_s, on_missing=on_missing)
    out = []
    for t, (kind, p) in enumerate(order):
        if t in polls:
            out += j.poll(now=float(t))
        if kind == "f":
            j.add_frame(p, frame(p), t=float(t))
        else:
            j.add_spectrum(p, spectrum(p), t=float(t))
        assert j.stats["pending_frames"] <= max_pending and j.stats["pending_spectra"] <= max_spectra
        j.check_invariants()
    out += j.flush()
    s = j.stats
    assert j.check_invariants()
    assert s["pending_frames"] == s["pending_spectra"] == 0
    frames_given = {p for k, p in order if k == "f" and 0 <= p < n}
    spectra_given = {p for k, p in order if k == "s" and 0 <= p < n}
    assert s["frames_in"] == sum(k == "f" for k, _ in order)
    assert s["duplicate_frames"] == sum(k == "f" and 0 <= p < n for k, p in order) - len(frames_given)
    assert s["duplicate_spectra"] == sum(k == "s" and 0 <= p < n for k, p in order) - len(spectra_given)
    rows = all_rows(out)
    positions = [p for p, _, _ in rows]
    # every half of a position leaves at most once (in "emit" mode a late partner leaves in its own row)
    frame_rows = [p for p, b, i in rows if b.has_frame[i]]
    spectrum_rows = [p for p, b, i in rows if b.has_spectrum[i]]
    assert len(frame_rows) == len(set(frame_rows)) and len(spectrum_rows) == len(set(spectrum_rows))
    joined = [p for p, b, i in rows if b.has_frame[i] and b.has_spectrum[i]]
    assert len(joined) == s["joined"]
    assert set(joined) <= frames_given & spectra_given
    for p, b, i in rows:  # with its own data
        assert not b.has_frame[i] or (b.frames[i] == p).all()
        assert not b.has_spectrum[i] or (b.spectra[i] == p + 1000).all()
    if min(max_pending, max_spectra) >= 2 * n and timeout_s > len(order):  # nothing can be given up early: all pairs join
        assert set(joined) == frames_given & spectra_given
    if on_missing == "emit":  # every accepted item leaves, paired or not
        assert set(positions) == frames_given | spectra_given
    else:
        assert positions == frame_rows == spectrum_rows and len(positions) == len(set(positions))
        assert set(positions) == set(joined)
    assert all(len(b) == batch_size for b in out[:-1])


# -- join_streams -------------------------------------------------------------------------------------
def test_join_streams_runs_both_iterators_and_reports_counters():
    n = 50
    rng = np.random.default_rng(1)
    frames = [NS(sequence=p + 1, image=frame(p)) for p in rng.permutation(n)]
    spectra = [NS(position=int(p), counts=spectrum(p)) for p in rng.permutation(n) if p % 10 != 3]
    spectra.append(spectra[0])
    stream = join_streams(iter(frames), iter(spectra), n, batch_size=16)
    rows = all_rows(list(stream))
    assert sorted(p for p, _, _ in rows) == [p for p in range(n) if p % 10 != 3]
    s = stream.stats
    assert s["joined"] == 45 and s["frames_without_spectrum"] == 5 and s["duplicate_spectra"] == 1
    stream.joiner.check_invariants()


def test_join_streams_reraises_a_source_failure_after_flushing():
    def broken():
        yield NS(position=0, counts=spectrum(0))
        raise ConnectionError("EDS link died")

    stream = join_streams([NS(sequence=1, image=frame(0))], broken(), 2, batch_size=4)
    batches = []
    with pytest.raises(RuntimeError, match="source") as info:
        for b in stream:
            batches.append(b)
    assert isinstance(info.value.__cause__, ConnectionError)
    assert [int(p) for b in batches for p in b.positions] == [0]


def test_join_streams_backpressure_does_not_lose_items():
    n = 300
    done = threading.Event()

    def slow_frames():
        for p in range(n):
            yield NS(position=p, image=frame(p))
        done.set()

    spectra = (NS(position=p, counts=spectrum(p)) for p in range(n))
    stream = join_streams(slow_frames(), spectra, n, batch_size=7, queue_size=4)
    total = sum(len(b) for b in stream)
    assert done.is_set() and total == n and stream.stats["joined"] == n


def test_a_slow_partner_stream_that_keeps_arriving_does_not_expire_items():
    """An EDS system far ahead of a slow frame source: spectra wait for frames that are coming."""
    j = ScanJoiner(100, batch_size=10, timeout_s=1.0)
    for p in range(100):                       # every spectrum at t = 0
        j.add_spectrum(p, np.full(4, p, np.uint16), t=0.0)
    for p in range(100):                       # frames trickle in, 0.1 s apart, 10 s in all
        t = 0.1 * (p + 1)
        j.add_frame(p, np.full((2, 2), p, np.uint16), t=t)
        j.poll(now=t)
    j.flush()
    s = j.stats
    assert s["joined"] == 100 and s["spectra_without_frame"] == 0
    assert j.check_invariants()


def test_items_expire_once_the_partner_stream_passed_them_or_went_silent():
    j = ScanJoiner(10, batch_size=10, timeout_s=1.0)
    j.add_spectrum(3, np.zeros(4, np.uint16), t=0.0)     # its frame is lost
    j.add_frame(2, np.zeros((2, 2), np.uint16), t=0.5)   # frame stream active, below position 3
    j.poll(now=1.2)
    assert j.stats["expired_spectra"] == 0                # frames may still bring position 3
    j.add_frame(5, np.zeros((2, 2), np.uint16), t=1.3)   # the frame stream passed position 3
    j.poll(now=1.4)
    assert j.stats["expired_spectra"] == 1
    j.add_spectrum(7, np.zeros(4, np.uint16), t=1.5)     # then the frame stream goes silent
    j.poll(now=2.0)
    assert j.stats["expired_spectra"] == 1
    j.poll(now=2.6)                                       # silent for > 1 s: a spectrum still waits
    assert j.stats["expired_spectra"] == 1
    j.poll(now=31.4)                                      # silent for spectrum_timeout_s (30 s)
    assert j.stats["expired_spectra"] == 2
    assert j.check_invariants()


# -- decoding straight into batch memory ----------------------------------------------------------
from streamclust.adapters.join import FrameBlocks  # noqa: E402


def test_frames_in_consecutive_block_rows_become_the_batch_without_a_copy():
    blocks = FrameBlocks(rows=4)
    j = ScanJoiner(8, batch_size=4)
    rows = []
    for p in range(8):
        row = blocks((H, W), np.uint16)
        row[...] = frame(p)
        rows.append(row)
        j.add_frame(p, row)
        j.add_spectrum(p, spectrum(p))
    out = j.poll()
    assert [b.positions.tolist() for b in out] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for b, first in zip(out, (rows[0], rows[4])):
        assert np.shares_memory(b.frames, first)          # a view of the block: no copy
        assert [int(f[0, 0]) for f in b.frames] == b.positions.tolist()
    assert blocks.n_allocated == 2 and j.check_invariants()


def test_reordered_or_incomplete_rows_fall_back_to_a_copy_with_the_right_values():
    blocks = FrameBlocks(rows=4)
    rows = [blocks((H, W), np.uint16) for _ in range(4)]
    for p, row in enumerate(rows):
        row[...] = frame(p)
    j = ScanJoiner(4, batch_size=4, on_missing="emit")
    for p in (1, 0, 2, 3):                                # joined out of block order
        j.add_frame(p, rows[p])
        if p != 3:
            j.add_spectrum(p, spectrum(p))
    j.poll()
    b, = j.flush()
    assert not np.shares_memory(b.frames, rows[0])
    assert [int(f[0, 0]) for f in b.frames] == b.positions.tolist() == [1, 0, 2, 3]
    assert b.has_spectrum.tolist() == [True, True, True, False] and j.check_invariants()


def test_frame_blocks_are_reused_only_once_nothing_references_them():
    blocks = FrameBlocks(rows=2)
    a = blocks((2, 2), np.uint8)
    b = blocks((2, 2), np.uint8)
    held = blocks((2, 2), np.uint8)                       # second block; the first is still viewed
    assert blocks.n_allocated == 2 and held.base is not a.base
    del a, b
    blocks((2, 2), np.uint8)                              # fills the second block's last row
    again = blocks((2, 2), np.uint8)                      # first block is free now: reused
    assert blocks.n_allocated == 2 and not np.shares_memory(again, held)
    blocks((3, 3), np.uint16)                             # a new geometry starts afresh
    assert blocks.n_allocated == 3
    with pytest.raises(ValueError):
        FrameBlocks(rows=0)


def test_join_streams_gives_an_allocating_frame_source_blocks_and_keeps_batch_order():
    class AllocatingSource:
        """Like MerlinReceiver.frames(): decodes into whatever out_allocator hands out."""

        def __init__(self, n):
            self.out_allocator = None
            self.n = n

        def __iter__(self):
            for p in range(self.n):
                out = self.out_allocator((H, W), np.uint16)
                out[...] = frame(p)
                yield NS(position=p, image=out)

    n = 40
    source = AllocatingSource(n)
    spectra = [NS(position=p, counts=spectrum(p)) for p in range(n)]
    stream = join_streams(source, iter(spectra), n, batch_size=8, queue_size=8)
    batches = list(stream)
    assert isinstance(source.out_allocator, FrameBlocks)
    assert [p for b in batches for p in b.positions.tolist()] == list(range(n))
    assert all((b.frames[:, 0, 0] == b.positions).all() for b in batches)
    assert all((b.spectra[:, 0] == b.positions + 1000).all() for b in batches)
    assert stream.stats["joined"] == n and stream.joiner.check_invariants()


def test_merlin_frames_are_decoded_straight_into_the_batches_over_a_real_socket():
    from streamclust.adapters.merlin import MerlinReceiver
    from streamclust.simulators.merlin import ArraySource, MerlinServer

    n = 12
    frames = np.random.default_rng(4).integers(0, 4096, (n, 256, 256)).astype(np.uint16)
    spectra = [NS(position=p, counts=spectrum(p)) for p in range(n)]
    with MerlinServer(ArraySource(frames), data_port=0, control_port=0, layout="1x1",
                      headless=True) as server:
        with MerlinReceiver(*server.data_address, timeout=5.0) as rx:
            source = rx.frames()
            stream = join_streams(source, iter(spectra), n, batch_size=4)
            batches = list(stream)
    assert isinstance(source.out_allocator, FrameBlocks)
    assert [b.positions.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    for b in batches:
        np.testing.assert_array_equal(b.frames, frames[b.positions])
        assert b.frames.base is not None and b.frames.base.shape == (4, 256, 256)  # a block, not a copy
    assert stream.stats["joined"] == n and stream.joiner.check_invariants()


def test_a_frame_waiting_long_for_its_spectrum_stops_pinning_its_block():
    blocks = FrameBlocks(rows=4)
    j = ScanJoiner(4, batch_size=2, timeout_s=60.0)
    rows = [blocks((H, W), np.uint16) for _ in range(2)]
    for p, row in enumerate(rows):
        row[...] = frame(p)
        j.add_frame(p, row, t=0.0)
    j.poll(now=0.1)                                       # the usual lag: still zero-copy
    assert all(np.shares_memory(j._pending[0][p][0], rows[p]) for p in range(2))
    j.add_spectrum(0, spectrum(0), t=0.2)
    j.poll(now=1.0)                                       # position 1 waited 1 s: copied out
    assert not np.shares_memory(j._pending[0][1][0], rows[1])
    rows[1][...] = 999                                    # the block may now be reused
    j.add_spectrum(1, spectrum(1), t=1.1)
    b, = j.poll(now=1.1)
    assert [int(f[0, 0]) for f in b.frames] == [0, 1] and j.check_invariants()


def test_spectra_wait_out_a_frame_stall_that_would_expire_frames():
    """A frame source stalled for 3 s (a cold JIT cache measured so) while spectra ran on: every
    position still pairs; a frame waiting as long for a stalled EDS stream is given up."""
    j = ScanJoiner(20, batch_size=20, timeout_s=2.0)
    for p in range(10):
        j.add_frame(p, frame(p), t=0.0)
        j.add_spectrum(p, spectrum(p), t=0.0)
    for p in range(10, 20):
        j.add_spectrum(p, spectrum(p), t=0.1)        # the frames stall here
    assert j.poll(now=3.1) == [] and j.stats["expired_spectra"] == 0
    for p in range(10, 20):
        j.add_frame(p, frame(p), t=3.2)              # and resume
    batches = j.poll(now=3.3)
    assert [b.positions.tolist() for b in batches] == [list(range(20))]
    assert j.stats["joined"] == 20 and j.stats["late_frames"] == 0
    k = ScanJoiner(4, batch_size=4, timeout_s=2.0)
    k.add_frame(0, frame(0), t=0.0)                  # its spectrum stream is silent
    k.poll(now=2.5)
    assert k.stats["expired_frames"] == 1
    assert j.check_invariants() and k.check_invariants()


# -- spectra handed over in blocks (SpectrumStream.blocks) -----------------------------------------
class BlockSpectra:
    """A spectrum source offering ``blocks()`` (as ``SpectrumStream`` does); plain iteration is an error,
    so a test passes only if the joiner took the block path."""

    def __init__(self, items, block_size, fail_after=None):
        self.items, self.block_size, self.fail_after = items, block_size, fail_after
        self.blocks_taken = 0

    def __iter__(self):
        raise AssertionError("a source with blocks() must be consumed by blocks")

    def blocks(self):
        for i in range(0, len(self.items), self.block_size):
            if self.fail_after is not None and self.blocks_taken == self.fail_after:
                raise ConnectionError("EDS link died")
            self.blocks_taken += 1
            yield self.items[i:i + self.block_size]


def test_join_streams_takes_spectra_by_blocks_and_accounts_for_each():
    n = 200
    rng = np.random.default_rng(4)
    frames = [NS(sequence=p + 1, image=frame(p)) for p in range(n)]
    spectra = [NS(position=int(p), counts=spectrum(p)) for p in rng.permutation(n) if p % 10 != 3]
    spectra.insert(5, spectra[3])                            # a duplicate inside one block
    spectra.append(NS(position=n + 7, counts=spectrum(0)))   # outside the scan
    spectra.append(NS(position=0, counts=np.zeros(C + 1, np.uint32)))  # wrong length
    source = BlockSpectra(spectra, block_size=32)
    stream = join_streams(iter(frames), source, n, batch_size=16, on_missing="emit")
    rows = all_rows(list(stream))
    s = stream.stats
    assert source.blocks_taken == -(-len(spectra) // 32)
    assert s["spectra_in"] == len(spectra) and s["joined"] == 180
    assert s["duplicate_spectra"] == 1 and s["out_of_range_spectra"] == 1 and s["rejected_spectra"] == 1
    assert sorted(p for p, _, _ in rows) == list(range(n))  # frames without spectrum emitted alone
    for p, b, i in rows:
        if b.has_spectrum[i]:
            assert b.spectra[i, 0] == p + 1000
    stream.joiner.check_invariants()


def test_join_streams_reraises_a_failing_block_source():
    spectra = [NS(position=p, counts=spectrum(p)) for p in range(8)]
    stream = join_streams([NS(sequence=p + 1, image=frame(p)) for p in range(8)],
                          BlockSpectra(spectra, block_size=4, fail_after=1), 8, batch_size=4)
    batches = []
    with pytest.raises(RuntimeError, match="source") as info:
        for b in stream:
            batches.append(b)
    assert isinstance(info.value.__cause__, ConnectionError)
    paired = sorted(int(p) for b in batches for p, has in zip(b.positions, b.has_spectrum) if has)
    assert paired == [0, 1, 2, 3]  # the block taken before the failure was joined
