"""Merge clusters that are not distinct phases: as many level-2 clusters as the data supports.

Why this exists
---------------
The host refinement (:mod:`streamclust.cluster.host_refine`) clusters the film into ``host_clusters``
sub-clusters. Where the film holds one matrix and a small second phase, most of those clusters are
counting noise: EDS spectra of about 36 X-ray counts scatter enough that fuzzy C-means splits a
uniform matrix into salt-and-pepper regions (measured: the largest live cluster held 24-37 % of
the matrix on the phantom). A microscopist reads such a map as five phases.

Telling a noise cluster from a phase
------------------------------------
A second phase differs from the matrix in **composition**; regions of the matrix that differ in
thickness or bending do not (their spectra scale, line by line, and the element lines' shares of the
counts stay the same). So two clusters are kept apart only when the shares of their X-ray counts in
the element-line windows (Fe and Co K-alpha by default) differ by at least ``min_effect`` and
significantly (the flag's quasi-likelihood G test, :func:`streamclust.flags.stats.composition_test`,
at ``alpha`` split over the pairs); otherwise they are merged, the most similar pair first, the
tests repeated after each merge.

Which positions stand for a cluster matters. Each position was put in the cluster its own data is
nearest to, and its data include the line windows, so noise clusters differ in composition on
their own positions. A phase is a region: every position is therefore labelled by the majority (at
least 3 of 4) of its 4-neighbours, whose data are not its own, and the test compares the counts of
the positions so labelled.

A structural separation was tried first and failed on a held-out phantom: the cross-fitted gap of
the positions' own level-2 scores under neighbour labels (:func:`streamclust.cluster.separation.block_distance`)
was 1.7-2.0 between thickness regions of the matrix (seed 0) and 1.2-1.8 between a weak second phase
and the matrix (seed 1000): no threshold separates them. The line shares under neighbour labels
(``benchmarks/level2_separation.py``): 0.002-0.032 between matrix clusters on seeds 0 and 1000,
0.17-0.31 between the second phase and the matrix (docs/host-refinement.md).

A cluster with too few neighbour-labelled positions to test (fewer than ``min_positions``) is kept:
no evidence either way, and a small inclusion must not vanish into the matrix for lack of it.
Merged clusters' memberships are summed (:func:`merge_columns`), not re-fitted: the extra centres
model the matrix's spread (a re-fit with fewer clusters split the matrix again).

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> ny = nx = 40
>>> yy, xx = np.mgrid[:ny, :nx]
>>> phase = ((yy - 20) ** 2 + (xx - 20) ** 2 < 64).ravel()      # a disc: a second phase
>>> fe_share = np.where(phase, 0.6, 0.33)                         # Fe of Fe + Co K-alpha counts
>>> fe = rng.binomial(12, fe_share)
>>> counts = np.stack([fe, 12 - fe], axis=1)                     # 12 line counts a position
>>> labels = np.where(phase, 2, rng.integers(0, 2, ny * nx))     # the matrix split by noise
>>> merge_same_composition(counts, np.arange(ny * nx), labels, (ny, nx), 3).tolist()
[0, 0, 2]
>>> u = np.array([[0.5, 0.3, 0.2]], np.float32)
>>> merge_columns(u, np.array([0, 0, 2])).tolist()
[[0.800000011920929, 0.0, 0.20000000298023224]]
"""

from __future__ import annotations

import logging

import numpy as np

from streamclust.flags.stats import composition_test, line_windows

logger = logging.getLogger(__name__)

__all__ = ["merge_same_composition", "merge_columns", "line_count_map", "neighbour_labels", "DEFAULT_MIN_EFFECT", "DEFAULT_ALPHA"]

#: clusters whose element-line shares differ by less than this are one composition (the flag's
#: ``min_effect``: five percentage points of the line counts)
DEFAULT_MIN_EFFECT = 0.05
#: the composition test's level per level-2 fit
DEFAULT_ALPHA = 0.01
#: the element lines compared by default (physics.md: the Heusler film's Fe-rich second phase)
DEFAULT_ELEMENTS = ("Fe", "Co")

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


