"""Second-phase flags from mergeable sums: the live end-of-scan assessment without gathering features.

:class:`~streamclust.flags.flagger.SecondPhaseFlagger` measures a candidate cluster ``k`` against its
neighbour ``j`` by a cross-fitted block distance (:func:`~streamclust.flags.flagger.block_distance`) on
per-position features: the square root of the 32 x 32-binned pattern and the EDS window (0.2 to
10 keV) summed in groups of 8 channels, as :class:`~streamclust.app.live.LiveAnalysis` stores them.
On a 1024 x 1024 scan those are 4.6 GB: a replay on Dask must not gather them. The distance only
needs

1. per cluster and fold (``(y + x) % 2``) the count and the feature sums of its positions above
   the membership threshold (:class:`FoldSums`, mergeable): the means along which the direction
   of each fold is fitted;
2. for each measured pair and fold, the count, mean and centred second moment of the *other*
   fold's projections on that direction (:class:`ProjectionMoments`, Chan-merged).

Both are one pass over the data each (the first shares the replay's last pass); everything
map-level (connected components of the membership map, neighbours, hysteresis) runs on the client
on the ``n x c`` memberships, in the flagger itself, which takes the distances through its
``block_distances`` hook. :func:`pair_distances` reproduces ``block_distance`` (float32
projections as it makes them, float64 sums; agreement about 1e-6, ``tests/test_flag_sums.py``).

Examples
--------
>>> import numpy as np
>>> from streamclust.flags.flagger import block_distance
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(400, 6)).astype(np.float32)
>>> labels = rng.integers(0, 3, 400)
>>> x[labels == 1, 0] += 2.0
>>> member = labels[:, None] == np.arange(3)
>>> fold = np.arange(400) % 2 == 0
>>> sums = FoldSums.from_data(member, fold, x, x[:, :2])
>>> plan = DistancePlan.fit(sums, [(1, 0)])
>>> mom = plan.moments(member, fold, x, x[:, :2])
>>> d_cbed, d_eds = pair_distances(plan, *mom)[(1, 0)]
>>> bool(abs(d_cbed - block_distance(x, member[:, 1], member[:, 0], fold)) < 1e-6)
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streamclust.flags.flagger import FLAG_EDS_REBIN, FLAG_EDS_WINDOW_KEV, eds_window, shape_difference

__all__ = ["FLAG_EDS_REBIN", "FLAG_EDS_WINDOW_KEV", "FoldSums", "ProjectionMoments", "DistancePlan",
           "pair_distances", "flag_features", "eds_window", "scan_fold"]


def flag_features(binned: np.ndarray, spectra: np.ndarray, window: slice,
                  eds_rebin: int = FLAG_EDS_REBIN) -> tuple[np.ndarray, np.ndarray]:
    """The flagger's per-position blocks, as :meth:`~streamclust.engine.centres.ThresholdedCentres.features`
    makes them: ``sqrt`` of the binned patterns (float32) and the window's spectra (stored as
    uint16) summed in groups of ``eds_rebin`` channels (float32)."""
    n = binned.shape[0]
    cbed = np.sqrt(np.maximum(np.asarray(binned, np.float32).reshape(n, -1), 0.0))
    spec = np.asarray(spectra)[:, window]
    if spec.size and (spec.min() < 0 or spec.max() > 65535):
        raise ValueError("spectra have counts outside 0-65535 (the live store keeps uint16)")
    spec = spec.astype(np.uint16)
    m = spec.shape[1] // eds_rebin * eds_rebin
    eds = spec[:, :m].reshape(n, -1, eds_rebin).sum(axis=2, dtype=np.float32)
    return cbed, eds


def scan_fold(positions: np.ndarray, nx: int) -> np.ndarray:
    """The flagger's interleaved folds: True where ``(y + x) % 2 == 0``."""
    y, x = np.divmod(np.asarray(positions, dtype=np.int64), int(nx))
    return (y + x) % 2 == 0


