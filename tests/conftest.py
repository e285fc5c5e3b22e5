"""Shared fixtures: the simulated instruments on 127.0.0.1 with port 0, and the CI rule for skips.

Every simulated instrument a test needs comes from here, started on a free port of 127.0.0.1 and
stopped (bounded) when the test ends, so no module builds its own servers:

* ``make_phantom(**kw)`` - a :class:`LamellaPhantom`, cached per argument set for the session (the
  phantom is immutable and its construction compiles Numba kernels);
* ``merlin_server(source, **kw)`` - a started :class:`MerlinServer` (data and control on port 0);
* ``eds_publisher(source, **kw)`` - a started :class:`EDSPublisher` on ``tcp://127.0.0.1:0``;
* ``instruments(source, ...)`` - both on one scan clock (a context manager);
* ``microscope(phantom, **config)`` - a started :class:`SimulatedMicroscope`;
* ``instruments_process(...)`` - the Merlin server and EDS publisher in a *child process*, for tests
  that measure this process's memory (tracemalloc counts every thread of a process: in-process
  simulators would be measured with the code under test, issue 15).

CI rule (issue 15): where ``../shared/data`` exists beside the checkout and ``CI`` is true, the real
recordings are there, so a real-file test that skips means a broken path or loader, not a machine
without data: such a skip is turned into a failure (see :func:`pytest_runtest_makereport`).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: where CI keeps the real recordings (beside the checkout); STREAMCLUST_SHARED_DATA overrides it
SHARED_DATA = Path(os.environ.get("STREAMCLUST_SHARED_DATA", REPO.parent / "shared" / "data"))
#: markers of a skip reason that says a real recording was not found
REAL_FILE_SKIP_WORDS = ("shared/data", "real file", "real recording", "real data", "recordings not found",
                        "no real")


# -- CI: a skipped real-file test is a failure -------------------------------------------------------
def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def is_real_file_skip(reason: str, nodeid: str) -> bool:
    """A skip that says a real recording is missing, or any skip of a test of the real files."""
    text = reason.lower()
    return "real_file" in nodeid or any(w in text for w in REAL_FILE_SKIP_WORDS)


def skips_are_failures(shared_data: Path = SHARED_DATA) -> bool:
    """On CI with the recordings present (``CI`` true and the shared data directory there)."""
    return _on_ci() and shared_data.is_dir()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or not skips_are_failures():
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if is_real_file_skip(reason, item.nodeid):
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid}: skipped on CI although {SHARED_DATA} exists ({reason}); "
                           "a real-file test must run where the recordings are")


# -- the simulated instruments ---------------------------------------------------------------------
@pytest.fixture(scope="session")
def make_phantom():
    """``make_phantom(**kwargs)``: a LamellaPhantom, one per argument set for the whole session."""
    from streamclust.simulators.phantom import LamellaPhantom

    cache: dict = {}

    def make(**kwargs):
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        if key not in cache:
            cache[key] = LamellaPhantom(**kwargs)
        return cache[key]

    return make


def _started(cls, defaults: dict, stop_kw: dict):
    """A factory ``start(source, **kw)`` of started, listening ``cls`` instances, and a list of them
    to stop after the test (bounded)."""
    started = []

    def start(source, **kw):
        for key, value in defaults.items():
            kw.setdefault(key, value)
        obj = cls(source, **kw).start()
        started.append(obj)
        obj.wait_for_listen()
        return obj

    return start, started, stop_kw


def _stop_all(started, stop_kw) -> None:
    for obj in started:
        obj.stop(timeout=5.0, **stop_kw)


@pytest.fixture
def merlin_server():
    """``merlin_server(source, **kw)``: a started MerlinServer on 127.0.0.1:0; stopped after the test."""
    from streamclust.simulators.merlin import MerlinServer

    start, started, stop_kw = _started(MerlinServer, {"data_port": 0, "control_port": 0}, {})
    yield start
    _stop_all(started, stop_kw)


@pytest.fixture
def eds_publisher():
    """``eds_publisher(source, **kw)``: a started EDSPublisher on tcp://127.0.0.1:0; stopped after."""
    from streamclust.simulators.eds import EDSPublisher

    start, started, stop_kw = _started(EDSPublisher, {"endpoint": "tcp://127.0.0.1:0"}, {"linger_s": 0})
    yield start
    _stop_all(started, stop_kw)


