"""Damaged Merlin streams: every frame is accounted for, every error names what and where."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from streamclust.adapters.errors import AcquisitionIncomplete
from streamclust.adapters.framing import encode_mpx_prefix, frame_message
from streamclust.adapters.merlin import MerlinReceiver, max_frame_payload
from streamclust.adapters.mib import parse_acquisition_header
from streamclust.simulators.merlin import ArraySource, Fault, MerlinServer
from streamclust.simulators.mib_encode import FrameEncoder, encode_acquisition_header

N = 8


@pytest.fixture
def frames():
    rng = np.random.default_rng(3)
    return rng.integers(0, 4096, (N, 256, 256)).astype(np.uint16)


def serve(frames, faults, **kw):
    kw.setdefault("layout", "1x1")
    return MerlinServer(ArraySource(frames), data_port=0, control_port=0, headless=True, faults=faults, **kw)


def receive_all(server, frames, timeout=5.0, **kw):
    with MerlinReceiver(*server.data_address, timeout=timeout, **kw) as rx:
        got = {}
        for f in rx.frames():
            assert np.array_equal(f.image, frames[f.sequence - 1]), f"frame {f.sequence} differs"
            got[f.sequence] = f.offset
        server.wait_until_idle(timeout=5.0)
        return rx, got


def test_truncated_frame_is_dropped_and_the_next_one_survives(frames):
    with serve(frames, [Fault("truncate", at=3)]) as server:
        rx, got = receive_all(server, frames)
    assert sorted(got) == [1, 2, 4, 5, 6, 7, 8]
    assert rx.stats.dropped["truncated"] == 1
    assert rx.stats.frames_received + rx.stats.frames_dropped == server.frames_sent == N
    err = next(e for e in rx.stats.errors if e["reason"] == "truncated")
    assert err["sequence"] == 3 and err["offset"] == got[2] + (got[2] - got[1])
    assert rx.stats.complete is False and rx.stats.received == N - 1


def test_corrupt_header_is_skipped_by_its_length(frames):
    with serve(frames, [Fault("corrupt_header", at=5)]) as server:
        rx, got = receive_all(server, frames)
    assert sorted(got) == [1, 2, 3, 4, 6, 7, 8]
    assert rx.stats.dropped["bad_header"] == 1
    assert rx.stats.bytes_skipped == 0  # no resynchronisation was needed
    assert rx.stats.frames_received + rx.stats.frames_dropped == server.frames_sent


def test_garbage_is_skipped_by_resynchronising(frames):
    with serve(frames, [Fault("garbage", at=4, n_bytes=3000)]) as server:
        rx, got = receive_all(server, frames)
    assert sorted(got) == list(range(1, N + 1))
    assert rx.stats.bytes_skipped == 3000
    assert rx.stats.error_counts["resync"] == 1
    assert rx.stats.complete is True
    resync = next(e for e in rx.stats.errors if e["reason"] == "resync")
    assert resync["offset"] == got[3] + (got[3] - got[2])  # where the garbage began


def test_skipped_frame_is_a_counted_gap(frames):
    with serve(frames, [Fault("skip", at=2)]) as server:
        rx, got = receive_all(server, frames)
    assert sorted(got) == [1, 3, 4, 5, 6, 7, 8]
    assert rx.stats.sequence_gaps == 1
    assert server.frames_sent == N - 1 == rx.stats.frames_received
    assert rx.stats.complete is False


def test_connection_dropped_mid_scan_is_reported_incomplete(frames):
    with serve(frames, [Fault("drop", at=5)]) as server:
        rx, got = receive_all(server, frames)
    assert sorted(got) == [1, 2, 3, 4]
    assert rx.stats.ended_by == "connection_lost"
    assert (rx.stats.expected, rx.stats.received, rx.stats.complete) == (N, 4, False)
    assert rx.stats.error_counts["connection_lost"] == 1


def test_raise_on_incomplete(frames):
    with serve(frames, [Fault("drop", at=3)]) as server:
        with MerlinReceiver(*server.data_address, timeout=5.0, raise_on_incomplete=True) as rx:
            seen = []
            with pytest.raises(AcquisitionIncomplete) as info:
                for f in rx.frames():
                    seen.append(f.sequence)
    assert seen == [1, 2]
    assert (info.value.expected, info.value.received) == (N, 2)


def test_short_stall_is_waited_out(frames):
    with serve(frames, [Fault("stall", at=3, seconds=0.3)]) as server:
        rx, got = receive_all(server, frames, timeout=5.0)
    assert sorted(got) == list(range(1, N + 1)) and rx.stats.complete


def test_stall_longer_than_timeout_ends_the_acquisition(frames):
    with serve(frames, [Fault("stall", at=3, seconds=1.5)]) as server:
        with MerlinReceiver(*server.data_address, timeout=0.3) as rx:
            got = [f.sequence for f in rx.frames()]
            assert got == [1, 2]
            assert rx.stats.ended_by == "timeout" and rx.stats.complete is False
            # the receiver keeps listening: the rest arrives, counted as late
            assert rx.next_acquisition(timeout=3.0) is None
        assert rx.stats.dropped["after_acquisition_end"] == N - 2


# -- hand-made hostile streams -------------------------------------------------------------------

class OneShotServer:
    """Accept one connection, send ``data``, then close (or keep it open)."""

    def __init__(self, data: bytes, keep_open: float = 0.0):
        self.data = data
        self.keep_open = keep_open
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(5.0)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def address(self):
        return self.listener.getsockname()[:2]

    def _run(self):
        conn, _ = self.listener.accept()
        with conn:
            conn.sendall(self.data)
            threading.Event().wait(self.keep_open)

    def close(self):
        self.thread.join(5.0)
        self.listener.close()


def make_stream(n_frames, pieces):
    enc = FrameEncoder(image_shape=(256, 256), counter_depth=6, layout="1x1")
    images = [np.full((256, 256), i % 64, np.uint8) for i in range(n_frames + 2)]
    hdr = frame_message(encode_acquisition_header(n_frames=n_frames, counter_depth=6, layout="1x1"))
    out = [hdr]
    for p in pieces:
        if isinstance(p, int):
            out.append(frame_message(enc.encode(p, images[p])))
        else:
            out.append(p)
    return b"".join(out), images


def run_stream(data, **kw):
    server = OneShotServer(data)
    try:
        with MerlinReceiver(*server.address, timeout=2.0, **kw) as rx:
            got = [(f.sequence, int(f.image[0, 0])) for f in rx.frames()]
        return rx, got
    finally:
        server.close()


def test_oversized_length_claim_is_rejected_without_allocating():
    data, _ = make_stream(3, [1, b"MPX,9999999999,MQ1,", 2, 3])
    rx, got = run_stream(data)
    assert [s for s, _ in got] == [1, 2, 3]
    err = next(e for e in rx.stats.errors if e["reason"] == "bad_framing")
    assert "more than" in err["message"] and err["offset"] is not None
    assert rx.stats.bytes_skipped == 19


def test_duplicate_and_backward_sequences_are_dropped():
    data, _ = make_stream(4, [1, 2, 2, 1, 3, 4])
    rx, got = run_stream(data)
    assert [s for s, _ in got] == [1, 2, 3, 4]
    assert rx.stats.dropped["duplicate_sequence"] == 2
    assert rx.stats.complete


def test_frame_larger_than_the_header_allows_is_skipped():
    other = FrameEncoder(image_shape=(512, 512), counter_depth=6, layout="2x2")
    odd = frame_message(other.encode(2, np.zeros((512, 512), np.uint8)))
    data, _ = make_stream(3, [1, odd, 2, 3])
    rx, got = run_stream(data)
    assert [s for s, _ in got] == [1, 2, 3]
    err = next(e for e in rx.stats.errors if e["reason"] == "bad_framing")
    assert "more than" in err["message"]
    assert rx.stats.bytes_skipped == len(odd)


def test_geometry_change_mid_acquisition_is_dropped():
    processed = FrameEncoder(image_shape=(256, 256), counter_depth=1, layout="1x1")
    raw = FrameEncoder(image_shape=(256, 256), counter_depth=1, layout="1x1", raw=True)
    one = np.ones((256, 256), np.uint8)
    data = b"".join([
        frame_message(encode_acquisition_header(n_frames=3, counter_depth=1, layout="1x1")),
        frame_message(processed.encode(1, one)),
        frame_message(raw.encode(2, one)),  # same depth, other pixel type and size
        frame_message(processed.encode(2, one)),
        frame_message(processed.encode(3, one)),
    ])
    rx, got = run_stream(data)
    assert [s for s, _ in got] == [1, 2, 3]
    assert rx.stats.dropped["geometry_change"] == 1
    assert rx.stats.bytes_skipped == 0


def test_frames_before_any_header_are_counted():
    enc = FrameEncoder(image_shape=(256, 256), counter_depth=6, layout="1x1")
    stray = frame_message(enc.encode(9, np.zeros((256, 256), np.uint8)))
    data, _ = make_stream(2, [1, 2])
    rx, got = run_stream(stray + data)
    assert [s for s, _ in got] == [1, 2]
    assert rx.stats.dropped["no_acquisition_header"] == 1


def test_new_header_ends_a_short_acquisition():
    first, _ = make_stream(5, [1, 2])
    second, _ = make_stream(2, [1, 2])
    server = OneShotServer(first + second)
    try:
        with MerlinReceiver(*server.address, timeout=2.0) as rx:
            acqs = [(a.number, [f.sequence for f in a.frames()], a.ended_by, a.complete)
                    for a in rx.acquisitions(timeout=2.0)]
    finally:
        server.close()
    assert acqs == [(1, [1, 2], "new_header", False), (2, [1, 2], "last_frame", True)]


def test_ring_full_drop_mode_counts_every_frame(frames):
    many = np.concatenate([frames] * 8)  # 64 frames, 2 slots, a slow consumer
    with serve(many, []) as server:
        with MerlinReceiver(*server.data_address, timeout=2.0, ring_slots=2, on_full="drop") as rx:
            got = []
            for f in rx.frames():
                got.append(f.sequence)
                threading.Event().wait(0.01)
        server.wait_until_idle(timeout=5.0)
    assert rx.stats.frames_received + rx.stats.dropped["ring_full"] == server.frames_sent == len(many)
    assert len(got) == rx.stats.frames_received
    assert rx.stats.dropped["ring_full"] > 0


def test_frame_bound_comes_from_the_acquisition_header():
    hdr = parse_acquisition_header(encode_acquisition_header(n_frames=1, counter_depth=1, layout="1x1"))
    assert max_frame_payload(hdr) < 256 * 256 + 8192
    quad24 = parse_acquisition_header(encode_acquisition_header(n_frames=1, counter_depth=24, layout="2x2"))
    assert max_frame_payload(quad24) >= 768 + 514 * 514 * 4


def test_fault_kinds_are_validated():
    with pytest.raises(ValueError, match="unknown fault"):
        Fault("explode", at=1)
    with pytest.raises(ValueError, match="1-based"):
        Fault("drop", at=0)


def test_prefix_helper_matches_framing():
    assert encode_mpx_prefix(4) == b"MPX,0000000005,"


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(min_size=0, max_size=300), min_size=4, max_size=4))
def test_garbage_anywhere_between_messages_is_skipped_exactly(blobs):
    blobs = [b.replace(b"MPX,", b"MPY,") for b in blobs]
    # garbage that ends in a prefix of "MPX," could glue onto the next message's magic: avoid it
    blobs = [b + b"." if b[-3:].endswith((b"M", b"MP", b"MPX")) else b for b in blobs]
    pieces = [blobs[0], 1, blobs[1], 2, blobs[2], 3, blobs[3], 4]
    data, images = make_stream(4, pieces)
    rx, got = run_stream(data)
    assert got == [(s, s % 64) for s in (1, 2, 3, 4)]
    assert rx.stats.bytes_skipped == sum(len(b) for b in blobs)
    assert rx.stats.complete


def test_sequence_numbers_past_999999_keep_decoding():
    """A 1024x1024 scan reaches frame 1,000,000: the header size moves one byte on, the frames must not be lost."""
    enc = FrameEncoder(image_shape=(256, 256), counter_depth=6, layout="1x1")
    seqs = (1_000_000, 1_000_001, 1_000_002)
    hdr = frame_message(encode_acquisition_header(n_frames=0, counter_depth=6, layout="1x1"))
    images = {s: np.full((256, 256), s % 64, np.uint8) for s in seqs}
    data = hdr + b"".join(frame_message(enc.encode(s, images[s])) for s in seqs)
    server = OneShotServer(data)
    try:
        with MerlinReceiver(*server.address, timeout=1.0) as rx:
            got = [(f.sequence, int(f.image[0, 0])) for f in rx.frames()]
    finally:
        server.close()
    assert got == [(s, s % 64) for s in seqs]
    assert rx.stats.frames_dropped == 0
    # the only records: the gap before the first frame (999,999 never sent) and the close
    assert set(rx.stats.error_counts) == {"sequence_gap", "connection_lost"}
