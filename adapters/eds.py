"""Receive EDS spectra from a ZeroMQ stream in streamclust's wire format.

A :class:`SpectrumReceiver` drains its socket in its own thread into a bounded buffer, so a slow
consumer never stalls the socket unnoticed: with ``on_full="block"`` (the PULL default) the thread
stops reading and ZeroMQ's high-water marks push back to the sender (lossless); with
``on_full="drop"`` (the SUB default) the spectrum is dropped and counted under ``dropped_full``.
Malformed messages are counted by kind and skipped; the receiver keeps running.

At detector rates (12,500 positions/s) the per-spectrum bookkeeping costs more than decoding, so
the thread reads every message already waiting (up to 256) before it takes a lock, and the
consumer takes everything buffered at once: :meth:`SpectrumStream.blocks` hands spectra on as
lists, which :func:`~streamclust.adapters.join.join_streams` offers to its joiner under one lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import zmq

from streamclust.adapters.errors import WireFormatError
from streamclust.adapters.security import apply_security, warn_if_exposed
from streamclust.adapters.wire import MAX_HEADER_BYTES, decode_array_message

logger = logging.getLogger(__name__)

__all__ = ["Spectrum", "SpectrumReceiver", "SpectrumStream"]

_POLL_MS = 50
#: Most messages read from the socket in one go before they are handed on (one lock, one wake-up)
_RECV_BLOCK = 256
#: Buffers below this many bytes are received with ``copy=True``: for small messages pyzmq's copy
#: costs less than the bookkeeping of a zero-copy ``zmq.Frame`` (its own threshold is 64 KiB too)
COPY_THRESHOLD = 65536


@dataclass(frozen=True)
class Spectrum:
    """One received spectrum: its 0-based scan position, counts (read-only view) and header."""

    position: int
    counts: np.ndarray
    header: dict = field(repr=False)


class _End:
    __slots__ = ("header",)

    def __init__(self, header: dict):
        self.header = header


class SpectrumReceiver:
    """Connect to an EDS stream and collect spectra in a background thread.

    Parameters
    ----------
    endpoint : str
        The publisher's endpoint (connected to, or bound with ``bind=True``).
    socket_type : {"pull", "sub"}
    max_buffer : int
        Spectra held between the socket and :meth:`spectra`.
    on_full : {"block", "drop"}, optional
        Behaviour at a full buffer; default "block" for PULL (lossless), "drop" for SUB.
    max_bytes : int
        Largest spectrum buffer accepted (larger messages are malformed, kind ``too_large``).
        ZeroMQ's own ``MAXMSGSIZE`` is set to twice this plus the header limit, so a peer
        claiming a huge message is disconnected by ZeroMQ before anything is allocated.
    hwm : int
        Receive high-water mark (messages).
    security : CurveClient, optional
        CURVE keys to receive from a CURVE publisher (:mod:`streamclust.adapters.security`).
    context : zmq.Context, optional
        Defaults to ``zmq.Context.instance()``.

    Attributes
    ----------
    stats : dict
        ``received`` (valid EDS messages), ``malformed`` (+ ``malformed_by_kind``), ``duplicates``
        (same position seen again in the same scan), ``dropped_full``, ``ends``.
    end_header : dict or None
        The last end marker's header.
    """

    def __init__(self, endpoint: str, *, socket_type: str = "pull", max_buffer: int = 4096,
                 on_full: str | None = None, max_bytes: int = 1 << 24, hwm: int = 10000,
                 bind: bool = False, max_positions: int = 1 << 26, security=None,
                 context: zmq.Context | None = None):
        if socket_type not in ("pull", "sub"):
            raise ValueError(f"socket_type must be 'pull' or 'sub', got {socket_type!r}")
        on_full = on_full or ("block" if socket_type == "pull" else "drop")
        if on_full not in ("block", "drop"):
            raise ValueError(f"on_full must be 'block' or 'drop', got {on_full!r}")
        if max_buffer < 1:
            raise ValueError("max_buffer must be >= 1")
        self.endpoint = endpoint
        self.socket_type = socket_type
        self.max_buffer = int(max_buffer)
        self.on_full = on_full
        self.max_bytes = int(max_bytes)
        self.hwm = int(hwm)
        self.bind = bind
        self.max_positions = int(max_positions)
        self.security = security
        self._context = context
        self._lock = threading.Lock()
        # the buffer between the thread and the consumer: items (Spectrum or _End) in arrival
        # order; ``_taken`` holds those the consumer took in its last block but has not yielded
        # yet (they still count against max_buffer)
        self._cv = threading.Condition(self._lock)
        self._buffer: deque = deque()
        self._taken: deque = deque()
        self._delivered = 0
        self._copy = True
        self._stats = Counter()
        self._malformed = Counter()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._seen_scan = None
        self._seen: np.ndarray | None = None
        self.end_header: dict | None = None
        self.bound_endpoint: str | None = None
        self._last_message = time.monotonic()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "SpectrumReceiver":
        if self._thread is not None:
            raise RuntimeError("receiver already started")
        self._thread = threading.Thread(target=self._run, name="eds-receiver", daemon=True)
        self._thread.start()
        if not self._ready.wait(10.0):
            raise TimeoutError("receiver socket not ready within 10 s")
        self._raise_error()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"receiver did not stop within {timeout} s")
        self._raise_error()

    def __enter__(self) -> "SpectrumReceiver":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _raise_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError("spectrum receiver thread failed") from err

    @property
    def stats(self) -> dict:
        with self._lock:
            out = {k: self._stats.get(k, 0) for k in ("received", "malformed", "duplicates", "dropped_full",
                                                      "ends")}
            out["delivered"] = self._delivered
            out["malformed_by_kind"] = dict(self._malformed)
            out["buffered"] = len(self._buffer) + len(self._taken)
            return out

    def end_report(self) -> dict:
        """What the last end marker announced versus what arrived here.

        ``lost_in_transport = announced_sent - received - malformed`` is what the network (or a
        SUB socket's HWM) lost; ``missing_positions`` are positions of the scan never received.
        The receive counters are cumulative: the comparison is exact for a receiver that saw one
        scan (use one receiver per scan, or compare differences).
        """
        with self._lock:
            totals = dict(self.end_header["totals"]) if self.end_header else {}
            seen = int(self._seen.sum()) if self._seen is not None else 0
            received = self._stats.get("received", 0)
            malformed = self._stats.get("malformed", 0)
            report = {"end_received": self.end_header is not None, "announced": totals,
                      "received": received, "malformed": malformed,
                      "duplicates": self._stats.get("duplicates", 0),
                      "dropped_full": self._stats.get("dropped_full", 0),
                      "unique_positions": seen}
        if "sent" in totals:
            report["lost_in_transport"] = int(totals["sent"]) - received - malformed
        if "n_positions" in totals:
            report["missing_positions"] = int(totals["n_positions"]) - seen
        return report

    # -- consumer side -------------------------------------------------------------------------
    def spectra(self, timeout: float | None = 2.0) -> "SpectrumStream":
        """Spectra until the end marker, or until ``timeout`` seconds pass without one.

        Returns an iterator of :class:`Spectrum`; its :meth:`SpectrumStream.blocks` yields the
        same spectra as lists of those already received (cheaper at high rates).
        """
        return SpectrumStream(self, timeout)

    def __iter__(self) -> Iterator[Spectrum]:
        return self.spectra()

    def _take(self, timeout: float | None) -> bool:
        """Move everything buffered into ``_taken``; False if nothing came within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            # wake a thread waiting for room: what the consumer yielded since has made some
            self._cv.notify_all()
            while not self._buffer:
                if deadline is None:
                    self._cv.wait(_POLL_MS / 1000)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cv.wait(min(remaining, _POLL_MS / 1000))
            self._taken.extend(self._buffer)
            self._buffer.clear()
            self._cv.notify_all()
        return True

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        ctx = self._context or zmq.Context.instance()
        sock = ctx.socket(zmq.PULL if self.socket_type == "pull" else zmq.SUB)
        try:
            sock.linger = 0
            sock.rcvhwm = self.hwm
            sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_bytes + MAX_HEADER_BYTES)
            if self.socket_type == "sub":
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            apply_security(sock, self.security, ctx, role="client")
            if self.bind:
                warn_if_exposed(self.endpoint, self.security, "SpectrumReceiver")
                sock.bind(self.endpoint)
                self.bound_endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
            else:
                sock.connect(self.endpoint)
            self._ready.set()
            # the room one block may take: a block never overshoots max_buffer on its own
            block_size = min(_RECV_BLOCK, self.max_buffer)
            # recv_multipart without its per-part getsockopt wrapper (0.5 us of 3.4 a message)
            recv, get, rcvmore, noblock = sock.recv, sock.get, int(zmq.RCVMORE), zmq.NOBLOCK
            while not self._stop.is_set():
                if not sock.poll(_POLL_MS, zmq.POLLIN):
                    continue
                parts_list = []
                for _ in range(block_size):
                    copy = self._copy
                    try:
                        parts = [recv(noblock, copy=copy)]
                    except zmq.Again:
                        break
                    # the parts of a message arrive together: the rest are there already
                    while get(rcvmore):
                        parts.append(recv(noblock, copy=copy))
                    parts_list.append(parts)
                    # the next spectrum is most likely as large as this one (an end marker's
                    # empty buffer says nothing about the next scan's)
                    if len(parts) == 2 and len(parts[1]):
                        self._copy = len(parts[1]) < COPY_THRESHOLD
                self._handle_block(parts_list)
        except BaseException as exc:
            logger.exception("spectrum receiver failed")
            self._error = exc
            self._ready.set()
        finally:
            sock.close(linger=0)

    def _decode(self, parts, malformed: Counter):
        """One message as a Spectrum or _End; None (counted in ``malformed``) if it is bad."""
        try:
            header, counts = decode_array_message(parts, max_bytes=self.max_bytes, expect_stream="eds")
            if counts.ndim != 1 and header["stream"] == "eds":
                err = WireFormatError(f"spectrum must be 1-D, got shape {list(counts.shape)}",
                                      sequence=header["sequence"])
                err.kind = "bad_shape"
                raise err
        except WireFormatError as exc:
            kind = getattr(exc, "kind", exc.reason)
            malformed[kind] += 1
            logger.warning("malformed EDS message skipped (%s): %s", kind, exc)
            return None
        if header["stream"] == "end":
            return _End(header)
        return Spectrum(header["position"], counts, header)

    def _handle_block(self, parts_list: list) -> None:
        malformed: Counter = Counter()
        decode = self._decode
        items = [item for item in (decode(parts, malformed) for parts in parts_list) if item is not None]
        with self._cv:
            if malformed:
                self._stats["malformed"] += sum(malformed.values())
                self._malformed.update(malformed)
            for item in items:
                if type(item) is _End:
                    self._stats["ends"] += 1
                    self.end_header = item.header
                    logger.info("EDS end marker: %s", item.header["totals"])
                    # an end marker is never dropped: it waits for room like a lossless spectrum
                    if not self._wait_for_room():
                        return
                    self._buffer.append(item)
                    continue
                self._count_position(item)
                if self.on_full == "drop":
                    if len(self._buffer) + len(self._taken) >= self.max_buffer:
                        self._stats["dropped_full"] += 1
                        continue
                elif not self._wait_for_room():
                    return
                self._buffer.append(item)
            self._cv.notify_all()

    def _wait_for_room(self) -> bool:
        """(Lock held.) Wait until max_buffer has room; False if stopped meanwhile.

        Blocking here stops reading the socket, so ZeroMQ's HWM pushes back to the sender.
        """
        while len(self._buffer) + len(self._taken) >= self.max_buffer:
            if self._stop.is_set():
                return False
            self._cv.notify_all()  # the consumer may be waiting for what is buffered already
            self._cv.wait(_POLL_MS / 1000)
        return True

    def _count_position(self, item: Spectrum) -> None:
        """(Lock held.) Count a valid spectrum and whether its position was seen in this scan."""
        self._stats["received"] += 1
        header = item.header
        if header["scan_id"] != self._seen_scan:
            n = int(np.prod(header["scan_shape"]))
            self._seen_scan = header["scan_id"]
            self._seen = np.zeros(min(n, self.max_positions), dtype=bool)
        pos = item.position
        if pos < self._seen.size:
            if self._seen[pos]:
                self._stats["duplicates"] += 1
            self._seen[pos] = True


