"""MIB pixel data: raw (``R64``) and processed (``U08`` .. ``U64``) frames to assembled images.

:class:`FrameDecoder` is built once per frame geometry (from a
:class:`~streamclust.adapters.mib_header.FrameHeader`) and decodes every frame of it, for the file
reader (:mod:`streamclust.adapters.mib`) and the live receiver alike; the loops are the kernels of
:mod:`streamclust.adapters.mib_kernels`. Images come out in the detector's native orientation (see
:mod:`streamclust.adapters.mib`).
"""

from __future__ import annotations

import numpy as np

from streamclust.adapters import mib_kernels as _k
from streamclust.adapters.errors import PixelDataError
from streamclust.adapters.mib_header import CHIP_GAP, PIXEL_TYPES, FrameHeader

__all__ = ["FrameDecoder", "raw_chip_placement"]

_CHIP = _k.CHIP_SIZE


# --------------------------------------------------------------------------------------------
# pixel data
# --------------------------------------------------------------------------------------------

def raw_chip_placement(layout: str, rows: int = _CHIP) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each chip of a raw row goes in the assembled image (without any gap).

    A raw quad row is ``[Q4 | Q3 | Q2 | Q1]`` (256 pixels each): Q1 (raw position 3) is the top
    left chip, Q2 (position 2) the top right, Q3 (position 1) the bottom left and Q4 (position 0)
    the bottom right; the bottom chips are rotated by 180 degrees. Verified against the real
    recordings (raw vs processed 1-bit, ``tests/test_mib_real_files.py``).

    A region-of-interest readout of ``rows`` rows a chip assembles to ``2 * rows`` rows: the top
    chips fill rows ``0..rows-1`` and the rotated bottom chips the rows below them, so that the
    full frame (``rows=256``) is the special case.

    Returns
    -------
    row0, col0 : ndarray of int64
        Top-left output pixel of each raw chip position.
    flip : ndarray of uint8
        1 where the chip is rotated by 180 degrees.

    Examples
    --------
    >>> [a.tolist() for a in raw_chip_placement("2x2")]
    [[256, 256, 0, 0], [256, 0, 256, 0], [1, 1, 0, 0]]
    """
    if layout == "1x1":
        return (np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.uint8))
    if layout in ("2x2", "2x2G"):
        return (np.array([rows, rows, 0, 0], np.int64),
                np.array([_CHIP, 0, _CHIP, 0], np.int64),
                np.array([1, 1, 0, 0], np.uint8))
    raise ValueError(f"no raw chip placement for layout {layout!r}")


def _insert_gap(src: np.ndarray, out: np.ndarray) -> None:
    """Copy a gap-free quad image (2r x 512) into one with a 2-pixel zero gap between chips."""
    r = src.shape[0] // 2
    out[r:r + CHIP_GAP, :] = 0
    out[:, _CHIP:_CHIP + CHIP_GAP] = 0
    out[:r, :_CHIP] = src[:r, :_CHIP]
    out[:r, _CHIP + CHIP_GAP:] = src[:r, _CHIP:]
    out[r + CHIP_GAP:, :_CHIP] = src[r:, :_CHIP]
    out[r + CHIP_GAP:, _CHIP + CHIP_GAP:] = src[r:, _CHIP:]


class FrameDecoder:
    """Decode the pixel data of frames with one geometry into assembled images.

    Construct once per acquisition (it precomputes the chip placement and scratch buffers) and
    call :meth:`decode` per frame. With ``use_numba=True`` (default) raw data goes through the
    fused kernels of :mod:`streamclust.adapters.mib_kernels`; ``False`` uses their NumPy twins.

    Parameters
    ----------
    header : FrameHeader
        Header of the first frame; later frames must :meth:`match` it.
    use_numba : bool, default True
        Use the Numba kernels (raw data; byte swapping of processed 16- and 32-bit pixels).

    Notes
    -----
    Raw 24-bit frames carry two 12-bit frames, the high 12 bits first; the decoder returns
    ``(high << 12) | low`` as uint32, the same value a processed 24-bit (U32) frame holds.
    """

    def __init__(self, header: FrameHeader, *, use_numba: bool = True):
        self.header = header
        self.use_numba = use_numba
        self._geometry = header.geometry()
        self.image_shape = header.image_shape
        self.image_dtype = header.image_dtype
        self.pixel_bytes = header.pixel_bytes
        self._scratch = None
        if header.raw:
            rows = header.height  # fewer than 256 in a region-of-interest readout
            self._row0, self._col0, self._flip = raw_chip_placement(header.layout, rows)
            if header.layout == "2x2G" or header.counter_depth == 24:
                # assemble gap-free (aligned 64-bit stores) then insert the gap / combine halves
                dt = np.uint16 if header.counter_depth == 24 else header.image_dtype
                n = 2 if header.counter_depth == 24 else 1
                self._scratch = np.empty((n, 2 * rows if header.n_chips == 4 else rows,
                                          2 * _CHIP if header.n_chips == 4 else _CHIP), dt)
            if use_numba:
                self._lut_fwd, self._lut_rev = _k.bit_luts()
        else:
            self._src_dtype = np.dtype(PIXEL_TYPES[header.pixel_type])

    def matches(self, header: FrameHeader) -> bool:
        """True when ``header`` has the geometry this decoder was built for."""
        return header.geometry() == self._geometry

    def decode(self, pixels, out: np.ndarray | None = None) -> np.ndarray:
        """Decode one frame's pixel data.

        Parameters
        ----------
        pixels : bytes-like or ndarray
            Exactly ``header.pixel_bytes`` bytes (C-contiguous).
        out : ndarray, optional
            Destination of shape ``image_shape`` and dtype ``image_dtype`` (C-contiguous).

        Returns
        -------
        ndarray
            The assembled image in native orientation.

        Raises
        ------
        PixelDataError
            Wrong size, or a non-contiguous buffer.
        """
        try:
            # (a live receiver passes a slice of its byte ring: no new array needed)
            src = (pixels if type(pixels) is np.ndarray and pixels.dtype == np.uint8 and pixels.ndim == 1
                   and pixels.flags.c_contiguous else np.frombuffer(pixels, dtype=np.uint8))
        except (ValueError, TypeError) as exc:
            raise PixelDataError(f"pixel data is not a contiguous byte buffer ({exc})",
                                 sequence=self.header.sequence) from None
        if src.size != self.pixel_bytes:
            raise PixelDataError(f"pixel data has {src.size} bytes, header says "
                                 f"{self.pixel_bytes}", sequence=self.header.sequence)
        if out is None:
            out = np.empty(self.image_shape, self.image_dtype)
        elif (out.shape != self.image_shape or out.dtype != self.image_dtype
              or not out.flags.c_contiguous):
            raise ValueError(f"out must be a C-contiguous {self.image_dtype} array of shape "
                             f"{self.image_shape}")
        if not self.header.raw:
            itemsize = self._src_dtype.itemsize
            if self.use_numba and itemsize in (2, 4):
                # one pass from the big-endian bytes into ``out`` (NumPy's swapping cast is 2-6x slower)
                flat = out.reshape(-1)
                if itemsize == 2:
                    _k.swap_be16(src, flat)
                else:
                    _k.swap_be32(src, flat)
            else:
                out[...] = src.view(self._src_dtype).reshape(self.image_shape)
            return out
        depth = self.header.counter_depth
        if depth == 24:
            half = self.pixel_bytes // 2
            hi, lo = self._scratch[0], self._scratch[1]
            self._unpack(src[:half], hi, 12)
            self._unpack(src[half:], lo, 12)
            tmp = hi.astype(np.uint32)
            tmp <<= 12
            tmp |= lo
            if self.header.layout == "2x2G":
                _insert_gap(tmp, out)
            else:
                out[...] = tmp
            return out
        if self.header.layout == "2x2G":
            self._unpack(src, self._scratch[0], depth)
            _insert_gap(self._scratch[0], out)
        else:
            self._unpack(src, out, depth)
        return out

    def _unpack(self, src: np.ndarray, out: np.ndarray, depth: int) -> None:
        """Unpack raw data of one (12-bit half of a 24-bit) frame into gap-free ``out``."""
        if self.use_numba:
            if depth == 1:  # reads bytes: any alignment will do
                _k.unpack_raw_1bit(src, out.view(np.uint64), self._row0, self._col0, self._flip,
                                   self._lut_fwd, self._lut_rev)
            else:
                src64 = src.view(np.uint64)
                if not src64.flags.aligned:
                    src64 = src64.copy()  # the word kernels read aligned uint64
                _k.unpack_raw_words(src64, out.view(np.uint64), self._row0, self._col0,
                                    self._flip, out.dtype.itemsize)
        elif depth == 1:
            _k.unpack_raw_1bit_numpy(src, out, self._row0, self._col0, self._flip)
        else:
            _k.unpack_raw_words_numpy(src, out, self._row0, self._col0, self._flip,
                                      out.dtype.itemsize)

