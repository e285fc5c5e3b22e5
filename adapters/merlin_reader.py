"""The Merlin receiver's reader thread: socket bytes to frame events (fast and careful parsers,
hold-back of the last frame, resynchronisation).

:class:`StreamReader` runs in the thread :class:`~streamclust.adapters.merlin.MerlinReceiver`
starts. It reads the data socket into the slots of a :class:`~streamclust.adapters.merlin_ring.FrameRing`
and puts events on the receiver's queue, in stream order:

* ``("frames", [frame events])``: frames read intact, each ``("frame", ring, slot, sequence,
  offset, FrameHeader | None)`` (the header only with the first frame of a new geometry);
* ``("header", AcquisitionHeader, offset)``: a new acquisition;
* ``("done",)``: the acquisition's last sequence arrived but that frame was dropped;
* ``("end", reason, exception | None)``: the reader stopped (``closed``, ``connection_lost``,
  ``receiver_error``).

Whole frames of the acquisition's geometry take the fast path (several small frames a
``recv_into``, checked by :func:`~streamclust.adapters.merlin_kernels.scan_frames`); anything else
takes the careful path, message by message, which finds truncated frames and resynchronises after
bad bytes. What is done with each kind of bad input is tabled in :mod:`streamclust.adapters.merlin`.
The consumer side (decoding, acquisitions, iteration) stays in that module.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
from typing import Callable

import numpy as np

from streamclust.adapters import merlin_kernels as _mk
from streamclust.adapters.errors import ConnectionLost, FramingError, HeaderError, ProtocolError
from streamclust.adapters.framing import MPX_PREFIX_SIZE, parse_mpx_prefix
from streamclust.adapters.merlin_ring import FrameRing, ReaderStopped
from streamclust.adapters.mib_header import (
    AcquisitionHeader,
    FrameHeader,
    parse_acquisition_header,
    parse_frame_header,
    peek_header_size,
)

__all__ = ["StreamReader", "max_frame_payload", "MAX_HDR_PAYLOAD"]

logger = logging.getLogger(__name__)

#: largest acquisition-header message accepted (real ones: 2048 bytes)
MAX_HDR_PAYLOAD = 65536
#: largest MQ1 header accepted in the frame-size bound (real ones: 384 / 768)
_MAX_FRAME_HEADER = 4096
_PEEK = 24  # bytes read before the MQ1 header size is known (see _on_frame_slow)
_CHIP_PIXELS = 256 * 256
_BYTES_PER_PIXEL = {1: 1, 6: 1, 12: 2, 24: 4}
_NO_HEADER_BOUND = _MAX_FRAME_HEADER + 514 * 514 * 4
#: bytes the reader asks for in one recv_into when frames are small
_BATCH_BYTES = 1 << 20
_RESYNC_CHUNK = 65536


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



def _geometry_key(header_start: bytes) -> bytes:
    """Fields 2-8 of an MQ1 header (size, chips, width, height, type, layout, chip select)."""
    return b",".join(header_start[:64].split(b",", 9)[2:9])


class _Closed(Exception):
    """The peer closed the connection (or the receiver is closing)."""


class StreamReader:
    """Read one Merlin data connection into frame events (runs in the receiver's thread).

    Parameters
    ----------
    sock : socket.socket
        The connected data socket (with a receive timeout: a held-back frame is handed over when
        a receive times out).
    events : queue.SimpleQueue
        Where the events go (the receiver's consumer side takes them).
    stats : ReceiverStats
        The receiver's counters: the reader counts bytes, frames read and drops.
    record : callable
        ``record(reason, message, offset, sequence)``: the receiver's error log (thread-safe).
    stop : threading.Event
        Set by the receiver to stop the reader.
    ring_slots, ring_bytes, on_full, max_frame_bytes, hold_s
        As the same parameters of :class:`~streamclust.adapters.merlin.MerlinReceiver`.
    """

    def __init__(self, sock: socket.socket, *, events: queue.SimpleQueue, stats,
                 record: Callable[[str, str, int | None, int | None], None], stop: threading.Event,
                 ring_slots: int, ring_bytes: int, on_full: str, max_frame_bytes: int | None,
                 hold_s: float):
        self._sock = sock
        self._events = events
        self.stats = stats
        self._record = record
        self._stop = stop
        self.ring_slots = ring_slots
        self.ring_bytes = ring_bytes
        self.on_full = on_full
        self.max_frame_bytes = max_frame_bytes
        self.hold_s = hold_s

        self._pos = 0
        self._pushback = bytearray()
        self._hdr: AcquisitionHeader | None = None
        self._bound = 0
        self._ring: FrameRing | None = None
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

    def run(self) -> None:
        """The thread's body: read messages until the receiver stops or the connection ends; every
        way it ends is put on the event queue, so the consumer never waits for a dead reader."""
        try:
            while not self._stop.is_set():
                self._read_message()
        except ReaderStopped:
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
        while got < n:
            got += self._recv(view[got:n], self._pos + got)
        self._pos += n

    def _recv(self, view: memoryview, at: int) -> int:
        """One ``recv_into(view)``, the frames read so far handed over first; the bytes received,
        0 when the receive timed out (``at``: the stream offset, for the error message).

        Raises :class:`ReaderStopped` when the receiver is closing, ``_Closed`` when the
        connection is gone.
        """
        self._post()
        try:
            k = self._sock.recv_into(view)
        except (socket.timeout, TimeoutError):
            if self._stop.is_set():
                raise ReaderStopped() from None
            return 0
        except OSError as exc:
            if self._stop.is_set():
                raise ReaderStopped() from None
            raise _Closed(f"connection error after {at} bytes: {exc}") from exc
        if k == 0:
            raise _Closed(f"connection closed by the detector after {at} bytes")
        self.stats.bytes_received += k
        return k

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
        prefix = self._prefix
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
                r = self._recv(view[got:total], offset0 + got)
                if r == 0:  # the stream went quiet: stop holding the last frame
                    self._flush_pending()
                    continue
                got += r
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
            self._ring = FrameRing(n_slots, msg_size, fh.header_size)
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
        k = 0
        while k == 0:
            k = self._recv(memoryview(buf), self._pos)
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
