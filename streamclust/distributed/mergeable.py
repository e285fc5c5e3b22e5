"""Mergeable partial states: what each worker computes on its chunk of a scan, and how they combine.

A recorded scan is re-analysed in chunks of positions on several processes (Dask distributed,
:mod:`streamclust.distributed.dask_replay`). That works because every statistic of the pipeline is a *state*
with the property ``merge(state(A), state(B)) == state(A + B)``:

=================================  ==============================================  =================
state                              merge                                           exactness
=================================  ==============================================  =================
robust scaler (per-feature         ``StreamingRobustScaler.merge``: add histogram   exact
histograms + Welford moments)      counts, Chan-merge the moments                  (moments: float64)
block balancer                     ``BlockBalancer.merge`` (one scaler per block)   exact
PCA, exact accumulator             ``StreamingPCA.merge``: re-express the other's   exact (float64
                                   scatter about our shift, add                    rounding)
PCA, sketch                        ``StreamingPCA.merge``: stack both sketches     approximate: see
                                   with the mean-shift row, re-factor, truncate    below
:class:`FCMSums` (one FCM pass)    add ``sum w u^m``, ``sum w u^m (x - v)``, J      exact
:class:`CentreSums` (thresholded   add weighted sums of binned patterns and        exact
cluster centres)                   spectra, weights and counts
``ValidityAccumulator``,           ``+=``                                          exact
``FeatureMoments``
=================================  ==============================================  =================

The estimators that already own a ``merge``/``+=`` keep it; :func:`merge` is the one entry point
for all of them (it never modifies its arguments, so a Dask task can merge the values it was
given), :func:`merge_all` folds a list.

**The sketch's approximation.** A rank-``r`` sketch keeps the ``r`` leading directions of what it
has seen; two sketches stacked and re-factored lose what each had already truncated, so a merged
sketch is a rank-``r`` approximation of an approximation. The total variance stays exact (per-
feature moments). ``tests/test_mergeable.py::test_sketch_merge_approximation`` measures it on data
with a clear spectrum (rank 24, 120 features, 8 strong directions): the merged sketch's leading
directions lie within 0.5 degree of the sketch of all the data and its leading explained
variances within 1 % (asserted at 2 degrees and 3 %); directions below the sketch's noise floor
are not comparable and not compared.

Examples
--------
>>> import numpy as np
>>> from streamclust.distributed.mergeable import FCMSums, merge
>>> rng = np.random.default_rng(0)
>>> Z = rng.normal(size=(100, 3))
>>> V = Z[:2].copy()
>>> whole = FCMSums.from_data(Z, V, m=1.2)
>>> parts = merge(FCMSums.from_data(Z[:40], V, m=1.2), FCMSums.from_data(Z[40:], V, m=1.2))
>>> bool(np.allclose(parts.weights, whole.weights) and np.isclose(parts.objective, whole.objective))
True
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamclust.cluster import fcm_kernels
from streamclust.engine.centres import CentreSet, bin_pattern

logger = logging.getLogger(__name__)

__all__ = ["merge", "merge_all", "merge_into", "FCMSums", "CentreSums", "thresholded_weights"]


def merge(a: Any, b: Any) -> Any:
    """A new state equal to ``a`` and ``b`` combined; neither argument is modified.

    Works for every state of the pipeline: objects with a ``merge`` method (scalers, balancers,
    PCA accumulators, :class:`FCMSums`, :class:`CentreSums`) and objects merged by ``+=``
    (``FeatureMoments``, ``ValidityAccumulator``). ``None`` stands for "no data" (a chunk without
    a complete position): the other state is returned (a copy).
    """
    if a is None:
        return copy.deepcopy(b)
    if b is None:
        return copy.deepcopy(a)
    out = copy.deepcopy(a)
    if hasattr(out, "merge"):
        res = out.merge(b)
        return out if res is None else res
    out += b
    return out


def merge_all(states: Iterable[Any]) -> Any:
    """Fold :func:`merge` over ``states`` (``None`` entries are "no data"; all None gives None).

    The first state is copied, the others are merged into the copy; no argument is modified.
    """
    out = None
    for s in states:
        if s is not None:
            out = copy.deepcopy(s) if out is None else merge_into(out, s)
    return out


def merge_into(acc: Any, b: Any) -> Any:
    """Merge ``b`` into ``acc`` in place and return the result (``acc`` if it was not None).

    For an accumulator the caller owns (a task folding its chunks one by one): no copy, so a
    168 MB exact PCA scatter is not duplicated at every chunk.
    """
    if b is None:
        return acc
    if acc is None:
        return b
    if hasattr(acc, "merge"):
        res = acc.merge(b)
        return acc if res is None else res
    acc += b
    return acc


# -------------------------------------------------------------------------------------------------
# fuzzy C-means: the sums of one pass
# -------------------------------------------------------------------------------------------------
@dataclass
class FCMSums:
    """The sufficient statistics of one fuzzy C-means pass at fixed ``centres``.

    ``weights[i] = sum_k w_k u_ki^m``, ``first[i] = sum_k w_k u_ki^m (x_k - v_i)``,
    ``objective = sum_k w_k sum_i u_ki^m d2_ki`` and the total sample weight ``n``, all from
    :func:`streamclust.cluster.fcm_kernels.fcm_pass` (Euclidean). The new centres of the pass are
    ``v + first / weights`` (:meth:`step`), exactly what ``FuzzyCMeans`` computes on all the data.
    """

    centres: np.ndarray
    m: float
    weights: np.ndarray
    first: np.ndarray
    objective: float
    n: float

    @classmethod
    def from_data(cls, X: np.ndarray, centres: np.ndarray, *, m: float,
                  sample_weight: np.ndarray | None = None) -> FCMSums:
        """The pass sums of the rows of ``X`` (n, p) at ``centres`` (c, p)."""
        X = np.ascontiguousarray(X)
        V = np.ascontiguousarray(centres, dtype=np.float64)
        if X.ndim != 2 or V.ndim != 2 or X.shape[1] != V.shape[1]:
            raise ValueError(f"X {X.shape} and centres {V.shape} must be 2-D with equal feature counts")
        w = np.ones(X.shape[0]) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if w.shape != (X.shape[0],):
            raise ValueError(f"sample_weight must have shape ({X.shape[0]},), got {w.shape}")
        if X.shape[0] == 0:
            return cls(V.copy(), float(m), np.zeros(V.shape[0]), np.zeros_like(V), 0.0, 0.0)
        W, S1, _, J = fcm_kernels.fcm_pass(X, w, V, float(m))
        return cls(V.copy(), float(m), np.asarray(W, dtype=np.float64), np.asarray(S1, dtype=np.float64),
                   float(J), float(w.sum()))

    def merge(self, other: FCMSums) -> FCMSums:
        """Add ``other``'s sums (computed at the same centres and m) into this one. Returns self."""
        if other.m != self.m or not np.array_equal(other.centres, self.centres):
            raise ValueError("FCM pass sums can only be merged when computed at the same centres and m")
        self.weights = self.weights + other.weights
        self.first = self.first + other.first
        self.objective += other.objective
        self.n += other.n
        return self

    def step(self) -> tuple[np.ndarray, float]:
        """``(new centres, summed squared shift)`` of this pass; a cluster with no weight stays put."""
        live = self.weights > 0
        delta = np.zeros_like(self.centres)
        delta[live] = self.first[live] / self.weights[live, None]
        return self.centres + delta, float(np.sum(delta ** 2))