@contextlib.contextmanager
def simulated_instruments(source, *, faults=(), dwell_s=0.0, headless=True, eds=True, cache="auto",
                          layout="1x1", **eds_kw):
    """MerlinServer + EDSPublisher on one scan clock, both on port 0; stopped (bounded) afterwards.

    Yields ``(server, publisher)``; the publisher is None with ``eds=False``.
    """
    from streamclust.simulators.clock import ScanClock
    from streamclust.simulators.eds import EDSPublisher
    from streamclust.simulators.merlin import MerlinServer

    clock = ScanClock()
    pub = server = None
    try:
        if eds:
            pub = EDSPublisher(source, clock=clock, **eds_kw).start()
            pub.wait_for_listen()
        server = MerlinServer(source, data_port=0, control_port=0, clock=clock, layout=layout,
                              dwell_s=dwell_s, headless=headless, faults=faults, cache=cache)
        server.start()
        server.wait_for_listen()
        yield server, pub
    finally:
        if server is not None:
            server.stop(timeout=5.0)
        if pub is not None:
            pub.stop(timeout=5.0, linger_s=0)


@pytest.fixture
def instruments():
    """The context manager :func:`simulated_instruments` (Merlin + EDS on one clock, port 0)."""
    return simulated_instruments


@pytest.fixture
def microscope():
    """``microscope(phantom, **config)``: a started SimulatedMicroscope on port 0; stopped after."""
    from streamclust.simulators.microscope import MicroscopeConfig, SimulatedMicroscope

    started = []

    def start(phantom, **config):
        for port in ("data_port", "control_port", "eds_port"):
            config.setdefault(port, 0)
        scope = SimulatedMicroscope(phantom, MicroscopeConfig(**config)).start()
        started.append(scope)
        return scope

    yield start
    for scope in started:
        scope.stop(timeout=5.0)


# -- the instruments in a child process ------------------------------------------------------------
_CHILD = r"""
import json, sys
from streamclust.simulators.clock import ScanClock
from streamclust.simulators.eds import EDSPublisher
from streamclust.simulators.merlin import MerlinServer
from streamclust.simulators.phantom import LamellaPhantom

spec = json.loads(sys.argv[1])
phantom = LamellaPhantom(**spec["phantom"])
# compile the phantom's kernels before listening (as SimulatedMicroscope does): a cold Numba cache
# would otherwise stall the first frames past a client's idle timeout
for name in ("frame", "spectrum", "frames", "spectra"):
    fn = getattr(phantom, name, None)
    if fn is not None:
        fn(0) if name in ("frame", "spectrum") else fn([0])
clock = ScanClock()
pub = None
if spec["eds"] is not None:  # None: no EDS publisher (the frames' path alone)
    pub = EDSPublisher(phantom, clock=clock, **spec["eds"]).start()
    pub.wait_for_listen()
server = MerlinServer(phantom, data_port=0, control_port=0, clock=clock, **spec["merlin"]).start()
server.wait_for_listen()
print(json.dumps({"data": list(server.data_address), "control": list(server.control_address),
                  "eds": pub.endpoint if pub else None}), flush=True)
sys.stdin.readline()  # the parent asks for the totals
idle = server.wait_until_idle(timeout=30.0)
out = {"idle": idle, "frames_sent": server.frames_sent, "eds_totals": pub.totals if pub else None}
server.stop(timeout=5.0)
if pub is not None:
    pub.stop(timeout=5.0, linger_s=0)
print(json.dumps(out, default=str), flush=True)
"""


