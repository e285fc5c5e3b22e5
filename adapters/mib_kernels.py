"""Numba kernels that unpack raw (``R64``) Merlin pixel data and assemble chips, with NumPy twins.

Raw pixel data is a stream of big-endian 64-bit words; pixels are packed least significant bit
first. The raw image is ``n_rows`` rows of ``n_chips`` chip rows of 256 pixels each. Every chip
position ``k`` in a raw row is placed in the output by ``(row0[k], col0[k], flip[k])``: an
unflipped chip puts raw row ``r`` at output row ``row0 + r``, left to right; a flipped chip puts
it at ``row0 + n_rows - 1 - r``, right to left (a 180 degree rotation, as the quad's lower chips are
mounted). The placement tables come from :mod:`streamclust.adapters.mib`.

Each kernel writes into a caller-owned output (no allocation in the hot loop) and has a NumPy
twin (``*_numpy``) computing the same result, compared in ``tests/test_mib_codec.py``.

Why these tricks: a quad 1-bit frame is 32 KiB in and 256 KiB out; per-pixel loops cost about a
nanosecond a pixel, too slow for 12,500 frames/s with a receiver beside it. So every source byte
of a 1-bit frame becomes one 8-byte store through a 256-entry lookup table, and 6/12-bit words are
moved whole with a byte swap (reversing the 8 bytes of a big-endian word puts 8-bit or 16-bit
pixels in order; a flipped chip needs the pixel order reversed, which for the whole chip row is
the word order reversed plus, for 16-bit pixels, a swap inside each 16-bit pixel).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = [
    "CHIP_SIZE",
    "bit_luts",
    "unpack_raw_1bit",
    "unpack_raw_1bit_numpy",
    "unpack_raw_words",
    "unpack_raw_words_numpy",
    "pack_raw_1bit",
    "pack_raw_1bit_numpy",
    "pack_raw_words",
    "pack_raw_words_numpy",
    "swap_be16",
    "swap_be32",
    "swap_be_numpy",
    "bin_raw_1bit",
    "bin_raw_1bit_numpy",
]

#: pixels along each side of a Medipix3 chip
CHIP_SIZE = 256


def bit_luts() -> tuple[np.ndarray, np.ndarray]:
    """Lookup tables from one packed byte to eight 0/1 pixel bytes (as one little-endian uint64).

    Returns
    -------
    forward, reversed : ndarray of uint64, shape (256,)
        ``forward[b]`` has byte ``i`` equal to bit ``i`` of ``b``; ``reversed[b]`` has byte
        ``7 - i`` equal to bit ``i`` (for chips written right to left).

    Examples
    --------
    >>> fwd, rev = bit_luts()
    >>> fwd[1].tobytes(), rev[1].tobytes()
    (b'\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00', b'\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x01')
    """
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
    forward = np.ascontiguousarray(bits).view("<u8").ravel().astype(np.uint64)
    backward = np.ascontiguousarray(bits[:, ::-1]).view("<u8").ravel().astype(np.uint64)
    return forward, backward


@njit(cache=True, nogil=True)
def unpack_raw_1bit(src, out64, row0, col0, flip, lut_fwd, lut_rev):  # pragma: no cover - JIT
    """Unpack raw 1-bit data and place its chips (Numba).

    Parameters
    ----------
    src : uint8[:]
        Raw pixel bytes: ``n_rows * n_chips * 32`` bytes (big-endian words, LSB-first bits).
    out64 : uint64[:, :]
        The output image (uint8 pixels) viewed as uint64, shape ``(H, W // 8)``; every chip
        column offset must be a multiple of 8 pixels.
    row0, col0 : int64[:]
        Output row and column (in pixels) of each chip position's top-left corner.
    flip : uint8[:]
        1 for chips rotated by 180 degrees.
    lut_fwd, lut_rev : uint64[:]
        Tables from :func:`bit_luts`.
    """
    n_chips = row0.shape[0]
    n_rows = src.shape[0] // (n_chips * 32)
    for r in range(n_rows):
        for k in range(n_chips):
            base = (r * n_chips + k) * 32
            c0 = col0[k] // 8
            if flip[k]:
                orow = row0[k] + n_rows - 1 - r
                # pixel p of the chip row goes to column 255 - p: byte group g -> 31 - g
                for w in range(4):
                    for j in range(8):
                        g = w * 8 + 7 - j  # the byte at offset j holds pixels 8g..8g+7
                        out64[orow, c0 + 31 - g] = lut_rev[src[base + w * 8 + j]]
            else:
                orow = row0[k] + r
                for w in range(4):
                    for j in range(8):
                        g = w * 8 + 7 - j
                        out64[orow, c0 + g] = lut_fwd[src[base + w * 8 + j]]


def unpack_raw_1bit_numpy(src, out, row0, col0, flip) -> None:
    """NumPy twin of :func:`unpack_raw_1bit`, writing uint8 pixels into ``out`` (H, W)."""
    n_chips = len(row0)
    words = np.frombuffer(src, dtype=np.uint8).reshape(-1, 8)[:, ::-1]
    bits = np.unpackbits(words, axis=1, bitorder="little")
    raw = bits.reshape(-1, n_chips, CHIP_SIZE)
    _place_numpy(raw, out, row0, col0, flip)


@njit(cache=True, nogil=True)
def _bswap64(v):  # pragma: no cover - JIT
    v = ((v & np.uint64(0x00FF00FF00FF00FF)) << np.uint64(8)) | (
        (v >> np.uint64(8)) & np.uint64(0x00FF00FF00FF00FF)
    )
    v = ((v & np.uint64(0x0000FFFF0000FFFF)) << np.uint64(16)) | (
        (v >> np.uint64(16)) & np.uint64(0x0000FFFF0000FFFF)
    )
    return (v << np.uint64(32)) | (v >> np.uint64(32))


@njit(cache=True, nogil=True)
def _bswap16x4(v):  # pragma: no cover - JIT
    return ((v & np.uint64(0x00FF00FF00FF00FF)) << np.uint64(8)) | (
        (v >> np.uint64(8)) & np.uint64(0x00FF00FF00FF00FF)
    )


@njit(cache=True, nogil=True)
def unpack_raw_words(src64, out64, row0, col0, flip, pixel_bytes):  # pragma: no cover - JIT
    """Unpack raw 6-bit (``pixel_bytes=1``) or 12-bit (``pixel_bytes=2``) data and place chips.

    Parameters
    ----------
    src64 : uint64[:]
        Raw pixel data read as *native little-endian* uint64 words (no byte swap applied).
    out64 : uint64[:, :]
        The output image (uint8 or uint16 pixels) viewed as uint64; chip column offsets must be
        multiples of ``8 // pixel_bytes`` pixels.
    row0, col0, flip
        Chip placement, as in :func:`unpack_raw_1bit`.
    pixel_bytes : int
        1 for 6-bit (8 pixels a word), 2 for 12-bit (4 pixels a word).
    """
    n_chips = row0.shape[0]
    per_word = 8 // pixel_bytes
    wpr = CHIP_SIZE // per_word  # words per chip row
    n_rows = src64.shape[0] // (n_chips * wpr)
    for r in range(n_rows):
        for k in range(n_chips):
            base = (r * n_chips + k) * wpr
            c0 = col0[k] // per_word
            if flip[k]:
                orow = row0[k] + n_rows - 1 - r
                if pixel_bytes == 1:
                    for w in range(wpr):
                        out64[orow, c0 + wpr - 1 - w] = src64[base + w]
                else:
                    for w in range(wpr):
                        out64[orow, c0 + wpr - 1 - w] = _bswap16x4(src64[base + w])
            else:
                orow = row0[k] + r
                for w in range(wpr):
                    out64[orow, c0 + w] = _bswap64(src64[base + w])


def unpack_raw_words_numpy(src, out, row0, col0, flip, pixel_bytes: int) -> None:
    """NumPy twin of :func:`unpack_raw_words`, writing uint8/uint16 pixels into ``out``."""
    n_chips = len(row0)
    per_word = 8 // pixel_bytes
    dtype = np.dtype(">u1") if pixel_bytes == 1 else np.dtype(">u2")
    # reverse the big-endian pixels inside each 64-bit word: LSB-first packing
    pixels = np.frombuffer(src, dtype=dtype).reshape(-1, per_word)[:, ::-1]
    raw = pixels.reshape(-1, n_chips, CHIP_SIZE)
    _place_numpy(raw, out, row0, col0, flip)


def _place_numpy(raw, out, row0, col0, flip) -> None:
    """Place chip k of every raw row (``raw[:, k, :]``) into ``out``."""
    for k in range(raw.shape[1]):
        chip = raw[:, k, :]
        if flip[k]:
            chip = chip[::-1, ::-1]
        out[row0[k] : row0[k] + chip.shape[0], col0[k] : col0[k] + CHIP_SIZE] = chip


# --------------------------------------------------------------------------------------------
# raw 1-bit frames binned without unpacking
# --------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def bin_raw_1bit(src, out, row0, col0, flip, bin_factor):  # pragma: no cover - JIT
    """Add raw 1-bit data, binned ``bin_factor`` x ``bin_factor``, to ``out`` (no unpacking).

    Each source byte holds 8 pixels of one chip row that stay within one 8-pixel-aligned group
    of output columns (chip column offsets are multiples of 8; a flipped chip only reverses the
    order inside and between groups), so its bits all fall into one bin: the bin gains the
    byte's popcount. A quad frame is 32 KiB read and 4,096 sums, instead of 256 KiB unpacked and
    then summed again; the result is the binned unpacked image (:func:`unpack_raw_1bit`).

    Parameters
    ----------
    src : uint8[:]
        Raw pixel bytes, as for :func:`unpack_raw_1bit`.
    out : 2-D integer or float array
        ``(H // bin_factor, W // bin_factor)``; added to (zero it first for one frame's bins).
    row0, col0, flip
        Chip placement, as for :func:`unpack_raw_1bit`.
    bin_factor : int
        A multiple of 8.
    """
    n_chips = row0.shape[0]
    n_rows = src.shape[0] // (n_chips * 32)
    groups = bin_factor // 8  # 8-pixel column groups a bin spans
    popcount = np.zeros(256, np.int32)
    for b in range(256):
        popcount[b] = popcount[b >> 1] + (b & 1)
    # output bin column of the byte at offset t of each chip's 32-byte row (no division in the loop)
    colbin = np.empty((n_chips, 32), np.int64)
    for k in range(n_chips):
        g0 = col0[k] // 8
        for w in range(4):
            for j in range(8):
                g = w * 8 + 7 - j  # the byte at offset j of word w holds pixel group g
                colbin[k, w * 8 + j] = (g0 + 31 - g if flip[k] else g0 + g) // groups
    stride = n_chips * 32  # bytes from one raw row to the next
    for k in range(n_chips):
        # 8 chip rows starting at a multiple of 8 land in one bin row (row0 and bin_factor are
        # multiples of 8): sum them in a register, one store a bin instead of eight
        # (a region-of-interest readout whose row count is not a multiple of 8 puts the groups
        # across bin rows: every row then takes the per-row loop below)
        n_fast = n_rows if n_rows % 8 == 0 else 0
        for r8 in range(0, n_fast, 8):
            orow = (row0[k] + n_rows - 1 - r8 if flip[k] else row0[k] + r8) // bin_factor
            base = r8 * stride + k * 32
            for t in range(32):
                acc = 0
                for i in range(8):
                    acc += popcount[src[base + i * stride + t]]
                out[orow, colbin[k, t]] += acc
        for r in range(n_fast, n_rows):
            orow = (row0[k] + n_rows - 1 - r if flip[k] else row0[k] + r) // bin_factor
            for t in range(32):
                out[orow, colbin[k, t]] += popcount[src[r * stride + k * 32 + t]]


def bin_raw_1bit_numpy(src, out, row0, col0, flip, bin_factor: int) -> None:
    """NumPy twin of :func:`bin_raw_1bit`: unpack, then sum ``bin_factor`` x ``bin_factor`` blocks."""
    h, w = out.shape[0] * bin_factor, out.shape[1] * bin_factor
    image = np.zeros((h, w), np.uint8)
    unpack_raw_1bit_numpy(src, image, row0, col0, flip)
    binned = image.reshape(out.shape[0], bin_factor, out.shape[1], bin_factor).sum(axis=(1, 3))
    out += binned.astype(out.dtype)


# --------------------------------------------------------------------------------------------
# processed (U16/U32) frames: big-endian pixels to native ones
# --------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def swap_be16(src, out):  # pragma: no cover - JIT
    """Big-endian 16-bit pixels (``src``: uint8, any alignment) into native ``out`` (uint16, 1-D).

    NumPy's ``out[...] = src.view(">u2")`` goes through a generic byte-swapping cast: about
    60 us for a quad 12-bit frame, 1.5x the whole bare-drain budget a frame at detector rate;
    this loop is compiled to vector shuffles and runs at memory speed (about 25 us).
    """
    for i in range(out.shape[0]):
        out[i] = (np.uint16(src[2 * i]) << np.uint16(8)) | np.uint16(src[2 * i + 1])


@njit(cache=True, nogil=True)
def swap_be32(src, out):  # pragma: no cover - JIT
    """Big-endian 32-bit pixels (``src``: uint8, any alignment) into native ``out`` (uint32, 1-D)."""
    for i in range(out.shape[0]):
        j = 4 * i
        out[i] = ((np.uint32(src[j]) << np.uint32(24)) | (np.uint32(src[j + 1]) << np.uint32(16))
                  | (np.uint32(src[j + 2]) << np.uint32(8)) | np.uint32(src[j + 3]))


def swap_be_numpy(src, out) -> None:
    """NumPy twin of :func:`swap_be16` / :func:`swap_be32` (chosen by ``out.dtype``)."""
    out[...] = np.frombuffer(src, dtype=out.dtype.newbyteorder(">"))


# --------------------------------------------------------------------------------------------
# packing (the encoder's direction): the exact inverses of the kernels above
# --------------------------------------------------------------------------------------------

#: gathers the lowest bit of each of 8 bytes into the top byte, byte i -> bit i
_GATHER_FWD = np.uint64(0x0102040810204080)
#: the same with the byte order reversed, byte 7 - i -> bit i (chips written right to left)
_GATHER_REV = np.uint64(0x8040201008040201)
_LSB_MASK = np.uint64(0x0101010101010101)


@njit(cache=True, nogil=True)
def pack_raw_1bit(img64, dst, row0, col0, flip):  # pragma: no cover - JIT
    """Pack an assembled 0/1 uint8 image (viewed as uint64, shape (H, W // 8)) into raw bytes.

    The inverse of :func:`unpack_raw_1bit`: every 8 pixels are gathered into one byte with a
    multiply (only the lowest bit of each pixel is used: values must be validated before).
    """
    n_chips = row0.shape[0]
    n_rows = dst.shape[0] // (n_chips * 32)
    for r in range(n_rows):
        for k in range(n_chips):
            base = (r * n_chips + k) * 32
            c0 = col0[k] // 8
            if flip[k]:
                orow = row0[k] + n_rows - 1 - r
                for w in range(4):
                    for j in range(8):
                        g = w * 8 + 7 - j
                        v = img64[orow, c0 + 31 - g] & _LSB_MASK
                        dst[base + w * 8 + j] = np.uint8((v * _GATHER_REV) >> np.uint64(56))
            else:
                orow = row0[k] + r
                for w in range(4):
                    for j in range(8):
                        g = w * 8 + 7 - j
                        v = img64[orow, c0 + g] & _LSB_MASK
                        dst[base + w * 8 + j] = np.uint8((v * _GATHER_FWD) >> np.uint64(56))


def pack_raw_1bit_numpy(img, dst, row0, col0, flip) -> None:
    """NumPy twin of :func:`pack_raw_1bit` (``img`` uint8 (H, W), ``dst`` uint8 1-D)."""
    raw = _gather_numpy(img, row0, col0, flip)
    packed = np.packbits(raw.reshape(-1, 8) & 1, axis=1, bitorder="little").reshape(-1, 8)
    dst.reshape(-1, 8)[...] = packed[:, ::-1]


@njit(cache=True, nogil=True)
def pack_raw_words(img64, dst64, row0, col0, flip, pixel_bytes):  # pragma: no cover - JIT
    """Pack an assembled uint8 (6-bit) or uint16 (12-bit) image into raw words.

    The inverse of :func:`unpack_raw_words` (the per-word transforms are their own inverses);
    ``dst64`` is the raw pixel buffer viewed as native uint64.
    """
    n_chips = row0.shape[0]
    per_word = 8 // pixel_bytes
    wpr = CHIP_SIZE // per_word
    n_rows = dst64.shape[0] // (n_chips * wpr)
    for r in range(n_rows):
        for k in range(n_chips):
            base = (r * n_chips + k) * wpr
            c0 = col0[k] // per_word
            if flip[k]:
                orow = row0[k] + n_rows - 1 - r
                if pixel_bytes == 1:
                    for w in range(wpr):
                        dst64[base + w] = img64[orow, c0 + wpr - 1 - w]
                else:
                    for w in range(wpr):
                        dst64[base + w] = _bswap16x4(img64[orow, c0 + wpr - 1 - w])
            else:
                orow = row0[k] + r
                for w in range(wpr):
                    dst64[base + w] = _bswap64(img64[orow, c0 + w])


def pack_raw_words_numpy(img, dst, row0, col0, flip, pixel_bytes: int) -> None:
    """NumPy twin of :func:`pack_raw_words` (``img`` uint8/uint16 (H, W), ``dst`` uint8 1-D)."""
    raw = _gather_numpy(img, row0, col0, flip)
    if pixel_bytes == 1:
        dst.reshape(-1, 8)[...] = raw.reshape(-1, 8)[:, ::-1]
    else:
        dst.view(">u2").reshape(-1, 4)[...] = raw.reshape(-1, 4)[:, ::-1]


def _gather_numpy(img, row0, col0, flip) -> np.ndarray:
    """Raw rows ``(n_rows, n_chips, 256)`` from an assembled image: inverse of ``_place_numpy``."""
    n_chips = len(row0)
    # every chip contributes n_rows rows: the whole image height single chip, half of it quad
    n_rows = img.shape[0] if n_chips == 1 else img.shape[0] // 2
    raw = np.empty((n_rows, n_chips, CHIP_SIZE), img.dtype)
    for k in range(n_chips):
        chip = img[row0[k]:row0[k] + n_rows, col0[k]:col0[k] + CHIP_SIZE]
        raw[:, k, :] = chip[::-1, ::-1] if flip[k] else chip
    return raw
