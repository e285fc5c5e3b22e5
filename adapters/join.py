"""Join diffraction frames and EDS spectra on their scan position, with bounded memory.

Frames and spectra arrive independently: late, out of order, duplicated or not at all. The
:class:`ScanJoiner` pairs them by 0-based scan position and hands out :class:`Batch` es of
complete positions, while keeping an account of every item it was given. Each frame ends in
exactly one of these counters (spectra likewise, with the roles swapped)::

    frames_in == joined + frames_without_spectrum + duplicate_frames
                 + out_of_range_frames + rejected_frames + pending_frames

and ``frames_without_spectrum == expired_frames + evicted_frames + late_frames + flushed_frames``
(partner timed out, pending store over capacity, partner already gone when the frame came, still
waiting at :meth:`ScanJoiner.flush`). :meth:`ScanJoiner.check_invariants` verifies both.
With ``on_missing="emit"`` the unpaired items are handed out too (zero-filled partner, masks say
which half is real); with ``"drop"`` only complete positions are. In ``"emit"`` mode a position whose partner came
after the first half was given up appears in two rows (one per half), never twice per half.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["Batch", "ScanJoiner", "JoinedStreams", "FrameBlocks", "join_streams"]

_FRAME, _SPECTRUM = 0, 1
#: per kind: the counters ``_add`` may bump (items in, out of range, rejected, duplicate)
_KIND_COUNTERS = (("frames_in", "out_of_range_frames", "rejected_frames", "duplicate_frames"),
                  ("spectra_in", "out_of_range_spectra", "rejected_spectra", "duplicate_spectra"))
#: a frame waiting this long for its spectrum is copied out of its shared block (see _compact)
_COMPACT_AFTER_S = 0.25


@dataclass
class Batch:
    """Positions joined into one batch; row ``i`` of every array belongs to ``positions[i]``.

    Attributes
    ----------
    positions : ndarray of int64, shape (n,)
    frames : ndarray, shape (n, h, w)
        Zero where ``has_frame`` is False.
    spectra : ndarray, shape (n, c)
        Zero where ``has_spectrum`` is False.
    has_frame, has_spectrum : ndarray of bool, shape (n,)
    """

    positions: np.ndarray
    frames: np.ndarray
    spectra: np.ndarray
    has_frame: np.ndarray
    has_spectrum: np.ndarray

    def __len__(self) -> int:
        return int(self.positions.shape[0])


_COUNTERS = (
    "frames_in", "spectra_in", "joined",
    "frames_without_spectrum", "spectra_without_frame",
    "expired_frames", "expired_spectra", "evicted_frames", "evicted_spectra",
    "late_frames", "late_spectra", "flushed_frames", "flushed_spectra",
    "duplicate_frames", "duplicate_spectra", "out_of_range_frames", "out_of_range_spectra",
    "rejected_frames", "rejected_spectra",
    "emitted_frame_only", "emitted_spectrum_only", "batches",
)


class ScanJoiner:
    """Pair frames and spectra by scan position and batch the pairs.

    Parameters
    ----------
    n_positions : int
        Positions in the scan; items outside ``[0, n_positions)`` are counted ``out_of_range``.
    batch_size : int
        Rows per batch (the last batch of :meth:`flush` may be shorter).
    max_pending : int
        Most unpaired *frames* held; beyond it the oldest frame is evicted and counted.
    max_pending_spectra : int
        Most unpaired *spectra* held; beyond it the oldest spectrum is evicted and counted. A
        separate, larger bound because a spectrum is small (4 KiB at 2,048 uint16 channels, against
        0.5 MiB for a quad frame) and it is the frame stream that falls behind when the analysis or
        the network is slow: with one shared bound, a 256 x 256 demo whose frames ran 90 s behind
        evicted 39,822 of 65,536 spectra and the engine saw those positions as two halves. The
        default, 65,536, is 256 MiB at 2,048 channels and covers a frame stream 131 s behind at 2 ms
        dwell.
    timeout_s : float
        An unpaired item older than this (by its arrival time ``t``) is given up at :meth:`poll`,
        but only once its partner stream can no longer bring the partner: that stream has already
        delivered a later position (its watermark passed this one), or it has been silent for
        ``timeout_s`` too. Two streams running at different speeds (an EDS system ahead of a slow
        frame source) therefore never expire each other's items; a stalled or dead stream does.
    spectrum_timeout_s : float, optional
        How long the *frame* stream must be silent before a waiting spectrum is given up (default
        ``max(30, timeout_s)``; a frame stream that passed the position still expires it after
        ``timeout_s``). Spectra
        are small (8 KiB), so they can wait out a stall of the frame stream that would cost
        gigabytes if frames waited as long: measured, a 2 s frame stall (a cold JIT cache) made
        the joiner give up 1,598 of 4,096 spectra whose frames then came "late", each position
        analysed as two halves.
    on_missing : {"drop", "emit"}
        What happens to an item whose partner never comes.
    frame_shape, n_channels : optional
        Fix the shapes up front; otherwise the first frame/spectrum defines them and items of any
        other shape are counted ``rejected``.
    frame_dtype, spectrum_dtype : dtype, optional
        Dtypes of the batch arrays (default: those of the first frame/spectrum).

    Examples
    --------
    >>> import numpy as np
    >>> j = ScanJoiner(4, batch_size=2)
    >>> for p in (1, 0, 3):
    ...     _ = j.add_frame(p, np.full((2, 2), p, np.uint16))
    >>> for p in (0, 1, 1, 2):
    ...     _ = j.add_spectrum(p, np.full(3, p, np.uint16))
    >>> [b.positions.tolist() for b in j.poll()]
    [[0, 1]]
    >>> [b.positions.tolist() for b in j.flush()]
    []
    >>> s = j.stats
    >>> s["joined"], s["duplicate_spectra"], s["frames_without_spectrum"], s["spectra_without_frame"]
    (2, 1, 1, 1)
    >>> j.check_invariants()
    True
    """

    def __init__(self, n_positions: int, *, batch_size: int = 64, max_pending: int = 4096,
                 max_pending_spectra: int = 65536, timeout_s: float = 2.0, spectrum_timeout_s: float | None = None,
                 on_missing: str = "drop", frame_shape: tuple | None = None,
                 n_channels: int | None = None, frame_dtype=None, spectrum_dtype=None):
        if n_positions < 0:
            raise ValueError(f"n_positions must be >= 0, got {n_positions}")
        if batch_size < 1 or max_pending < 1 or max_pending_spectra < 1:
            raise ValueError("batch_size, max_pending and max_pending_spectra must be >= 1")
        if on_missing not in ("drop", "emit"):
            raise ValueError(f"on_missing must be 'drop' or 'emit', got {on_missing!r}")
        self.n_positions = int(n_positions)
        self.batch_size = int(batch_size)
        self.max_pending = int(max_pending)
        self.max_pending_spectra = int(max_pending_spectra)
        self.timeout_s = float(timeout_s)
        self.spectrum_timeout_s = (max(30.0, self.timeout_s) if spectrum_timeout_s is None
                                   else float(spectrum_timeout_s))
        self.on_missing = on_missing
        self.frame_shape = None if frame_shape is None else tuple(int(n) for n in frame_shape)
        self.n_channels = None if n_channels is None else int(n_channels)
        self.frame_dtype = None if frame_dtype is None else np.dtype(frame_dtype)
        self.spectrum_dtype = None if spectrum_dtype is None else np.dtype(spectrum_dtype)
        # per position, per kind: has an item of this kind been accepted (first arrival)?
        self._seen = np.zeros((2, self.n_positions), dtype=bool)
        # unpaired items, insertion-ordered: position -> (array, t); dicts keep arrival order
        self._pending: tuple[dict, dict] = ({}, {})
        # rows ready for the next batch: (position, frame or None, spectrum or None)
        self._ready: list = []
        self._out: list[Batch] = []
        self._c = dict.fromkeys(_COUNTERS, 0)
        # per kind: highest position accepted so far, and the arrival time of the latest item
        self._watermark = [-1, -1]
        self._last_arrival = [-float("inf"), -float("inf")]
        self._last_compact = -float("inf")
        # per kind: the exact shape an item must have (None until the first one fixes it)
        self._shape: list = [self.frame_shape, None if self.n_channels is None else (self.n_channels,)]

    # -- input ---------------------------------------------------------------------------------
    def add_frame(self, position: int, image, *, t: float | None = None) -> bool:
        """Offer one frame; True if it was accepted for joining (see :attr:`stats` otherwise)."""
        return self._add(_FRAME, position, image, t)

    def add_spectrum(self, position: int, counts, *, t: float | None = None) -> bool:
        """Offer one spectrum; True if it was accepted for joining."""
        return self._add(_SPECTRUM, position, counts, t)

    def _add(self, kind: int, position: int, array, t) -> bool:
        # (called once per item at detector rates, under the join lock: kept to plain operations)
        n_in, out_of_range, rejected, duplicate = _KIND_COUNTERS[kind]
        c = self._c
        c[n_in] += 1
        position = int(position)
        if not 0 <= position < self.n_positions:
            c[out_of_range] += 1
            logger.debug("%s position %d outside [0, %d)", n_in[:-3], position, self.n_positions)
            return False
        if type(array) is not np.ndarray:
            array = np.asarray(array)
        if array.shape != self._shape[kind] and not self._shape_ok(kind, array):
            c[rejected] += 1
            logger.warning("%s at position %d has shape %s, expected %s", n_in[:-3], position, array.shape,
                           self.frame_shape if kind == _FRAME else (self.n_channels,))
            return False
        seen = self._seen
        if seen[kind, position]:
            c[duplicate] += 1
            return False
        seen[kind, position] = True
        now = time.monotonic() if t is None else float(t)
        if position > self._watermark[kind]:
            self._watermark[kind] = position
        if now > self._last_arrival[kind]:
            self._last_arrival[kind] = now
        other = 1 - kind
        partner = self._pending[other].pop(position, None)
        if partner is not None:
            c["joined"] += 1
            if kind == _FRAME:
                self._push_row(position, array, partner[0])
            else:
                self._push_row(position, partner[0], array)
            return True
        if seen[other, position]:
            # the partner came and was already given up (expired, evicted): this one is late
            self._give_up(kind, position, array, "late")
            return True
        store = self._pending[kind]
        store[position] = (array, now)
        if len(store) > (self.max_pending if kind == _FRAME else self.max_pending_spectra):
            self._evict_oldest(kind)
        return True

    def _shape_ok(self, kind: int, array: np.ndarray) -> bool:
        """The shape check behind ``_add``'s fast one: fixes the shape on the first item."""
        if kind == _FRAME:
            if array.ndim != 2:
                return False
            if self.frame_shape is None:
                self.frame_shape = array.shape
                self.frame_dtype = self.frame_dtype or array.dtype
                self._shape[_FRAME] = self.frame_shape
            return array.shape == self.frame_shape
        if array.ndim != 1:
            return False
        if self.n_channels is None:
            self.n_channels = array.shape[0]
            self.spectrum_dtype = self.spectrum_dtype or array.dtype
            self._shape[_SPECTRUM] = (self.n_channels,)
        return array.shape[0] == self.n_channels

    # -- giving up on a partner ----------------------------------------------------------------
    def _give_up(self, kind: int, position: int, array, why: str) -> None:
        c = self._c
        if kind == _FRAME:
            c["frames_without_spectrum"] += 1
            c[f"{why}_frames"] += 1
        else:
            c["spectra_without_frame"] += 1
            c[f"{why}_spectra"] += 1
        if self.on_missing == "emit":
            if kind == _FRAME:
                c["emitted_frame_only"] += 1
                self._push_row(position, array, None)
            else:
                c["emitted_spectrum_only"] += 1
                self._push_row(position, None, array)

    def _evict_oldest(self, kind: int) -> None:
        """Hand on the oldest unpaired item of ``kind`` (its store is over its bound)."""
        store = self._pending[kind]
        position = next(iter(store))  # dicts keep arrival order
        array, _ = store.pop(position)
        logger.debug("pending %s store full (%d): evicting position %d", "frame" if kind == _FRAME else "spectrum",
                     self.max_pending if kind == _FRAME else self.max_pending_spectra, position)
        self._give_up(kind, position, array, "evicted")

    @property
    def n_pending(self) -> int:
        return len(self._pending[0]) + len(self._pending[1])

    # -- output --------------------------------------------------------------------------------
    def _push_row(self, position: int, frame, spectrum) -> None:
        self._ready.append((position, frame, spectrum))
        if len(self._ready) >= self.batch_size:
            self._out.append(self._make_batch(self._ready))
            self._ready = []

    def _make_batch(self, rows: list) -> Batch:
        n = len(rows)
        fshape = self.frame_shape if self.frame_shape is not None else (0, 0)
        nch = self.n_channels if self.n_channels is not None else 0
        fdtype = self.frame_dtype or np.dtype(np.uint16)
        sdtype = self.spectrum_dtype or np.dtype(np.uint16)
        positions = np.array([r[0] for r in rows], dtype=np.int64)
        frame_list = [r[1] for r in rows]
        spectrum_list = [r[2] for r in rows]
        has_frame = np.array([f is not None for f in frame_list], dtype=bool)
        has_spectrum = np.array([s is not None for s in spectrum_list], dtype=bool)
        self._c["batches"] += 1
        if n and has_frame.all() and has_spectrum.all():
            # one copy of each row into preallocated arrays, in C; frames decoded straight into
            # consecutive rows of one FrameBlocks block need no copy at all
            frames = _block_rows(frame_list, fshape, fdtype)
            if frames is None:
                frames = np.stack(frame_list, out=np.empty((n, *fshape), dtype=fdtype), casting="unsafe")
            spectra = np.stack(spectrum_list, out=np.empty((n, nch), dtype=sdtype), casting="unsafe")
            return Batch(positions, frames, spectra, has_frame, has_spectrum)
        # something is missing: zero-filled, row by row
        frames = np.zeros((n, *fshape), dtype=fdtype)
        spectra = np.zeros((n, nch), dtype=sdtype)
        for i, (_, frame, spectrum) in enumerate(rows):
            if frame is not None:
                frames[i] = frame
            if spectrum is not None:
                spectra[i] = spectrum
        return Batch(positions, frames, spectra, has_frame, has_spectrum)

    def expire(self, now: float | None = None) -> int:
        """Give up on unpaired items that arrived before ``now - timeout_s`` and whose partner
        stream has passed them or gone silent (see ``timeout_s``); return how many."""
        now = time.monotonic() if now is None else float(now)
        limit = now - self.timeout_s
        n = 0
        for kind in (_FRAME, _SPECTRUM):
            store = self._pending[kind]
            other = 1 - kind
            # a spectrum outlives a silent frame stream longer (see spectrum_timeout_s)
            silence = self.spectrum_timeout_s if kind == _SPECTRUM else self.timeout_s
            partner_silent = self._last_arrival[other] <= now - silence
            # arrival order: stop at the first item young enough (times are non-decreasing), or at
            # the first the partner stream may still bring (positions mostly rise with arrival, so
            # later items would wait too; an out-of-order item behind it is only delayed, not lost)
            while store:
                position = next(iter(store))
                array, t = store[position]
                if t > limit:
                    break
                if not partner_silent and self._watermark[other] < position:
                    break
                del store[position]
                self._give_up(kind, position, array, "expired")
                n += 1
        return n

    def poll(self, now: float | None = None) -> list[Batch]:
        """Expire old unpaired items, then return the complete batches made so far."""
        now = time.monotonic() if now is None else float(now)
        self.expire(now)
        if now - self._last_compact >= _COMPACT_AFTER_S:
            self._last_compact = now
            self._compact(now - _COMPACT_AFTER_S)
        out, self._out = self._out, []
        return out

    def _compact(self, limit: float) -> None:
        """Copy frames waiting since before ``limit`` out of shared blocks.

        A frame decoded into a :class:`FrameBlocks` row keeps its whole block (``batch_size``
        frames) alive; one frame whose spectrum is late or lost must not pin 128 MiB until it
        expires. Recent arrivals (the usual lag between the two streams) stay zero-copy.
        """
        store = self._pending[_FRAME]
        for position, (array, t) in store.items():
            if t > limit:
                break  # arrival order: the rest are younger
            base = array.base
            if isinstance(base, np.ndarray) and base.ndim == 3:
                store[position] = (array.copy(), t)

    def flush(self) -> list[Batch]:
        """End of scan: give up on every pending item and return everything left, last batch short."""
        for kind in (_FRAME, _SPECTRUM):
            store = self._pending[kind]
            while store:
                position = next(iter(store))
                array, _ = store.pop(position)
                self._give_up(kind, position, array, "flushed")
        if self._ready:
            self._out.append(self._make_batch(self._ready))
            self._ready = []
        out, self._out = self._out, []
        return out

    # -- accounting ----------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """Every counter (see the module docstring), plus pending and per-scan coverage."""
        s = dict(self._c)
        s["pending_frames"] = len(self._pending[_FRAME])
        s["pending_spectra"] = len(self._pending[_SPECTRUM])
        s["out_of_range"] = s["out_of_range_frames"] + s["out_of_range_spectra"]
        s["evicted_at_capacity"] = s["evicted_frames"] + s["evicted_spectra"]
        s["positions_with_frame"] = int(self._seen[_FRAME].sum())
        s["positions_with_spectrum"] = int(self._seen[_SPECTRUM].sum())
        s["positions_without_any"] = int((~(self._seen[_FRAME] | self._seen[_SPECTRUM])).sum())
        return s

    def check_invariants(self) -> bool:
        """True if every frame and spectrum is accounted for; AssertionError naming the gap otherwise."""
        s = self.stats
        for name, partner, single in (("frames", "frames_without_spectrum", "frames"),
                                      ("spectra", "spectra_without_frame", "spectra")):
            total = (s["joined"] + s[partner] + s[f"duplicate_{single}"] + s[f"out_of_range_{single}"]
                     + s[f"rejected_{single}"] + s[f"pending_{single}"])
            if s[f"{name}_in"] != total:
                raise AssertionError(f"{name}_in = {s[f'{name}_in']} but accounted {total}: {s}")
            parts = sum(s[f"{why}_{single}"] for why in ("expired", "evicted", "late", "flushed"))
            if s[partner] != parts:
                raise AssertionError(f"{partner} = {s[partner]} but its breakdown sums to {parts}: {s}")
        if s["joined"] > min(s["positions_with_frame"], s["positions_with_spectrum"]):
            raise AssertionError(f"more joins than positions seen: {s}")
        if self.on_missing == "emit":
            if s["emitted_frame_only"] != s["frames_without_spectrum"]:
                raise AssertionError(f"frames without spectrum not all emitted: {s}")
            if s["emitted_spectrum_only"] != s["spectra_without_frame"]:
                raise AssertionError(f"spectra without frame not all emitted: {s}")
        return True


