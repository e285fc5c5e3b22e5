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
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from streamclust.adapters import merlin_kernels as _mk
from streamclust.adapters.errors import (
    AcquisitionIncomplete,
    ConnectionLost,
    FramingError,
    HeaderError,
    ProtocolError,
)
from streamclust.adapters.framing import MPX_PREFIX_SIZE, parse_mpx_prefix
from streamclust.adapters.merlin_control import MerlinControl
from streamclust.adapters.mib import (
    MQ1_PEEK,
    AcquisitionHeader,
    FrameDecoder,
    FrameHeader,
    parse_acquisition_header,
    parse_frame_header,
    peek_header_size,
)

__all__ = ["MerlinReceiver", "MerlinFrame", "MerlinAcquisition", "FrameIterator", "ReceiverStats",
           "max_frame_payload"]

logger = logging.getLogger(__name__)

#: largest acquisition-header message accepted (real ones: 2048 bytes)
MAX_HDR_PAYLOAD = 65536
#: largest MQ1 header accepted in the frame-size bound (real ones: 384 / 768)
_MAX_FRAME_HEADER = 4096
_PEEK = 24  # bytes read before the MQ1 header size is known (see _on_frame_slow)
_CHIP_PIXELS = 256 * 256
_BYTES_PER_PIXEL = {1: 1, 6: 1, 12: 2, 24: 4}
_NO_HEADER_BOUND = _MAX_FRAME_HEADER + 514 * 514 * 4
_POLL_S = 0.2
#: bytes the reader asks for in one recv_into when frames are small
_BATCH_BYTES = 1 << 20
_MAX_ERROR_RECORDS = 1000
_RESYNC_CHUNK = 65536
_NEVER = 1 << 62


def max_frame_payload(header: AcquisitionHeader) -> int:
    """Largest frame payload (MQ1 header + pixels) an acquisition header allows.

    Chips come from ``Assembly Size`` (``1x1`` 1, ``2x2``/``2x2G`` 4 plus the gap, ``Nx1`` N;
    unknown: 16), bytes a pixel from ``Counter Depth`` (unknown: 4).

    Examples
    --------
    >>> max_frame_payload(parse_acquisition_header(
    ...     b"HDR,\\r\\nFrames in Acquisition (Number):\\t1\\r\\nCounter Depth (number):\\t12\\r\\n"
    ...     b"Assembly Size (NX1, 2X2):\\t2x2\\r\\nEnd\\t"))
    532488
    """
    size = header.assembly_size.lower().replace(" ", "")
    extra = 0
    if size in ("2x2", "2x2g"):
        chips, extra = 4, 514 * 514 - 512 * 512
    elif size.endswith("x1") and size[:-2].isdigit():
        chips = max(1, int(size[:-2]))
    else:
        chips = 16
    try:
        bpp = _BYTES_PER_PIXEL.get(header.counter_depth, 4)
    except ProtocolError:
        bpp = 4
    return _MAX_FRAME_HEADER + (chips * _CHIP_PIXELS + extra) * bpp


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


