"""The ingest fast paths agree with the careful ones: the frame-run scanner and its Python twin,
``FrameIterator.blocks()`` and plain iteration (also on damaged streams), the wire header
template cache and a full parse, the joiner's block hand-over."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from streamclust.adapters import merlin_kernels as mk
from streamclust.adapters import wire
from streamclust.adapters.errors import WireFormatError
from streamclust.adapters.framing import frame_message
from streamclust.adapters.join import FrameBlocks, join_streams
from streamclust.adapters.merlin import FrameIterator, MerlinReceiver
from streamclust.simulators.merlin import ArraySource, Fault, MerlinServer
from streamclust.simulators.mib_encode import FrameEncoder, encode_acquisition_header

# -- scan_frames and its twin -----------------------------------------------------------------------


def _messages(n, first_seq=1, depth=1, raw=True, layout="2x2", shape=(512, 512)):
    enc = FrameEncoder(image_shape=shape, counter_depth=depth, raw=raw, layout=layout)
    image = np.zeros(shape, np.uint8 if depth <= 8 else np.uint16)
    return [frame_message(enc.encode(first_seq + i, image)) for i in range(n)]


def _geometry(msg: bytes) -> bytes:
    return b",".join(msg[15:15 + 64].split(b",", 9)[2:9])


def _both(buf: bytes, n_msgs: int, msg_size: int, prefix: bytes, geometry: bytes):
    fast, slow = np.full(n_msgs + 1, -1, np.int64), np.full(n_msgs + 1, -1, np.int64)
    got_fast = mk.scan_frames(np.frombuffer(buf, np.uint8), n_msgs, msg_size,
                              np.frombuffer(prefix, np.uint8), np.frombuffer(geometry, np.uint8), fast)
    got_slow = mk.scan_frames_python(buf, n_msgs, msg_size, prefix, geometry, slow)
    assert got_fast == got_slow, (got_fast, got_slow)
    np.testing.assert_array_equal(fast[:got_fast], slow[:got_slow])
    return got_fast, fast[:got_fast].tolist()


def test_scan_frames_reads_every_sequence_of_a_regular_run():
    msgs = _messages(5, first_seq=41)
    size = len(msgs[0])
    assert _both(b"".join(msgs), 5, size, msgs[0][:15], _geometry(msgs[0])) == (5, [41, 42, 43, 44, 45])


def test_scan_frames_stops_at_the_first_irregular_message():
    msgs = _messages(4)
    size, prefix, geometry = len(msgs[0]), msgs[0][:15], _geometry(msgs[0])
    other = _messages(1, first_seq=3, depth=6)[0]  # another pixel type: another geometry...
    other = other[:size].ljust(size, b"\0")  # ...at this message size
    cases = {
        "prefix digit": msgs[2][:9] + b"9" + msgs[2][10:],
        "magic": msgs[2][:15] + b"MQ2" + msgs[2][18:],
        "sequence digit": msgs[2][:20] + b"x" + msgs[2][21:],
        "geometry": other,
    }
    for what, bad in cases.items():
        buf = b"".join([msgs[0], msgs[1], bad, msgs[3]])
        assert _both(buf, 4, size, prefix, geometry) == (2, [1, 2]), what


def test_scan_frames_long_and_overlong_sequences():
    enc = FrameEncoder(image_shape=(256, 256), counter_depth=6, layout="1x1")
    image = np.zeros((256, 256), np.uint8)
    seven = frame_message(enc.encode(1_234_567, image))  # one digit more than usual
    prefix, geometry = seven[:15], _geometry(seven)
    assert _both(seven, 1, len(seven), prefix, geometry) == (1, [1_234_567])
    # 19 digits (beyond int64 arithmetic in the kernel): left to the careful path
    start = seven.index(b"1234567")
    long19 = seven[:start] + b"1" * 19 + seven[start + 7:]
    assert _both(long19, 1, len(long19), long19[:15], geometry) == (0, [])


def test_scan_frames_twin_agrees_on_random_damage():
    rng = np.random.default_rng(7)
    msgs = _messages(3, first_seq=99_998, depth=6, raw=False, layout="1x1", shape=(256, 256))
    size, prefix, geometry = len(msgs[0]), msgs[0][:15], _geometry(msgs[0])
    base = bytearray(b"".join(msgs))
    outcomes = set()
    for _ in range(400):
        buf = bytearray(base)
        for _ in range(rng.integers(1, 4)):
            # damage where the checks look: the first 90 bytes of a message
            at = int(rng.integers(0, 3)) * size + int(rng.integers(0, 90))
            buf[at] = int(rng.choice([44, 48, 57, 77, int(rng.integers(0, 256))]))
        outcomes.add(_both(bytes(buf), 3, size, prefix, geometry)[0])
    assert outcomes >= {0, 1, 2, 3}  # the damage reached every message and missed some


def test_scan_frames_never_reads_past_the_buffer():
    msg = _messages(1)[0]
    short = msg[:15 + 30]  # the head window reaches beyond the bytes given
    assert _both(short, 1, len(msg), msg[:15], _geometry(msg)) == (0, [])


# -- FrameIterator.blocks() ---------------------------------------------------------------------------

N = 12


@pytest.fixture
def frames():
    rng = np.random.default_rng(5)
    return rng.integers(0, 4096, (N, 256, 256)).astype(np.uint16)


def _serve(frames, faults=(), **kw):
    kw.setdefault("layout", "1x1")
    return MerlinServer(ArraySource(frames), data_port=0, control_port=0, headless=True, faults=list(faults),
                        **kw)


def _receive(server, frames, use_blocks):
    with MerlinReceiver(*server.data_address, timeout=3.0) as rx:
        it = rx.frames()
        got = []
        sizes = []
        source = it.blocks(max_frames=5) if use_blocks else ([f] for f in it)
        for block in source:
            sizes.append(len(block))
            for f in block:
                assert np.array_equal(f.image, frames[f.sequence - 1]), f"frame {f.sequence} differs"
                got.append(f.sequence)
        server.wait_until_idle(timeout=5.0)
        stats = rx.stats.as_dict()
    return got, sizes, stats


@pytest.mark.parametrize("faults", [
    [], [Fault("truncate", at=4)], [Fault("corrupt_header", at=6)], [Fault("skip", at=2)],
    [Fault("garbage", at=5, n_bytes=777)], [Fault("drop", at=9)],
], ids=["clean", "truncate", "corrupt_header", "skip", "garbage", "drop"])
def test_blocks_deliver_and_count_exactly_what_iteration_does(frames, faults):
    results = []
    for use_blocks in (False, True):
        with _serve(frames, faults) as server:
            results.append(_receive(server, frames, use_blocks))
    (seq_a, _, stats_a), (seq_b, sizes_b, stats_b) = results
    assert seq_a == seq_b
    assert all(1 <= s <= 5 for s in sizes_b)
    for key in ("frames_received", "frames_decoded", "dropped", "sequence_gaps", "error_counts",
                "expected", "received", "complete", "ended_by"):
        assert stats_a[key] == stats_b[key], key
    assert stats_b["frames_decoded"] == len(seq_b)


def test_blocks_decode_into_the_out_allocator_and_end_at_the_frame_count(frames):
    with _serve(frames) as server:
        with MerlinReceiver(*server.data_address, timeout=3.0) as rx:
            it = rx.frames()
            it.out_allocator = FrameBlocks(rows=N)
            blocks = list(it.blocks())
            assert rx.stats.complete is True and rx.stats.ended_by == "last_frame"
    images = [f.image for b in blocks for f in b]
    assert [f.sequence for b in blocks for f in b] == list(range(1, N + 1))
    block = images[0].base
    assert all(im.base is block for im in images)  # rows of the one block the allocator made
    np.testing.assert_array_equal(block, frames)


def test_blocks_cannot_be_mixed_with_iteration(frames):
    with _serve(frames) as server:
        with MerlinReceiver(*server.data_address, timeout=3.0) as rx:
            it = rx.frames()
            first = next(it)
            with pytest.raises(RuntimeError, match="only way"):
                it.blocks()
            rest = [f.sequence for f in it]
    assert [first.sequence, *rest] == list(range(1, N + 1))
    with pytest.raises(ValueError, match="max_frames"):
        FrameIterator(lambda it: iter(()), lambda it, k: iter(())).blocks(max_frames=0)


def test_blocks_time_out_like_iteration(frames):
    # a header for 5 frames, 2 frames, then silence with the connection open
    enc = FrameEncoder(image_shape=(256, 256), counter_depth=12, layout="1x1")
    data = frame_message(encode_acquisition_header(n_frames=5, counter_depth=12, layout="1x1"))
    data += b"".join(frame_message(enc.encode(s, frames[s - 1])) for s in (1, 2))
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.sendall(data)
            done.wait(5.0)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        with MerlinReceiver(*listener.getsockname()[:2], timeout=0.5) as rx:
            got = [f.sequence for b in rx.frames().blocks() for f in b]
            stats = rx.stats
    finally:
        done.set()
        th.join(5.0)
        listener.close()
    assert got == [1, 2]
    assert stats.complete is False and stats.ended_by == "timeout"


def test_join_streams_takes_frame_blocks(frames):
    from types import SimpleNamespace as NS
    spectra = [NS(position=p, counts=np.full(8, p, np.uint16)) for p in range(N)]
    with _serve(frames) as server:
        with MerlinReceiver(*server.data_address, timeout=3.0) as rx:
            it = rx.frames()
            stream = join_streams(it, spectra, N, batch_size=4, timeout_s=5.0)
            batches = list(stream)
    assert isinstance(it.out_allocator, FrameBlocks)
    positions = np.concatenate([b.positions for b in batches])
    assert sorted(positions.tolist()) == list(range(N))
    for b in batches:
        np.testing.assert_array_equal(b.frames, frames[b.positions])
        np.testing.assert_array_equal(b.spectra[:, 0], b.positions)
    assert stream.stats["joined"] == N and stream.joiner.check_invariants()


# -- the wire header template cache ----------------------------------------------------------------------

HEAD = {"stream": "eds", "scan_id": "s-1", "scan_shape": [4, 5], "live_time_s": 0.001, "real_time_s": 0.001,
        "energy_offset_kev": -0.02, "channel_width_kev": 0.01}


def _msg(seq, pos, n=8, **extra):
    head = dict(HEAD, sequence=seq, position=pos, **extra)
    parts = wire.encode_array_message(head, np.arange(n, dtype="<u2") + pos % 1000)
    return [bytes(parts[0]), bytes(parts[1])]


def _decode(parts, cached: bool, **kw):
    if not cached:
        wire._TEMPLATES.clear()
    kw.setdefault("expect_stream", "eds")
    try:
        head, array = wire.decode_array_message(parts, **kw)
        return "ok", head, array.tolist(), array.flags.writeable
    except WireFormatError as exc:
        return "error", exc.kind, exc.sequence, str(exc)


def test_template_cache_is_used_and_gives_what_a_parse_gives():
    wire._TEMPLATES.clear()
    first = _decode(_msg(1, 0), cached=True)
    assert len(wire._TEMPLATES) == 1
    for seq, pos in ((2, 1), (3, 19), (10**17, 10**17 + 5)):
        parts = _msg(seq, pos)
        assert _decode(parts, cached=True) == _decode(parts, cached=False)
        _decode(_msg(1, 0), cached=True)  # prime again
    assert first[1]["sequence"] == 1
    a = wire.decode_array_message(_msg(5, 4), expect_stream="eds")[0]
    b = wire.decode_array_message(_msg(6, 4), expect_stream="eds")[0]
    a["scan_shape"].append(99)  # each header owns its lists: the cache is not shared out
    assert b["scan_shape"] == [4, 5] and wire.decode_array_message(_msg(7, 4), expect_stream="eds")[0][
        "scan_shape"] == [4, 5]


@pytest.mark.parametrize("parts", [
    _msg(0, 3),  # sequence 0 after a valid template
    [_msg(2, 3)[0], bytes(14)],  # buffer one element short
    [_msg(2, 3)[0].replace(b'"live_time_s":0.001', b'"live_time_s":NaN'), _msg(2, 3)[1]],
    [_msg(2, 3)[0].replace(b'"position":3', b'"position":3,"position":4'), _msg(2, 3)[1]],
    [_msg(2, 3)[0].replace(b'"position":3', b'"position":03'), _msg(2, 3)[1]],
    [_msg(2, 3)[0].replace(b'"sequence":2', b'"sequence":-2'), _msg(2, 3)[1]],
    _msg(2, 3, n=9),
], ids=["seq0", "short", "nan", "dup-key", "leading-zero", "negative", "other-shape"])
def test_template_cache_never_accepts_what_a_parse_rejects(parts):
    primed = _msg(1, 0)
    wire._TEMPLATES.clear()
    _decode(primed, cached=True)
    assert _decode(parts, cached=True) == _decode(parts, cached=False)
    _decode(primed, cached=True)
    assert _decode(parts, cached=True, max_bytes=4) == _decode(parts, cached=False, max_bytes=4)


def test_template_cache_keeps_streams_apart_and_stays_bounded():
    wire._TEMPLATES.clear()
    parts = _msg(1, 0)
    assert _decode(parts, cached=True)[0] == "ok"
    # the same bytes where only frames (or end markers) are expected: still a wrong stream
    assert _decode(parts, cached=True, expect_stream="frame")[:2] == ("error", "wrong_stream")
    for i in range(wire._MAX_TEMPLATES + 5):
        _decode(_msg(1, 0, note=f"scan {i}"), cached=True)
    assert len(wire._TEMPLATES) <= wire._MAX_TEMPLATES