# -- decoding straight into batch memory ------------------------------------------------------------
class FrameBlocks:
    """Hand out frame-sized rows of ``(rows, h, w)`` blocks, so a decoder writes where a batch reads.

    A frame source that supports it (``MerlinReceiver.frames()``: its ``out_allocator``) decodes
    each frame into the next row. When the joiner then batches frames that sit in consecutive
    rows of one block, the batch's ``frames`` is a view of that block: the pixels are written
    once, by the decoder, and never copied again. Anything else (reordering, a missing frame, a
    batch that straddles two blocks) falls back to one copy, so correctness never depends on it.

    A block is reused once nothing references it any more (no pending frame, no batch), so
    steady-state ingest touches warm memory instead of faulting in fresh pages; at most
    ``max_blocks`` idle blocks are kept.

    Examples
    --------
    >>> import numpy as np
    >>> blocks = FrameBlocks(rows=2)
    >>> a, b = blocks((3, 3), np.uint16), blocks((3, 3), np.uint16)
    >>> a.base is b.base, a.base.shape
    (True, (2, 3, 3))
    >>> _block_rows([a, b], (3, 3), np.dtype(np.uint16)) is not None
    True
    >>> _block_rows([b, a], (3, 3), np.dtype(np.uint16)) is None
    True
    """

    def __init__(self, rows: int, max_blocks: int = 6):
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        self.rows = int(rows)
        self.max_blocks = int(max_blocks)
        self._key = None
        self._shape_in = self._dtype_in = None  # the arguments of the last call (see __call__)
        self._blocks: list[np.ndarray] = []
        self._block: np.ndarray | None = None
        self._next = 0
        #: blocks allocated so far (the rest of the time an idle one was reused)
        self.n_allocated = 0

    def __call__(self, shape: tuple, dtype) -> np.ndarray:
        # a decoder asks with the same two objects every frame: compare those before building a key
        if shape is not self._shape_in or dtype is not self._dtype_in:
            key = (tuple(shape), np.dtype(dtype))
            if key != self._key:
                self._key, self._blocks, self._block = key, [], None
            self._shape_in, self._dtype_in = shape, dtype
        if self._block is None or self._next == self.rows:
            self._block = self._free_block()
            self._next = 0
        row = self._block[self._next]
        self._next += 1
        return row

    def _free_block(self) -> np.ndarray:
        for block in self._blocks:
            # references: the list, the loop variable, getrefcount's argument (and no row views)
            if sys.getrefcount(block) == 3:
                return block
        block = np.empty((self.rows, *self._key[0]), self._key[1])
        self.n_allocated += 1
        if len(self._blocks) < self.max_blocks:
            self._blocks.append(block)
        return block