def merge_same_composition(line_counts: np.ndarray, positions: np.ndarray, labels: np.ndarray,
                           scan_shape: tuple[int, int], n_clusters: int, min_effect: float = DEFAULT_MIN_EFFECT,
                           alpha: float = DEFAULT_ALPHA, min_positions: int = 10) -> np.ndarray:
    """The cluster each of ``n_clusters`` clusters is merged into (itself if kept): ``(n_clusters,)``.

    Parameters
    ----------
    line_counts : ndarray (m, E) int
        Each position's X-ray counts in the element-line windows
        (:func:`streamclust.flags.stats.line_windows`).
    positions : ndarray (m,) int
        Their flat raster indices in ``scan_shape``.
    labels : ndarray (m,) int
        Their cluster (arg-max membership), in ``[0, n_clusters)``.
    scan_shape : (ny, nx)
    n_clusters : int
    min_effect : float
        Two clusters are kept apart only if some window's share of their line counts differs by at
        least this much (and significantly); 0 merges nothing.
    alpha : float
        Level of the composition test of one level-2 fit, Bonferroni-split over the pairs tested
        at each step.
    min_positions : int
        Fewest neighbour-labelled positions of a cluster for it to be tested (fewer: kept).
    """
    rep = np.arange(int(n_clusters))
    if float(min_effect) <= 0 or n_clusters < 2 or scan_shape is None or len(scan_shape) != 2:
        return rep
    ny, nx = (int(v) for v in scan_shape)
    pos = np.asarray(positions, dtype=np.intp)
    lab = np.asarray(labels, dtype=np.intp)
    counts = np.asarray(line_counts)
    if pos.size != lab.size or counts.shape[0] != pos.size or counts.ndim != 2:
        raise ValueError(f"{counts.shape[0]} line-count rows, {pos.size} positions and {lab.size} labels "
                         "must agree")
    if pos.size == 0 or counts.shape[1] < 2:
        return rep
    while True:
        grid = np.full(ny * nx, -1, dtype=np.intp)
        grid[pos] = rep[lab]
        nb = neighbour_labels(grid.reshape(ny, nx)).ravel()[pos]
        tested = [int(c) for c in np.unique(rep) if int((nb == c).sum()) >= int(min_positions)]
        pairs = [(a, b) for i, a in enumerate(tested) for b in tested[i + 1:]]
        if not pairs:
            break
        level = float(alpha) / len(pairs)
        same = []
        for a, b in pairs:
            # the larger cluster is the reference: its spread is the dispersion the test charges
            small, large = sorted((a, b), key=lambda c: int((nb == c).sum()))
            res = composition_test(counts[nb == small], counts[nb == large])
            if not (res.p_value < level and res.effect >= float(min_effect)):
                same.append((res.effect, a, b))
        if not same:
            break
        effect, a, b = min(same)
        size = np.bincount(rep[lab], minlength=rep.size)
        keep, gone = (a, b) if size[a] >= size[b] else (b, a)
        rep[rep == gone] = keep
        logger.debug("clusters %d and %d merged: line shares differ by %.3f", gone, keep, effect)
    if np.unique(rep).size < rep.size:
        logger.info("%d clusters are %d compositions (merged into: %s)", rep.size, np.unique(rep).size,
                    rep.tolist())
    return rep


def line_count_map(n_cbed: int, eds_energies_kev: np.ndarray, elements=DEFAULT_ELEMENTS) -> np.ndarray | None:
    """``(n_cbed + n_eds, E)`` float32: raw feature vectors (the CBED block, then the windowed and
    rebinned EDS block with channel centres ``eds_energies_kev``) times this map are each position's
    counts in the element-line windows; an affine map like the level-2 projection, so the engine
    computes both in one pass over its store. None (and merging off) when the EDS block has no
    channel in some element's window."""
    e = np.asarray(eds_energies_kev, dtype=np.float64)
    try:
        windows = line_windows(e, tuple(elements))
    except ValueError as exc:
        # not a warning: a configuration whose EDS window holds no such line simply has no merge
        logger.info("no composition merge of level-2 clusters: %s", exc)
        return None
    W = np.zeros((int(n_cbed) + e.size, windows.shape[0]), dtype=np.float32)
    W[int(n_cbed):] = windows.T
    return W


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
