"""Merge clusters that are not distinct phases: as many level-2 clusters as the data supports.

Why this exists
---------------
The host refinement (:mod:`streamclust.host_refine`) clusters the film into ``host_clusters``
sub-clusters. Where the film holds one matrix and a small second phase, most of those clusters are
counting noise: EDS spectra of about 36 X-ray counts scatter enough that fuzzy C-means splits a
uniform matrix into salt-and-pepper regions (measured: the largest live cluster held 24-37 % of
the matrix on the phantom). A microscopist reads such a map as five phases.

Telling a noise cluster from a phase
------------------------------------
A cluster's *own* labels cannot tell: each position was put in the cluster its own data is
nearest to, so any two clusters look separated on that data (cross-fitted ``d`` about 3 between
noise clusters and phases alike, ``benchmarks/level2_separation.py``). A phase is a *region*: a
position's neighbours know which phase it is in before its own data is read. So every position is
labelled by the majority (at least 3 of 4) of its 4-neighbours, which all lie in the other fold of
the scan's checkerboard, and the separation of two clusters is the cross-fitted standardised gap
``d`` (:func:`streamclust.separation.block_distance`) of the positions' *own* scores under those
neighbour labels. For noise clusters the neighbour label carries nothing about the position's
data and ``d`` is near 0; for a phase it is the phase contrast.

Measured on the phantom (level-2 scores, 64 x 64, tuning seeds 0 and 2): neighbour-labelled ``d``
between matrix clusters 0-1.07, between the second phase and any matrix cluster 2.3-3.4.

The rule
--------
Clusters closer than ``min_separation`` are merged, closest pair first, the separations recomputed
after each merge (average rather than single linkage: a cluster of boundary positions close to both
the matrix and the second phase is merged into one of them, it does not chain the two together).
``min_separation = 2`` is a statement about the map, not about one phantom: two groups with
equal spread ``d`` apart are told apart position by position with error ``Phi(-d/2)``, 16 % at 2.
Clusters that a position's own data cannot assign with better than that are shown as one region.
``d`` does not grow with the number of positions (it is an effect size, not a test statistic), so
the rule means the same at 64 x 64 and at 512 x 512. A cluster with too few neighbour-labelled
positions to measure (fewer than ``min_positions`` in a fold) is not merged: no evidence either
way, and a small inclusion must not vanish into the matrix for lack of it.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> ny = nx = 40
>>> yy, xx = np.mgrid[:ny, :nx]
>>> phase = ((yy - 20) ** 2 + (xx - 20) ** 2 < 64).ravel()      # a disc: a second phase
>>> z = rng.normal(0.0, 1.0, (ny * nx, 3)); z[phase, 0] += 4.0
>>> labels = np.where(phase, 2, rng.integers(0, 2, ny * nx))     # the matrix split by noise
>>> merge_indistinct(z, np.arange(ny * nx), labels, (ny, nx), 3).tolist()
[0, 0, 2]
>>> u = np.array([[0.5, 0.3, 0.2]], np.float32)
>>> merge_columns(u, np.array([0, 0, 2])).tolist()
[[0.800000011920929, 0.0, 0.20000000298023224]]
"""

from __future__ import annotations

import logging

import numpy as np

from streamclust.separation import block_distance

logger = logging.getLogger(__name__)

__all__ = ["merge_indistinct", "merge_columns", "neighbour_labels", "DEFAULT_MIN_SEPARATION"]

#: two clusters closer than this (cross-fitted standardised gap under neighbour labels) are one region
DEFAULT_MIN_SEPARATION = 2.0

_FOUR = ((-1, 0), (1, 0), (0, -1), (0, 1))


