"""A simulated Merlin detector PC: the real TCP protocol on a control port and a data port.

:class:`MerlinServer` listens on both ports (the detector PC is the server; clients connect to
both). The control port speaks ``GET``/``SET``/``CMD`` (see
:mod:`streamclust.simulators.merlin_control`); ``CMD,STARTACQUISITION`` arms an acquisition and the
data port sends the acquisition header (``HDR``) followed by one ``MPX``-framed MQ1 frame message per
scan position, byte-for-byte what the real detector sends (encoded by
:mod:`streamclust.simulators.mib_encode`).

Triggering (``TRIGGERSTART``, or ``trigger=`` at construction)
    ``0`` internal / free running: frames start right after arming. ``5`` soft trigger: each
    ``CMD,SOFTTRIGGER`` releases ``NUMFRAMESPERTRIGGER`` frames. Hardware trigger values (1-4, 6)
    behave as internal (there is no hardware). The shared :class:`ScanClock` is armed by
    ``STARTACQUISITION`` and triggered by the internal start or the first soft trigger, so a
    simulated EDS publisher follows the same positions at the same dwell.
Pacing
    ``max(ACQUISITIONTIME, ACQUISITIONPERIOD)`` ms a frame (initialised from ``dwell_s``); 0 sends as
    fast as the socket takes the bytes.
Headless mode (``headless=True`` or ``SET,RUNHEADLESS,1``)
    When a data client connects and nothing is armed, the server starts one internal-trigger
    acquisition with the current settings by itself: handy for benchmarks and ``streamclust
    simulate``, where nothing drives the control port.
Continuous mode
    ``NUMFRAMESTOACQUIRE 0`` sends frames (cycling through the source positions) until
    ``STOPACQUISITION``/``ABORT``.
Speed
    One preallocated message buffer per acquisition (prefix + header + pixels), filled in place and
    sent with one ``sendall`` of a memoryview. With ``cache="auto"`` (default) the encoded pixel bytes
    of every position are kept after their first encoding when all positions fit in
    ``cache_bytes``: sources must then be deterministic (same frame for the same position, which the
    phantom and :class:`ArraySource` are). That is what lets raw 1-bit streams exceed 12,500
    frames/s: a repeated acquisition costs a header format and a memcpy per frame. Frames not in
    the cache (a 128x128 quad 12-bit scan is 8 GiB: it never fits) are rendered and encoded ahead
    by ``render_threads`` worker threads while the data thread sends, in sequence order.
Faults (tests)
    ``faults=[Fault("truncate", at=7), ...]``: see :class:`Fault`.

Examples
--------
>>> import numpy as np
>>> from streamclust.adapters.merlin import MerlinReceiver
>>> src = ArraySource(np.zeros((2, 256, 256), np.uint8))
>>> with MerlinServer(src, data_port=0, control_port=0, layout="1x1", counter_depth=6,
...                   headless=True) as server:
...     with MerlinReceiver(*server.data_address) as rx:
...         [f.sequence for f in rx.frames()]
...     server.wait_until_idle(timeout=5.0)
...     server.acquisitions_served, server.frames_sent
[1, 2]
True
(1, 2)
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Protocol

import numpy as np

from streamclust.adapters.framing import MPX_PREFIX_SIZE, encode_mpx_prefix, frame_message, parse_mpx_prefix
from streamclust.adapters.security import warn_if_exposed
from streamclust.simulators.clock import ScanClock, ScanRun
from streamclust.simulators.merlin_control import BUSY, OK, DetectorSettings

__all__ = ["MerlinServer", "Fault", "ArraySource", "FrameSource", "FAULT_KINDS"]

logger = logging.getLogger(__name__)

#: what :class:`Fault` can do to one frame message
FAULT_KINDS = ("truncate", "corrupt_header", "drop", "skip", "stall", "garbage")

_POLL_S = 0.05  # how often blocked threads look at the stop flag
_BATCH_BYTES = 1 << 20  # free-running small frames: up to this much a send
_TRIGGER_MODES = {"internal": 0, "soft": 5}


class FrameSource(Protocol):
    """What the server serves: the phantom, or an :class:`ArraySource`."""

    n_positions: int
    frame_shape: tuple[int, int]

    def frame_into(self, position: int, out: np.ndarray) -> None: ...


class ArraySource:
    """Serve the frames of an ``(n, height, width)`` array (tests, replays of recorded data).

    Examples
    --------
    >>> src = ArraySource(np.arange(8, dtype=np.uint16).reshape(2, 2, 2))
    >>> src.n_positions, src.frame_shape
    (2, (2, 2))
    >>> out = np.empty((2, 2), np.uint16); src.frame_into(1, out); out.tolist()
    [[4, 5], [6, 7]]
    """

    def __init__(self, frames: np.ndarray, scan_shape: tuple[int, int] | None = None):
        frames = np.asarray(frames)
        if frames.ndim != 3:
            raise ValueError(f"frames must be (n, height, width), got shape {frames.shape}")
        self.frames = frames
        self.n_positions = frames.shape[0]
        self.frame_shape = (int(frames.shape[1]), int(frames.shape[2]))
        self.frame_dtype = frames.dtype
        self.scan_shape = scan_shape

    def frame_into(self, position: int, out: np.ndarray) -> None:
        out[...] = self.frames[position]


def _thread_safe(source) -> bool:
    """May ``source.frame_into`` run in several threads at once? (declared, or a known source)."""
    declared = getattr(source, "thread_safe", None)
    if declared is not None:
        return bool(declared)
    if isinstance(source, ArraySource):
        return True
    from streamclust.simulators.phantom import LamellaPhantom  # lazy: a heavy module

    # the phantom's kernels keep no state between calls: position seeds, read-only templates
    return isinstance(source, LamellaPhantom)


class _Renderer:
    """Render and encode frames ahead of the sending thread, in worker threads.

    The phantom's Numba kernels and NumPy's byte swapping release the GIL, so rendering the next
    frames overlaps with sending this one (and with each other on several cores). Results come
    back in sequence order; ``depth`` buffers bound the memory and how far ahead it runs.
    """

    def __init__(self, source, encoder, n_workers: int, max_count: int, dtype, n_total: int):
        self.source, self.encoder, self.max_count = source, encoder, max_count
        self.n_total = n_total  # 0: continuous
        self.depth = 2 * n_workers
        shape = tuple(source.frame_shape)
        self._images = [np.empty(shape, dtype) for _ in range(self.depth)]
        self._pixels = [np.empty(encoder.pixel_bytes, np.uint8) for _ in range(self.depth)]
        dtype = np.dtype(dtype)
        sat = getattr(source, "saturation", None)  # a source that saturates itself needs no clamp
        self._clamp = (dtype.kind in "iu" and dtype.itemsize * 8 > encoder.counter_depth
                       and not (sat is not None and sat <= max_count))
        self._pool = ThreadPoolExecutor(n_workers, thread_name_prefix="merlin-sim-render")
        self._futures: deque = deque()
        self._next = 0  # next sequence index (0-based) to submit

    def _render(self, position: int, slot: int) -> int:
        image = self._images[slot]
        self.source.frame_into(position, image)
        if self._clamp:
            np.minimum(image, self.max_count, out=image)  # the counter saturates
        self.encoder.pixels(image, out=self._pixels[slot])
        return slot

    def _fill(self) -> None:
        while len(self._futures) < self.depth and (self.n_total == 0 or self._next < self.n_total):
            slot = self._next % self.depth
            position = self._next % self.source.n_positions
            self._futures.append(self._pool.submit(self._render, position, slot))
            self._next += 1

    def pixels(self) -> np.ndarray:
        """Encoded pixels of the next frame in sequence (valid until the following call)."""
        self._fill()
        slot = self._futures.popleft().result()
        return self._pixels[slot]

    def close(self) -> None:
        for f in self._futures:
            f.cancel()
        self._pool.shutdown(wait=True)


@dataclass(frozen=True)
class Fault:
    """Damage to inject into frame ``at`` (1-based sequence) of an acquisition.

    Kinds
    -----
    ``truncate``        send the prefix and only the first half of the frame's payload, then carry on
                        with the next frame (a reader must not take the next frame's bytes as pixels).
    ``corrupt_header``  send the frame with its full length but a garbled MQ1 header (magic and
                        sequence digits overwritten).
    ``drop``            close the data connection just before the frame: the scan is cut short.
    ``skip``            never send the frame (a sequence gap).
    ``stall``           send half the message, pause ``seconds``, send the rest.
    ``garbage``         send ``n_bytes`` of random bytes (seeded) just before the frame.

    ``acquisition`` restricts the fault to the n-th acquisition served (1-based); None = every one.
    """

    kind: str
    at: int
    seconds: float = 0.0
    n_bytes: int = 1000
    acquisition: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")
        if self.at < 1:
            raise ValueError("Fault.at is a 1-based frame sequence number")


@dataclass
class _Acquisition:
    number: int
    n_frames: int  # 0 = continuous
    frames_per_trigger: int
    soft: bool
    dwell_s: float
    counter_depth: int
    raw: bool
    triggers: int = 0
    run: ScanRun | None = None
    stop: bool = False
    abort: bool = False
    done: bool = False
    serving: bool = False


class _Disconnected(Exception):
    """The data client went away (or a ``drop`` fault closed the connection)."""


class MerlinServer:
    """Simulated Merlin detector: control port + data port, served from threads.

    Parameters
    ----------
    source : FrameSource
        Anything with ``n_positions``, ``frame_shape`` and ``frame_into(position, out)``.
    host, data_port, control_port
        Where to listen; port 0 picks a free port (see :attr:`data_address`).
    clock : ScanClock, optional
        Shared with other simulated instruments; a private one is made if omitted.
    counter_depth : {1, 6, 12, 24}
    raw : bool
        ``FILEFORMAT 2`` (R64 raw words) instead of processed U08/U16/U32.
    layout : {"1x1", "2x2", "2x2G", "Nx1"}
        Must agree with ``source.frame_shape``.
    dwell_s : float
        Seconds a frame (0 = as fast as possible); ``ACQUISITIONTIME`` overrides it later.
    n_frames : int, optional
        ``NUMFRAMESTOACQUIRE`` (default: ``source.n_positions``).
    frames_per_trigger : int
    trigger : {"internal", "soft"}
        Initial ``TRIGGERSTART`` (0 or 5).
    headless : bool
        Start an acquisition by itself when a data client connects.
    faults : iterable of Fault
    cache : {"auto", True, False}
        Keep encoded pixels for repeated positions (see module notes).
    cache_bytes : int
        Upper bound of the pixel cache.
    seed : int
        Seed of garbage bytes.
    render_threads : int or "auto"
        Frames not served from the cache are rendered and encoded ahead of sending by this many
        worker threads (0: in the sending thread). ``"auto"``: one per core (at most 4) for
        sources known to be thread-safe (the phantom, :class:`ArraySource`, or a source with
        ``thread_safe = True``), else 1 (calls stay sequential, only overlapped with sending).
    """

    def __init__(self, source: FrameSource, *, host: str = "127.0.0.1", data_port: int = 6342,
                 control_port: int = 6341, clock: ScanClock | None = None, counter_depth: int = 12,
                 raw: bool = False, layout: str = "2x2", dwell_s: float = 0.0, n_frames: int | None = None,
                 frames_per_trigger: int = 1, trigger: str = "internal", headless: bool = False,
                 faults: Iterable[Fault] = (), cache: bool | str = "auto", cache_bytes: int = 256 * 2**20,
                 seed: int = 0, render_threads: int | str = "auto"):
        if trigger not in _TRIGGER_MODES:
            raise ValueError(f"trigger must be one of {tuple(_TRIGGER_MODES)}, got {trigger!r}")
        self.source = source
        self.host = host
        # the Merlin protocol has no authentication: say so when it faces the network
        warn_if_exposed(f"tcp://{host}:{data_port}", None, "MerlinServer (plain TCP, no authentication)")
        self.clock = clock if clock is not None else ScanClock()
        self.layout = layout
        self.faults = tuple(faults)
        self.cache = cache
        self.cache_bytes = int(cache_bytes)
        if render_threads == "auto":
            render_threads = min(4, os.cpu_count() or 1) if _thread_safe(source) else 1
        if not isinstance(render_threads, int) or render_threads < 0:
            raise ValueError(f"render_threads must be 'auto' or an int >= 0, got {render_threads!r}")
        self.render_threads = render_threads
        self._rng = np.random.default_rng(seed)

        self.settings = DetectorSettings()
        h, w = source.frame_shape
        self.settings.values.update({
            "NUMFRAMESTOACQUIRE": int(source.n_positions if n_frames is None else n_frames),
            "NUMFRAMESPERTRIGGER": int(frames_per_trigger),
            "ACQUISITIONTIME": float(dwell_s) * 1000.0,
            "COUNTERDEPTH": int(counter_depth),
            "TRIGGERSTART": _TRIGGER_MODES[trigger],
            "RUNHEADLESS": int(bool(headless)),
            "FILEFORMAT": 2 if raw else 0,
            "IMAGEX": int(w),
            "IMAGEY": int(h),
        })
        self._requested_ports = (data_port, control_port)

        self._cond = threading.Condition()
        self._acq: _Acquisition | None = None
        self._n_acquisitions = 0
        self._stopping = threading.Event()
        self._listening = threading.Event()
        self._threads: list[threading.Thread] = []
        self._data_listener: socket.socket | None = None
        self._control_listener: socket.socket | None = None
        self._errors: list[BaseException] = []
        self._pixel_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

        #: acquisitions whose frames were all sent (or stopped on request)
        self.acquisitions_served = 0
        #: frame messages put on the wire, damaged ones included (skipped and dropped frames not)
        self.frames_sent = 0
        #: (acquisition, kind, sequence) of every fault injected
        self.fault_log: list[tuple[int, str, int]] = []

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "MerlinServer":
        self._data_listener = self._listen(self._requested_ports[0])
        self._control_listener = self._listen(self._requested_ports[1])
        for target, name in ((self._data_loop, "merlin-sim-data"), (self._control_loop, "merlin-sim-control")):
            t = threading.Thread(target=self._guard(target), name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._listening.set()
        logger.info("simulated Merlin: data %s, control %s", self.data_address, self.control_address)
        return self

    def _listen(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, port))
        s.listen(4)
        s.settimeout(_POLL_S)
        return s

    def _guard(self, target):
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # re-raised by stop(): a dead simulator must not go unnoticed
                logger.exception("simulated Merlin thread failed")
                self._errors.append(exc)
        return run

    def wait_for_listen(self, timeout: float = 5.0) -> None:
        """Block until both ports accept connections."""
        if not self._listening.wait(timeout):
            raise TimeoutError(f"simulated Merlin did not listen within {timeout} s")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close every socket, join the threads; re-raise a thread's error."""
        self._stopping.set()
        self.clock.abort()
        with self._cond:
            if self._acq is not None:
                self._acq.abort = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for s in (self._data_listener, self._control_listener):
            if s is not None:
                s.close()
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise TimeoutError(f"simulated Merlin threads still running after {timeout} s: {alive}")
        if self._errors:
            raise RuntimeError("simulated Merlin failed") from self._errors[0]

    def __enter__(self) -> "MerlinServer":
        self.start()
        self.wait_for_listen()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def data_address(self) -> tuple[str, int]:
        return self._data_listener.getsockname()[:2]

    @property
    def control_address(self) -> tuple[str, int]:
        return self._control_listener.getsockname()[:2]

    @property
    def status(self) -> int:
        """DETECTORSTATUS: 0 idle, 1 acquiring."""
        with self._cond:
            return 0 if self._acq is None else 1

    def wait_until_idle(self, timeout: float = 5.0) -> bool:
        """Block until no acquisition is armed or running; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._acq is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    # -- control port ------------------------------------------------------------------------
    def _control_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._control_listener.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            t = threading.Thread(target=self._guard(lambda c=conn: self._serve_control(c)),
                                 name="merlin-sim-control-conn", daemon=True)
            t.start()
            self._threads.append(t)

    def _serve_control(self, conn: socket.socket) -> None:
        conn.settimeout(_POLL_S)
        buf = b""
        with conn:
            while not self._stopping.is_set():
                try:
                    chunk = conn.recv(4096)
                except (socket.timeout, TimeoutError):
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= MPX_PREFIX_SIZE:
                    try:
                        n = parse_mpx_prefix(buf, max_payload=4096)
                    except ValueError as exc:
                        logger.warning("control port: %s; closing the connection", exc)
                        return
                    if len(buf) < MPX_PREFIX_SIZE + n:
                        break
                    payload, buf = buf[MPX_PREFIX_SIZE:MPX_PREFIX_SIZE + n], buf[MPX_PREFIX_SIZE + n:]
                    reply = self._handle_control(payload)
                    try:
                        conn.sendall(frame_message(reply))
                    except OSError:
                        return

    def _handle_control(self, payload: bytes) -> bytes:
        with self._cond:
            busy = self._acq is not None
            self.settings["DETECTORSTATUS"] = 1 if busy else 0
            reply, command = self.settings.handle(payload, busy=busy)
            if command is None:
                return reply
            code = getattr(self, "_cmd_" + command.lower())()
            self._cond.notify_all()
            return self.settings.command_reply(command, code)

    # the _cmd_* methods run with self._cond held
    def _cmd_startacquisition(self, headless: bool = False) -> int:
        if self._acq is not None:
            return BUSY
        s = self.settings
        counter_depth, raw = int(s["COUNTERDEPTH"]), s["FILEFORMAT"] == 2
        self._n_acquisitions += 1
        acq = _Acquisition(
            number=self._n_acquisitions,
            n_frames=int(s["NUMFRAMESTOACQUIRE"]),
            frames_per_trigger=int(s["NUMFRAMESPERTRIGGER"]),
            soft=(not headless) and s["TRIGGERSTART"] in (5, 6),
            dwell_s=s.dwell_s,
            counter_depth=counter_depth,
            raw=raw,
        )
        self.clock.arm(acq.n_frames or self.source.n_positions, acq.dwell_s)
        if not acq.soft:
            acq.run = self.clock.trigger()
        self._acq = acq
        logger.info("acquisition %d armed: %d frames, %s trigger", acq.number, acq.n_frames,
                    "soft" if acq.soft else "internal")
        return OK

    def _cmd_softtrigger(self) -> int:
        acq = self._acq
        if acq is None or not acq.soft:
            logger.warning("SOFTTRIGGER without an armed soft-triggered acquisition: ignored")
            return OK
        if acq.run is None:
            acq.run = self.clock.trigger()
        acq.triggers += 1
        return OK

    def _cmd_stopacquisition(self) -> int:
        if self._acq is not None:
            self._acq.stop = True
            self._drop_unserved()
        return OK

    def _cmd_abort(self) -> int:
        if self._acq is not None:
            self._acq.abort = True
            self.clock.abort()
            self._drop_unserved()
        return OK

    def _drop_unserved(self) -> None:
        # armed but no data client has taken it yet: nobody else will end it
        if self._acq is not None and not self._acq.serving:
            self._acq.done = True
            self._acq = None

    def _cmd_reset(self) -> int:
        # a reset returns the detector to idle; settings are kept (as after a real RESET)
        return self._cmd_abort()

    # -- data port ---------------------------------------------------------------------------
    def _data_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self._data_listener.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            logger.info("data client connected from %s", peer)
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.settimeout(_POLL_S)
                self._serve_data(conn)
            except _Disconnected:
                logger.info("data client %s gone", peer)
            finally:
                conn.close()

    def _serve_data(self, conn: socket.socket) -> None:
        with self._cond:
            if self.settings["RUNHEADLESS"] == 1 and self._acq is None:
                self._cmd_startacquisition(headless=True)
        while not self._stopping.is_set():
            with self._cond:
                while self._acq is None or self._acq.done:
                    if self._stopping.is_set():
                        return
                    self._cond.wait(_POLL_S)
                    if self._peer_closed(conn):
                        raise _Disconnected()
                acq = self._acq
                acq.serving = True
            try:
                self._send_acquisition(conn, acq)
            finally:
                with self._cond:
                    acq.done = True
                    if self._acq is acq:
                        self._acq = None
                    self._cond.notify_all()

    @staticmethod
    def _peer_closed(conn: socket.socket) -> bool:
        readable, _, _ = select.select([conn], [], [], 0)
        if not readable:
            return False
        try:
            return conn.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _send(self, conn: socket.socket, data) -> None:
        # a send loop with a timeout, not a bare sendall: a client that stops reading must not
        # keep stop() from returning
        view = memoryview(data).cast("B")
        sent, n = 0, len(view)
        while sent < n:
            try:
                sent += conn.send(view[sent:])
            except (socket.timeout, TimeoutError):
                if self._stopping.is_set():
                    raise _Disconnected() from None
            except OSError as exc:
                raise _Disconnected() from exc

    def _send_acquisition(self, conn: socket.socket, acq: _Acquisition) -> None:
        from streamclust.simulators.mib_encode import FrameEncoder, encode_acquisition_header

        src = self.source
        scan_shape = getattr(src, "scan_shape", None)
        n_total = acq.n_frames
        if scan_shape is not None and n_total != int(np.prod(scan_shape)):
            scan_shape = None
        hdr = encode_acquisition_header(n_frames=acq.n_frames, counter_depth=acq.counter_depth,
                                        layout=self.layout, raw=acq.raw,
                                        frames_per_trigger=acq.frames_per_trigger,
                                        scan_shape=tuple(scan_shape) if scan_shape is not None else None)
        enc = FrameEncoder(image_shape=tuple(src.frame_shape), counter_depth=acq.counter_depth, raw=acq.raw,
                           layout=self.layout, shutter_s=max(acq.dwell_s, 1e-6))
        self._send(conn, frame_message(hdr))

        hs, pb = enc.header_size, enc.pixel_bytes
        msg = MPX_PREFIX_SIZE + hs + pb
        # Free-running at full speed, small frames go out several to a send (one syscall for up
        # to ~1 MiB); paced or triggered frames go one by one, each as soon as it is due.
        batch = max(1, min(64, _BATCH_BYTES // msg)) if (acq.dwell_s == 0 and not acq.soft) else 1
        buf = bytearray(batch * msg)
        prefix = encode_mpx_prefix(hs + pb)
        for j in range(batch):
            buf[j * msg:j * msg + MPX_PREFIX_SIZE] = prefix
        whole = memoryview(buf)
        flat = np.frombuffer(buf, np.uint8)
        image = np.empty(src.frame_shape, getattr(src, "frame_dtype", np.uint32))
        max_count = (1 << acq.counter_depth) - 1
        cache = self._cache_for(acq, pb)
        faults = {f.at: f for f in self.faults if f.acquisition in (None, acq.number)}
        filled = 0
        renderer = None
        if cache is None and self.render_threads > 0:
            renderer = _Renderer(src, enc, self.render_threads, max_count, image.dtype, n_total)

        def flush() -> None:
            nonlocal filled
            if filled:
                self._send(conn, whole[:filled * msg])
                self.frames_sent += filled
                filled = 0

        seq = 0
        ended = False
        try:
            while n_total == 0 or seq < n_total:
                position = seq % src.n_positions
                seq += 1
                if acq.soft and (seq - 1) % acq.frames_per_trigger == 0:
                    if not self._wait_trigger(acq, (seq - 1) // acq.frames_per_trigger + 1, conn):
                        break
                if acq.dwell_s > 0 and acq.run is not None:
                    while not self.clock.wait_for(acq.run, position, timeout=_POLL_S):
                        if acq.abort or acq.stop or self._stopping.is_set():
                            break
                if acq.stop or acq.abort or self._stopping.is_set():
                    break
                base = filled * msg
                whole[base + MPX_PREFIX_SIZE:base + MPX_PREFIX_SIZE + hs] = enc.header(seq)
                pixels = flat[base + MPX_PREFIX_SIZE + hs:base + msg]
                if cache is not None and cache[1][position]:
                    pixels[:] = cache[0][position]
                elif renderer is not None:
                    pixels[:] = renderer.pixels()
                else:
                    src.frame_into(position, image)
                    if image.dtype.kind in "iu" and image.dtype.itemsize * 8 > acq.counter_depth:
                        np.minimum(image, max_count, out=image)  # the counter saturates
                    enc.pixels(image, out=pixels)
                    if cache is not None:
                        cache[0][position] = pixels
                        cache[1][position] = True
                fault = faults.get(seq)
                if fault is None:
                    filled += 1
                    if filled == batch:
                        flush()
                    continue
                flush()  # frames before the damaged one go out first
                self._inject(conn, fault, acq, seq, whole[base:base + msg], hs)
                if fault.kind != "skip":
                    self.frames_sent += 1
            else:
                ended = True
        finally:
            if renderer is not None:
                renderer.close()
            if not self._stopping.is_set():
                try:
                    flush()
                except _Disconnected:
                    if ended:
                        raise
        if ended:
            self.acquisitions_served += 1
            logger.info("acquisition %d: all %d frames sent", acq.number, seq)
            return
        if acq.stop and not acq.abort:
            self.acquisitions_served += 1
        logger.info("acquisition %d ended at frame %d (%s)", acq.number, seq,
                    "stopped" if acq.stop else "aborted")

    def _cache_for(self, acq: _Acquisition, pixel_bytes: int):
        n = self.source.n_positions
        if self.cache is False or (self.cache == "auto" and n * pixel_bytes > self.cache_bytes):
            return None
        key = (acq.counter_depth, acq.raw, pixel_bytes)
        if key not in self._pixel_cache:
            self._pixel_cache.clear()  # one geometry at a time: the bound holds
            self._pixel_cache[key] = (np.empty((n, pixel_bytes), np.uint8), np.zeros(n, bool))
        return self._pixel_cache[key]

    def _wait_trigger(self, acq: _Acquisition, needed: int, conn: socket.socket) -> bool:
        with self._cond:
            while acq.triggers < needed:
                if acq.stop or acq.abort or self._stopping.is_set():
                    return False
                self._cond.wait(_POLL_S)
                if self._peer_closed(conn):
                    raise _Disconnected()
        return True

    def _inject(self, conn: socket.socket, fault: Fault, acq: _Acquisition, seq: int, whole: memoryview,
                header_size: int) -> None:
        self.fault_log.append((acq.number, fault.kind, seq))
        logger.info("fault %s at frame %d of acquisition %d", fault.kind, seq, acq.number)
        size = len(whole)
        if fault.kind == "truncate":
            self._send(conn, whole[: MPX_PREFIX_SIZE + header_size + (size - MPX_PREFIX_SIZE - header_size) // 2])
        elif fault.kind == "corrupt_header":
            damaged = bytearray(whole)
            damaged[MPX_PREFIX_SIZE:MPX_PREFIX_SIZE + 10] = b"XQ9,??????"
            self._send(conn, damaged)
        elif fault.kind == "drop":
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            raise _Disconnected()
        elif fault.kind == "skip":
            pass
        elif fault.kind == "stall":
            self._send(conn, whole[: size // 2])
            self._stopping.wait(fault.seconds)
            self._send(conn, whole[size // 2:])
        elif fault.kind == "garbage":
            junk = self._rng.integers(0, 256, fault.n_bytes, dtype=np.uint8).tobytes()
            self._send(conn, junk.replace(b"MPX,", b"MPY,"))
            self._send(conn, whole)
