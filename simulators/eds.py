"""A simulated EDS detector that publishes one spectrum per scan position over ZeroMQ.

It speaks streamclust's EDS wire format (``docs/wire-formats.md``): header ``stream = "eds"``
plus the spectrum's counts, and an ``"end"`` marker with the scan's totals. Real EDS systems lose,
repeat and reorder messages; the publisher can do all of that on purpose (seeded), and counts each
fault so a test can check a receiver's accounting exactly.

Counting rules (per scan, in :attr:`EDSPublisher.scans` and the end marker's ``totals``):

* ``n_positions`` spectra are produced, each with its own ``sequence`` (1-based, in position order),
  assigned *before* the drop decision so a dropped message leaves a gap like a transport loss;
* ``dropped`` of them are never sent;
* ``duplicated`` of them are sent twice (same header, same sequence);
* ``reordered`` of them are held back and sent after the next message;
* ``sent`` messages leave the socket: ``sent == n_positions - dropped + duplicated``.
  On a PUB socket at its high-water mark a message is not delivered; ``hwm_dropped`` counts those
  (PUB is set to ``XPUB_NODROP`` so ZeroMQ tells us instead of dropping silently), and they are
  not in ``sent``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np
import zmq

from streamclust.adapters.background import BackgroundSocketThread
from streamclust.adapters.security import apply_security, release_server, warn_if_exposed
from streamclust.adapters.wire import encode_array_message, end_header
from streamclust.simulators.clock import ScanClock

logger = logging.getLogger(__name__)

__all__ = ["EDSPublisher", "ArraySpectrumSource"]

_POLL_MS = 50


@dataclass
class ArraySpectrumSource:
    """The smallest spectrum source: an ``(n_positions, n_channels)`` array and its energy axis.

    Examples
    --------
    >>> import numpy as np
    >>> src = ArraySpectrumSource(np.zeros((6, 8), np.uint16), scan_shape=(2, 3))
    >>> src.n_positions, src.n_channels, src.spectrum(5).shape
    (6, 8, (8,))
    """

    spectra: np.ndarray
    scan_shape: tuple | None = None
    energy_offset_kev: float = 0.0
    channel_width_kev: float = 0.01
    live_time_s: float = 0.001

    def __post_init__(self):
        self.spectra = np.asarray(self.spectra)
        if self.spectra.ndim != 2:
            raise ValueError(f"spectra must be (n_positions, n_channels), got shape {self.spectra.shape}")
        if self.scan_shape is None:
            self.scan_shape = (self.spectra.shape[0],)
        if int(np.prod(self.scan_shape)) != self.spectra.shape[0]:
            raise ValueError(f"scan_shape {self.scan_shape} does not hold {self.spectra.shape[0]} positions")

    @property
    def n_positions(self) -> int:
        return self.spectra.shape[0]

    @property
    def n_channels(self) -> int:
        return self.spectra.shape[1]

    def spectrum(self, position: int) -> np.ndarray:
        return self.spectra[position]


class _Stopped(Exception):
    pass


class EDSPublisher(BackgroundSocketThread):
    """Publish a source's spectra over a PUSH (lossless) or PUB (viewers) socket, in its own thread.

    Parameters
    ----------
    source : object
        Has ``n_positions`` (or ``scan_shape``), ``n_channels``, ``spectrum(position)``,
        ``energy_offset_kev`` and ``channel_width_kev``; optional ``live_time_s``/``dwell_s``
        and ``energy_axis_kev`` (which, when present, defines channel 0's energy on the wire).
    endpoint : str
        Where to bind; port 0 picks a free port (read :attr:`endpoint` after :meth:`wait_for_listen`).
    clock : ScanClock, optional
        Follow the scan clock: every triggered run is published, position ``i`` once the clock says
        it is acquired (plus ``delay_s``). Without a clock, call :meth:`publish_scan`.
    socket_type : {"push", "pub"}
    scan_id : str, optional
        Identifier in every header; with a clock, ``"<scan_id>-<run_id>"``.
    jitter_s, delay_s : float
        Random extra latency in ``[0, jitter_s)`` and fixed latency before each message.
    reorder, drop, duplicate : float
        Per-message probabilities of the faults (see the module docstring for the counting rules).
    random_state : int or None
        Seed of the fault generator.
    hwm : int
        Send high-water mark (messages). PUSH blocks at it (lossless), PUB drops and counts.
    security : CurveServer, optional
        CURVE for an endpoint reachable from the network (:mod:`streamclust.adapters.security`);
        binding a non-loopback address without it logs a warning.
    context : zmq.Context, optional
        Defaults to ``zmq.Context.instance()``.

    Examples
    --------
    >>> import numpy as np, zmq
    >>> from streamclust.adapters.wire import recv_array
    >>> src = ArraySpectrumSource(np.arange(12, dtype=np.uint16).reshape(3, 4))
    >>> with EDSPublisher(src, random_state=0) as pub:
    ...     pull = zmq.Context.instance().socket(zmq.PULL)
    ...     _ = pull.connect(pub.endpoint)
    ...     totals = pub.publish_scan()
    ...     msgs = [recv_array(pull) for _ in range(4)]
    ...     pull.close(linger=0)
    >>> [h["stream"] for h, _ in msgs], totals["sent"]
    (['eds', 'eds', 'eds', 'end'], 3)
    """

    def __init__(self, source, *, endpoint: str = "tcp://127.0.0.1:0", clock: ScanClock | None = None,
                 socket_type: str = "push", scan_id: str | None = None, jitter_s: float = 0.0,
                 reorder: float = 0.0, drop: float = 0.0, duplicate: float = 0.0, delay_s: float = 0.0,
                 random_state: int | None = None, hwm: int = 10000, security=None,
                 context: zmq.Context | None = None):
        if socket_type not in ("push", "pub"):
            raise ValueError(f"socket_type must be 'push' or 'pub', got {socket_type!r}")
        for name, p in (("reorder", reorder), ("drop", drop), ("duplicate", duplicate)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if jitter_s < 0 or delay_s < 0:
            raise ValueError("jitter_s and delay_s must be >= 0")
        self.source = source
        self.clock = clock
        self.socket_type = socket_type
        self.scan_id = scan_id if scan_id is not None else uuid.uuid4().hex[:12]
        self.jitter_s = float(jitter_s)
        self.reorder = float(reorder)
        self.drop = float(drop)
        self.duplicate = float(duplicate)
        self.delay_s = float(delay_s)
        self.random_state = random_state
        self.hwm = int(hwm)
        self._endpoint_requested = endpoint
        self.security = security
        self._context = context
        self.endpoint: str | None = None
        #: one dict of totals per published scan, in order
        self.scans: list[dict] = []
        self._rng = np.random.default_rng(random_state)
        self._requests: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._sequence = 0
        self._linger_ms = 0

    # -- lifecycle (start / wait_for_listen / context manager: BackgroundSocketThread) -----------
    _thread_name = "eds-publisher"
    _what = "EDS publisher"

    def stop(self, timeout: float = 5.0, *, linger_s: float = 1.0) -> None:
        """Stop the thread (interrupting a blocked send) and close the socket; re-raise its error.

        Messages still queued in ZeroMQ get ``linger_s`` seconds to leave (0 discards them).
        """
        self._linger_ms = int(max(0.0, min(linger_s, timeout)) * 1000)
        self._join(timeout)

    @property
    def n_positions(self) -> int:
        n = getattr(self.source, "n_positions", None)
        return int(n) if n is not None else int(np.prod(self.source.scan_shape))

    @property
    def totals(self) -> dict:
        """Sums over every scan published so far."""
        keys = ("n_positions", "sent", "dropped", "duplicated", "reordered", "hwm_dropped")
        return {k: sum(s[k] for s in self.scans) for k in keys}

    def _first_channel_kev(self) -> float:
        """Energy of channel 0 as the wire format defines it (``offset + k * width`` is channel k).

        A source with an explicit ``energy_axis_kev`` (the LamellaPhantom: channel centres at
        ``energy_offset_kev + (k + 0.5) * width``) is taken at its word; otherwise its
        ``energy_offset_kev`` is channel 0's energy.
        """
        axis = getattr(self.source, "energy_axis_kev", None)
        if axis is not None and len(axis):
            return float(axis[0])
        return float(self.source.energy_offset_kev)

    def publish_scan(self, n: int | None = None, *, wait: bool = True, timeout: float | None = None) -> dict | None:
        """Publish positions ``0 .. n-1`` (default: all) as fast as possible, then the end marker.

        Only without a clock. Returns the scan's totals when ``wait`` (None otherwise).
        """
        if self.clock is not None:
            raise RuntimeError("this publisher follows its scan clock; trigger the clock instead")
        if self._thread is None:
            raise RuntimeError("start() the publisher first")
        done: queue.Queue = queue.Queue()
        self._requests.put((n, done))
        if not wait:
            return None
        try:
            result = done.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"scan not published within {timeout} s") from None
        if isinstance(result, BaseException):
            raise RuntimeError("EDS publisher thread failed") from result
        return result

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        ctx = self._context or zmq.Context.instance()
        sock = ctx.socket(zmq.PUSH if self.socket_type == "push" else zmq.PUB)
        secured = False
        try:
            apply_security(sock, self.security, ctx, role="server")
            secured = True
            warn_if_exposed(self._endpoint_requested, self.security, "EDSPublisher")
            sock.linger = 0
            sock.sndhwm = self.hwm
            if self.socket_type == "pub":
                # tell us (EAGAIN) instead of silently dropping at a subscriber's HWM: we count it
                sock.setsockopt(zmq.XPUB_NODROP, 1)
            sock.bind(self._endpoint_requested)
            self.endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
            self._listening.set()
            if self.clock is not None:
                self._follow_clock(sock)
            else:
                self._serve_requests(sock)
        except _Stopped:
            pass
        except BaseException as exc:  # re-raised by stop()/wait_for_listen()
            logger.exception("EDS publisher failed")
            self._error = exc
            self._listening.set()
        finally:
            sock.close(linger=self._linger_ms if self._error is None else 0)
            if secured:
                release_server(self.security, ctx)

    def _serve_requests(self, sock) -> None:
        while not self._stop.is_set():
            try:
                n, done = self._requests.get(timeout=_POLL_MS / 1000)
            except queue.Empty:
                continue
            try:
                total = self.n_positions if n is None else min(int(n), self.n_positions)
                done.put(self._publish(sock, total, self.scan_id, due=None))
            except BaseException as exc:
                done.put(exc)
                raise

    def _follow_clock(self, sock) -> None:
        last = 0
        while not self._stop.is_set():
            run = self.clock.wait_for_run(after_run_id=last, timeout=_POLL_MS / 1000)
            if run is None:
                continue
            last = run.run_id
            n = run.n_positions
            if n > self.n_positions:
                logger.warning("scan of %d positions but the source has %d; publishing %d",
                               n, self.n_positions, self.n_positions)
                n = self.n_positions
            self._publish(sock, n, f"{self.scan_id}-{run.run_id}", due=run)

    def _wait_due(self, run, position: int) -> bool:
        if run is None:
            return True
        while not self._stop.is_set():
            if self.clock.wait_for(run, position, timeout=_POLL_MS / 1000):
                return True
            if self.clock.is_aborted(run):
                return False
        raise _Stopped

    def _sleep(self, seconds: float) -> None:
        if seconds > 0 and self._stop.wait(seconds):
            raise _Stopped

    def _send(self, sock, parts, *, counts: dict | None) -> bool:
        """Send one message; PUSH waits (lossless) until sent or stopped, PUB counts HWM drops."""
        copy = parts[1].nbytes < 65536
        if self.socket_type == "pub":
            try:
                sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=copy)
                return True
            except zmq.Again:
                if counts is not None:
                    counts["hwm_dropped"] += 1
                return False
        while True:
            if sock.poll(_POLL_MS, zmq.POLLOUT):
                try:
                    sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=copy)
                    return True
                except zmq.Again:
                    pass
            if self._stop.is_set():
                raise _Stopped

    def _publish(self, sock, n: int, scan_id: str, due) -> dict:
        src = self.source
        counts = {"scan_id": scan_id, "n_positions": 0, "sent": 0, "dropped": 0, "duplicated": 0,
                  "reordered": 0, "hwm_dropped": 0, "aborted": False}
        first_sequence = self._sequence + 1
        scan_shape = [int(s) for s in getattr(src, "scan_shape", (self.n_positions,))]
        live = float(getattr(src, "live_time_s", getattr(src, "dwell_s", 0.0)) or 0.0)
        real = float(getattr(src, "real_time_s", live) or live)
        base = {"stream": "eds", "scan_id": scan_id, "scan_shape": scan_shape,
                "live_time_s": live, "real_time_s": real,
                "energy_offset_kev": self._first_channel_kev(),
                "channel_width_kev": float(src.channel_width_kev)}
        held = None  # a message delayed past the next one (reorder)

        def emit(parts):
            if self._send(sock, parts, counts=counts):
                counts["sent"] += 1

        for position in range(n):
            if not self._wait_due(due, position):
                counts["aborted"] = True
                logger.info("scan %s aborted at position %d", scan_id, position)
                break
            # one draw of every random number per position, whatever happens, so runs are reproducible
            u_drop, u_dup, u_reorder, u_jitter = self._rng.random(4)
            self._sequence += 1
            counts["n_positions"] += 1
            if u_drop < self.drop:
                counts["dropped"] += 1
                continue
            has = getattr(src, "has_spectrum", None)
            if has is not None and not has(position):  # a recording with a hole: nothing to send
                counts["dropped"] += 1
                continue
            self._sleep(self.delay_s + u_jitter * self.jitter_s)
            spectrum = np.asarray(src.spectrum(position))
            header = dict(base, position=position, sequence=self._sequence)
            parts = encode_array_message(header, spectrum)
            copies = 2 if u_dup < self.duplicate else 1
            counts["duplicated"] += copies - 1
            if held is None and u_reorder < self.reorder and position < n - 1:
                held = (parts, copies)
                counts["reordered"] += 1
                continue
            for _ in range(copies):
                emit(parts)
            if held is not None:
                for _ in range(held[1]):
                    emit(held[0])
                held = None
        if held is not None:  # nothing was sent after it after all: it goes out in order
            counts["reordered"] -= 1
            for _ in range(held[1]):
                emit(held[0])
        self._sequence += 1
        totals = {k: counts[k] for k in ("n_positions", "sent", "dropped", "duplicated", "reordered",
                                         "hwm_dropped")}
        totals.update(first_sequence=first_sequence, last_sequence=self._sequence - 1,
                      aborted=counts["aborted"])
        end_parts = encode_array_message(end_header("eds", scan_id, self._sequence, totals),
                                         np.zeros(0, np.uint8))
        if self.socket_type == "pub":
            # the end marker matters to every viewer: retry briefly at the HWM rather than drop it
            deadline = time.monotonic() + 1.0
            while not self._send(sock, end_parts, counts=None) and time.monotonic() < deadline:
                self._sleep(0.005)
        else:
            self._send(sock, end_parts, counts=None)
        self.scans.append(counts)
        logger.info("EDS scan %s published: %s", scan_id, totals)
        return dict(counts)
