"""Closing the loop: flag -> event -> follow-up request -> a better spectrum of the inclusion."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import zmq

from streamclust.adapters.wire import decode_array_message
from streamclust.engine.centres import ThresholdedCentres, centre_signals, fe_co_lines
from streamclust.flags.events import EventPublisher
from streamclust.flags.flagger import FLAG_EDS_REBIN, SecondPhaseFlagger, eds_window
from streamclust.flags.followup import FollowUpClient, FollowUpConsumer, FollowUpError
from streamclust.simulators.followup import FollowUpServer

logger = logging.getLogger(__name__)

SCAN = (64, 64)
LIVE_DWELL = 0.01
FOLLOW_DWELL = 0.1


@pytest.fixture(scope="module")
def phantom(make_phantom):
    # 128 x 128 frames (+-9.6 mrad) still hold the 111 and satellite discs; they keep this fast
    return make_phantom(scan_shape=SCAN, seed=0, frame_shape=(128, 128), dwell_s=LIVE_DWELL)


@pytest.fixture(scope="module")
def live_scan(phantom):
    """The live scan's per-position signals, memberships (truth fractions + noise) and flag events."""
    ph = phantom
    pos = np.arange(ph.n_positions)
    frames = ph.frames(pos)
    spectra = ph.spectra(pos)
    rng = np.random.default_rng(1)
    u = np.stack([ph.truth.fractions[n].ravel() for n in ph.truth.label_names], axis=1)
    u = np.clip(u + rng.normal(0.0, 0.05, u.shape), 0.0, None)
    u /= u.sum(axis=1, keepdims=True)
    # the live path: the centres' store feeds both the centre signals and the flagger's blocks
    centres = ThresholdedCentres(u.shape[1], n_positions=ph.n_positions, cbed_shape=(16, 16))
    for i in range(0, pos.size, 512):
        centres.add(pos[i:i + 512], frames[i:i + 512], spectra[i:i + 512])
    signals = centre_signals(centres.update(u), ph.energy_axis_kev)
    cbed, eds = centres.features(eds_rebin=FLAG_EDS_REBIN, eds_channels=eds_window(ph.energy_axis_kev))
    events = SecondPhaseFlagger(raise_after=1).update(u, SCAN, cbed, eds, signals=signals)  # one update raises
    return spectra, events


@pytest.fixture
def server(phantom):
    with FollowUpServer(phantom) as srv:
        yield srv


def test_followup_of_a_raised_flag_has_higher_snr_and_shows_fe_rich(phantom, live_scan, server):
    ph = phantom
    spectra, events = live_scan
    assert [ev.kind for ev in events] == ["raised"]
    assert events[0].signals["fe_co_ratio"] > 1.0  # the live centre already says Fe-rich
    reports = {}
    for region in ("components", "bbox"):
        with EventPublisher(socket_type="push", scan_id="live") as pub, \
                FollowUpConsumer(pub.endpoint, server.endpoint, dwell_s=FOLLOW_DWELL, socket_type="pull",
                                 region=region) as consumer:
            pub.publish_all(events)
            pub.end()
            (reports[region],) = consumer.run(idle_timeout_s=10.0)
    rep = reports["components"]
    ev = events[0]
    assert rep.flag_id == ev.flag_id and rep.bbox == ev.bbox and rep.n_flag_positions == ev.n_positions
    assert len(rep.results) == len(ev.components)
    # the whole box costs more beam time for the same positions of the flag
    whole = reports["bbox"]
    assert whole.n_flag_positions == rep.n_flag_positions and whole.n_acquired > rep.n_acquired
    assert whole.results[0].bbox == ev.bbox
    live = fe_co_lines(spectra[ev.positions].sum(axis=0), ph.energy_axis_kev)
    logger.info("flag %d, %d positions: live Fe/Co %.2f SNR %.1f; follow-up at %g s Fe/Co %.2f SNR %.1f "
                "(%d positions re-acquired by components, %d by bbox)", rep.flag_id, rep.n_flag_positions,
                live.ratio, live.snr_fe, FOLLOW_DWELL, rep.fe_co_ratio, rep.snr_fe, rep.n_acquired,
                whole.n_acquired)
    # ten times the dwell: about sqrt(10) = 3.2 times the SNR
    assert rep.snr_fe > 2.0 * live.snr_fe
    assert rep.fe_co_ratio > 1.0
    # the same follow-up of a matrix region shows the matrix (Fe/Co < 1)
    truth = ph.truth
    film = (truth.fractions["cfs_matrix"] > 0.99)
    rows = np.flatnonzero(film.all(axis=1))
    y0 = int(rows[0])
    with FollowUpClient(server.endpoint) as client:
        res = client.acquire_region((y0, 0, y0 + 2, SCAN[1]), FOLLOW_DWELL)
    assert fe_co_lines(res.summed, res.energy_axis_kev).ratio < 1.0
    assert res.summed.sum() > 0 and res.spectra is None