class SpectrumStream:
    """The spectra of a :class:`SpectrumReceiver`, as an iterator or in blocks.

    Made by :meth:`SpectrumReceiver.spectra`. Iterating yields :class:`Spectrum` objects;
    :meth:`blocks` yields lists of them (each what had arrived when it was taken, at most
    ``max_block``), which costs one lock per block instead of one per spectrum. Both end at the
    end marker or after ``timeout`` seconds without a spectrum, and may be mixed: nothing taken
    from the receiver is lost between them. One consumer thread at a time: spectra taken but not
    yet yielded are shared by all the receiver's streams.
    """

    def __init__(self, receiver: SpectrumReceiver, timeout: float | None):
        self._rx = receiver
        self.timeout = timeout
        self._done = False

    def __iter__(self) -> "SpectrumStream":
        return self

    def _fill(self) -> bool:
        rx = self._rx
        if self._done:
            return False  # what follows an end marker belongs to the next scan's stream
        if rx._taken:
            return True
        if not rx._take(self.timeout):
            logger.info("no spectrum for %s s: ending the stream", self.timeout)
            self._done = True
            rx._raise_error()
            return False
        return True

    def __next__(self) -> Spectrum:
        rx = self._rx
        if not self._fill():
            raise StopIteration
        item = rx._taken.popleft()
        if type(item) is _End:
            self._done = True
            raise StopIteration
        rx._delivered += 1
        return item

    def blocks(self, max_block: int = 256) -> Iterator[list[Spectrum]]:
        """Yield the spectra as non-empty lists of at most ``max_block``, in arrival order."""
        rx = self._rx
        taken = rx._taken
        while self._fill():
            block = []
            while taken and len(block) < max_block:
                item = taken.popleft()
                if type(item) is _End:
                    self._done = True
                    break
                block.append(item)
            if block:
                rx._delivered += len(block)
                yield block