@dataclass
class FoldSums:
    """Per cluster ``c`` and fold ``f`` (0: ``(y + x)`` even, 1: odd): the count and the feature
    sums (float64) of the positions with ``member[:, c]``, in each block. Merge: add."""

    count: np.ndarray  # (c, 2) int64
    cbed: np.ndarray  # (c, 2, d_cbed)
    eds: np.ndarray  # (c, 2, d_eds)

    @classmethod
    def from_data(cls, member: np.ndarray, fold: np.ndarray, cbed: np.ndarray, eds: np.ndarray) -> FoldSums:
        member = np.asarray(member, bool)
        fold = np.asarray(fold, bool)
        c = member.shape[1]
        count = np.zeros((c, 2), np.int64)
        s_c = np.zeros((c, 2, cbed.shape[1]))
        s_e = np.zeros((c, 2, eds.shape[1]))
        for f, rows in enumerate((fold, ~fold)):
            w = (member & rows[:, None]).astype(np.float64)  # (n, c)
            count[:, f] = w.sum(axis=0).astype(np.int64)
            s_c[:, f] = w.T @ cbed.astype(np.float64)
            s_e[:, f] = w.T @ eds.astype(np.float64)
        return cls(count, s_c, s_e)

    def merge(self, other: FoldSums) -> FoldSums:
        if self.count.shape != other.count.shape or self.cbed.shape != other.cbed.shape:
            raise ValueError(f"fold sums of shapes {self.cbed.shape} and {other.cbed.shape} cannot be merged")
        self.count += other.count
        self.cbed += other.cbed
        self.eds += other.eds
        return self


@dataclass
class ProjectionMoments:
    """Count, mean and centred second moment of projections, one entry per (direction, set).
    Merge: Chan et al.'s pairwise update (the variance does not lose digits to ``E[p^2] - E[p]^2``)."""

    n: np.ndarray  # (q,) float64 counts
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, q: int) -> ProjectionMoments:
        return cls(np.zeros(q), np.zeros(q), np.zeros(q))

    @classmethod
    def from_data(cls, proj: np.ndarray, mask: np.ndarray) -> ProjectionMoments:
        """``proj`` (n, q) float64, ``mask`` (n, q) bool: which rows each entry takes."""
        w = np.asarray(mask, np.float64)
        n = w.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, (w * proj).sum(axis=0) / np.maximum(n, 1), 0.0)
        m2 = (w * (proj - mean) ** 2).sum(axis=0)
        return cls(n, mean, m2)

    def merge(self, other: ProjectionMoments) -> ProjectionMoments:
        n = self.n + other.n
        safe = np.maximum(n, 1)
        delta = other.mean - self.mean
        self.mean = np.where(n > 0, self.mean + delta * other.n / safe, 0.0)
        self.m2 = self.m2 + other.m2 + delta ** 2 * self.n * other.n / safe
        self.n = n
        return self

    @property
    def var(self) -> np.ndarray:
        """Population variance (``np.var``'s ``ddof=0``, as ``block_distance``)."""
        return np.where(self.n > 0, self.m2 / np.maximum(self.n, 1), 0.0)