class _Ring:
    """Frame-sized slots, back to back, used first-in first-out (one message geometry).

    The reader takes runs of contiguous free slots so that one ``recv_into`` can fill several
    small frames; slots are handed back (:meth:`release`) in any order and reclaimed in order.
    """

    def __init__(self, n_slots: int, msg_size: int, header_size: int):
        self.buf = np.empty(n_slots * msg_size, np.uint8)
        self.scratch = np.empty(msg_size, np.uint8)
        self.msg_size = msg_size
        self.header_size = header_size
        self.n_slots = n_slots
        self._done = [False] * n_slots
        self._w = 0  # slots handed out so far (monotonic)
        self._r = 0  # slots reclaimed so far (monotonic)
        self._released = 0  # slots released so far (monotonic; written by the consumer only)
        self._wake_at = _NEVER  # while the reader waits: wake it when _released reaches this
        self._space = threading.Event()

    def acquire_run(self, max_k: int, block: bool, stop: threading.Event, min_k: int = 1) -> tuple[int, int]:
        """Return ``(first_slot, k)``: up to ``max_k`` contiguous free slots (k = 0: none, not blocking).

        Blocking, it waits for ``min_k`` of them (fewer where the ring wraps): when the consumer
        is the bottleneck the ring is full, and taking each slot as soon as it is freed would
        mean one ``recv_into``, one wake-up of each thread and one GIL hand-over a frame; taking
        them in runs turns that into one per run.
        """
        n = self.n_slots
        while True:
            done = self._done
            while self._r < self._w and done[self._r % n]:
                done[self._r % n] = False
                self._r += 1
            free = n - (self._w - self._r)
            first = self._w % n
            k = min(max_k, free, n - first)
            if not block or k >= max(1, min(min_k, max_k, n - first)):
                self._wake_at = _NEVER
                return first, k
            self._space.clear()
            # wake after enough further releases; if a slot released out of order waits behind
            # the head, the next release may free the whole run: wake at once then
            stuck = self._released > self._r
            self._wake_at = self._released + (1 if stuck else max(1, min(min_k, max_k, n - first) - k))
            # re-check after clear: a release may have happened in between
            if done[self._r % n] and (stuck or min_k <= 1):
                continue
            if not self._space.wait(_POLL_S) and stop.is_set():
                raise _Stopped()

    def commit(self, k: int = 1) -> None:
        """The next ``k`` slots of the run now belong to frames (held, queued or released)."""
        self._w += k

    def release(self, slot: int) -> None:
        """The consumer is done with ``slot`` (only the consumer thread calls this)."""
        self._done[slot] = True
        self._released += 1
        if self._released >= self._wake_at:
            self._space.set()

    def release_own(self, slot: int) -> None:
        """The reader gives back a slot it never handed over (it never waits on itself)."""
        self._done[slot] = True

    def array(self, slot: int | None, k: int = 1) -> np.ndarray:
        """Slots ``slot .. slot + k - 1`` as one byte array (None: the scratch slot)."""
        if slot is None:
            return self.scratch
        start = slot * self.msg_size
        return self.buf[start:start + k * self.msg_size]

    def view(self, slot: int | None, k: int = 1) -> memoryview:
        return memoryview(self.array(slot, k))

    def pixels(self, slot: int) -> np.ndarray:
        start = slot * self.msg_size + MPX_PREFIX_SIZE + self.header_size
        return self.buf[start:(slot + 1) * self.msg_size]

    def header_bytes(self, slot: int) -> bytes:
        start = slot * self.msg_size + MPX_PREFIX_SIZE
        return self.buf[start:start + self.header_size].tobytes()


def _geometry_key(header_start: bytes) -> bytes:
    """Fields 2-8 of an MQ1 header (size, chips, width, height, type, layout, chip select)."""
    return b",".join(header_start[:64].split(b",", 9)[2:9])


class _ImagePool:
    """Recycle image arrays the caller no longer references.

    A fresh 512x512 image per frame costs an mmap, page faults and zeroing in the kernel: about as
    much as decoding it. An array whose only reference is this pool (nobody kept the image, nor a
    view of it) is handed out again; otherwise a new one is made (the pool keeps at most ``size``).
    """

    def __init__(self, shape: tuple[int, int], dtype: np.dtype, size: int = 16):
        self.shape, self.dtype, self.size = shape, dtype, size
        self._arrays: list[np.ndarray] = []

    def get(self) -> np.ndarray:
        for a in self._arrays:
            # references: the list, the loop variable, getrefcount's argument
            if sys.getrefcount(a) == 3:
                return a
        a = np.empty(self.shape, self.dtype)
        if len(self._arrays) < self.size:
            self._arrays.append(a)
        return a


class _Closed(Exception):
    """The peer closed the connection (or the receiver is closing)."""