class InstrumentsProcess:
    """Addresses of the instruments in the child, and their totals once :meth:`finish` is called."""

    def __init__(self, proc: subprocess.Popen, ready: dict):
        self.proc = proc
        self.data_address = tuple(ready["data"])
        self.control_address = tuple(ready["control"])
        self.eds_endpoint = ready["eds"]
        self.totals: dict | None = None

    def finish(self, timeout: float = 60.0) -> dict:
        """Wait until the detector is idle; return ``{"idle", "frames_sent", "eds_totals"}``."""
        if self.totals is None:
            self.proc.stdin.write("totals\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"instrument process ended early: {self.proc.stderr_text()}")
            self.totals = json.loads(line)
            self.proc.wait(timeout=timeout)
        return self.totals


@contextlib.contextmanager
def instruments_in_process(phantom: dict, merlin: dict | None = None, eds: dict | None = {},
                           start_timeout: float = 120.0):
    """Merlin + EDS in a child Python (same interpreter), built from JSON-able keyword arguments.

    ``eds=None``: no EDS publisher (``eds_endpoint`` is then None)."""
    spec = json.dumps({"phantom": phantom, "merlin": merlin or {}, "eds": eds})
    # stderr to a file: a chatty child must not block on a full pipe nobody reads
    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, spec], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=err, text=True, cwd=REPO)
    proc.stderr_text = lambda: (err.seek(0), err.read())[1]
    try:
        line = proc.stdout.readline()  # the addresses, once both listen: an explicit handshake
        if not line:
            proc.wait(timeout=start_timeout)
            raise RuntimeError(f"instrument process failed to start: {proc.stderr_text()}")
        yield InstrumentsProcess(proc, json.loads(line))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30.0)
        for stream in (proc.stdin, proc.stdout, err):
            stream.close()


@pytest.fixture
def instruments_process():
    """The context manager :func:`instruments_in_process` (simulators outside this process)."""
    return instruments_in_process


# -- a PUB's subscriber, confirmed -------------------------------------------------------------------
class SubscriptionProbe:
    """Frames for a :class:`FrameBridge` PUB that start with probe frames until the SUB has one.

    A SUB's subscription reaches a PUB asynchronously; what is published before it is lost unseen
    (and counted as sent). Instead of sleeping and hoping, the bridge publishes one small probe
    frame at a time (so none can meet a high-water mark) until the test's SUB reports one with
    :meth:`is_probe`; then the real frames follow. Probes have sequences from :attr:`BASE` on.
    """

    BASE = 1_000_000

    def __init__(self) -> None:
        import threading

        self.subscribed = threading.Event()
        self.sent = 0
        self.seen = 0

    def frames(self, real):
        """``real()`` (a callable: started only once the subscription is confirmed) after the probes."""
        import numpy as np
        from types import SimpleNamespace

        while not self.subscribed.is_set():
            self.sent += 1
            yield SimpleNamespace(sequence=self.BASE + self.sent, image=np.zeros((4, 4), np.uint16))
            self.subscribed.wait(1.0)  # a probe in flight, or the subscription is not there yet
        yield from real()

    def is_probe(self, frame) -> bool:
        """True for a probe (and the subscription is then confirmed)."""
        if frame.sequence >= self.BASE:
            self.seen += 1
            self.subscribed.set()
            return True
        return False


@pytest.fixture
def subscription_probe():
    return SubscriptionProbe()


def kernel_tcp_buffer_bytes() -> int:
    """The most a loopback TCP connection can hold in the kernel: both ends' buffer maxima.

    A test that asserts loss at a high-water mark sends more than this, so the kernel cannot absorb
    the stream and the loss is forced, whatever the machine's settings.
    """
    total = 0
    for path in ("/proc/sys/net/ipv4/tcp_rmem", "/proc/sys/net/ipv4/tcp_wmem"):
        try:
            total += int(Path(path).read_text().split()[2])
        except (OSError, IndexError, ValueError):
            total += 64 * 2**20  # not Linux: assume generous buffers
    return total
