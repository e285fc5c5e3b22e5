"""FrameBridge fan-out and ZmqFrameSource, over real ZeroMQ sockets."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace as NS

import numpy as np
import pytest
import zmq

from conftest import kernel_tcp_buffer_bytes
from streamclust.adapters.join import join_streams
from streamclust.adapters.wire import encode_array_message
from streamclust.adapters.zmq_frames import FrameBridge, ZmqFrame, ZmqFrameSource

EP = "tcp://127.0.0.1:0"


def merlin_frames(n, shape=(32, 32)):
    """What MerlinReceiver yields: 1-based sequence and an image (here: the sequence in every pixel)."""
    for seq in range(1, n + 1):
        yield NS(sequence=seq, image=np.full(shape, seq, dtype=np.uint16))


def collect(source: ZmqFrameSource, out: list, timeout=10.0):
    for f in source.frames(timeout=timeout):
        assert (f.image == f.sequence).all()  # each frame carries its own pixels
        out.append(f)


def test_shared_push_is_lossless_across_two_consumers():
    n = 400
    bridge = FrameBridge(merlin_frames(n), push=EP, push_hwm=4, n_consumers=2).start()
    endpoint = bridge.wait_for_listen()["push"][0]
    sources = [ZmqFrameSource(endpoint, hwm=4) for _ in range(2)]
    got = [[], []]
    threads = [threading.Thread(target=collect, args=(s, g)) for s, g in zip(sources, got)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    bridge.join(10)
    for s in sources:
        s.close()
    seqs = [f.sequence for g in got for f in g]
    assert sorted(seqs) == list(range(1, n + 1))  # union == all, no duplicates
    assert all(f.position == f.sequence - 1 for g in got for f in g)
    stats = bridge.stats
    assert stats["frames_in"] == stats["push_sent"] == n
    assert stats["end_markers_sent"] == 2 and stats["pub_dropped"] == 0


def test_one_push_per_consumer_gives_every_consumer_every_frame():
    n = 100
    bridge = FrameBridge(merlin_frames(n), push_each=[EP, EP]).start()
    endpoints = bridge.wait_for_listen()["push"]
    assert len(endpoints) == 2 and endpoints[0] != endpoints[1]
    got = [[], []]
    sources = [ZmqFrameSource(e) for e in endpoints]
    threads = [threading.Thread(target=collect, args=(s, g)) for s, g in zip(sources, got)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    bridge.join(10)
    for s in sources:
        assert s.end_header["totals"]["frames_in"] == n
        s.close()
    for g in got:
        assert [f.sequence for f in g] == list(range(1, n + 1))
    assert bridge.stats["push_sent"] == 2 * n


def test_pub_drops_for_a_slow_subscriber_are_counted(subscription_probe):
    """The viewer's subscription is confirmed by probe frames (no sleep), then it reads nothing until
    the bridge is done, and the frames are twice what the kernel's socket buffers hold: loss forced."""
    n = 300
    side = int(np.ceil(np.sqrt(2 * kernel_tcp_buffer_bytes() / (n * 2))))
    probe = subscription_probe
    bridge = FrameBridge(probe.frames(lambda: merlin_frames(n, shape=(side, side))), pub=EP, pub_hwm=2).start()
    endpoint = bridge.wait_for_listen()["pub"]
    viewer = ZmqFrameSource(endpoint, "sub", hwm=2)
    for f in viewer.frames(timeout=10):
        if probe.is_probe(f):
            break
    bridge.join(60)  # the viewer reads nothing until the bridge is done: it is as slow as can be
    got = []
    for f in viewer.frames(timeout=2):
        if not probe.is_probe(f):
            assert (f.image == f.sequence % 65536).all()
            got.append(f)
    viewer.close()
    stats = bridge.stats
    assert probe.seen >= 1
    assert stats["pub_dropped"] > 0
    assert stats["pub_sent"] + stats["pub_dropped"] == stats["frames_in"] == n + probe.sent
    seqs = [f.sequence for f in got]
    assert seqs == sorted(set(seqs))  # in order, no duplicates
    assert 0 < len(seqs) <= stats["pub_sent"] - probe.sent


