"""ZeroMQ CURVE over real sockets: with the right keys the streams work; wrong keys and plain text get nothing."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import zmq

from streamclust.adapters.eds import SpectrumReceiver
from streamclust.adapters.security import (CurveClient, CurveServer, create_keys, is_loopback,
                                           registered_domains, warn_if_exposed)
from streamclust.adapters.zmq_frames import FrameBridge, ZmqFrameSource
from streamclust.flags.events import EventPublisher, EventSubscriber
from streamclust.flags.flagger import FlagEvent
from streamclust.simulators.eds import ArraySpectrumSource, EDSPublisher

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")

QUIET_S = 0.6  # how long a refused client listens for anything at all


@pytest.fixture
def keys(tmp_path):
    """Server keys, one authorised client, one unknown client (not in the allow-list)."""
    server_pub, server_secret = create_keys(tmp_path / "server", "server")
    _, good_secret = create_keys(tmp_path / "clients", "viewer")
    _, bad_secret = create_keys(tmp_path / "strangers", "intruder")
    return {
        "server": CurveServer(server_secret, authorized_clients=tmp_path / "clients"),
        "good": CurveClient(good_secret, server_pub),
        "bad": CurveClient(bad_secret, server_pub),
        # a client that has the right own key but believes in another server key
        "wrong_server": CurveClient(good_secret, create_keys(tmp_path / "other", "other")[0]),
    }


@pytest.fixture(autouse=True)
def no_leaked_domains():
    before = registered_domains()
    yield
    assert registered_domains() == before, "a CURVE server socket did not release its ZAP domain"


def _event(flag_id=1):
    return FlagEvent(kind="raised", flag_id=flag_id, cluster=1, neighbour=0, score=0.9, coherence=1.0,
                     distance_cbed=1.0, distance_eds=1.0, n_positions=2, fraction=0.1, bbox=(0, 0, 1, 2),
                     components=((0, 0, 1, 2),), positions=np.array([0, 1]), scan_shape=(4, 4), update=1,
                     signals={})


# -- events (PUSH: lossless, so a refused client's silence is not a slow-joiner artefact) --------------
@pytest.mark.parametrize("client,expect", [("good", True), ("bad", False), ("wrong_server", False),
                                           (None, False)])
def test_event_stream_with_and_without_the_right_keys(keys, client, expect):
    with EventPublisher(socket_type="push", security=keys["server"], send_timeout_s=QUIET_S) as pub, \
            EventSubscriber(pub.endpoint, socket_type="pull",
                            security=None if client is None else keys[client]) as sub:
        sent = pub.publish(_event())
        got = sub.recv(timeout_s=5.0 if expect else QUIET_S)
    if expect:
        assert sent and got is not None and got["flag_id"] == 1
    else:
        # the handshake never completes: the PUSH has no peer, the send times out, nothing arrives
        assert got is None and not sent and pub.stats["push_timeouts"] == 1


def test_event_pub_sub_with_curve(keys):
    with EventPublisher(socket_type="pub", security=keys["server"]) as pub, \
            EventSubscriber(pub.endpoint, security=keys["good"]) as good, \
            EventSubscriber(pub.endpoint, security=keys["bad"]) as bad, \
            EventSubscriber(pub.endpoint) as plain:
        got = None
        for i in range(50):  # PUB/SUB: resend until the (authorised) subscriber has joined
            pub.publish(_event(i + 1))
            got = good.recv(timeout_s=0.1)
            if got is not None:
                break
        assert got is not None
        assert bad.recv(timeout_s=QUIET_S) is None
        assert plain.recv(timeout_s=0.1) is None


def test_allow_any_client_without_allow_list(keys, tmp_path):
    server = CurveServer(keys["server"].secret_key_file)  # encryption only: any key is accepted
    with EventPublisher(socket_type="push", security=server) as pub, \
            EventSubscriber(pub.endpoint, socket_type="pull", security=keys["bad"]) as sub:
        assert pub.publish(_event())
        assert sub.recv(timeout_s=5.0)["flag_id"] == 1


def test_allow_any_and_allow_list_servers_side_by_side(keys):
    """pyzmq's allow-any flag is global to an authenticator; ours is per socket (ZAP domain)."""
    open_server = CurveServer(keys["server"].secret_key_file)
    with EventPublisher(socket_type="push", security=keys["server"], send_timeout_s=QUIET_S) as strict, \
            EventPublisher(socket_type="push", security=open_server) as lax, \
            EventSubscriber(strict.endpoint, socket_type="pull", security=keys["bad"]) as refused, \
            EventSubscriber(lax.endpoint, socket_type="pull", security=keys["bad"]) as admitted:
        assert lax.publish(_event(2)) and admitted.recv(timeout_s=5.0)["flag_id"] == 2
        assert not strict.publish(_event(1)) and refused.recv(timeout_s=0.1) is None