# -------------------------------------------------------------------------------------------------
# thresholded cluster centres
# -------------------------------------------------------------------------------------------------
def thresholded_weights(u: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """(n, c) memberships -> (n, T * c) weights ``u if u > t else 0``, threshold-major, NaN as 0.

    The rule of :class:`streamclust.engine.centres.ThresholdedCentres`.
    """
    u = np.asarray(u, dtype=np.float64)
    thr = np.asarray(tuple(float(t) for t in thresholds))
    u = np.where(np.isfinite(u), u, 0.0)
    w = np.where(u[:, None, :] > thr[None, :, None], u[:, None, :], 0.0)
    return w.reshape(u.shape[0], -1)


@dataclass
class CentreSums:
    """Weighted sums behind thresholded cluster centres, mergeable by addition.

    For thresholds ``t`` and clusters ``k`` (flattened threshold-major, as
    :class:`~streamclust.engine.centres.ThresholdedCentres` does): ``sum_w = sum_p W[p, t, k]``,
    ``sum_cbed = sum_p W[p, t, k] * pattern_p``, ``sum_eds = sum_p W[p, t, k] * spectrum_p`` and
    ``count`` the positions with ``W > 0``; :meth:`centres` divides, giving the same
    :class:`~streamclust.engine.centres.CentreSet` as ``ThresholdedCentres`` on the same positions.
    """

    thresholds: tuple
    n_clusters: int
    cbed_shape: tuple
    sum_w: np.ndarray
    sum_cbed: np.ndarray
    sum_eds: np.ndarray
    count: np.ndarray

    @classmethod
    def from_data(cls, memberships: np.ndarray, cbed: np.ndarray, spectra: np.ndarray, *,
                  thresholds: Sequence[float] = (0.5, 0.75), cbed_shape: tuple | None = None) -> CentreSums:
        """Sums over positions with memberships ``(n, c)``, patterns ``(n, H, W)`` (block-summed
        to ``cbed_shape``, default as given) and spectra ``(n, channels)``."""
        u = np.asarray(memberships)
        frames = np.asarray(cbed)
        spec = np.asarray(spectra)
        if u.ndim != 2 or frames.ndim != 3 or spec.ndim != 2 or not (u.shape[0] == frames.shape[0] == spec.shape[0]):
            raise ValueError(f"memberships (n, c), patterns (n, H, W) and spectra (n, channels) needed; "
                             f"got {u.shape}, {frames.shape}, {spec.shape}")
        shape = tuple(frames.shape[1:]) if cbed_shape is None else tuple(int(v) for v in cbed_shape)
        thr = tuple(float(t) for t in thresholds)
        if not thr or any(not 0.0 <= t < 1.0 for t in thr):
            raise ValueError(f"thresholds must be in [0, 1), got {thresholds!r}")
        w = thresholded_weights(u, thr)
        binned = bin_pattern(frames, shape).reshape(u.shape[0], -1) if u.shape[0] else np.zeros((0, int(np.prod(shape))))
        return cls(thr, int(u.shape[1]), shape, w.sum(axis=0),
                   w.T @ binned.astype(np.float64), w.T @ spec.astype(np.float64),
                   (w > 0).sum(axis=0).astype(np.int64))

    def merge(self, other: CentreSums) -> CentreSums:
        """Add ``other`` (same thresholds, clusters, pattern shape and channels). Returns self."""
        if (other.thresholds != self.thresholds or other.n_clusters != self.n_clusters
                or other.cbed_shape != self.cbed_shape or other.sum_eds.shape != self.sum_eds.shape):
            raise ValueError("centre sums over different thresholds, clusters, pattern shapes or channels")
        self.sum_w = self.sum_w + other.sum_w
        self.sum_cbed = self.sum_cbed + other.sum_cbed
        self.sum_eds = self.sum_eds + other.sum_eds
        self.count = self.count + other.count
        return self

    def centres(self) -> CentreSet:
        """The thresholded centres (NaN for a cluster with no position above a threshold)."""
        t, c = len(self.thresholds), int(self.n_clusters)
        empty = self.sum_w <= 1e-9
        wsafe = np.where(empty, 1.0, self.sum_w)[:, None]
        cbed = np.where(empty[:, None], np.nan, self.sum_cbed / wsafe)
        eds = np.where(empty[:, None], np.nan, self.sum_eds / wsafe)
        return CentreSet(
            thresholds=self.thresholds,
            cbed=cbed.reshape(t, c, *self.cbed_shape),
            eds=eds.reshape(t, c, -1),
            weight=np.where(empty, 0.0, self.sum_w).reshape(t, c),
            count=self.count.reshape(t, c),
        )