def neighbour_labels(grid: np.ndarray, min_votes: int = 3) -> np.ndarray:
    """Each position's label by its 4-neighbours: the label at least ``min_votes`` of them share,
    else -1. ``grid`` (ny, nx) int, -1 where unknown (not scanned, outside the host)."""
    grid = np.asarray(grid)
    ny, nx = grid.shape
    k = int(grid.max()) + 1 if grid.size else 0
    votes = np.zeros((ny, nx, max(k, 1)), dtype=np.int8)
    for dy, dx in _FOUR:
        src = grid[max(dy, 0):ny + min(dy, 0), max(dx, 0):nx + min(dx, 0)]
        dst = votes[max(-dy, 0):ny + min(-dy, 0), max(-dx, 0):nx + min(-dx, 0)]
        for c in range(k):
            dst[..., c] += src == c
    best = votes.argmax(axis=2)
    return np.where(votes.max(axis=2) >= int(min_votes), best, -1)


def merge_indistinct(scores: np.ndarray, positions: np.ndarray, labels: np.ndarray, scan_shape: tuple[int, int],
                     n_clusters: int, min_separation: float = DEFAULT_MIN_SEPARATION,
                     min_positions: int = 5) -> np.ndarray:
    """The cluster each of ``n_clusters`` clusters is merged into (itself if kept): ``(n_clusters,)``.

    Parameters
    ----------
    scores : ndarray (m, k)
        Per-position scores (not neighbourhood means: the test needs each position's own data).
    positions : ndarray (m,) int
        Their flat raster indices in ``scan_shape``.
    labels : ndarray (m,) int
        Their cluster (arg-max membership), in ``[0, n_clusters)``.
    scan_shape : (ny, nx)
    n_clusters : int
    min_separation : float
        Clusters with a smaller neighbour-labelled cross-fitted ``d`` are merged (module
        docstring); 0 merges nothing.
    min_positions : int
        Fewest neighbour-labelled positions of a cluster in each fold for its ``d`` to count.
    """
    rep = np.arange(int(n_clusters))
    if float(min_separation) <= 0 or n_clusters < 2 or scan_shape is None or len(scan_shape) != 2:
        return rep
    ny, nx = (int(v) for v in scan_shape)
    pos = np.asarray(positions, dtype=np.intp)
    lab = np.asarray(labels, dtype=np.intp)
    z = np.ascontiguousarray(scores, dtype=np.float32)
    if pos.size != lab.size or z.shape[0] != pos.size:
        raise ValueError(f"{z.shape[0]} scores, {pos.size} positions and {lab.size} labels must agree")
    if pos.size == 0:
        return rep
    fold = (pos // nx + pos % nx) % 2 == 0
    while True:
        grid = np.full(ny * nx, -1, dtype=np.intp)
        grid[pos] = rep[lab]
        nb = neighbour_labels(grid.reshape(ny, nx)).ravel()[pos]
        kept = np.unique(rep)
        best = None
        for i, a in enumerate(kept):
            in_a = nb == a
            if min(int((in_a & fold).sum()), int((in_a & ~fold).sum())) < int(min_positions):
                continue
            for b in kept[i + 1:]:
                in_b = nb == b
                if min(int((in_b & fold).sum()), int((in_b & ~fold).sum())) < int(min_positions):
                    continue
                d = block_distance(z, in_a, in_b, fold, min_per_fold=int(min_positions))
                if best is None or d < best[0]:
                    best = (d, int(a), int(b))
        if best is None or best[0] >= float(min_separation):
            break
        d, a, b = best
        size = np.bincount(rep[lab], minlength=rep.size)
        keep, gone = (a, b) if size[a] >= size[b] else (b, a)
        rep[rep == gone] = keep
        logger.debug("clusters %d and %d merged (neighbour-labelled d = %.2f < %.2f)", gone, keep, d,
                     float(min_separation))
    if np.unique(rep).size < rep.size:
        logger.info("%d clusters are %d distinct regions (merged into: %s)", rep.size, np.unique(rep).size,
                    rep.tolist())
    return rep


def merge_columns(u: np.ndarray, merged_into: np.ndarray | None) -> np.ndarray:
    """Memberships with each merged cluster's column added to the column it is merged into (and its
    own left at 0): rows still sum as before, cluster numbers stay as they were."""
    if merged_into is None:
        return u
    rep = np.asarray(merged_into, dtype=np.intp)
    if np.array_equal(rep, np.arange(rep.size)):
        return u
    out = np.zeros_like(u)
    for j, r in enumerate(rep):
        out[:, r] += u[:, j]
    return out
