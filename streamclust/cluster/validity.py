"""Validity indices of a fuzzy partition: partition coefficient, partition entropy, Xie-Beni.

Each index is available from the data (memberships in hand) and from accumulated sums, so a live
scan can keep them up to date batch by batch (:class:`ValidityAccumulator`, mergeable with ``+=``
like every streaming statistic in streamclust) without storing the memberships.

* Partition coefficient (Bezdek 1974): ``PC = sum_k w_k sum_i u_ki^2 / sum_k w_k`` in
  ``[1/c, 1]``; higher is crisper.
* Partition entropy (Bezdek 1974): ``PE = -sum_k w_k sum_i u_ki log u_ki / sum_k w_k`` in
  ``[0, log c]``; lower is crisper.
* Xie-Beni (Xie & Beni 1991): ``XB = J_m / (N * min_{i != j} ||v_i - v_j||^2)`` with
  ``J_m = sum_k w_k sum_i u_ki^m d2_ki`` and ``N = sum_k w_k``: compactness over separation, lower is
  better. The classical index uses ``m = 2``; here it uses the model's own ``m``.

PC and PE drift with the number of clusters (PC falls, PE rises as c grows), so to *choose*
``n_clusters`` the default criterion is Xie-Beni (:func:`choose_n_clusters`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np

from streamclust.cluster import fcm_kernels as _k

logger = logging.getLogger(__name__)

__all__ = [
    "partition_coefficient",
    "partition_entropy",
    "xie_beni",
    "xie_beni_from_sums",
    "min_centre_separation",
    "ValidityAccumulator",
    "choose_n_clusters",
]


def _weights(sample_weight: Any, n: int) -> np.ndarray:
    if sample_weight is None:
        return np.ones(n)
    w = np.asarray(sample_weight, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"sample_weight has shape {w.shape}, expected ({n},)")
    return w


def _check_U(U: Any) -> np.ndarray:
    U = np.asarray(U, dtype=np.float64)
    if U.ndim != 2 or U.shape[0] == 0:
        raise ValueError(f"memberships must be a non-empty (n_samples, n_clusters) array, got {U.shape}")
    return U


def _entropy_terms(U: np.ndarray) -> np.ndarray:
    # 0 log 0 = 0 (the limit), without warnings
    return np.where(U > 0, U * np.log(np.where(U > 0, U, 1.0)), 0.0)


def partition_coefficient(U: Any, sample_weight: Any = None) -> float:
    """Bezdek's partition coefficient of memberships ``U`` (n_samples, n_clusters).

    Examples
    --------
    >>> partition_coefficient([[1.0, 0.0], [0.0, 1.0]]), partition_coefficient([[0.5, 0.5]])
    (1.0, 0.5)
    """
    U = _check_U(U)
    w = _weights(sample_weight, U.shape[0])
    return float(w @ np.sum(U * U, axis=1) / w.sum())


def partition_entropy(U: Any, sample_weight: Any = None) -> float:
    """Bezdek's partition entropy (natural log) of memberships ``U``.

    Examples
    --------
    >>> import numpy as np
    >>> partition_entropy([[1.0, 0.0]]) + 0.0, bool(np.isclose(partition_entropy([[0.5, 0.5]]), np.log(2)))
    (0.0, True)
    """
    U = _check_U(U)
    w = _weights(sample_weight, U.shape[0])
    return float(-(w @ np.sum(_entropy_terms(U), axis=1)) / w.sum())


def min_centre_separation(centers: Any) -> float:
    """Smallest squared Euclidean distance between two distinct centres (inf for one centre)."""
    V = np.asarray(centers, dtype=np.float64)
    if V.shape[0] < 2:
        return float("inf")
    d = _k.sq_euclidean_numpy(V, V)
    np.fill_diagonal(d, np.inf)
    return float(d.min())


def xie_beni_from_sums(objective: float, weight_total: float, centers: Any) -> float:
    """Xie-Beni index from an accumulated objective ``J_m`` and total sample weight ``N``.

    Examples
    --------
    >>> xie_beni_from_sums(8.0, 4.0, [[0.0, 0.0], [2.0, 0.0]])
    0.5
    """
    sep = min_centre_separation(centers)
    if sep == 0.0:
        return float("inf")  # two coincident prototypes: the worst possible separation
    return float(objective / (weight_total * sep))


def xie_beni(
    X: Any,
    centers: Any,
    U: Any = None,
    *,
    m: float = 2.0,
    sample_weight: Any = None,
    norms: Any = None,
) -> float:
    """Xie-Beni index of ``X`` for the given centres.

    Parameters
    ----------
    X : array of shape (n_samples, n_features)
    centers : array of shape (n_clusters, n_features)
    U : array of shape (n_samples, n_clusters), optional
        Memberships; computed from the centres (with ``m`` and ``norms``) when omitted.
    m : float, default=2.0
        Exponent of the memberships in the compactness term (2 is Xie and Beni's choice).
    sample_weight : array of shape (n_samples,), optional
    norms : array of shape (n_clusters, n_features, n_features), optional
        Gustafson-Kessel norm matrices for the distances (separation stays Euclidean).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[0.0], [0.2], [10.0], [10.2]])
    >>> round(xie_beni(X, [[0.1], [10.1]]), 6)
    0.0001
    """
    X = np.ascontiguousarray(X, dtype=np.float64)
    V = np.ascontiguousarray(centers, dtype=np.float64)
    w = _weights(sample_weight, X.shape[0])
    nrm = None if norms is None else np.ascontiguousarray(norms, dtype=np.float64)
    U_pred, D2 = _k.predict_memberships(X, V, m, nrm)
    U = U_pred if U is None else _check_U(U)
    J = _k.objective(D2, np.ascontiguousarray(U), w, m)
    return xie_beni_from_sums(J, float(w.sum()), V)


class ValidityAccumulator:
    """Running sums for PC, PE and Xie-Beni, updated batch by batch and mergeable with ``+=``.

    The Xie-Beni compactness is accumulated with the distances of each batch *at the time* (the
    centres of a live model move), so on drifting data it is an approximation of the index that a
    final pass would give; PC and PE are exact for the memberships fed in.

    Parameters
    ----------
    m : float, default=2.0
        Exponent of the memberships in the Xie-Beni compactness.

    Examples
    --------
    >>> import numpy as np
    >>> acc = ValidityAccumulator(m=2.0)
    >>> acc.update(np.array([[1.0, 0.0]]), np.array([[0.0, 4.0]]))
    >>> acc.update(np.array([[0.5, 0.5]]), np.array([[1.0, 1.0]]))
    >>> acc.partition_coefficient(), acc.n_samples
    (0.75, 2.0)
    >>> acc.xie_beni([[0.0], [2.0]])  # J = 0.25 + 0.25, N = 2, separation 4
    0.0625
    """

    def __init__(self, m: float = 2.0) -> None:
        self.m = m
        self.n_samples = 0.0
        self.sum_u2 = 0.0
        self.sum_ulogu = 0.0
        self.objective = 0.0

    def update(self, U: Any, D2: Any, sample_weight: Any = None) -> None:
        """Add a batch: memberships ``U`` and squared distances ``D2``, both (n, c)."""
        U = _check_U(U)
        D2 = np.asarray(D2, dtype=np.float64)
        if D2.shape != U.shape:
            raise ValueError(f"D2 has shape {D2.shape}, memberships have {U.shape}")
        w = _weights(sample_weight, U.shape[0])
        self.n_samples += float(w.sum())
        self.sum_u2 += float(w @ np.sum(U * U, axis=1))
        self.sum_ulogu += float(w @ np.sum(_entropy_terms(U), axis=1))
        self.objective += _k.objective_numpy(D2, U, w, self.m)

    def __iadd__(self, other: "ValidityAccumulator") -> "ValidityAccumulator":
        if other.m != self.m:
            raise ValueError(f"cannot merge accumulators with m={self.m} and m={other.m}")
        self.n_samples += other.n_samples
        self.sum_u2 += other.sum_u2
        self.sum_ulogu += other.sum_ulogu
        self.objective += other.objective
        return self

    def _need_samples(self) -> None:
        if self.n_samples <= 0:
            raise ValueError("no samples accumulated yet")

    def partition_coefficient(self) -> float:
        self._need_samples()
        return self.sum_u2 / self.n_samples

    def partition_entropy(self) -> float:
        self._need_samples()
        return -self.sum_ulogu / self.n_samples

    def xie_beni(self, centers: Any) -> float:
        self._need_samples()
        return xie_beni_from_sums(self.objective, self.n_samples, centers)


_CRITERIA = {
    # name: True if larger is better
    "xie_beni": False,
    "partition_coefficient": True,
    "partition_entropy": False,
}


def choose_n_clusters(
    X: Any,
    n_clusters_range: Iterable[int],
    *,
    criterion: str = "xie_beni",
    sample_weight: Any = None,
    **fcm_params: Any,
) -> tuple[int, dict[int, float]]:
    """Fit :class:`~streamclust.cluster.fcm.FuzzyCMeans` for each ``n_clusters`` and pick the best by a
    validity index.

    Parameters
    ----------
    X : array of shape (n_samples, n_features)
    n_clusters_range : iterable of int
    criterion : {"xie_beni", "partition_coefficient", "partition_entropy"}
    sample_weight : array of shape (n_samples,), optional
    **fcm_params
        Passed to :class:`~streamclust.cluster.fcm.FuzzyCMeans` (e.g. ``m``, ``random_state``).

    Returns
    -------
    best : int
    scores : dict mapping n_clusters to the index value

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = np.vstack([rng.normal(c, 0.2, (40, 2)) for c in (0.0, 4.0, 8.0)])
    >>> best, scores = choose_n_clusters(X, range(2, 6), random_state=0)
    >>> best
    3
    """
    from streamclust.cluster.fcm import FuzzyCMeans

    if criterion not in _CRITERIA:
        raise ValueError(f"criterion must be one of {sorted(_CRITERIA)}, got {criterion!r}")
    larger_better = _CRITERIA[criterion]
    scores: dict[int, float] = {}
    for c in n_clusters_range:
        fcm = FuzzyCMeans(n_clusters=int(c), **fcm_params).fit(X, sample_weight=sample_weight)
        if criterion == "xie_beni":
            w = _weights(sample_weight, fcm.memberships_.shape[0])
            scores[int(c)] = xie_beni_from_sums(fcm.objective_, float(w.sum()), fcm.cluster_centers_)
        elif criterion == "partition_coefficient":
            scores[int(c)] = partition_coefficient(fcm.memberships_, sample_weight)
        else:
            scores[int(c)] = partition_entropy(fcm.memberships_, sample_weight)
        logger.debug("n_clusters=%d: %s=%.6g", c, criterion, scores[int(c)])
    if not scores:
        raise ValueError("n_clusters_range is empty")
    pick = max if larger_better else min
    best = pick(scores, key=scores.__getitem__)
    return best, scores