def test_late_subscriber_follows_up_once(phantom, live_scan, server):
    # PUB/SUB: the consumer may join after "raised" went out; the first "updated" stands in
    spectra, events = live_scan
    raised = events[0]
    updated = dataclasses.replace(raised, kind="updated", update=raised.update + 1)
    with EventPublisher(socket_type="pub") as pub, \
            FollowUpConsumer(pub.endpoint, server.endpoint, dwell_s=0.02, socket_type="sub") as consumer:
        for _ in range(400):  # until the subscription has reached the publisher
            pub.publish(updated)
            ev = consumer.subscriber.recv(timeout_s=0.02)
            if ev is not None:
                break
        assert ev is not None
        first = consumer.handle(ev)
        for _ in range(3):
            pub.publish(updated)
        later = [consumer.handle(e) for e in consumer.subscriber.events(idle_timeout_s=0.5)]
    assert first is not None and first.flag_id == raised.flag_id
    assert later and all(r is None for r in later)
    assert consumer.stats["followed_up"] == 1


def test_followup_counts_scale_with_dwell(phantom, server):
    ph = phantom
    with FollowUpClient(server.endpoint) as client:
        a = client.acquire_region((20, 20, 30, 30), 0.01)
        b = client.acquire_region((20, 20, 30, 30), 0.1, per_position=True)
        info = client.info()
    assert info["scan_shape"] == list(SCAN) and info["dwell_s"] == LIVE_DWELL
    expected = sum(ph.expected_spectrum(int(p)).sum() for p in a.positions)
    # Poisson totals: within 5 sigma of the expectation at both dwells
    assert abs(a.summed.sum() - expected) < 5 * np.sqrt(expected)
    assert abs(b.summed.sum() - 10 * expected) < 5 * np.sqrt(10 * expected)
    assert b.spectra.shape == (100, ph.n_channels)
    np.testing.assert_array_equal(b.sum_over(b.positions), b.summed)
    np.testing.assert_allclose(a.energy_axis_kev, ph.energy_axis_kev)


@pytest.mark.parametrize("request_obj, kind", [
    ({"cmd": "acquire_region", "bbox": [0, 0, 70, 4], "dwell_s": 0.1}, "bad_bbox"),
    ({"cmd": "acquire_region", "bbox": [5, 5, 5, 9], "dwell_s": 0.1}, "bad_bbox"),
    ({"cmd": "acquire_region", "bbox": [0, 0, 2], "dwell_s": 0.1}, "bad_bbox"),
    ({"cmd": "acquire_region", "bbox": [0, 0, 2.5, 2], "dwell_s": 0.1}, "bad_bbox"),
    ({"cmd": "acquire_region", "bbox": [0, 0, 2, 2], "dwell_s": -1}, "bad_dwell"),
    ({"cmd": "acquire_region", "bbox": [0, 0, 2, 2], "dwell_s": 1e9}, "bad_dwell"),
    ({"cmd": "acquire_region", "bbox": [0, 0, 2, 2]}, "bad_dwell"),
    ({"cmd": "acquire_region", "bbox": [0, 0, 2, 2], "dwell_s": 0.1, "per_position": "yes"}, "bad_request"),
    ({"cmd": "acquire_region", "bbox": [0, 0, 64, 64], "dwell_s": 0.1}, "too_large"),
    ({"cmd": "take_photo"}, "unknown_cmd"),
])
def test_bad_requests_are_refused_clearly(phantom, request_obj, kind):
    with FollowUpServer(phantom, max_region_positions=1024) as srv, FollowUpClient(srv.endpoint) as client:
        with pytest.raises(FollowUpError) as info:
            client.request(request_obj)
        assert info.value.kind == kind
        # the server survived and still serves
        assert client.acquire_region((0, 0, 1, 1), 0.01).positions.tolist() == [0]
    assert srv.stats["errors_by_kind"] == {kind: 1} and srv.stats["ok"] == 1


def test_malformed_request_bytes(server):
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    try:
        for payload, kind in ((b"\xff\xfe", "bad_json"), (b"[1, 2]", "bad_json")):
            sock.send(payload)
            assert sock.poll(5000)
            head, arr = decode_array_message(sock.recv_multipart())
            assert head["status"] == "error" and head["error"] == kind and arr.size == 0
        sock.send_multipart([json.dumps({"cmd": "info"}).encode(), b"extra"])
        assert sock.poll(5000)
        head, _ = decode_array_message(sock.recv_multipart())
        assert head["error"] == "bad_request" and "2 parts" in head["message"]
    finally:
        sock.close(linger=0)


def test_client_times_out_without_a_server():
    # a bound socket that never answers: the client gives up and can be used again
    ctx = zmq.Context.instance()
    silent = ctx.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    silent.bind("tcp://127.0.0.1:0")
    try:
        with FollowUpClient(silent.getsockopt_string(zmq.LAST_ENDPOINT), timeout_s=0.2) as client:
            for _ in range(2):
                with pytest.raises(FollowUpError) as info:
                    client.info()
                assert info.value.kind == "timeout"
            assert client.stats["timeouts"] == 2
    finally:
        silent.close(linger=0)
