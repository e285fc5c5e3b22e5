"""EDS publisher -> SpectrumReceiver -> ScanJoiner over real ZeroMQ sockets; EDS recordings."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace as NS

import h5py
import numpy as np
import pytest
import zmq

from conftest import kernel_tcp_buffer_bytes
from streamclust.adapters.eds import Spectrum, SpectrumReceiver
from streamclust.adapters.eds_file import EDSRecordingError, read_eds_recording
from streamclust.adapters.join import ScanJoiner, join_streams
from streamclust.adapters.wire import encode_array_message
from streamclust.simulators.clock import ScanClock
from streamclust.simulators.eds import ArraySpectrumSource, EDSPublisher
from streamclust.simulators.eds_recording import write_eds_recording

NY, NX, C = 12, 25, 64
N = NY * NX


@pytest.fixture
def source():
    rng = np.random.default_rng(7)
    spectra = rng.poisson(3.0, size=(N, C)).astype(np.uint16)
    spectra[:, 0] = np.arange(N)  # channel 0 carries the position: every delivery is checkable
    return ArraySpectrumSource(spectra, scan_shape=(NY, NX), energy_offset_kev=-0.2, channel_width_kev=0.01)


def wait_subscribed(pub, rx, attempts: int = 50) -> int:
    """Publish empty probe scans (an end marker alone) until the SUB receives one: its subscription
    has then reached the PUB (ZeroMQ's "slow joiner"), shown rather than assumed after a sleep.
    Returns the probes sent.

    A probe carries no spectrum, so it draws none of the publisher's random faults and meets no
    high-water mark; once one has arrived nothing of the probes is still in flight. The 2 s wait for
    each is a liveness guard (a subscribed SUB gets it in milliseconds).
    """
    for attempt in range(1, attempts + 1):
        ends = rx.stats["ends"]
        pub.publish_scan(0, timeout=10)
        assert list(rx.spectra(timeout=2.0)) == []
        if rx.stats["ends"] > ends:
            return attempt
    raise AssertionError(f"no probe reached the SUB in {attempts} attempts: subscription never arrived")


def publish_and_collect(source, *, receiver_kwargs=None, **publisher_kwargs):
    with EDSPublisher(source, **publisher_kwargs) as pub:
        with SpectrumReceiver(pub.endpoint, **(receiver_kwargs or {})) as rx:
            totals = pub.publish_scan(timeout=30)
            got = list(rx.spectra(timeout=10))
            return totals, got, rx.stats, rx.end_report()


def test_clean_scan_arrives_complete_with_its_energy_axis(source):
    totals, got, stats, report = publish_and_collect(source, random_state=0)
    assert [s.position for s in got] == list(range(N))
    for s in got:
        assert isinstance(s, Spectrum)
        np.testing.assert_array_equal(s.counts, source.spectra[s.position])
    h = got[0].header
    assert h["scan_shape"] == [NY, NX] and h["energy_offset_kev"] == -0.2 and h["channel_width_kev"] == 0.01
    assert [s.header["sequence"] for s in got] == list(range(1, N + 1))
    assert totals["sent"] == N and stats["received"] == N and stats["malformed"] == 0
    assert report["end_received"] and report["lost_in_transport"] == 0 and report["missing_positions"] == 0


def test_faults_are_accounted_exactly_through_receiver_and_joiner(source):
    totals, got, stats, report = publish_and_collect(
        source, random_state=123, drop=0.1, duplicate=0.1, reorder=0.2, jitter_s=0.0002)
    assert totals["dropped"] > 0 and totals["duplicated"] > 0 and totals["reordered"] > 0
    assert totals["sent"] == totals["n_positions"] - totals["dropped"] + totals["duplicated"] == len(got)
    assert stats["received"] == totals["sent"] and stats["duplicates"] == totals["duplicated"]
    assert report["missing_positions"] == totals["dropped"] and report["lost_in_transport"] == 0
    positions = [s.position for s in got]
    assert positions != sorted(positions)  # reordering is visible on the wire
    for s in got:
        assert s.counts[0] == s.position

    joiner = ScanJoiner(N, batch_size=32, on_missing="drop")
    rng = np.random.default_rng(0)
    for p in rng.permutation(N):  # every frame, in some other order, interleaved with the spectra
        joiner.add_frame(int(p), np.full((2, 2), p, np.uint16))
    for s in got:
        joiner.add_spectrum(s.position, s.counts)
    batches = joiner.poll() + joiner.flush()
    js = joiner.stats
    assert js["joined"] == N - totals["dropped"] == sum(len(b) for b in batches)
    assert js["duplicate_spectra"] == totals["duplicated"]
    assert js["frames_without_spectrum"] == totals["dropped"]
    assert js["spectra_without_frame"] == 0
    joiner.check_invariants()
    for b in batches:
        np.testing.assert_array_equal(b.spectra[:, 0], b.positions)
        np.testing.assert_array_equal(b.frames[:, 0, 0], b.positions)


def test_same_seed_same_faults(source):
    runs = [publish_and_collect(source, random_state=5, drop=0.2, duplicate=0.2, reorder=0.3, scan_id="a")
            for _ in range(2)]
    assert runs[0][0] == runs[1][0]
    assert [s.position for s in runs[0][1]] == [s.position for s in runs[1][1]]


def test_publisher_follows_the_scan_clock_and_stops_on_abort(source):
    clock = ScanClock()
    with EDSPublisher(source, clock=clock, scan_id="scan") as pub:
        with SpectrumReceiver(pub.endpoint) as rx:
            clock.arm(n_positions=20, dwell_s=0.0)
            clock.trigger()
            got = list(rx.spectra(timeout=10))
            assert [s.position for s in got] == list(range(20))
            assert rx.end_header["scan_id"] == "scan-1" and rx.end_header["totals"]["n_positions"] == 20
            # a slow second run, aborted after a few positions
            clock.arm(n_positions=N, dwell_s=0.01)
            clock.trigger()
            first = next(iter(rx.spectra(timeout=10)))
            clock.abort()
            rest = list(rx.spectra(timeout=10))
            assert first.header["scan_id"] == "scan-2"
            assert rx.end_header["totals"]["aborted"] is True
            assert 1 + len(rest) == rx.end_header["totals"]["sent"] < N


def test_full_buffer_drops_are_counted_and_the_end_marker_survives(source):
    with EDSPublisher(source, random_state=0) as pub:
        with SpectrumReceiver(pub.endpoint, max_buffer=5, on_full="drop") as rx:
            pub.publish_scan(timeout=30)
            deadline = time.monotonic() + 10
            while rx.stats["ends"] == 0 and time.monotonic() < deadline:  # let the thread fill up
                time.sleep(0.01)
            got = list(rx.spectra(timeout=5))
            stats = rx.stats
    assert len(got) == 5
    assert stats["dropped_full"] == N - 5 and stats["received"] == N and stats["delivered"] == 5


def test_pub_sub_delivers_to_a_subscribed_receiver(source):
    with EDSPublisher(source, socket_type="pub", random_state=0) as pub:
        with SpectrumReceiver(pub.endpoint, socket_type="sub") as rx:
            wait_subscribed(pub, rx)
            totals = pub.publish_scan(timeout=30)
            got = list(rx.spectra(timeout=10))
    assert totals["hwm_dropped"] == 0
    assert [s.position for s in got] == list(range(N))


def test_pub_counts_messages_not_published_at_a_slow_subscribers_hwm():
    # The loss is forced: the scan is twice what the kernel's socket buffers can hold, and nothing is
    # read until it has all been offered (with small spectra the kernel could absorb the whole scan)
    channels = -(-2 * kernel_tcp_buffer_bytes() // (N * 2))
    rng = np.random.default_rng(11)
    spectra = rng.integers(0, 50, size=(N, channels), dtype=np.uint16)
    source = ArraySpectrumSource(spectra, scan_shape=(NY, NX))
    with EDSPublisher(source, socket_type="pub", hwm=1, random_state=1, duplicate=0.1) as pub:
        with SpectrumReceiver(pub.endpoint, socket_type="sub", hwm=1, max_buffer=1, on_full="block") as rx:
            probes = wait_subscribed(pub, rx)
            pub.publish_scan(wait=False)
            deadline = time.monotonic() + 20
            while len(pub.scans) == probes and time.monotonic() < deadline:
                time.sleep(0.01)  # nothing is read meanwhile: the subscriber is as slow as can be
            got = list(rx.spectra(timeout=5))
    assert len(pub.scans) == probes + 1
    scan = pub.scans[-1]
    assert scan["hwm_dropped"] > 0
    assert scan["sent"] + scan["hwm_dropped"] == N + scan["duplicated"]
    assert 0 < len(got) <= scan["sent"]


def test_malformed_messages_are_counted_by_kind_and_the_receiver_keeps_running():
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    port = push.bind_to_random_port("tcp://127.0.0.1")
    good = {"stream": "eds", "scan_id": "m", "position": 1, "sequence": 3, "live_time_s": 0.1,
            "real_time_s": 0.1, "energy_offset_kev": 0.0, "channel_width_kev": 0.01, "scan_shape": [2, 2]}
    try:
        with SpectrumReceiver(f"tcp://127.0.0.1:{port}", max_bytes=1024) as rx:
            push.send_multipart([b"only one part"])
            push.send_multipart([b"{oops", b""])
            bad = dict(good, version=1, dtype="<u2", shape=[4])
            del bad["live_time_s"]
            push.send_multipart([json.dumps(bad).encode(), np.zeros(4, "<u2").tobytes()])
            push.send_multipart(encode_array_message(dict(good, scan_shape=[0]), np.zeros(4, np.uint16)))
            push.send_multipart(encode_array_message(good, np.zeros(2000, np.uint16)))  # > max_bytes
            push.send_multipart(encode_array_message(good, np.zeros((2, 2), np.uint16)))  # not 1-D
            hdr = dict(good, version=1, dtype="<u2", shape=[8])
            push.send_multipart([json.dumps(hdr).encode(), b"\0" * 4])  # size mismatch
            push.send_multipart(encode_array_message(dict(good, stream="frame", merlin_sequence=1),
                                                     np.zeros(4, np.uint16)))
            push.send_multipart(encode_array_message(good, np.arange(4, dtype=np.uint16)))
            push.send_multipart(encode_array_message(
                {"stream": "end", "of_stream": "eds", "scan_id": "m", "sequence": 4, "totals": {"sent": 1}},
                np.zeros(0, np.uint8)))
            got = list(rx.spectra(timeout=10))
            stats = rx.stats
    finally:
        push.close(linger=0)
    assert [s.position for s in got] == [1] and got[0].counts.tolist() == [0, 1, 2, 3]
    assert stats["malformed"] == 8
    assert stats["malformed_by_kind"] == {"part_count": 1, "bad_json": 1, "missing_key": 1, "bad_value": 1,
                                          "too_large": 1, "bad_shape": 1, "size_mismatch": 1,
                                          "wrong_stream": 1}


# -- recordings ------------------------------------------------------------------------------------
def test_recording_round_trip(tmp_path, source):
    path = tmp_path / "eds.h5"
    report = write_eds_recording(path, source.spectra, scan_shape=(NY, NX), energy_offset_kev=-0.2,
                                 channel_width_kev=0.01, live_time_s=0.05, attrs={"sample": "lamella"})
    assert report == {"written": N, "missing": 0, "duplicates": 0, "out_of_range": 0}
    rec = read_eds_recording(path)
    np.testing.assert_array_equal(rec.spectra, source.spectra.reshape(NY, NX, C))
    np.testing.assert_array_equal(rec.flat_spectra, source.spectra)
    np.testing.assert_allclose(rec.energy_axis_kev, -0.2 + 0.01 * np.arange(C))
    assert rec.scan_shape == (NY, NX) and rec.acquired.all()
    assert rec.attrs["live_time_s"] == 0.05 and rec.attrs["eds.sample"] == "lamella"
    with h5py.File(path) as f:
        assert f["eds/spectra"].chunks == (1, NX, C) and f["eds/spectra"].dtype == np.uint16


def test_recording_from_a_live_stream_with_gaps_and_duplicates(tmp_path, source):
    _, got, _, _ = publish_and_collect(source, random_state=3, drop=0.1, duplicate=0.1, reorder=0.3)
    path = tmp_path / "live.h5"
    report = write_eds_recording(path, iter(got), scan_shape=(NY, NX), energy_offset_kev=-0.2,
                                 channel_width_kev=0.01, live_time_s=0.05)
    rec = read_eds_recording(path)
    seen = sorted({s.position for s in got})
    assert report["written"] == len(seen) and report["duplicates"] == len(got) - len(seen)
    assert report["missing"] == N - len(seen)
    np.testing.assert_array_equal(np.flatnonzero(rec.acquired.ravel()), seen)
    np.testing.assert_array_equal(rec.flat_spectra[seen], source.spectra[seen])
    assert not rec.flat_spectra[~rec.acquired.ravel()].any()


def test_recording_rejects_counts_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="position 1"):
        write_eds_recording(tmp_path / "x.h5", np.array([[1, 2], [70000, 0]]), scan_shape=(2,),
                            energy_offset_kev=0, channel_width_kev=0.01, live_time_s=1)


@pytest.mark.parametrize("damage, message", [
    (lambda f: f["eds"].attrs.__setitem__("format", "other"), "format"),
    (lambda f: f["eds"].attrs.__setitem__("version", 9), "version"),
    (lambda f: f["eds/spectra"].attrs.__delitem__("channel_width_kev"), "channel_width_kev"),
    (lambda f: f["eds/spectra"].attrs.__setitem__("scan_shape", [5, 5]), "scan_shape"),
    (lambda f: (f["eds"].__delitem__("acquired"), f["eds"].create_dataset("acquired", data=np.ones(3, bool))),
     "acquired"),
    (lambda f: f.__delitem__("eds"), "no /eds group"),
])
def test_reader_names_what_is_wrong(tmp_path, damage, message):
    path = tmp_path / "eds.h5"
    write_eds_recording(path, np.ones((4, 3), np.uint16), scan_shape=(2, 2), energy_offset_kev=0,
                        channel_width_kev=0.01, live_time_s=1)
    with h5py.File(path, "a") as f:
        damage(f)
    with pytest.raises(EDSRecordingError, match=message) as info:
        read_eds_recording(path)
    assert str(path) in str(info.value) and info.value.reason == "bad_eds_recording"


def test_reader_rejects_a_file_that_is_not_hdf5(tmp_path):
    path = tmp_path / "junk.h5"
    path.write_bytes(b"MPX,0000000384,HDR," + bytes(100))
    with pytest.raises(EDSRecordingError, match="not an HDF5"):
        read_eds_recording(path)


# -- block hand-off (SpectrumStream.blocks) and the bounded buffer ----------------------------
def test_blocks_yield_every_spectrum_in_order_and_stop_at_the_end_marker(source):
    with EDSPublisher(source, random_state=0) as pub:
        with SpectrumReceiver(pub.endpoint) as rx:
            pub.publish_scan(timeout=30)
            pub.publish_scan(timeout=30)  # a second scan queued behind the first's end marker
            deadline = time.monotonic() + 10
            while rx.stats["ends"] < 2 and time.monotonic() < deadline:
                time.sleep(0.01)  # both scans buffered: blocks are as large as they get
            blocks = list(rx.spectra(timeout=10).blocks(max_block=100))
            second = list(rx.spectra(timeout=10))
            stats = rx.stats
    assert all(0 < len(b) <= 100 for b in blocks) and len(blocks) >= N // 100
    got = [s for b in blocks for s in b]
    assert [s.position for s in got] == list(range(N)) == [s.position for s in second]
    # the second scan's spectra came after the first's end marker, and only from the next stream
    assert max(s.header["sequence"] for s in got) < min(s.header["sequence"] for s in second)
    for s in got + second:
        np.testing.assert_array_equal(s.counts, source.spectra[s.position])
    assert stats["delivered"] == 2 * N and stats["buffered"] == 0


def test_next_and_blocks_can_be_mixed_without_losing_a_spectrum(source):
    with EDSPublisher(source, random_state=0) as pub:
        with SpectrumReceiver(pub.endpoint) as rx:
            pub.publish_scan(timeout=30)
            deadline = time.monotonic() + 10
            while rx.stats["ends"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)  # the whole scan received: the first block is then a full one
            stream = rx.spectra(timeout=10)
            head = [next(stream) for _ in range(7)]
            middle = next(iter(stream.blocks(max_block=50)))
            tail = list(stream)
            assert list(stream.blocks()) == []  # ended: the end marker was consumed
    positions = [s.position for s in head + middle + tail]
    assert positions == list(range(N)) and len(middle) == 50


def test_a_blocking_receiver_never_holds_more_than_max_buffer(source):
    with EDSPublisher(source, random_state=0) as pub:
        with SpectrumReceiver(pub.endpoint, max_buffer=20) as rx:
            pub.publish_scan(wait=False)
            stream = rx.spectra(timeout=10)
            seen_buffered, got = [], []
            for block in stream.blocks(max_block=7):
                seen_buffered.append(rx.stats["buffered"])
                got.extend(block)
                time.sleep(0.002)  # a slow consumer: the thread must wait, not overfill
    assert [s.position for s in got] == list(range(N))
    assert max(seen_buffered) <= 20 and rx.stats["dropped_full"] == 0


def test_spectra_above_the_copy_threshold_arrive_intact():
    # 8,192 float64 channels = 64 KiB: from the second message on they are received zero-copy
    rng = np.random.default_rng(3)
    spectra = rng.random((40, 8192))
    src = ArraySpectrumSource(spectra, scan_shape=(40,))
    with EDSPublisher(src, random_state=0) as pub:
        with SpectrumReceiver(pub.endpoint) as rx:
            pub.publish_scan(timeout=30)
            got = list(rx.spectra(timeout=10))
            assert rx._copy is False
    assert [s.position for s in got] == list(range(40))
    for s in got:
        assert s.counts.dtype == np.float64 and not s.counts.flags.writeable
        np.testing.assert_array_equal(s.counts, spectra[s.position])


def test_join_streams_over_a_live_receiver_accounts_for_every_spectrum(source):
    # the receiver's stream goes to the joiner in blocks; faults must still be counted exactly
    frames = [NS(position=p, image=np.full((2, 2), p, np.uint16)) for p in range(N)]
    with EDSPublisher(source, random_state=5, drop=0.05, duplicate=0.05, reorder=0.1) as pub:
        with SpectrumReceiver(pub.endpoint) as rx:
            totals = pub.publish_scan(timeout=30)
            stream = join_streams(iter(frames), rx.spectra(timeout=10), N, batch_size=32)
            batches = list(stream)
    s = stream.stats
    assert s["spectra_in"] == totals["sent"] == rx.stats["delivered"]
    assert s["joined"] == N - totals["dropped"] and s["duplicate_spectra"] == totals["duplicated"]
    for b in batches:
        for i in np.flatnonzero(b.has_spectrum):
            assert b.spectra[i, 0] == b.positions[i] == b.frames[i, 0, 0]
    stream.joiner.check_invariants()
