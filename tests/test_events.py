"""The event stream over real ZeroMQ sockets: schema, PUB and PUSH, malformed messages counted."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import zmq

from streamclust.adapters.errors import WireFormatError
from streamclust.adapters.wire import encode_array_message
from streamclust.flags.events import EVENT_VERSION, EventPublisher, EventSubscriber, event_header, validate_event
from streamclust.flags.flagger import SecondPhaseFlagger

DOC = Path(__file__).resolve().parents[1] / "docs" / "events.md"


def synthetic_events(kind_sequence=("raise", "retract")):
    """Flag events from the flagger on a small synthetic scan: raised, then retracted."""
    ny, nx = 24, 24
    rng = np.random.default_rng(0)
    inc = np.zeros((ny, nx), bool)
    inc[8:13, 8:13] = True
    u = np.where(inc.ravel()[:, None], [0.1, 0.9], [0.9, 0.1])
    cbed = rng.normal(0, 1, (ny * nx, 8))
    cbed[inc.ravel(), 0] += 4
    eds = rng.normal(0, 1, (ny * nx, 8))
    eds[inc.ravel(), 1] += 4
    flagger = SecondPhaseFlagger(min_positions=5, raise_after=1)  # one update raises
    events = flagger.update(u, (ny, nx), cbed, eds, signals={1: {"fe_co_ratio": 1.9, "fe_ka_net": float("nan")}})
    merged = np.column_stack([np.ones(ny * nx), np.zeros(ny * nx)])
    events += flagger.update(merged, (ny, nx), cbed, eds)
    return events


@pytest.fixture
def push_pair():
    pub = EventPublisher(socket_type="push", scan_id="scan-7")
    sub = EventSubscriber(pub.endpoint, socket_type="pull")
    yield pub, sub
    sub.close()
    pub.close()


def test_push_pull_events_match_the_flags(push_pair):
    pub, sub = push_pair
    events = synthetic_events()
    assert [ev.kind for ev in events] == ["raised", "retracted"]
    assert pub.publish_all(events) == 2
    got = [sub.recv(timeout_s=5.0) for _ in events]
    for ev, msg in zip(events, got):
        assert validate_event(msg) is msg
        assert msg["stream"] == "event" and msg["version"] == 1 and msg["event_version"] == EVENT_VERSION
        assert msg["scan_id"] == "scan-7"
        assert msg["event"] == ev.kind and msg["flag_id"] == ev.flag_id and msg["cluster"] == ev.cluster
        assert msg["bbox"] == list(ev.bbox) == [8, 8, 13, 13]
        assert msg["positions"] == ev.positions.tolist() and len(msg["positions"]) == 25
        assert msg["score"] == pytest.approx(ev.score)
        assert msg["distinctness"] == {"cbed": pytest.approx(ev.distance_cbed), "eds": pytest.approx(ev.distance_eds)}
        assert msg["dtype"] == "|u1" and msg["shape"] == [0]
    assert [m["sequence"] for m in got] == [1, 2]
    assert got[0]["signals"] == {"fe_co_ratio": 1.9, "fe_ka_net": None}  # NaN travels as null
    assert got[1]["reason"] == "cluster_gone"
    assert sub.recv(timeout_s=0.05) is None
    assert pub.end()
    end = sub.recv(timeout_s=5.0)
    assert end["stream"] == "end" and end["of_stream"] == "event" and end["totals"]["sent"] == 2


def test_pub_sub_reaches_a_subscribed_viewer():
    (ev, _) = synthetic_events()
    with EventPublisher(socket_type="pub") as pub, EventSubscriber(pub.endpoint) as sub:
        # a subscriber misses what was sent before its subscription arrived: keep publishing
        msg = None
        for _ in range(200):
            pub.publish(ev)
            msg = sub.recv(timeout_s=0.05)
            if msg is not None:
                break
        assert msg is not None and validate_event(msg)["flag_id"] == ev.flag_id
        assert pub.stats["hwm_dropped"] == 0


def test_long_position_lists_are_truncated():
    (ev, _) = synthetic_events()
    head = event_header(ev, scan_id=1, sequence=1, max_positions=10)
    assert head["positions"] is None and head["positions_truncated"] is True
    validate_event(dict(head, version=1, dtype="|u1", shape=[0]))


def test_oversized_event_is_truncated_not_lost(push_pair):
    pub, sub = push_pair
    (ev, _) = synthetic_events()
    many = [(i % 190, (i // 190) * 2, i % 190 + 1, (i // 190) * 2 + 1) for i in range(6000)]
    big = dataclasses.replace(ev, components=tuple(many), positions=np.arange(20000),
                              scan_shape=(200, 200))
    assert pub.publish(big)
    msg = sub.recv(timeout_s=5.0)
    assert msg["components_truncated"] and msg["positions_truncated"] and msg["positions"] is None
    assert len(msg["components"]) == 512 and msg["bbox"] == list(ev.bbox)


def test_malformed_messages_are_counted_and_skipped():
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.bind("tcp://127.0.0.1:0")
    try:
        with EventSubscriber(push.getsockopt_string(zmq.LAST_ENDPOINT), socket_type="pull") as sub:
            (ev, _) = synthetic_events()
            good = event_header(ev, scan_id="s", sequence=5)
            empty = np.zeros(0, np.uint8)
            push.send_multipart([b"only one part"])
            push.send_multipart([b"{not json", b""])
            missing = dict(good)
            del missing["bbox"]
            push.send_multipart(encode_array_message(missing, empty))
            push.send_multipart(encode_array_message(dict(good, event_version=99), empty))
            push.send_multipart(encode_array_message(dict(good, bbox=[0, 0, 99, 99]), empty))
            push.send_multipart(encode_array_message(dict(good, stream="eds"), empty))
            push.send_multipart(encode_array_message(good, empty))
            msg = sub.recv(timeout_s=5.0)
            assert msg is not None and msg["sequence"] == 5
            assert sub.stats["malformed"] == 6
            assert dict(sub.stats["malformed_by_kind"]) == {
                "part_count": 1, "bad_json": 1, "bad_event": 3, "wrong_stream": 1}
    finally:
        push.close(linger=0)


def test_documented_example_matches_the_schema():
    text = DOC.read_text()
    blocks = re.findall(r"```json\n(.*?)\n```", text, flags=re.S)
    assert blocks, "docs/events.md has no json example"
    example = json.loads(blocks[0])
    validate_event(example)
    # and the documented keys are exactly those the publisher writes
    (ev, _) = synthetic_events()
    head = event_header(ev, scan_id="x", sequence=1)
    assert set(example) == set(head) | {"version", "dtype", "shape"}
    with pytest.raises(WireFormatError, match="score"):
        validate_event(dict(example, score="high"))


def test_push_without_receiver_times_out_and_counts():
    (ev, _) = synthetic_events()
    with EventPublisher(socket_type="push", send_timeout_s=0.05, hwm=1) as pub:
        # no peer connected: a PUSH socket has nowhere to queue, the send waits then gives up
        assert pub.publish(ev) is False
        assert pub.stats["push_timeouts"] == 1 and pub.stats["sent"] == 0
