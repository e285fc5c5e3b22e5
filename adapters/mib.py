"""Decoding the Merlin MIB format: acquisition header, frame headers, pixel data, ``.mib`` files.

The same code serves the file reader (:class:`MibFile`, :func:`read_mib`) and the live TCP
receiver (:mod:`streamclust.adapters.merlin`): a data-port message payload is exactly one record
of a ``.mib`` file (``MQ1`` header + pixels), and the acquisition-header message payload is the
``.hdr`` file's text.

The format is read in three parts, one module each: the headers
(:mod:`streamclust.adapters.mib_header`), the pixel data (:mod:`streamclust.adapters.mib_decode`)
and the files (this module, which re-exports the other two: import from here).

Orientation
-----------
Images are returned in the detector's *native* orientation, exactly as the Merlin software stores
processed frames: row 0 is the first row in the file, no flip is applied. (rosettasciio flips
axis -2 for display; we do not.) Raw (``R64``) frames are assembled into that same orientation, so
a raw frame and a processed frame of the same exposure decode to the same array. See
``docs/merlin-format.md``.

Examples
--------
>>> from streamclust.simulators.mib_encode import FrameEncoder
>>> import numpy as np
>>> enc = FrameEncoder(image_shape=(256, 256), counter_depth=1, raw=True, layout="1x1")
>>> image = (np.arange(256 * 256) % 3 == 0).astype(np.uint8).reshape(256, 256)
>>> message = enc.encode(7, image)
>>> header = parse_frame_header(message)
>>> header.sequence, header.pixel_type, header.counter_depth, header.image_shape
(7, 'R64', 1, (256, 256))
>>> decoded = FrameDecoder(header).decode(memoryview(message)[header.header_size:])
>>> bool((decoded == image).all())
True
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from streamclust.adapters.errors import HeaderError, PixelDataError
# re-exported: the codec's names have always been imported from this module
from streamclust.adapters.mib_decode import FrameDecoder, raw_chip_placement
from streamclust.adapters.mib_header import (
    COUNTER_DEPTHS,
    MAX_HEADER_SIZE,
    MQ1_PEEK,
    PIXEL_TYPES,
    AcquisitionHeader,
    FrameHeader,
    parse_acquisition_header,
    parse_frame_header,
    peek_header_size,
)

__all__ = [
    "AcquisitionHeader",
    "parse_acquisition_header",
    "MQ1_PEEK",
    "MAX_HEADER_SIZE",
    "FrameHeader",
    "peek_header_size",
    "parse_frame_header",
    "FrameDecoder",
    "MibFile",
    "read_mib",
    "COUNTER_DEPTHS",
    "PIXEL_TYPES",
    "raw_chip_placement",
]

logger = logging.getLogger(__name__)


class MibFile:
    """A ``.mib`` file, memory-mapped: frame headers validated as read, images on demand.

    Every record must have the geometry of the first (real recordings do); ``n_frames`` is the
    file size divided by the record size.

    Parameters
    ----------
    path : path-like
        The ``.mib`` file.
    hdr_path : path-like, optional
        The acquisition header; by default ``path`` with suffix ``.hdr`` when it exists.
    on_truncated : {"raise", "skip"}, default "raise"
        A file whose size is not a whole number of records (recording cut short, or still being
        written): ``"raise"`` raises :class:`PixelDataError` with the offset of the partial
        record; ``"skip"`` ignores the partial record (logged) and reads the complete ones.
    use_numba : bool, default True
        Passed to :class:`FrameDecoder`.

    Raises
    ------
    HeaderError
        The first frame header is invalid, or the file is empty.
    PixelDataError
        The last record is truncated and ``on_truncated="raise"``.
    """

    def __init__(self, path, *, hdr_path=None, on_truncated: str = "raise",
                 use_numba: bool = True):
        if on_truncated not in ("raise", "skip"):
            raise ValueError(f"on_truncated must be 'raise' or 'skip', not {on_truncated!r}")
        self.path = Path(path)
        if hdr_path is None:
            candidate = self.path.with_suffix(".hdr")
            hdr_path = candidate if candidate.exists() else None
        self.hdr_path = Path(hdr_path) if hdr_path is not None else None
        self.acquisition_header = (
            parse_acquisition_header(self.hdr_path.read_bytes()) if self.hdr_path else None
        )
        depth_hint = self.acquisition_header.counter_depth if self.acquisition_header else None
        self._file = open(self.path, "rb")
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size < MQ1_PEEK:
                raise HeaderError(f"{self.path} is too small ({size} bytes) for a frame",
                                  offset=0)
            self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._buf = memoryview(self._mmap)
            try:
                first = parse_frame_header(self._buf, offset=0, counter_depth=depth_hint)
            except HeaderError as exc:
                if exc.sequence is None:
                    exc.sequence = 1
                raise
            self._depth_hint = first.counter_depth
            self.first_header = first
            self.record_size = first.message_size
            n, rest = divmod(size, self.record_size)
            if rest:
                msg = (f"{self.path}: last record truncated ({rest} of {self.record_size} bytes)")
                if on_truncated == "raise":
                    raise PixelDataError(msg, offset=n * self.record_size, sequence=n + 1)
                logger.warning("%s; skipped", msg)
            self.n_frames = n
            if n == 0:
                raise PixelDataError(f"{self.path}: no complete frame", offset=0, sequence=1)
            self.decoder = FrameDecoder(first, use_numba=use_numba)
            if (self.acquisition_header is not None and self.acquisition_header.n_frames
                    and self.acquisition_header.n_frames != n):
                logger.warning("%s holds %d frames, its header announces %d", self.path, n,
                               self.acquisition_header.n_frames)
        except BaseException:
            self.close()
            raise
        self._headers: list[FrameHeader | None] = [None] * n
        self._headers[0] = first

    # context manager -------------------------------------------------------------------------
    def __enter__(self) -> MibFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the memory map and the file."""
        buf = getattr(self, "_buf", None)
        if buf is not None:
            buf.release()
            self._buf = None
        mm = getattr(self, "_mmap", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                # an array or traceback still references the map; it is unmapped when collected
                logger.debug("memory map of %s still referenced; left to the collector",
                             self.path)
            self._mmap = None
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None

    def __len__(self) -> int:
        return self.n_frames

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.first_header.image_shape

    @property
    def image_dtype(self) -> np.dtype:
        return self.first_header.image_dtype

    def header(self, i: int) -> FrameHeader:
        """The validated header of frame ``i`` (0-based)."""
        if not 0 <= i < self.n_frames:
            raise IndexError(f"frame {i} out of range 0..{self.n_frames - 1}")
        h = self._headers[i]
        if h is None:
            off = i * self.record_size
            h = parse_frame_header(self._buf, offset=off, counter_depth=self._depth_hint,
                                   sequence_hint=i + 1)
            if not self.decoder.matches(h) or h.header_size != self.first_header.header_size:
                raise HeaderError(f"frame geometry {h.geometry()} differs from the first frame's "
                                  f"{self.first_header.geometry()}", offset=off,
                                  sequence=h.sequence)
            self._headers[i] = h
        return h

    @property
    def headers(self) -> list[FrameHeader]:
        """All frame headers (parsed and validated on first access)."""
        return [self.header(i) for i in range(self.n_frames)]

    def frame(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Decode frame ``i`` (0-based) after validating its header."""
        h = self.header(i)
        start = i * self.record_size + h.header_size
        return self.decoder.decode(self._buf[start:start + h.pixel_bytes], out=out)

    def iter_frames(self) -> Iterator[tuple[FrameHeader, np.ndarray]]:
        """Yield ``(header, image)`` for every frame in file order (a new array each)."""
        for i in range(self.n_frames):
            yield self.header(i), self.frame(i)

    def read_all(self) -> np.ndarray:
        """All frames as one ``(n_frames, h, w)`` array."""
        out = np.empty((self.n_frames, *self.image_shape), self.image_dtype)
        for i in range(self.n_frames):
            self.frame(i, out=out[i])
        return out


def read_mib(path, *, hdr_path=None) -> np.ndarray:
    """Read every frame of a ``.mib`` file.

    Parameters
    ----------
    path : path-like
        The ``.mib`` file.
    hdr_path : path-like, optional
        Acquisition header (default: the ``.hdr`` beside it, when present).

    Returns
    -------
    ndarray, shape (n_frames, h, w)
        Assembled frames in the detector's native orientation (no flip), dtype by counter
        depth (uint8 for 1/6-bit, uint16 for 12-bit, uint32 for 24-bit).
    """
    with MibFile(path, hdr_path=hdr_path) as f:
        return f.read_all()