def _block_rows(frames: list, shape: tuple, dtype) -> np.ndarray | None:
    """``block[k:k + n]`` if ``frames`` are rows k..k+n-1 of one 3-d block (a view), else None."""
    first = frames[0]
    block = first.base
    if (not isinstance(block, np.ndarray) or block.ndim != 3 or block.shape[1:] != tuple(shape)
            or block.dtype != dtype or not block.flags.c_contiguous or first.shape != tuple(shape)):
        return None
    stride = block.strides[0]
    start = block.__array_interface__["data"][0]
    addr0 = first.__array_interface__["data"][0]
    k, rem = divmod(addr0 - start, stride)
    n = len(frames)
    if rem or k < 0 or k + n > block.shape[0]:
        return None
    for i, f in enumerate(frames):
        if (f.base is not block or f.__array_interface__["data"][0] != addr0 + i * stride
                or f.shape != first.shape):
            return None
    return block[k:k + n]


# -- running both streams -----------------------------------------------------------------------
def _default_frame_position(frame) -> int:
    pos = getattr(frame, "position", None)
    if pos is not None:
        return int(pos)
    # a Merlin frame: 1-based sequence, one frame per position (first acquisition)
    return int(frame.sequence) - 1


class JoinedStreams:
    """Iterate Batches from a frame iterator and a spectrum iterator, each drained by its own thread.

    Created by :func:`join_streams`; after iteration :attr:`stats` holds the joiner's counters and
    :attr:`joiner` the joiner itself. An exception raised by either source is re-raised at the end.

    Each source thread offers its items to the joiner itself (under one lock) instead of passing
    them through a queue to the consuming thread: at detector rates (12,500 frames/s at 1 bit) a
    per-item queue hand-off, with its locks and thread switches, costs more than decoding. Only
    finished batches cross to the consumer, in the order they were completed. At most
    ``max_batches`` of them wait there; beyond that the sources stop reading (back-pressure: a
    lossless source such as ``MerlinReceiver`` then fills its ring, then TCP pushes back).

    If the frame iterator has an ``out_allocator`` attribute (``MerlinReceiver.frames()`` does),
    it is given a :class:`FrameBlocks`, so frames are decoded straight into batch memory.
    """

    def __init__(self, frames: Iterable, spectra: Iterable, joiner: ScanJoiner, *,
                 frame_position: Callable, poll_interval_s: float, queue_size: int):
        self.joiner = joiner
        self._sources = ((_FRAME, frames), (_SPECTRUM, spectra))
        self._frame_position = frame_position
        self._poll = float(poll_interval_s)
        # queue_size bounds the items waiting for the consumer; they now wait in whole batches
        self.max_batches = max(1, -(-int(queue_size) // joiner.batch_size))
        self._cv = threading.Condition()
        self._batches: list[Batch] = []
        self._running = 0
        self._stop = threading.Event()
        self.errors: list[BaseException] = []
        self._started = False
        if hasattr(frames, "out_allocator") and getattr(frames, "out_allocator") is None:
            frames.out_allocator = FrameBlocks(joiner.batch_size)

    @property
    def stats(self) -> dict:
        with self._cv:
            return self.joiner.stats

    def _drain(self, kind: int, source: Iterable) -> None:
        joiner, cv, stop = self.joiner, self._cv, self._stop
        add = joiner.add_frame if kind == _FRAME else joiner.add_spectrum
        frame_position = self._frame_position
        try:
            if callable(getattr(source, "blocks", None)):
                self._drain_blocks(kind, source.blocks())
                return
            for item in source:
                if kind == _FRAME:
                    position, array = frame_position(item), item.image
                else:
                    position, array = int(item.position), item.counts
                with cv:
                    add(position, array)
                    # poll on every item: complete batches leave at once, expiry stays current
                    self._hand_over_locked()
                if stop.is_set():
                    return
        except BaseException as exc:
            logger.exception("%s source failed", "frame" if kind == _FRAME else "spectrum")
            self.errors.append(exc)
        finally:
            with cv:
                self._running -= 1
                cv.notify_all()

    def _drain_blocks(self, kind: int, blocks: Iterable[list]) -> None:
        """Offer items a block at a time (``SpectrumStream.blocks()``, ``FrameIterator.blocks()``):
        one lock and one poll per block instead of per item; a block holds only what had already
        arrived, so this adds no wait."""
        cv, stop = self._cv, self._stop
        if kind == _FRAME:
            add, frame_position = self.joiner.add_frame, self._frame_position
            for block in blocks:
                with cv:
                    for item in block:
                        add(frame_position(item), item.image)
                    self._hand_over_locked()
                if stop.is_set():
                    return
            return
        add = self.joiner.add_spectrum
        for block in blocks:
            with cv:
                for item in block:
                    add(int(item.position), item.counts)
                self._hand_over_locked()
            if stop.is_set():
                return

    def _hand_over_locked(self) -> None:
        """With the lock held: move completed batches to the consumer, then wait while too many
        are queued (bounded back-pressure on the source calling this)."""
        done = self.joiner.poll()
        if done:
            self._batches.extend(done)
            self._cv.notify_all()
        while len(self._batches) > self.max_batches and not self._stop.is_set():
            self._cv.wait(0.1)

    def __iter__(self) -> Iterator[Batch]:
        if self._started:
            raise RuntimeError("a JoinedStreams can be iterated once")
        self._started = True
        threads = [threading.Thread(target=self._drain, args=src, daemon=True,
                                    name=f"join-{'frames' if src[0] == _FRAME else 'spectra'}")
                   for src in self._sources]
        cv, joiner = self._cv, self.joiner
        self._running = len(threads)
        for th in threads:
            th.start()
        try:
            while True:
                with cv:
                    while not self._batches and self._running:
                        if not cv.wait(self._poll):
                            # both streams quiet: expiry must still happen
                            self._batches.extend(joiner.poll())
                    out, self._batches = self._batches, []
                    finished = not out and not self._running
                    if out:
                        cv.notify_all()  # sources waiting for room
                if finished:
                    break
                yield from out
            with cv:
                last = joiner.flush()
            yield from last
        finally:
            self._stop.set()
            with cv:
                cv.notify_all()
            for th in threads:
                th.join(timeout=1.0)
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} source(s) failed while joining") from self.errors[0]


def join_streams(frames: Iterable, spectra: Iterable, n_positions: int, *,
                 frame_position: Callable | None = None, poll_interval_s: float = 0.05,
                 queue_size: int = 1024, **joiner_kwargs) -> JoinedStreams:
    """Join a frame stream and a spectrum stream into Batches.

    Parameters
    ----------
    frames : iterable
        Objects with ``.image`` and either ``.position`` or a 1-based ``.sequence``
        (``position = sequence - 1``), e.g. ``MerlinReceiver`` or ``ZmqFrameSource`` output.
        If it has a ``blocks()`` method (``MerlinReceiver.frames()`` does), that is iterated
        instead, for lists of such objects.
    spectra : iterable
        Objects with ``.position`` and ``.counts`` (e.g. ``SpectrumReceiver.spectra()``). If it
        has a ``blocks()`` method (``SpectrumStream`` does), that is iterated instead, for lists
        of such objects.
    n_positions : int
    frame_position : callable, optional
        Maps a frame object to its scan position.
    poll_interval_s : float, default 0.05
        How often the consumer expires unpaired items while both streams are quiet.
    queue_size : int, default 1024
        Most joined positions (rounded up to whole batches) waiting for the consumer before the
        sources are held back.
    **joiner_kwargs
        Passed to :class:`ScanJoiner`.

    Returns
    -------
    JoinedStreams
        Iterate it for Batches; its ``stats`` hold the counters afterwards.

    Examples
    --------
    >>> import numpy as np
    >>> from types import SimpleNamespace as NS
    >>> frames = [NS(sequence=s, image=np.zeros((2, 2))) for s in (1, 2, 3)]
    >>> spectra = [NS(position=p, counts=np.ones(4)) for p in (2, 0, 1)]
    >>> stream = join_streams(frames, spectra, 3, batch_size=8)
    >>> sorted(p for b in stream for p in b.positions.tolist())
    [0, 1, 2]
    >>> stream.stats["joined"]
    3
    """
    joiner = ScanJoiner(n_positions, **joiner_kwargs)
    return JoinedStreams(frames, spectra, joiner, frame_position=frame_position or _default_frame_position,
                         poll_interval_s=poll_interval_s, queue_size=queue_size)
