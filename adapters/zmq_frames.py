"""Fan detector frames out over ZeroMQ, and consume such a frame stream.

:class:`FrameBridge` takes any iterable of frames with ``.sequence`` (1-based) and ``.image`` (the
live ``MerlinReceiver`` yields exactly that) and sends each one, in streamclust's ``"frame"`` wire
format, on

* one shared **PUSH** socket (``push=``): lossless - a send waits at the high-water mark, and the
  time spent waiting is counted (``push_blocked_s``). Several PULL consumers connected to one PUSH
  endpoint **share** the load (ZeroMQ round-robin): each frame reaches exactly one of them;
* one **PUSH socket per consumer** (``push_each=[...]``): lossless, and every consumer gets every
  frame; the slowest consumer sets the pace;
* a **PUB** socket (``pub=``) for viewers: never waits; a frame that cannot be queued for a
  subscriber at its HWM is not published at all (``XPUB_NODROP`` makes ZeroMQ report it instead of
  dropping silently) and is counted in ``pub_dropped``. Subscribers that connect late miss the
  frames sent before (ZeroMQ's "slow joiner").

Every socket ends the stream with an ``"end"`` marker carrying the totals. On a shared PUSH socket
the bridge sends ``n_consumers`` markers (one per expected consumer, round-robin); a consumer that
gets none still ends on its idle timeout.

:class:`ZmqFrameSource` is the consumer side: it yields :class:`ZmqFrame` objects (``.sequence``,
``.position``, ``.image``) and counts malformed messages by kind.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import zmq

from streamclust.adapters.errors import WireFormatError
from streamclust.adapters.security import apply_security, release_server, warn_if_exposed
from streamclust.adapters.wire import (DEFAULT_MAX_BYTES, MAX_HEADER_BYTES, decode_array_message,
                                       encode_array_message, end_header)

logger = logging.getLogger(__name__)

__all__ = ["FrameBridge", "ZmqFrame", "ZmqFrameSource"]

_POLL_MS = 50
_COPY_THRESHOLD = 65536


@dataclass(frozen=True)
class ZmqFrame:
    """A frame received from a ZeroMQ frame stream.

    ``sequence`` is the detector's 1-based sequence number (``merlin_sequence`` in the header),
    ``position`` the 0-based scan position, ``image`` a read-only view of the received buffer.
    """

    sequence: int
    position: int
    image: np.ndarray
    header: dict = field(repr=False)


class _Stopped(Exception):
    pass


class FrameBridge:
    """Fan frames out over PUSH and/or PUB sockets from its own thread.

    Parameters
    ----------
    frames : iterable
        Objects with ``.sequence`` (1-based) and ``.image`` (2-D array).
    push : str, optional
        Endpoint of one shared PUSH socket (consumers share the frames).
    push_each : list of str, optional
        Endpoints of one PUSH socket each (every consumer gets every frame).
    pub : str, optional
        Endpoint of a PUB socket for viewers (drops at the HWM, counted).
    push_hwm, pub_hwm : int
        Send high-water marks in messages.
    n_consumers : int
        End markers sent on the shared PUSH socket.
    position_of : callable, optional
        Maps a frame to its 0-based scan position; default ``frame.sequence - 1``.
    scan_id : str, optional
    end_timeout_s : float
        How long the end marker may wait at a PUSH socket whose consumers are gone, and how long
        closing the sockets may wait for queued frames to leave after the last frame.
    copy_threshold : int
        Images of at least this many bytes are sent zero-copy: ZeroMQ keeps a reference and reads
        the buffer later, so the frame source must not reuse an image's memory for a later frame.
        A source that does should pass a ``copy_threshold`` above its frame size.
    security : CurveServer, optional
        CURVE for endpoints reachable from the network (every socket of the bridge);
        binding a non-loopback address without it logs a warning.
    context : zmq.Context, optional

    Examples
    --------
    >>> import numpy as np
    >>> from types import SimpleNamespace as NS
    >>> frames = [NS(sequence=s, image=np.full((4, 4), s, np.uint16)) for s in (1, 2, 3)]
    >>> bridge = FrameBridge(frames, push="tcp://127.0.0.1:0").start()
    >>> with ZmqFrameSource(bridge.wait_for_listen()["push"][0]) as source:
    ...     got = [(f.sequence, f.position, int(f.image[0, 0])) for f in source.frames(timeout=5)]
    >>> bridge.join()
    >>> got, bridge.stats["push_sent"]
    ([(1, 0, 1), (2, 1, 2), (3, 2, 3)], 3)
    """

    def __init__(self, frames: Iterable, *, push: str | None = None, push_each: list[str] | None = None,
                 pub: str | None = None, push_hwm: int = 1000, pub_hwm: int = 100, n_consumers: int = 1,
                 position_of: Callable | None = None, scan_id: str | None = None, end_timeout_s: float = 10.0,
                 copy_threshold: int = _COPY_THRESHOLD, security=None, context: zmq.Context | None = None):
        if push is None and not push_each and pub is None:
            raise ValueError("give at least one of push, push_each, pub")
        self.frames = frames
        self.push = push
        self.push_each = list(push_each or [])
        self.pub = pub
        self.push_hwm = int(push_hwm)
        self.pub_hwm = int(pub_hwm)
        self.n_consumers = int(n_consumers)
        self.position_of = position_of or (lambda frame: int(frame.sequence) - 1)
        self.scan_id = scan_id if scan_id is not None else uuid.uuid4().hex[:12]
        self.end_timeout_s = float(end_timeout_s)
        self.copy_threshold = int(copy_threshold)
        self.security = security
        self._context = context
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._stats = Counter()
        #: bound endpoints: {"push": [shared, *each], "pub": pub or None}
        self.endpoints: dict = {}

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "FrameBridge":
        if self._thread is not None:
            raise RuntimeError("bridge already started")
        self._thread = threading.Thread(target=self.run, name="frame-bridge", daemon=True)
        self._thread.start()
        return self

    def wait_for_listen(self, timeout: float = 10.0) -> dict:
        """Block until every socket is bound; return :attr:`endpoints` (real ports)."""
        if not self._listening.wait(timeout):
            raise TimeoutError(f"bridge did not bind within {timeout} s")
        self._raise_error()
        return self.endpoints

    def join(self, timeout: float | None = None) -> None:
        """Wait for the frames to run out (and the end markers to leave); re-raise a thread error."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"bridge still running after {timeout} s")
        self._raise_error()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop early (between frames, or interrupting a wait at a PUSH HWM)."""
        self._stop.set()
        self.join(timeout)

    def __enter__(self) -> "FrameBridge":
        self.start()
        self.wait_for_listen()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _raise_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError("frame bridge failed") from err

    @property
    def stats(self) -> dict:
        """``frames_in``, ``push_sent``, ``push_blocked`` (sends that had to wait),
        ``push_blocked_s``, ``pub_sent``, ``pub_dropped``, ``end_markers_sent``."""
        with self._lock:
            keys = ("frames_in", "push_sent", "push_blocked", "push_blocked_s", "pub_sent", "pub_dropped",
                    "end_markers_sent", "end_markers_unsent")
            return {k: self._stats.get(k, 0) for k in keys}

    def _count(self, key: str, n=1) -> None:
        with self._lock:
            self._stats[key] += n

    # -- sending -------------------------------------------------------------------------------
    def _send_push(self, sock, parts, copy: bool, deadline: float | None = None) -> bool:
        try:
            sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=copy)
            return True
        except zmq.Again:
            pass
        # at the HWM (or no consumer yet): wait, lossless, and count the time spent waiting
        self._count("push_blocked")
        t0 = time.perf_counter()
        try:
            while True:
                if sock.poll(_POLL_MS, zmq.POLLOUT):
                    try:
                        sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=copy)
                        return True
                    except zmq.Again:
                        pass
                if self._stop.is_set():
                    raise _Stopped
                if deadline is not None and time.monotonic() > deadline:
                    return False
        finally:
            self._count("push_blocked_s", time.perf_counter() - t0)

    def _send_pub(self, sock, parts, copy: bool) -> bool:
        try:
            sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=copy)
            return True
        except zmq.Again:
            return False

    def run(self) -> None:
        """Bind, send every frame, send the end markers, close. :meth:`start` runs this in a thread."""
        ctx = self._context or zmq.Context.instance()
        sockets = []
        n_secured = 0
        try:
            push_socks = []
            for endpoint in ([self.push] if self.push else []) + self.push_each:
                s = ctx.socket(zmq.PUSH)
                sockets.append(s)
                apply_security(s, self.security, ctx, role="server")
                n_secured += self.security is not None
                warn_if_exposed(endpoint, self.security, "FrameBridge")
                s.linger = 0
                s.sndhwm = self.push_hwm
                s.bind(endpoint)
                push_socks.append(s)
            pub_sock = None
            if self.pub:
                pub_sock = ctx.socket(zmq.PUB)
                sockets.append(pub_sock)
                apply_security(pub_sock, self.security, ctx, role="server")
                n_secured += self.security is not None
                warn_if_exposed(self.pub, self.security, "FrameBridge")
                pub_sock.linger = 0
                pub_sock.sndhwm = self.pub_hwm
                pub_sock.setsockopt(zmq.XPUB_NODROP, 1)
                pub_sock.bind(self.pub)
            self.endpoints = {"push": [s.getsockopt(zmq.LAST_ENDPOINT).decode() for s in push_socks],
                              "pub": pub_sock.getsockopt(zmq.LAST_ENDPOINT).decode() if pub_sock else None}
            self._listening.set()
            sequence = 0
            for frame in self.frames:
                if self._stop.is_set():
                    break
                sequence += 1
                self._count("frames_in")
                header = {"stream": "frame", "scan_id": self.scan_id, "position": int(self.position_of(frame)),
                          "sequence": sequence, "merlin_sequence": int(frame.sequence)}
                parts = encode_array_message(header, frame.image)
                copy = parts[1].nbytes < self.copy_threshold
                for s in push_socks:
                    self._send_push(s, parts, copy)
                    self._count("push_sent")
                if pub_sock is not None:
                    self._count("pub_sent" if self._send_pub(pub_sock, parts, copy) else "pub_dropped")
            self._send_ends(push_socks, pub_sock, sequence + 1)
            if not self._stop.is_set():
                # frames still queued in ZeroMQ must reach the consumers: close lets them out
                # (bounded), whereas stop() and errors discard them (linger 0)
                linger_ms = int(self.end_timeout_s * 1000)
                for s in sockets:
                    s.close(linger=linger_ms)
        except _Stopped:
            logger.info("frame bridge stopped")
        except BaseException as exc:
            logger.exception("frame bridge failed")
            self._error = exc
        finally:
            self._listening.set()
            for s in sockets:
                s.close(linger=0)
            for _ in range(n_secured):
                release_server(self.security, ctx)

    def _send_ends(self, push_socks, pub_sock, sequence: int) -> None:
        totals = self.stats
        totals.pop("push_blocked_s")
        parts = encode_array_message(end_header("frame", self.scan_id, sequence, totals), np.zeros(0, np.uint8))
        deadline = time.monotonic() + self.end_timeout_s
        for i, s in enumerate(push_socks):
            for _ in range(self.n_consumers if (self.push and i == 0) else 1):
                ok = self._send_push(s, parts, True, deadline=deadline)
                self._count("end_markers_sent" if ok else "end_markers_unsent")
        if pub_sock is not None:
            # viewers need the end too: retry briefly at the HWM instead of dropping it
            pub_deadline = min(deadline, time.monotonic() + 1.0)
            while not self._send_pub(pub_sock, parts, True):
                if time.monotonic() > pub_deadline or self._stop.wait(0.005):
                    self._count("end_markers_unsent")
                    return
            self._count("end_markers_sent")


class ZmqFrameSource:
    """Consume a frame stream (PULL or SUB); iterate :meth:`frames` for :class:`ZmqFrame` objects.

    The socket is created and connected on construction (so a SUB socket subscribes before the
    publisher starts) and must then be used from one thread at a time.

    Parameters
    ----------
    endpoint : str
    socket_type : {"pull", "sub"}
    max_bytes : int
        Largest frame buffer accepted; larger messages are malformed (``too_large``).
    hwm : int
        Receive high-water mark (messages).
    security : CurveClient, optional
        CURVE keys to receive from a CURVE bridge (:mod:`streamclust.adapters.security`).
    context : zmq.Context, optional

    Attributes
    ----------
    stats : dict
        ``received``, ``malformed`` (+ ``malformed_by_kind``), ``ends``.
    end_header : dict or None
    """

    def __init__(self, endpoint: str, socket_type: str = "pull", *, max_bytes: int = DEFAULT_MAX_BYTES,
                 hwm: int = 1000, security=None, context: zmq.Context | None = None):
        if socket_type not in ("pull", "sub"):
            raise ValueError(f"socket_type must be 'pull' or 'sub', got {socket_type!r}")
        self.endpoint = endpoint
        self.socket_type = socket_type
        self.max_bytes = int(max_bytes)
        ctx = context or zmq.Context.instance()
        self._sock = ctx.socket(zmq.PULL if socket_type == "pull" else zmq.SUB)
        self._sock.linger = 0
        self._sock.rcvhwm = int(hwm)
        self._sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_bytes + MAX_HEADER_BYTES)
        if socket_type == "sub":
            self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            apply_security(self._sock, security, ctx, role="client")
        except BaseException:
            self._sock.close(linger=0)
            raise
        self._sock.connect(endpoint)
        self._stats = Counter()
        self._malformed = Counter()
        self.end_header: dict | None = None

    @property
    def stats(self) -> dict:
        out = {k: self._stats.get(k, 0) for k in ("received", "malformed", "ends")}
        out["malformed_by_kind"] = dict(self._malformed)
        return out

    def frames(self, timeout: float | None = 2.0) -> Iterator[ZmqFrame]:
        """Yield frames until an end marker, or ``timeout`` seconds without a message."""
        poll_ms = None if timeout is None else int(timeout * 1000)
        while True:
            if not self._sock.poll(poll_ms, zmq.POLLIN):
                logger.info("no frame for %s s: ending the stream", timeout)
                return
            parts = self._sock.recv_multipart(copy=False)
            try:
                header, image = decode_array_message(parts, max_bytes=self.max_bytes, expect_stream="frame")
                if header["stream"] == "frame" and image.ndim != 2:
                    err = WireFormatError(f"frame must be 2-D, got shape {list(image.shape)}",
                                          sequence=header["sequence"])
                    err.kind = "bad_shape"
                    raise err
            except WireFormatError as exc:
                kind = getattr(exc, "kind", exc.reason)
                self._stats["malformed"] += 1
                self._malformed[kind] += 1
                logger.warning("malformed frame message skipped (%s): %s", kind, exc)
                continue
            if header["stream"] == "end":
                self._stats["ends"] += 1
                self.end_header = header
                return
            self._stats["received"] += 1
            yield ZmqFrame(header["merlin_sequence"], header["position"], image, header)

    def __iter__(self) -> Iterator[ZmqFrame]:
        return self.frames()

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> "ZmqFrameSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