# -- EDS spectra ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("client,expect", [("good", True), ("bad", False), (None, False)])
def test_eds_stream_with_and_without_the_right_keys(keys, client, expect):
    spectra = np.arange(5 * 16, dtype=np.uint16).reshape(5, 16)
    with EDSPublisher(ArraySpectrumSource(spectra), security=keys["server"], random_state=0) as pub:
        rx = SpectrumReceiver(pub.endpoint, security=None if client is None else keys[client]).start()
        try:
            # without a peer that completed the handshake a PUSH send waits: publish without waiting
            pub.publish_scan(wait=False)
            got = list(rx.spectra(timeout=5.0 if expect else QUIET_S))
        finally:
            rx.stop()
            pub.stop(timeout=5.0, linger_s=0)
    if expect:
        assert [s.position for s in got] == [0, 1, 2, 3, 4]
        np.testing.assert_array_equal(np.stack([s.counts for s in got]), spectra)
    else:
        assert got == [] and rx.stats["received"] == 0 and rx.stats["malformed"] == 0


# -- frames --------------------------------------------------------------------------------------------
def _frames(n=6):
    from types import SimpleNamespace as NS
    return [NS(sequence=s, image=np.full((8, 8), s, np.uint16)) for s in range(1, n + 1)]


@pytest.mark.parametrize("client,expect", [("good", True), ("bad", False), (None, False)])
def test_frame_bridge_with_and_without_the_right_keys(keys, client, expect):
    bridge = FrameBridge(_frames(), push="tcp://127.0.0.1:0", security=keys["server"], end_timeout_s=1.0)
    bridge.start()
    try:
        endpoint = bridge.wait_for_listen()["push"][0]
        with ZmqFrameSource(endpoint, security=None if client is None else keys[client]) as src:
            got = [f.sequence for f in src.frames(timeout=5.0 if expect else QUIET_S)]
    finally:
        bridge.stop(timeout=5.0)
    if expect:
        assert got == [1, 2, 3, 4, 5, 6] and src.end_header is not None
    else:
        assert got == [] and src.stats["received"] == 0


def test_frame_bridge_pub_with_curve(keys):
    stop = threading.Event()

    def frames():  # keep publishing until the test has what it needs (PUB: joiners miss the start)
        s = 0
        while not stop.is_set() and s < 10000:
            s += 1
            yield type("F", (), {"sequence": s, "image": np.full((4, 4), s % 60000, np.uint16)})()

    bridge = FrameBridge(frames(), pub="tcp://127.0.0.1:0", security=keys["server"], pub_hwm=10)
    bridge.start()
    try:
        endpoint = bridge.wait_for_listen()["pub"]
        with ZmqFrameSource(endpoint, "sub", security=keys["good"]) as good, \
                ZmqFrameSource(endpoint, "sub", security=keys["bad"]) as bad:
            first = next(iter(good.frames(timeout=5.0)), None)
            assert first is not None and first.image.shape == (4, 4)
            assert next(iter(bad.frames(timeout=QUIET_S)), None) is None
    finally:
        stop.set()
        bridge.stop(timeout=5.0)


# -- configuration errors and the exposure warning --------------------------------------------------------
def test_bad_key_files_are_named(tmp_path, keys):
    with pytest.raises(FileNotFoundError, match="nope.key_secret"):
        CurveServer(tmp_path / "nope.key_secret")
    public = keys["good"].server_public_key_file
    with pytest.raises(ValueError, match="no secret key"):
        CurveServer(public)  # the public half alone cannot serve
    junk = tmp_path / "junk.key_secret"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="junk.key_secret"):
        CurveClient(junk, public)
    with pytest.raises(FileNotFoundError, match="authorized_clients"):
        CurveServer(keys["server"].secret_key_file, authorized_clients=tmp_path / "missing")
    with pytest.raises(TypeError, match="CurveServer"):
        EventPublisher(security=keys["good"])


def test_secret_key_file_is_private(tmp_path):
    _, secret = create_keys(tmp_path / "k", "me")
    import os
    assert os.stat(secret).st_mode & 0o077 == 0


@pytest.mark.parametrize("endpoint,loopback", [
    ("tcp://127.0.0.1:1", True), ("tcp://127.8.9.1:1", True), ("tcp://localhost:1", True),
    ("tcp://[::1]:1", True), ("ipc:///tmp/sock", True), ("inproc://x", True),
    ("tcp://0.0.0.0:1", False), ("tcp://*:1", False), ("tcp://eth0:1", False), ("tcp://10.0.0.5:1", False),
    ("tcp://[::]:1", False),
])
def test_is_loopback(endpoint, loopback):
    assert is_loopback(endpoint) is loopback


def test_exposure_warning(caplog, keys):
    with caplog.at_level(logging.WARNING, logger="streamclust.adapters.security"):
        assert warn_if_exposed("tcp://0.0.0.0:5000", None, "EventPublisher")
        assert not warn_if_exposed("tcp://0.0.0.0:5000", keys["server"], "EventPublisher")
        assert not warn_if_exposed("tcp://127.0.0.1:5000", None, "EventPublisher")
    assert len(caplog.records) == 1 and "0.0.0.0:5000" in caplog.records[0].getMessage()
