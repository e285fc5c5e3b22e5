"""Numba kernels for per-frame feature reduction, each beside its NumPy reference twin.

A 512x512 uint16 frame is 512 KiB, so binning is memory-bound: the kernels read every pixel once,
in row order, and accumulate a row of bins at a time. Frames are processed in parallel (``prange``
over the frame axis); each frame writes only its own slice of the preallocated output, so no
synchronisation is needed.

The unweighted kernel is the fast path (no masks). Masks are pixel weights (0 for excluded pixels, 1
for normal pixels, 1/area for the quad's wide pixels when asked) with each bin rescaled by the
inverse of its live fraction. The dense weighted kernel multiplies every pixel (simple, the
definition); the corrected kernel sum-bins in integers and then corrects the few pixels whose weight
is not 1 (measured about 2x faster with a direct-beam disc and the chip cross masked). Both share the
NumPy twin :func:`bin_weighted_frames_numpy`.

Examples
--------
>>> import numpy as np
>>> frames = np.arange(2 * 4 * 4, dtype=np.uint16).reshape(2, 4, 4)
>>> out = np.empty((2, 2, 2), dtype=np.float32)
>>> _ = bin_sum_frames(frames, 2, out)
>>> bool(np.array_equal(out, bin_sum_frames_numpy(frames, 2)))
True
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = [
    "bin_corrected_frames",
    "bin_sum_frames",
    "bin_sum_frames_numpy",
    "bin_weighted_frames",
    "bin_weighted_frames_numpy",
]


@njit(cache=True, nogil=True, parallel=True)
def bin_sum_frames(frames, factor, out):  # pragma: no cover - compiled
    """Sum-bin ``frames`` (n, H, W) by ``factor`` into ``out`` (n, H//factor, W//factor) float32.

    Accumulates in float64 per bin row (exact for any integer input up to 2**53), then stores
    float32. Returns ``out``.
    """
    n = frames.shape[0]
    hb = out.shape[1]
    wb = out.shape[2]
    for i in prange(n):
        acc = np.zeros(wb, dtype=np.float64)
        for br in range(hb):
            for j in range(wb):
                acc[j] = 0.0
            for dr in range(factor):
                row = frames[i, br * factor + dr]
                for j in range(wb):
                    base = j * factor
                    s = 0
                    for k in range(factor):
                        s += np.int64(row[base + k])
                    acc[j] += s
            for j in range(wb):
                out[i, br, j] = np.float32(acc[j])
    return out


@njit(cache=True, nogil=True, parallel=True)
def bin_weighted_frames(frames, weights, bin_scale, factor, out):  # pragma: no cover - compiled
    """Weighted sum-binning: ``out[i, a, b] = bin_scale[a, b] * sum(frames[i] * weights)`` over the bin.

    ``weights`` (H, W) float32 is 0 for excluded pixels; ``bin_scale`` (H//f, W//f) is the inverse
    live fraction of each bin (0 where a bin is dropped). Returns ``out``.
    """
    n = frames.shape[0]
    hb = out.shape[1]
    wb = out.shape[2]
    for i in prange(n):
        acc = np.zeros(wb, dtype=np.float64)
        for br in range(hb):
            for j in range(wb):
                acc[j] = 0.0
            for dr in range(factor):
                r = br * factor + dr
                row = frames[i, r]
                wrow = weights[r]
                for j in range(wb):
                    base = j * factor
                    s = 0.0
                    for k in range(factor):
                        s += np.float64(row[base + k]) * np.float64(wrow[base + k])
                    acc[j] += s
            for j in range(wb):
                out[i, br, j] = np.float32(acc[j] * bin_scale[br, j])
    return out


@njit(cache=True, nogil=True, parallel=True)
def bin_corrected_frames(
    frames, factor, corr_rows, corr_cols, corr_wm1, bin_scale, out
):  # pragma: no cover - compiled
    """Weighted binning as a correction of the plain sum: the fast path for masks.

    Masks touch few pixels (a direct-beam disc, the chip cross, dead pixels: a few thousand of
    262,144), so instead of multiplying every pixel by its weight, the frame is sum-binned in
    integers and each exceptional pixel ``p`` adds ``(w_p - 1) * x_p`` to its bin; the bin is then
    scaled by ``bin_scale``. Same result as :func:`bin_weighted_frames` with the weights
    ``1 + corr_wm1`` at ``(corr_rows, corr_cols)`` and 1 elsewhere, up to float rounding.
    """
    n = frames.shape[0]
    hb = out.shape[1]
    wb = out.shape[2]
    n_corr = corr_rows.shape[0]
    for i in prange(n):
        acc = np.zeros((hb, wb), dtype=np.float64)
        for br in range(hb):
            for dr in range(factor):
                row = frames[i, br * factor + dr]
                for j in range(wb):
                    base = j * factor
                    s = 0
                    for k in range(factor):
                        s += np.int64(row[base + k])
                    acc[br, j] += s
        for p in range(n_corr):
            r = corr_rows[p]
            c = corr_cols[p]
            acc[r // factor, c // factor] += corr_wm1[p] * np.float64(frames[i, r, c])
        for br in range(hb):
            for j in range(wb):
                out[i, br, j] = np.float32(acc[br, j] * bin_scale[br, j])
    return out


def bin_sum_frames_numpy(frames: np.ndarray, factor: int) -> np.ndarray:
    """NumPy twin of :func:`bin_sum_frames` (reshape-sum in float64, stored as float32)."""
    n, h, w = frames.shape
    hb, wb = h // factor, w // factor
    blocks = frames[:, : hb * factor, : wb * factor].reshape(n, hb, factor, wb, factor)
    return blocks.sum(axis=(2, 4), dtype=np.float64).astype(np.float32)


def bin_weighted_frames_numpy(
    frames: np.ndarray, weights: np.ndarray, bin_scale: np.ndarray, factor: int
) -> np.ndarray:
    """NumPy twin of :func:`bin_weighted_frames`."""
    n, h, w = frames.shape
    hb, wb = h // factor, w // factor
    weighted = frames.astype(np.float64) * weights.astype(np.float64)
    sums = weighted[:, : hb * factor, : wb * factor].reshape(n, hb, factor, wb, factor).sum(axis=(2, 4))
    return (sums * bin_scale.astype(np.float64)).astype(np.float32)