class _Stopped(Exception):
    pass


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
        self._pool: _ImagePool | None = None

        # reader state (reader thread only)
        self._pos = 0
        self._pushback = bytearray()
        self._hdr: AcquisitionHeader | None = None
        self._bound = 0
        self._ring: _Ring | None = None
        self._prefix = b""
        self._geometry = b""
        self._first_header_pending = False
        self._prefix_arr = self._geometry_arr = np.zeros(0, np.uint8)
        self._seqs = np.zeros(1, np.int64)
        self._last_seq = 0
        self._pending: tuple | None = None  # (ring, slot, sequence, offset, FrameHeader | None)
        self._outbox: list = []  # frame events not yet handed to the consumer (see _post)
        self._acq_done = True
        self._n_frames = 0

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
        sock.settimeout(min(_POLL_S, max(self.hold_s, 0.001)))
        self._sock = sock
        if self.control_port is not None:
            self.control = MerlinControl(self.host, self.control_port, timeout=self.timeout).connect()
        self._thread = threading.Thread(target=self._reader, name="merlin-receiver", daemon=True)
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
                    self._pool = _ImagePool(dec.image_shape, dec.image_dtype)
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

    # -- reader thread -----------------------------------------------------------------------
    def _reader(self) -> None:
        try:
            while not self._stop.is_set():
                self._read_message()
        except _Stopped:
            self._put_event(("end", "closed", None))
        except _Closed as exc:
            self._flush_pending()
            self._record(ConnectionLost.reason, str(exc), self._pos, None)
            self._put_event(("end", "connection_lost", exc))
        except Exception as exc:  # a bug must end the stream visibly, not hang the consumer
            logger.exception("Merlin receiver thread failed")
            self._record("receiver_error", repr(exc), self._pos, None)
            self._put_event(("end", "receiver_error", exc))

    def _fill(self, view: memoryview, n: int) -> None:
        """Fill ``view[:n]`` from the pushback buffer, then the socket."""
        got = 0
        if self._pushback:
            got = min(n, len(self._pushback))
            view[:got] = self._pushback[:got]
            del self._pushback[:got]
        sock = self._sock
        while got < n:
            self._post()
            try:
                k = sock.recv_into(view[got:n])
            except (socket.timeout, TimeoutError):
                if self._stop.is_set():
                    raise _Stopped() from None
                continue
            except OSError as exc:
                if self._stop.is_set():
                    raise _Stopped() from None
                raise _Closed(f"connection error after {self._pos + got} bytes: {exc}") from exc
            if k == 0:
                raise _Closed(f"connection closed by the detector after {self._pos + got} bytes")
            got += k
            self.stats.bytes_received += k
        self._pos += n

    def _read(self, n: int) -> bytes:
        buf = bytearray(n)
        self._fill(memoryview(buf), n)
        return bytes(buf)

    def _unread(self, data: bytes) -> None:
        self._pushback[:0] = data
        self._pos -= len(data)

    def _skip(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, _RESYNC_CHUNK)))
        while n > 0:
            k = min(n, len(scratch))
            self._fill(scratch, k)
            n -= k

    def _read_message(self) -> None:
        if not self._acq_done and self._geometry and not self._pushback:
            self._read_frame_fast()
        else:
            self._hold_or_flush()
            self._read_message_slow()

    def _hold_or_flush(self) -> None:
        # A frame is handed over once the next message starts cleanly (that is how a truncated
        # frame is caught). When the detector goes quiet instead (end of a trigger burst), hand
        # it over after a short grace time rather than hold it until the next trigger.
        if self._pending is not None and not self._pushback:
            self._post()
            if not select.select([self._sock], [], [], self.hold_s)[0]:
                self._flush_pending()

    def _get_slot(self) -> int | None:
        """One slot for the careful path (None: ring full in drop mode)."""
        self._post()  # the ring may be full: the consumer must have every frame to free it
        first, k = self._ring.acquire_run(1, self.on_full == "block", self._stop)
        if k == 0:
            return None
        self._ring.commit()
        return first

    def _read_frame_fast(self) -> None:
        """Read whole frame messages of the acquisition's geometry, several per ``recv_into`` when
        they are small, straight into contiguous ring slots; check each run of received messages
        with one :func:`~streamclust.adapters.merlin_kernels.scan_frames` call."""
        ring = self._ring
        n = ring.msg_size
        self._post()  # the ring may be full: the consumer must have every frame to free it
        first, k = ring.acquire_run(max(1, _BATCH_BYTES // n), self.on_full == "block", self._stop,
                                    min_k=ring.n_slots // 4)
        if k == 0:  # ring full, drop mode: read into scratch to count and skip it
            first, k = None, 1
        arr = ring.array(first, k)
        view = memoryview(arr)
        total = k * n
        offset0 = self._pos
        sock, stats, prefix = self._sock, self.stats, self._prefix
        prefix_arr, geometry_arr, seqs = self._prefix_arr, self._geometry_arr, self._seqs
        got = processed = 0
        checked = -1
        while True:
            target = (processed + 1) * n
            while got < target:
                base = processed * n
                if checked < processed and got >= base + MPX_PREFIX_SIZE + 4:
                    checked = processed
                    if (view[base:base + MPX_PREFIX_SIZE] != prefix
                            or view[base + MPX_PREFIX_SIZE:base + MPX_PREFIX_SIZE + 4] != b"MQ1,"):
                        self._give_back(view, base, got, offset0)
                        return
                    # the next message starts cleanly: the held-back frame was whole, hand it over now
                    self._flush_pending()
                self._post()
                try:
                    r = sock.recv_into(view[got:total])
                except (socket.timeout, TimeoutError):
                    if self._stop.is_set():
                        raise _Stopped() from None
                    self._flush_pending()  # the stream went quiet: stop holding the last frame
                    continue
                except OSError as exc:
                    if self._stop.is_set():
                        raise _Stopped() from None
                    raise _Closed(f"connection error after {offset0 + got} bytes: {exc}") from exc
                if r == 0:
                    raise _Closed(f"connection closed by the detector after {offset0 + got} bytes")
                got += r
                stats.bytes_received += r
            m = got // n - processed
            base = processed * n
            good = _mk.scan_frames(arr[base:base + m * n], m, n, prefix_arr, geometry_arr, seqs)
            if good:
                processed = self._accept_run(first, processed, good, seqs, offset0, n)
                if self._acq_done:  # that was the last frame: what follows is not ours to read
                    if got > processed * n:
                        self._give_back(view, processed * n, got, offset0, slow=False)
                    return
            if good < m:
                self._give_back(view, processed * n, got, offset0)
                return
            if got == processed * n:
                return

    def _accept_run(self, first: int | None, processed: int, good: int, seqs: np.ndarray, offset0: int,
                    n: int) -> int:
        """Accept ``good`` checked messages (sequences ``seqs[:good]``) that start at message
        ``processed`` of the run; return how many messages of the run are now processed (fewer
        than ``processed + good`` if the acquisition's last frame came first)."""
        ring = self._ring
        seq_list = seqs[:good].tolist()
        last_seq = self._last_seq
        if (first is not None and seq_list == list(range(last_seq + 1, last_seq + good + 1))
                and not (self._n_frames and seq_list[-1] >= self._n_frames)):
            # the usual case, in one go: consecutive frames, none of them the last: each but the
            # last is handed over (its successor started cleanly), the last one is held back
            self._flush_pending()
            slot0 = first + processed
            base0 = offset0 + processed * n
            self._outbox.extend([("frame", ring, slot0 + i, seq_list[i], base0 + i * n, None)
                                 for i in range(good - 1)])
            self.stats.frames_received += good - 1
            self._pending = (ring, slot0 + good - 1, seq_list[-1], base0 + (good - 1) * n, None)
            ring.commit(good)
            self._last_seq = seq_list[-1]
            self._pos = offset0 + (processed + good) * n
            return processed + good
        for seq in seq_list:  # gaps, duplicates, the last frame, a full ring: one at a time
            base = processed * n
            slot = None if first is None else first + processed
            if slot is not None:
                ring.commit()
            self._pos = offset0 + base + n
            self._accept(slot, seq, offset0 + base, None)
            processed += 1
            if self._acq_done:
                break
        return processed

    def _give_back(self, view: memoryview, base: int, got: int, offset0: int, slow: bool = True) -> None:
        """Bytes ``view[base:got]`` are not a regular frame: unread them, parse them carefully."""
        self._pos = offset0 + got
        self._unread(bytes(view[base:got]))
        if slow:
            self._read_message_slow()

    def _read_message_slow(self) -> None:
        offset = self._pos
        prefix = self._read(MPX_PREFIX_SIZE)
        # before any acquisition header: the largest frame a Merlin makes (quad, gaps, 24-bit)
        bound = max(MAX_HDR_PAYLOAD, self._bound if self._hdr is not None else _NO_HEADER_BOUND)
        try:
            try:
                n = parse_mpx_prefix(prefix, max_payload=bound)
            except FramingError as exc:  # report the position in the stream, not in the buffer
                raise FramingError(exc.message, offset=offset) from None
            if n < 4:
                raise FramingError(f"MPX message of {n} bytes is too short to hold a header", offset=offset)
        except FramingError as exc:
            self._unread(prefix)
            self._bad_stream(exc)
            return
        magic = self._read(4)
        if magic == b"HDR,":
            if n > MAX_HDR_PAYLOAD:
                self._unread(prefix + magic)
                self._bad_stream(FramingError(f"acquisition header of {n} bytes is larger than "
                                              f"{MAX_HDR_PAYLOAD}", offset=offset))
                return
            self._on_header(magic + self._read(n - 4), offset)
        elif magic == b"MQ1,":
            self._on_frame_slow(prefix, n, offset)
        elif self._geometry and not self._acq_done and MPX_PREFIX_SIZE + n == self._ring.msg_size:
            # intact framing of exactly a frame's size: a frame whose header is damaged
            self._flush_pending()
            self._record(HeaderError.reason, f"frame header starts with {magic!r}, not b'MQ1,'",
                         offset + MPX_PREFIX_SIZE, None)
            self.stats.dropped[HeaderError.reason] += 1
            self._skip(n - 4)
        else:
            self._unread(prefix + magic)
            self._bad_stream(HeaderError(f"message payload starts with {magic!r}, neither b'MQ1,' nor "
                                         "b'HDR,'", offset=offset + MPX_PREFIX_SIZE))

    def _on_header(self, payload: bytes, offset: int) -> None:
        self._flush_pending()
        try:
            header = parse_acquisition_header(payload)
            n_frames = header.n_frames
        except ProtocolError as exc:
            self._record(exc.reason, f"acquisition header: {exc}", offset, None)
            return
        self._hdr = header
        self._n_frames = n_frames
        self._bound = self.max_frame_bytes or max_frame_payload(header)
        self._acq_done = False
        self._geometry = b""
        self._prefix = b""
        self._last_seq = 0
        self.stats.acquisitions += 1
        self._put_event(("header", header, offset))
        logger.info("acquisition header at byte %d: %d frames, counter depth %s", offset, n_frames,
                    header.get_field("Counter Depth"))

    def _on_frame_slow(self, prefix: bytes, n: int, offset: int) -> None:
        if self._hdr is None or self._acq_done:
            self._record("no_acquisition_header", "frame outside an acquisition", offset, None)
            self.stats.dropped["no_acquisition_header"] += 1
            self._skip(n - 4)
            return
        if n > self._bound:
            self._unread(prefix + b"MQ1,")
            self._bad_stream(FramingError(f"frame message claims {n} bytes, more than the {self._bound} "
                                          "the acquisition header allows", offset=offset))
            return
        # MQ1_PEEK bytes hold the header size while the sequence has 6 digits; scans past frame
        # 999,999 (1024x1024 positions) push it one byte on, so read a little more (any valid
        # header is far longer than _PEEK)
        if n < _PEEK:
            self._unread(prefix + b"MQ1,")
            self._bad_stream(FramingError(f"frame message of {n} bytes cannot hold an MQ1 header",
                                          offset=offset))
            return
        peek = b"MQ1," + self._read(_PEEK - 4)
        try:
            header_size = peek_header_size(peek)
            if header_size > n or header_size > _MAX_FRAME_HEADER:
                raise HeaderError(f"MQ1 header size {header_size} does not fit the {n}-byte message")
            head = peek + self._read(header_size - _PEEK)
            fh = parse_frame_header(head, counter_depth=self._hdr.counter_depth,
                                    max_pixel_bytes=self._bound - header_size)
            if header_size + fh.pixel_bytes != n:
                raise HeaderError(f"MQ1 header says {header_size}+{fh.pixel_bytes} bytes, the message "
                                  f"holds {n}", sequence=fh.sequence)
        except HeaderError as exc:
            # report where the MQ1 header starts in the stream (the parsers count from 0)
            exc = HeaderError(exc.message, offset=offset + MPX_PREFIX_SIZE, sequence=exc.sequence)
            consumed = self._pos - offset
            if consumed <= MPX_PREFIX_SIZE + _PEEK:
                # the header size itself is unreadable: the length cannot be trusted either
                self._unread(prefix + (peek if consumed > MPX_PREFIX_SIZE + 4 else b"MQ1,"))
                self._bad_stream(exc)
                return
            # framing was intact: skip exactly this message (and the held-back frame was whole)
            self._flush_pending()
            self._record(exc.reason, str(exc), offset, exc.sequence)
            self.stats.dropped[exc.reason] += 1
            self._skip(offset + MPX_PREFIX_SIZE + n - self._pos)
            return
        if not self._geometry:
            self._setup_slots(prefix, fh, head)
        elif prefix != self._prefix or _geometry_key(head) != self._geometry:
            self._flush_pending()
            self._record("geometry_change", f"frame geometry {fh.geometry()} differs from the acquisition's "
                         "first frame", offset, fh.sequence)
            self.stats.dropped["geometry_change"] += 1
            self._skip(offset + MPX_PREFIX_SIZE + n - self._pos)
            return
        ring = self._ring
        slot = self._get_slot()
        view = ring.view(slot)
        view[:MPX_PREFIX_SIZE] = prefix
        view[MPX_PREFIX_SIZE:MPX_PREFIX_SIZE + header_size] = head
        self._fill(view[MPX_PREFIX_SIZE + header_size:], fh.pixel_bytes)
        self._accept(slot, fh.sequence, offset, fh if self._first_header_pending else None)
        self._first_header_pending = False

    def _setup_slots(self, prefix: bytes, fh: FrameHeader, head: bytes) -> None:
        msg_size = MPX_PREFIX_SIZE + fh.header_size + fh.pixel_bytes
        ring = self._ring
        if ring is None or ring.msg_size != msg_size or ring.header_size != fh.header_size:
            # a new ring per message geometry: slots of the old one may still be with the consumer
            n_slots = max(2, min(self.ring_slots, self.ring_bytes // msg_size))
            self._ring = _Ring(n_slots, msg_size, fh.header_size)
            logger.debug("ring: %d slots of %d bytes", n_slots, msg_size)
        self._prefix = prefix
        self._geometry = _geometry_key(head)
        self._first_header_pending = True
        # what scan_frames compares every later frame message with
        self._prefix_arr = np.frombuffer(prefix, np.uint8).copy()
        self._geometry_arr = np.frombuffer(self._geometry, np.uint8).copy()
        self._seqs = np.zeros(max(1, _BATCH_BYTES // self._ring.msg_size) + 1, np.int64)

    def _accept(self, slot: int | None, seq: int, offset: int, fh: FrameHeader | None) -> None:
        if seq <= self._last_seq:
            self._record("duplicate_sequence", f"sequence {seq} after {self._last_seq}", offset, seq)
            self.stats.dropped["duplicate_sequence"] += 1
            if slot is not None:
                self._ring.release_own(slot)
            return
        if seq > self._last_seq + 1:
            gap = seq - self._last_seq - 1
            self.stats.sequence_gaps += gap
            self._record("sequence_gap", f"{gap} frames missing before sequence {seq}", offset, seq)
        self._last_seq = seq
        last = bool(self._n_frames) and seq >= self._n_frames
        self._flush_pending()
        if slot is None:
            self.stats.dropped["ring_full"] += 1
            self._record("ring_full", "no free slot: frame dropped", offset, seq)
        else:
            self._pending = (self._ring, slot, seq, offset, fh)
        if last:
            self._flush_pending()
            if slot is None:
                self._put_event(("done",))
            self._acq_done = True

    def _flush_pending(self) -> None:
        if self._pending is not None:
            ring, slot, seq, offset, fh = self._pending
            self._pending = None
            self.stats.frames_received += 1
            self._outbox.append(("frame", ring, slot, seq, offset, fh))

    def _post(self) -> None:
        """Hand the frames read so far to the consumer in one queue message.

        Called before the reader may block (socket, ring) and before any other event, so a frame
        never waits in the outbox while the reader waits for something else. At full speed one
        message carries every frame of a ``recv_into`` (31 raw 1-bit frames a MiB): one consumer
        wake-up instead of 31.
        """
        if self._outbox:
            out, self._outbox = self._outbox, []
            self._events.put(("frames", out))

    def _put_event(self, event: tuple) -> None:
        self._post()  # frames first: events stay in stream order
        self._events.put(event)

    def _bad_stream(self, exc: ProtocolError) -> None:
        """The bytes at the current position are not a valid message start: find where one is."""
        self._record(exc.reason, str(exc), exc.offset, exc.sequence)
        if not self._check_pending_truncated():
            self._resync()

    def _check_pending_truncated(self) -> bool:
        """Was the held-back frame cut short, with the next message starting inside its pixels?

        If so, drop it and continue at that message start (True); else hand it over (False).
        """
        if self._pending is None:
            return False
        ring, slot, seq, offset, fh = self._pending
        view = ring.view(slot)
        pix_start = MPX_PREFIX_SIZE + ring.header_size
        tail = bytes(view[pix_start:])
        # to validate a candidate near the end we need bytes after the message: those are in pushback
        combined = tail + bytes(self._pushback[:MPX_PREFIX_SIZE + 4])
        at = _find_message_start(combined, max(MAX_HDR_PAYLOAD, self._bound), limit=len(tail))
        if at is None:
            self._flush_pending()
            return False
        self._pending = None
        self._record("truncated", f"frame {seq} cut short after {pix_start + at - MPX_PREFIX_SIZE} of "
                     f"{ring.msg_size - MPX_PREFIX_SIZE} bytes: the next message starts inside it", offset, seq)
        self.stats.dropped["truncated"] += 1
        # the stream continues at the embedded message start
        self._unread(tail[at:])
        self._pos = offset + pix_start + at
        ring.release_own(slot)
        return True

    def _resync(self) -> None:
        """Skip forward to the next plausible message start, counting skipped bytes.

        The byte at the current position is known to be bad, so the search starts one further.
        """
        start = self._pos
        bound = max(MAX_HDR_PAYLOAD, self._bound)
        buf = bytearray()
        skipped = 0
        keep = MPX_PREFIX_SIZE + 3  # a candidate needs 19 bytes: it may straddle two reads
        while True:
            buf += self._read_some(_RESYNC_CHUNK)
            at = _find_message_start(bytes(buf), bound, first=1 if skipped == 0 else 0)
            if at is not None:
                skipped += at
                self._unread(bytes(buf[at:]))
                break
            drop = len(buf) - keep
            if drop > 0:
                skipped += drop
                del buf[:drop]
        self.stats.bytes_skipped += skipped
        self._record("resync", f"skipped {skipped} bytes to the next message start", start, None)

    def _read_some(self, n: int) -> bytes:
        """Read whatever is available (at least one byte), up to ``n``."""
        if self._pushback:
            data = bytes(self._pushback[:n])
            del self._pushback[:len(data)]
            self._pos += len(data)
            return data
        buf = bytearray(n)
        while True:
            self._post()
            try:
                k = self._sock.recv_into(buf)
            except (socket.timeout, TimeoutError):
                if self._stop.is_set():
                    raise _Stopped() from None
                continue
            except OSError as exc:
                if self._stop.is_set():
                    raise _Stopped() from None
                raise _Closed(f"connection error after {self._pos} bytes: {exc}") from exc
            if k == 0:
                raise _Closed(f"connection closed by the detector after {self._pos} bytes")
            self.stats.bytes_received += k
            self._pos += k
            return bytes(buf[:k])


def _find_message_start(data: bytes, bound: int, *, first: int = 0, limit: int | None = None) -> int | None:
    """Index of the first ``MPX,<10 digits>,`` + (``MQ1,`` | ``HDR,``) in ``data[first:limit]``.

    Only candidates whose prefix and 4-byte magic lie fully inside ``data`` are considered.
    """
    limit = len(data) if limit is None else limit
    i = data.find(b"MPX,", first)
    while 0 <= i < limit:
        end = i + MPX_PREFIX_SIZE
        if end + 4 <= len(data) and data[end:end + 4] in (b"MQ1,", b"HDR,"):
            try:
                parse_mpx_prefix(data, offset=i, max_payload=bound)
                return i
            except FramingError:
                pass
        i = data.find(b"MPX,", i + 1)
    return None