@dataclass
class DistancePlan:
    """Directions of the measured pairs, fitted on each fold from :class:`FoldSums`.

    ``pairs[p] = (k, j)``; in each block, direction column ``2 p + a`` is fitted on fold ``a``
    (``mean_k - mean_j`` normalised, cast to float32 as ``block_distance`` casts it) and measured
    on the other fold; ``valid[p]`` is False where ``block_distance`` returns 0 before projecting
    (a fold with fewer than ``min_per_fold`` positions of a set, or coinciding means).
    """

    pairs: list
    cbed: np.ndarray  # (d_cbed, 2P) float32
    eds: np.ndarray  # (d_eds, 2P) float32
    valid_cbed: np.ndarray  # (P,) bool
    valid_eds: np.ndarray
    counts: np.ndarray  # (P, 4): n_k fold 0, n_j fold 0, n_k fold 1, n_j fold 1

    @classmethod
    def fit(cls, sums: FoldSums, pairs: Sequence[tuple[int, int]], min_per_fold: int = 2, *,
            eds_shape_only: bool = False) -> DistancePlan:
        """``eds_shape_only``: the EDS directions made orthogonal to the pair's pooled mean
        (``block_distance(..., shape_only=True)``, the flagger's ``eds_shape_only``)."""
        pairs = [(int(k), int(j)) for k, j in pairs]
        P = len(pairs)
        out = {}
        valid = {}
        counts = np.zeros((P, 4), np.int64)
        for name, S, shape_only in (("cbed", sums.cbed, False), ("eds", sums.eds, bool(eds_shape_only))):
            E = np.zeros((S.shape[2], 2 * P), np.float32)
            ok = np.zeros(P, bool)
            for p, (k, j) in enumerate(pairs):
                c = sums.count
                counts[p] = (c[k, 0], c[j, 0], c[k, 1], c[j, 1])
                if counts[p].min() < min_per_fold:
                    continue
                ok[p] = True
                for a in (0, 1):
                    mean_k, mean_j = S[k, a] / c[k, a], S[j, a] / c[j, a]
                    diff = shape_difference(mean_k, mean_j) if shape_only else mean_k - mean_j
                    norm = float(np.linalg.norm(diff))
                    if not np.isfinite(norm) or norm == 0.0:
                        ok[p] = False
                        break
                    E[:, 2 * p + a] = (diff / norm).astype(np.float32)
            out[name], valid[name] = E, ok
        return cls(pairs, out["cbed"], out["eds"], valid["cbed"], valid["eds"], counts)

    def set_masks(self, member: np.ndarray, fold: np.ndarray) -> np.ndarray:
        """(n, 4P) bool: entry ``4 p + 2 a + s`` takes set ``s`` (0: k, 1: j) of pair ``p`` on
        the fold *other* than ``a`` (where direction ``2 p + a`` is measured)."""
        member = np.asarray(member, bool)
        fold = np.asarray(fold, bool)
        n = member.shape[0]
        mask = np.zeros((n, 4 * len(self.pairs)), bool)
        for p, (k, j) in enumerate(self.pairs):
            for a in (0, 1):
                other = ~fold if a == 0 else fold
                mask[:, 4 * p + 2 * a] = member[:, k] & other
                mask[:, 4 * p + 2 * a + 1] = member[:, j] & other
        return mask

    def moments(self, member: np.ndarray, fold: np.ndarray, cbed: np.ndarray,
                eds: np.ndarray) -> tuple[ProjectionMoments, ProjectionMoments]:
        """One chunk's projection moments in both blocks (float32 projections, as ``block_distance``)."""
        mask = self.set_masks(member, fold)
        out = []
        for x, E in ((cbed, self.cbed), (eds, self.eds)):
            x = np.asarray(x, np.float32)
            proj = (x @ E).astype(np.float64)  # (n, 2P)
            # each direction's projections enter its two sets (k, j)
            out.append(ProjectionMoments.from_data(np.repeat(proj, 2, axis=1), mask))
        return out[0], out[1]

    def empty_moments(self) -> tuple[ProjectionMoments, ProjectionMoments]:
        q = 4 * len(self.pairs)
        return ProjectionMoments.empty(q), ProjectionMoments.empty(q)


def pair_distances(plan: DistancePlan, cbed: ProjectionMoments,
                   eds: ProjectionMoments) -> dict[tuple[int, int], tuple[float, float]]:
    """``{(k, j): (d_cbed, d_eds)}`` from the merged projection moments (``block_distance``'s formula)."""
    out = {}
    for p, kj in enumerate(plan.pairs):
        d = []
        for mom, ok in ((cbed, plan.valid_cbed[p]), (eds, plan.valid_eds[p])):
            if not ok:
                d.append(0.0)
                continue
            vals = []
            var = mom.var
            for a in (0, 1):
                qk, qj = 4 * p + 2 * a, 4 * p + 2 * a + 1
                pooled = math.sqrt(0.5 * (float(var[qk]) + float(var[qj])))
                gap = float(mom.mean[qk] - mom.mean[qj])
                vals.append((math.inf if gap > 0 else 0.0) if pooled == 0.0 else gap / pooled)
            d.append(max(0.0, float(np.mean(vals))))
        out[kj] = (d[0], d[1])
    return out
