"""Live receiver for the Merlin data port (TCP 6342): acquisition headers and frames.

:class:`MerlinReceiver` connects to the detector PC, drains the socket in its own thread into a
bounded ring of frame-sized slots (``recv_into``, no per-frame allocation), and hands frames to the
consumer, which decodes them in :meth:`MerlinReceiver.frames`. The detector is therefore never
stalled by analysis until the ring is full; then the reader either blocks (``on_full="block"``,
default: TCP back-pressure, lossless) or reads the frame into a scratch buffer and counts it as
dropped (``on_full="drop"``, reason ``ring_full``).

Sizing: the slot size comes from the *first* frame header of an acquisition and must not exceed
the largest frame the acquisition header allows (chips from ``Assembly Size``, bytes per pixel
from ``Counter Depth``). No size a header merely claims is ever allocated.

What happens to bad input (every case is counted in :attr:`MerlinReceiver.stats`, recorded with
its reason, byte offset in the stream and sequence when known, and survived):

======================================  ==================================================
case                                    what the receiver does
======================================  ==================================================
malformed ``MPX,`` prefix, wrong        record ``bad_framing``; **resynchronise**: scan forward
magic, non-digit or impossible/over-    for the next ``MPX,<10 digits>,`` followed by ``MQ1,``
sized length, garbage bytes             or ``HDR,``; skipped bytes are counted
frame payload with a bad MQ1 header     the length is trusted (it was bounded), the message is
(corrupt header)                        **skipped** and dropped as ``bad_header``
truncated frame (the next message       detected because each frame is held back until the next
starts inside its pixels)               message start checks out; dropped as ``truncated``,
                                        parsing continues at the embedded message start
frame of another size or geometry       dropped as ``geometry_change`` (skipped by its length)
sequence jump                           delivered; the missing count is added to
                                        ``sequence_gaps`` and recorded
duplicate / backward sequence           dropped as ``duplicate_sequence``
frame before any acquisition header     dropped as ``no_acquisition_header``
connection closed / reset               the reader **stops**; an open acquisition ends
                                        incomplete (``connection_lost``)
silence longer than ``timeout``         :meth:`frames` ends; the acquisition is incomplete
                                        (``timeout``); the reader keeps listening
new ``HDR`` before the frame count      the old acquisition ends incomplete (``new_header``),
                                        the new one starts
======================================  ==================================================

Limitation: the last frame of an acquisition is handed over on arrival (there is no next message
to check it against); if it is truncated and the next acquisition's header follows, that header
is consumed as pixels and the next acquisition is found by resynchronisation.

The real detector keeps the data socket open across acquisitions: each ``HDR`` message starts a
new one (:meth:`MerlinReceiver.acquisitions`).

Frames are delivered in the detector's native orientation (see :mod:`streamclust.adapters.mib`).

This module is the consumer side (connection, acquisitions, iteration, decoding, counters); the
reader thread and its parsers are :mod:`streamclust.adapters.merlin_reader`, the ring of frame
slots and the image pool :mod:`streamclust.adapters.merlin_ring`.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from streamclust.adapters.errors import AcquisitionIncomplete, ProtocolError
from streamclust.adapters.merlin_control import MerlinControl
# max_frame_payload is re-exported: callers have always imported it from here
from streamclust.adapters.merlin_reader import StreamReader, max_frame_payload
from streamclust.adapters.merlin_ring import POLL_S, ImagePool
from streamclust.adapters.mib_decode import FrameDecoder
from streamclust.adapters.mib_header import AcquisitionHeader, parse_frame_header

__all__ = ["MerlinReceiver", "MerlinFrame", "MerlinAcquisition", "FrameIterator", "ReceiverStats",
           "max_frame_payload"]

logger = logging.getLogger(__name__)

#: errors kept in ReceiverStats.errors (their counts are never truncated)
_MAX_ERROR_RECORDS = 1000


@dataclass
class ReceiverStats:
    """Counters of one receiver (all acquisitions on the connection)."""

    #: frame messages read intact and handed to the consumer
    frames_received: int = 0
    #: frames decoded by the consumer
    frames_decoded: int = 0
    #: bytes read from the socket
    bytes_received: int = 0
    #: bytes skipped while resynchronising
    bytes_skipped: int = 0
    #: frames (or frame-sized messages) dropped, by reason
    dropped: Counter = field(default_factory=Counter)
    #: sequence numbers never seen (sum of jump sizes)
    sequence_gaps: int = 0
    #: acquisition headers received
    acquisitions: int = 0
    #: errors: dicts with reason, message, offset, sequence (the first 1000)
    errors: list = field(default_factory=list)
    #: error counts by reason (never truncated)
    error_counts: Counter = field(default_factory=Counter)
    #: state of the current/last acquisition: expected and received frames, complete flag, end reason
    expected: int = 0
    received: int = 0
    complete: bool | None = None
    ended_by: str | None = None

    @property
    def frames_dropped(self) -> int:
        return sum(self.dropped.values())

    def as_dict(self) -> dict:
        return {
            "frames_received": self.frames_received, "frames_decoded": self.frames_decoded,
            "bytes_received": self.bytes_received, "bytes_skipped": self.bytes_skipped,
            "dropped": dict(self.dropped), "sequence_gaps": self.sequence_gaps,
            "acquisitions": self.acquisitions, "error_counts": dict(self.error_counts),
            "expected": self.expected, "received": self.received, "complete": self.complete,
            "ended_by": self.ended_by,
        }


@dataclass
class MerlinFrame:
    """One received frame: 1-based ``sequence`` from the MQ1 header, the assembled ``image``,
    the byte ``offset`` of its message in the stream and the acquisition ``number``."""

    sequence: int
    image: np.ndarray
    offset: int
    acquisition: int


class MerlinAcquisition:
    """One acquisition on the data connection: its header and its frames.

    Obtained from :meth:`MerlinReceiver.acquisitions`; iterate :meth:`frames` once.
    """

    def __init__(self, receiver: "MerlinReceiver", header: AcquisitionHeader, number: int, offset: int):
        self._rx = receiver
        self.header = header
        self.number = number
        self.offset = offset
        self.expected = header.n_frames
        self.received = 0
        self.last_sequence = 0
        self.complete: bool | None = None
        self.ended_by: str | None = None
        self._decoder: FrameDecoder | None = None

    @property
    def finished(self) -> bool:
        return self.ended_by is not None

    def frames(self, timeout: float | None = None, *, copy: bool = True) -> "FrameIterator":
        """Yield the frames of this acquisition, decoded, until its frame count is reached.

        Parameters
        ----------
        timeout : float, optional
            Longest silence (seconds) before giving up; defaults to the receiver's ``timeout``.
        copy : bool, default True
            Each image is an array of its own (recycled only once nothing references it any more).
            With False one array is reused: an image is valid only until the next frame.
        """
        timeout = self._rx.timeout if timeout is None else timeout
        return FrameIterator(lambda it: self._rx._iter_frames(self, timeout, copy, it),
                             lambda it, max_frames: self._rx._iter_frame_blocks(self, timeout, copy, it,
                                                                                max_frames))


class FrameIterator:
    """The iterator :meth:`MerlinReceiver.frames` returns: frames, decoded on demand.

    Attributes
    ----------
    out_allocator : callable or None
        ``out_allocator(shape, dtype)`` returns the array the next frame is decoded into (for
        example a row of a batch buffer, :class:`~streamclust.adapters.join.FrameBlocks`): the
        pixels then go from the socket ring to where analysis reads them in one pass. The
        allocator must hand out memory nobody else writes. None (default): see ``copy``.
    """

    def __init__(self, make, make_blocks=None):
        self.out_allocator = None
        self._make, self._make_blocks = make, make_blocks
        self._gen = None

    def __iter__(self) -> "FrameIterator":
        return self

    def __next__(self) -> MerlinFrame:
        if self._gen is None:
            self._gen = self._make(self)
        return next(self._gen)

    def blocks(self, max_frames: int = 64) -> Iterator[list[MerlinFrame]]:
        """The same frames as lists: each holds the frames already received (at least one, at
        most ``max_frames``), decoded, so a consumer pays its per-item costs (a lock, a poll)
        once a list instead of once a frame. Waits, ends and counters are those of iteration.

        Use either this or plain iteration on one iterator, not both.
        """
        if self._gen is not None or self._make_blocks is None:
            raise RuntimeError("blocks() must be the only way this iterator is consumed")
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self._gen = self._make_blocks(self, int(max_frames))
        return self._gen

    def close(self) -> None:
        """Stop early (the acquisition ends as ``consumer_stopped``)."""
        if self._gen is not None:
            self._gen.close()


class MerlinReceiver:
    """Receive frames from a Merlin data port (real detector or the simulator).

    Parameters
    ----------
    host : str
    data_port : int, default 6342
    control_port : int, optional
        When given, :attr:`control` is a connected :class:`MerlinControl`.
    timeout : float, default 5.0
        Seconds to connect, and the default longest silence in :meth:`frames`.
    ring_slots : int, default 64
        Frame slots between the socket reader and the consumer.
    ring_bytes : int, default 256 MiB
        Upper bound on the ring's memory; the slot count shrinks to fit.
    on_full : {"block", "drop"}
        When every slot holds an undecoded frame: block the reader (TCP back-pressure, lossless)
        or drop and count the frame (reason ``ring_full``).
    raise_on_incomplete : bool, default False
        Raise :class:`AcquisitionIncomplete` from :meth:`frames` when an acquisition ends short.
    max_frame_bytes : int, optional
        Override the frame-size bound derived from the acquisition header.
    hold_s : float, default 0.05
        Each frame is held until the next message starts cleanly (so a truncated frame is never
        delivered); if the stream goes quiet, it is handed over after ``hold_s`` seconds.

    Examples
    --------
    >>> import numpy as np
    >>> from streamclust.simulators.merlin import ArraySource, MerlinServer
    >>> frames = np.arange(3 * 256 * 256, dtype=np.uint16).reshape(3, 256, 256) % 4096
    >>> with MerlinServer(ArraySource(frames), data_port=0, control_port=0, layout="1x1",
    ...                   headless=True) as server:
    ...     with MerlinReceiver(*server.data_address) as rx:
    ...         got = [(f.sequence, bool((f.image == frames[f.sequence - 1]).all())) for f in rx.frames()]
    ...         complete = rx.stats.complete
    >>> got, complete
    ([(1, True), (2, True), (3, True)], True)
    """

    def __init__(self, host: str = "127.0.0.1", data_port: int = 6342, control_port: int | None = None, *,
                 timeout: float = 5.0, ring_slots: int = 64, ring_bytes: int = 256 * 2**20,
                 on_full: str = "block", raise_on_incomplete: bool = False,
                 max_frame_bytes: int | None = None, hold_s: float = 0.05):
        if on_full not in ("block", "drop"):
            raise ValueError(f"on_full must be 'block' or 'drop', got {on_full!r}")
        if ring_slots < 2:
            raise ValueError("ring_slots must be at least 2")
        self.host = host
        self.data_port = data_port
        self.control_port = control_port
        self.timeout = timeout
        self.ring_slots = ring_slots
        self.ring_bytes = ring_bytes
        self.on_full = on_full
        self.raise_on_incomplete = raise_on_incomplete
        self.max_frame_bytes = max_frame_bytes
        self.hold_s = hold_s

        self.stats = ReceiverStats()
        self.control: MerlinControl | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._stash: tuple | None = None
        self._backlog: deque = deque()  # frame events of a received block not yet consumed
        self._current: MerlinAcquisition | None = None
        self._n_acq = 0
        self._error_lock = threading.Lock()
        self._out: np.ndarray | None = None
        self._pool: ImagePool | None = None
        self._reader: StreamReader | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def connect(self) -> "MerlinReceiver":
        if self._sock is not None:
            return self
        sock = socket.create_connection((self.host, self.data_port), timeout=self.timeout)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 2**20)
        except OSError:
            pass
        # a frame held back (see hold_s) is handed over when a receive times out: no separate
        # readiness check (a select() per receive) is needed in the fast path
        sock.settimeout(min(POLL_S, max(self.hold_s, 0.001)))
        self._sock = sock
        if self.control_port is not None:
            self.control = MerlinControl(self.host, self.control_port, timeout=self.timeout).connect()
        self._reader = StreamReader(sock, events=self._events, stats=self.stats, record=self._record,
                                    stop=self._stop, ring_slots=self.ring_slots, ring_bytes=self.ring_bytes,
                                    on_full=self.on_full, max_frame_bytes=self.max_frame_bytes,
                                    hold_s=self.hold_s)
        self._thread = threading.Thread(target=self._reader.run, name="merlin-receiver", daemon=True)
        self._thread.start()
        logger.info("receiving from %s:%s", self.host, self.data_port)
        return self

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.control is not None:
            self.control.close()

    def __enter__(self) -> "MerlinReceiver":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def header(self) -> AcquisitionHeader | None:
        """The acquisition header of the current (or last) acquisition."""
        return None if self._current is None else self._current.header

    # -- consumer side -----------------------------------------------------------------------
    def acquisitions(self, timeout: float | None = None) -> Iterator[MerlinAcquisition]:
        """Yield each acquisition on the connection as its header arrives; ends on a timeout
        without a new header or when the connection is gone."""
        while True:
            acq = self.next_acquisition(timeout)
            if acq is None:
                return
            yield acq
            if not acq.finished:
                # the caller did not read the frames: drain them so the next header can be found
                for _ in acq.frames(timeout):
                    pass

    def next_acquisition(self, timeout: float | None = None) -> MerlinAcquisition | None:
        """Wait for the next acquisition header; None on timeout or a closed connection.

        If an acquisition is open (its frames not all read), that one is returned.
        """
        if self._current is not None and not self._current.finished:
            return self._current
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            event = self._next_event(deadline - time.monotonic())
            if event is None:
                return None
            kind = event[0]
            if kind == "header":
                _, header, offset = event
                self._n_acq += 1
                self._current = MerlinAcquisition(self, header, self._n_acq, offset)
                self.stats.expected = header.n_frames
                self.stats.received = 0
                self.stats.complete = None
                self.stats.ended_by = None
                return self._current
            if kind == "end":
                self._stash = event  # keep it: every later call sees the end too
                return None
            if kind == "frame":  # frames of an acquisition we already gave up on
                event[1].release(event[2])
                self.stats.dropped["after_acquisition_end"] += 1

    def frames(self, timeout: float | None = None, *, copy: bool = True) -> Iterator[MerlinFrame]:
        """Frames of the current or next acquisition; ends when its frame count is reached.

        See :meth:`MerlinAcquisition.frames`. Without any acquisition header within ``timeout``
        this yields nothing (and raises with ``raise_on_incomplete``).
        """
        acq = self.next_acquisition(timeout)
        if acq is None:
            if self.raise_on_incomplete:
                raise AcquisitionIncomplete("no acquisition header received", expected=0, received=0)
            return iter(())
        return acq.frames(timeout, copy=copy)

    def _next_event(self, timeout: float):
        if self._backlog:  # frames precede anything stashed: they were read before it
            return self._backlog.popleft()
        if self._stash is not None:
            event = self._stash
            if event[0] != "end":
                self._stash = None
            return event
        try:
            event = self._events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if event[0] == "frames":
            self._backlog.extend(event[1][1:])
            event = event[1][0]
        return event

    def _iter_frames(self, acq: MerlinAcquisition, timeout: float, copy: bool,
                     it: FrameIterator) -> Iterator[MerlinFrame]:
        if acq.finished:
            return
        try:
            while True:
                event = self._next_event(timeout)
                if event is None:
                    self._finish(acq, "timeout")
                    return
                if event[0] == "frame":
                    frame = self._decode_event(acq, event, copy, it)
                    if frame is None:
                        continue
                    yield frame
                    if acq.expected and frame.sequence >= acq.expected:
                        self._finish(acq, "last_frame")
                        return
                elif self._ends(acq, event):
                    return
        finally:
            if not acq.finished:  # the caller stopped iterating early
                self._finish(acq, "consumer_stopped", raise_=False)

    def _iter_frame_blocks(self, acq: MerlinAcquisition, timeout: float, copy: bool, it: FrameIterator,
                           max_frames: int) -> Iterator[list[MerlinFrame]]:
        """:meth:`_iter_frames` a list at a time: after one blocking wait, every event already
        received is taken without waiting (up to ``max_frames`` frames)."""
        if acq.finished:
            return
        next_event, decode = self._next_event, self._decode_event
        try:
            while True:
                event = next_event(timeout)
                if event is None:
                    self._finish(acq, "timeout")
                    return
                block: list[MerlinFrame] = []
                last = ended = False
                while event is not None:
                    if event[0] == "frame":
                        frame = decode(acq, event, copy, it)
                        if frame is not None:
                            block.append(frame)
                            if acq.expected and frame.sequence >= acq.expected:
                                last = True
                                break
                            if len(block) >= max_frames:
                                break
                    else:
                        # an end of the acquisition: the frames before it go out first
                        ended = True
                        break
                    event = next_event(0.0)
                if block:
                    yield block
                if last:
                    self._finish(acq, "last_frame")
                    return
                if ended and self._ends(acq, event):
                    return
        finally:
            if not acq.finished:  # the caller stopped iterating early
                self._finish(acq, "consumer_stopped", raise_=False)

    def _ends(self, acq: MerlinAcquisition, event: tuple) -> bool:
        """Handle a non-frame event; True when it ends the acquisition (it always does)."""
        kind = event[0]
        if kind == "done":  # the reader saw the last sequence but dropped that frame
            self._finish(acq, "last_frame")
        elif kind == "header":
            self._stash = event
            self._finish(acq, "new_header")
        elif kind == "end":
            self._stash = event
            self._finish(acq, event[1])
        else:  # pragma: no cover - the reader sends no other kinds
            raise AssertionError(f"unknown receiver event {kind!r}")
        return True

    def _decode_event(self, acq: MerlinAcquisition, event: tuple, copy: bool,
                      it: FrameIterator) -> MerlinFrame | None:
        """Decode one frame event (releasing its slot); None if it is dropped (recorded)."""
        _, ring, slot, seq, offset, fheader = event
        stats = self.stats
        if fheader is not None or acq._decoder is None:
            try:
                if fheader is None:
                    fheader = parse_frame_header(ring.header_bytes(slot),
                                                 counter_depth=acq.header.counter_depth)
                acq._decoder = FrameDecoder(fheader)
            except ProtocolError as exc:
                ring.release(slot)
                self._record(exc.reason, str(exc), offset, seq)
                stats.dropped[exc.reason] += 1
                return None
            self._out = None
        try:
            pixels = ring.pixels(slot)
            dec = acq._decoder
            if it.out_allocator is not None:
                out = it.out_allocator(dec.image_shape, dec.image_dtype)
            else:
                if self._out is None:
                    self._out = np.empty(dec.image_shape, dec.image_dtype)
                    self._pool = ImagePool(dec.image_shape, dec.image_dtype)
                out = self._pool.get() if copy else self._out
            image = dec.decode(pixels, out=out)
        except ProtocolError as exc:
            self._record(exc.reason, str(exc), offset, seq)
            stats.dropped[exc.reason] += 1
            return None
        finally:
            ring.release(slot)
        stats.frames_decoded += 1
        acq.received += 1
        stats.received = acq.received
        acq.last_sequence = seq
        return MerlinFrame(seq, image, offset, acq.number)

    def _finish(self, acq: MerlinAcquisition, reason: str, raise_: bool = True) -> None:
        acq.ended_by = reason
        acq.complete = bool(acq.expected) and acq.received >= acq.expected
        if not acq.expected:
            acq.complete = None  # continuous: there is no count to reach
        self.stats.complete = acq.complete
        self.stats.ended_by = reason
        if acq.complete is False:
            logger.warning("acquisition %d incomplete (%s): received %d of %d frames", acq.number, reason,
                           acq.received, acq.expected)
            self._record("incomplete", f"acquisition {acq.number} ended by {reason}", None, acq.last_sequence)
            if raise_ and self.raise_on_incomplete:
                raise AcquisitionIncomplete(f"acquisition {acq.number} ended by {reason}",
                                            expected=acq.expected, received=acq.received)

    def _record(self, reason: str, message: str, offset: int | None, sequence: int | None) -> None:
        with self._error_lock:
            self.stats.error_counts[reason] += 1
            if len(self.stats.errors) < _MAX_ERROR_RECORDS:
                self.stats.errors.append({"reason": reason, "message": message, "offset": offset,
                                          "sequence": sequence})
        logger.debug("%s: %s (offset %s, sequence %s)", reason, message, offset, sequence)

