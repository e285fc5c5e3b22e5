"""Every server and publisher of the project, started with its defaults, listens on 127.0.0.1 only.

The check does not trust the objects' own address attributes: it lists this process's listening
sockets (psutil) before and after starting each one and inspects what appeared. ZeroMQ's sockets are
opened by libzmq inside this process, so they show up too. Ports are 0 where the API has a port
argument (the defaults 6341-6344 may be taken on a shared machine); hosts and interfaces are left
at their defaults.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import psutil
import pytest

from streamclust.adapters.eds import SpectrumReceiver
from streamclust.adapters.zmq_frames import FrameBridge
from streamclust.flags.events import EventPublisher
from streamclust.simulators.eds import ArraySpectrumSource, EDSPublisher
from streamclust.simulators.merlin import ArraySource, MerlinServer
from streamclust.simulators.phantom import LamellaPhantom
from streamclust.simulators.followup import FollowUpServer
from streamclust.app.liveview import LiveView


def _listening() -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


class _NewListeners:
    """The listening sockets that appear while the block runs (polled: libzmq binds in its I/O thread)."""

    def __init__(self, expect: int):
        self.expect = expect

    def __enter__(self):
        self.before = _listening()
        return self

    def wait(self, timeout: float = 5.0) -> set[tuple[str, int]]:
        deadline = time.monotonic() + timeout
        while True:
            new = _listening() - self.before
            if len(new) >= self.expect or time.monotonic() > deadline:
                self.new = new
                return new
            time.sleep(0.02)

    def __exit__(self, *exc):
        return False


def _assert_loopback_only(new, expect):
    assert len(new) == expect, f"expected {expect} new listening socket(s), found {sorted(new)}"
    exposed = sorted(addr for addr in new if addr[0] != "127.0.0.1")
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_merlin_server_data_and_control_ports():
    server = MerlinServer(ArraySource(np.zeros((1, 256, 256), np.uint16)), data_port=0, control_port=0,
                          layout="1x1")
    with _NewListeners(2) as probe:
        server.start()
        try:
            server.wait_for_listen()
            new = probe.wait()
            ports = {server.data_address[1], server.control_address[1]}
        finally:
            server.stop()
    _assert_loopback_only(new, 2)
    assert ports == {port for _, port in new}


def test_eds_publisher():
    with _NewListeners(1) as probe, EDSPublisher(ArraySpectrumSource(np.zeros((2, 4), np.uint16))):
        new = probe.wait()
    _assert_loopback_only(new, 1)


def test_event_publisher_pub_and_push():
    for socket_type in ("pub", "push"):
        with _NewListeners(1) as probe, EventPublisher(socket_type=socket_type) as pub:
            new = probe.wait()
        _assert_loopback_only(new, 1)
        assert pub.endpoint.startswith("tcp://127.0.0.1:")


def test_frame_bridge():
    # FrameBridge has no default endpoint (the caller must name one); port 0 on the documented host
    with _NewListeners(2) as probe:
        bridge = FrameBridge(iter(()), push="tcp://127.0.0.1:0", pub="tcp://127.0.0.1:0", end_timeout_s=0.2)
        bridge.start()
        try:
            bridge.wait_for_listen()
            new = probe.wait()
        finally:
            bridge.stop()
    _assert_loopback_only(new, 2)


def test_liveview():
    from streamclust.app.liveview import LiveView

    with _NewListeners(1) as probe:
        view = LiveView()
        view.start()
        try:
            new = probe.wait()
        finally:
            view.stop()
    _assert_loopback_only(new, 1)


def test_followup_server():
    from streamclust.simulators.followup import FollowUpServer
    from streamclust.simulators.phantom import LamellaPhantom

    with _NewListeners(1) as probe, FollowUpServer(LamellaPhantom(scan_shape=(4, 4), frame_shape=(64, 64))):
        new = probe.wait()
    _assert_loopback_only(new, 1)


def test_simulated_microscope_config_defaults():
    from streamclust.simulators.microscope import MicroscopeConfig, SimulatedMicroscope
    from streamclust.simulators.phantom import LamellaPhantom

    cfg = MicroscopeConfig(data_port=0, control_port=0, eds_port=0)
    assert cfg.host == "127.0.0.1"
    with _NewListeners(3) as probe, SimulatedMicroscope(LamellaPhantom(scan_shape=(4, 4)), cfg):
        new = probe.wait()
    _assert_loopback_only(new, 3)


def test_configuration_defaults_are_loopback():
    from streamclust.app.config import Config
    from streamclust.adapters.security import is_loopback

    cfg = Config()
    hosts = [cfg.detector.host, cfg.liveview.host]
    endpoints = [cfg.eds.endpoint, cfg.events.endpoint]
    assert all(is_loopback(h) for h in hosts), hosts
    assert all(is_loopback(e) for e in endpoints), endpoints


# -- binding beyond loopback without CURVE is allowed, but never silent ---------------------------------
@pytest.mark.parametrize("make", [
    pytest.param(lambda: EventPublisher("tcp://0.0.0.0:0"), id="EventPublisher"),
    pytest.param(lambda: EDSPublisher(ArraySpectrumSource(np.zeros((2, 4), np.uint16)),
                                      endpoint="tcp://0.0.0.0:0"), id="EDSPublisher"),
    pytest.param(lambda: FrameBridge(iter(()), pub="tcp://0.0.0.0:0", end_timeout_s=0.2), id="FrameBridge"),
    pytest.param(lambda: SpectrumReceiver("tcp://0.0.0.0:0", bind=True), id="SpectrumReceiver-bind"),
])
def test_non_loopback_bind_without_curve_warns(make, caplog):
    with caplog.at_level(logging.WARNING, logger="streamclust.adapters.security"):
        obj = make()
        try:
            if hasattr(obj, "wait_for_listen"):
                obj.start()
                obj.wait_for_listen()
            elif isinstance(obj, SpectrumReceiver):
                obj.start()
        finally:
            obj.stop() if hasattr(obj, "stop") else obj.close()
    warnings = [r for r in caplog.records if "without CURVE" in r.getMessage()]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0].getMessage()


def test_loopback_bind_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="streamclust.adapters.security"):
        EventPublisher().close()
        with EDSPublisher(ArraySpectrumSource(np.zeros((2, 4), np.uint16))):
            pass
    assert not [r for r in caplog.records if "without CURVE" in r.getMessage()]


@pytest.mark.parametrize("make", [
    pytest.param(lambda: MerlinServer(ArraySource(np.zeros((1, 256, 256), np.uint8)), host="0.0.0.0",
                                      data_port=0, control_port=0, layout="1x1", counter_depth=6,
                                      headless=True), id="MerlinServer"),
    pytest.param(lambda: LiveView(host="0.0.0.0", scan_shape=(4, 4), n_clusters=2), id="LiveView"),
    pytest.param(lambda: FollowUpServer(LamellaPhantom((8, 8), seed=0), endpoint="tcp://0.0.0.0:0"),
                 id="FollowUpServer"),
])
def test_servers_without_authentication_warn_when_exposed(make, caplog):
    """Servers whose protocol has no CURVE option still say so when they face the network
    (constructed only: the warning is given before anything binds)."""
    with caplog.at_level(logging.WARNING, logger="streamclust.adapters.security"):
        make()
    warnings = [r for r in caplog.records if "reachable from the network" in r.getMessage()]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0].getMessage()
