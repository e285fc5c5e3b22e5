"""Cross-fitted separation of two sets of scan positions in one feature block.

Why cross-fitted
----------------
Two groups of positions chosen *on their own data* (a clustering's labels) look distinct on that
data whatever they are: a direction fitted to noise in hundreds of channels separates any two
groups. The positions are therefore split into two interleaved folds (the checkerboard
``(y + x) % 2`` of the scan); the direction from ``j``'s to ``k``'s mean is taken in one fold and the
other fold's projections give ``d = (mean_k - mean_j) / sqrt((var_k + var_j) / 2)``; the two folds'
``d`` are averaged. On fresh data a noise direction's expected ``d`` is 0.

``d`` is a standardised gap (Cohen's d along the fitted direction): for two Gaussian groups of
equal spread, a position is assigned to the wrong one of them with probability ``Phi(-d / 2)``
(16 % at ``d = 2``, 31 % at ``d = 1``) whatever the number of positions. That is what makes it
usable as a threshold across scan sizes (:mod:`streamclust.cluster.merge`,
:mod:`streamclust.flags.flagger`).

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(0.0, 1.0, (400, 6))
>>> k = np.arange(400) < 200
>>> fold = np.arange(400) % 2 == 0
>>> block_distance(x, k, ~k, fold) < 0.5             # the same distribution: near 0
True
>>> x[k, 0] += 3.0
>>> 2.5 < block_distance(x, k, ~k, fold) < 3.5        # 3 standard deviations apart
True
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["block_distance", "shape_difference"]


def shape_difference(mean_k: np.ndarray, mean_j: np.ndarray) -> np.ndarray:
    """``mean_k - mean_j`` without its part along the pooled mean ``mean_k + mean_j``: what differs
    in the ratios of the channels, not in the overall intensity."""
    diff = mean_k - mean_j
    pooled = mean_k + mean_j
    pn = float(pooled @ pooled)
    return diff - (float(diff @ pooled) / pn) * pooled if pn > 0 else diff


def block_distance(features: np.ndarray, in_k: np.ndarray, in_j: np.ndarray, fold: np.ndarray,
                   min_per_fold: int = 2, shape_only: bool = False) -> float:
    """Cross-fitted discriminability of two position sets in one feature block (module docstring).

    ``features`` (n, d) floating point; ``in_k``, ``in_j``, ``fold`` boolean (n,). Returns 0.0 when a fold has
    fewer than ``min_per_fold`` positions of either set or the means coincide. ``shape_only``: the
    direction is made orthogonal to the two sets' pooled mean, so a difference in overall
    intensity (a thicker region's spectrum: every line scaled alike) does not count, a difference
    in the ratios (composition) does (as :class:`streamclust.flags.sums.DistancePlan`).
    """
    x = features
    out = []
    for a in (fold, ~fold):
        b = ~a
        ka, ja, kb, jb = in_k & a, in_j & a, in_k & b, in_j & b
        counts = (int(ka.sum()), int(ja.sum()), int(kb.sum()), int(jb.sum()))
        if min(counts) < min_per_fold:
            return 0.0
        # means and projections as matrix-vector products over the whole block: fancy-indexed
        # copies of a (n, 4096) block cost more than the arithmetic (and a (2, n) x (n, d) gemm
        # measured 20x slower than two gemv here)
        mean_k = (ka.astype(x.dtype) @ x).astype(np.float64) / counts[0]
        mean_j = (ja.astype(x.dtype) @ x).astype(np.float64) / counts[1]
        diff = shape_difference(mean_k, mean_j) if shape_only else mean_k - mean_j
        norm = float(np.linalg.norm(diff))
        if not np.isfinite(norm) or norm == 0.0:
            return 0.0
        proj = (x @ (diff / norm).astype(x.dtype)).astype(np.float64)
        pk = proj[kb]
        pj = proj[jb]
        pooled = math.sqrt(0.5 * (float(pk.var()) + float(pj.var())))
        gap = float(pk.mean() - pj.mean())
        if pooled == 0.0:
            out.append(math.inf if gap > 0 else 0.0)
        else:
            out.append(gap / pooled)
    return max(0.0, float(np.mean(out)))