def test_push_waits_for_a_consumer_and_counts_the_time_blocked():
    frames = list(merlin_frames(5))
    bridge = FrameBridge(frames, push=EP, push_hwm=1).start()
    endpoint = bridge.wait_for_listen()["push"][0]
    deadline = time.monotonic() + 10
    while bridge.stats.get("push_blocked", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # until the first frame, with nobody connected, waits at the socket (not dropped)
    got = []
    with ZmqFrameSource(endpoint) as source:
        collect(source, got)
    bridge.join(10)
    assert [f.sequence for f in got] == [1, 2, 3, 4, 5]
    assert bridge.stats["push_blocked"] >= 1 and bridge.stats["push_blocked_s"] > 0


def test_stop_interrupts_a_bridge_blocked_without_consumers():
    bridge = FrameBridge(merlin_frames(10), push=EP).start()
    bridge.wait_for_listen()
    deadline = time.monotonic() + 10
    while bridge.stats["push_blocked"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # until the first frame waits at the socket
    bridge.stop(timeout=5)
    assert bridge.stats["push_sent"] == 0 and bridge.stats["frames_in"] == 1


def test_custom_position_mapping_for_repeated_acquisitions():
    bridge = FrameBridge(merlin_frames(6), push=EP, position_of=lambda f: (f.sequence - 1) % 3).start()
    got = []
    with ZmqFrameSource(bridge.wait_for_listen()["push"][0]) as source:
        collect(source, got)
    bridge.join(10)
    assert [(f.sequence, f.position) for f in got] == [(1, 0), (2, 1), (3, 2), (4, 0), (5, 1), (6, 2)]


def test_source_counts_malformed_messages_and_keeps_going():
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    port = push.bind_to_random_port("tcp://127.0.0.1")
    good = {"stream": "frame", "scan_id": "x", "position": 4, "sequence": 1, "merlin_sequence": 5}
    try:
        with ZmqFrameSource(f"tcp://127.0.0.1:{port}", max_bytes=4096) as source:
            push.send_multipart([b"a", b"b", b"c"])
            push.send_multipart(encode_array_message(dict(good, merlin_sequence=0), np.zeros((2, 2), np.uint8)))
            push.send_multipart(encode_array_message(good, np.zeros(4, np.uint8)))  # 1-D image
            push.send_multipart(encode_array_message(good, np.zeros((64, 64), np.uint16)))  # > max_bytes
            hdr = dict(good, version=1, dtype="<u2", shape=[2, 2])
            push.send_multipart([json.dumps(hdr).encode(), b"\0" * 7])
            push.send_multipart(encode_array_message(good, np.full((2, 2), 9, np.uint8)))
            push.send_multipart(encode_array_message(
                {"stream": "end", "of_stream": "frame", "scan_id": "x", "sequence": 2, "totals": {}},
                np.zeros(0, np.uint8)))
            got = list(source.frames(timeout=10))
            stats = source.stats
    finally:
        push.close(linger=0)
    assert len(got) == 1 and isinstance(got[0], ZmqFrame)
    assert (got[0].sequence, got[0].position, got[0].image.tolist()) == (5, 4, [[9, 9], [9, 9]])
    assert stats["malformed"] == 5 and stats["ends"] == 1
    assert stats["malformed_by_kind"] == {"part_count": 1, "bad_value": 1, "bad_shape": 1, "too_large": 1,
                                          "size_mismatch": 1}


def test_bridge_output_joins_with_spectra():
    n = 60
    bridge = FrameBridge(merlin_frames(n, shape=(8, 8)), push=EP).start()
    spectra = [NS(position=p, counts=np.full(16, p, np.uint32)) for p in reversed(range(n))]
    with ZmqFrameSource(bridge.wait_for_listen()["push"][0]) as source:
        stream = join_streams(source.frames(timeout=10), spectra, n, batch_size=16)
        batches = list(stream)
    bridge.join(10)
    positions = np.concatenate([b.positions for b in batches])
    assert sorted(positions.tolist()) == list(range(n))
    for b in batches:
        np.testing.assert_array_equal(b.frames[:, 0, 0], b.positions + 1)
        np.testing.assert_array_equal(b.spectra[:, 0], b.positions)
    stream.joiner.check_invariants()


def test_bridge_requires_an_output():
    with pytest.raises(ValueError, match="push"):
        FrameBridge([], push=None)
