"""Fuzzy C-means estimators: batch and mini-batch, Euclidean or Gustafson-Kessel norms.

Both estimators follow the scikit-learn contract (``__init__`` only stores parameters, learned
state ends in ``_``) and run their hot loop in the Numba kernels of :mod:`streamclust.cluster.fcm_kernels`.

Why this is more careful than a textbook FCM (see DESIGN.md, "Fuzzy C-means, carefully"): with
``m = 2`` in about ten PCA dimensions, two prototypes often merge into one and a small second phase
next to a big one disappears. So centres start from the data (k-means++), several restarts keep
the lowest objective, iteration stops on centre shift *or* relative objective change, the default
fuzzifier is smaller (chosen by measurement, docs/fcm.md), memberships are computed with the
minimum distance factored out (no overflow at small ``m``), and the Gustafson-Kessel fuzzy
covariances are regularised as in Babuska, van der Veen and Kaymak (2002): blended with the
identity scaled to the data covariance's volume, then condition-number capped.
"""

from __future__ import annotations

import logging
import numbers
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin, TransformerMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted

from streamclust.cluster import fcm_kernels as _k

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_M",
    "FuzzyCMeans",
    "MiniBatchFuzzyCMeans",
    "kmeans_plusplus",
    "gk_norm_matrices",
]

#: Default fuzzifier, chosen by measurement on data shaped like the real case (docs/fcm.md:
#: ``python benchmarks/bench_fcm.py choose-m``): m = 1.2 never merged two prototypes and was the
#: only value that kept a 2 % cluster apart from a 45 % neighbour; m >= 1.5 merged prototypes in
#: 11-12 of 12 data sets. 1 / (m - 1) = 5 is also a multiply-only fast path in the kernels.
DEFAULT_M = 1.2

_COVARIANCES = ("euclidean", "gk")


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------


def _check_X(X: Any, est: BaseEstimator, *, reset: bool, min_samples: int = 1) -> np.ndarray:
    X = check_array(X, dtype=[np.float64, np.float32], order="C", ensure_min_samples=min_samples,
                    estimator=est)
    if reset:
        est.n_features_in_ = X.shape[1]
    elif X.shape[1] != est.n_features_in_:
        raise ValueError(
            f"X has {X.shape[1]} features, but {type(est).__name__} is expecting "
            f"{est.n_features_in_} features as input"
        )
    return X


def _check_weight(sample_weight: Any, n: int) -> np.ndarray:
    if sample_weight is None:
        return np.ones(n, dtype=np.float64)
    w = np.asarray(sample_weight, dtype=np.float64)
    if w.ndim == 0:
        return np.full(n, float(w))
    if w.shape != (n,):
        raise ValueError(f"sample_weight has shape {w.shape}, expected ({n},)")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        bad = int(np.flatnonzero(~np.isfinite(w) | (w < 0))[0])
        raise ValueError(f"sample_weight must be finite and non-negative; row {bad} is {w[bad]}")
    return np.ascontiguousarray(w)


def _check_params(est: Any) -> None:
    if not isinstance(est.n_clusters, numbers.Integral) or est.n_clusters < 1:
        raise ValueError(f"n_clusters must be a positive integer, got {est.n_clusters!r}")
    if not (isinstance(est.m, numbers.Real) and 1.0 < est.m < np.inf):
        raise ValueError(f"m must be a float > 1, got {est.m!r}")
    if est.covariance not in _COVARIANCES:
        raise ValueError(f"covariance must be one of {_COVARIANCES}, got {est.covariance!r}")
    if not 0.0 <= est.gk_gamma <= 1.0:
        raise ValueError(f"gk_gamma must be in [0, 1], got {est.gk_gamma!r}")
    if not est.gk_max_condition > 1.0:
        raise ValueError(f"gk_max_condition must be > 1, got {est.gk_max_condition!r}")
    if not isinstance(est.n_init, numbers.Integral) or est.n_init < 1:
        raise ValueError(f"n_init must be a positive integer, got {est.n_init!r}")
    if isinstance(est.init, str):
        if est.init != "k-means++":
            raise ValueError(f"init must be 'k-means++' or an array, got {est.init!r}")


def _initial_centres(est: Any, X: np.ndarray, w: np.ndarray, rs: np.random.RandomState) -> np.ndarray:
    if isinstance(est.init, str):
        return kmeans_plusplus(X, est.n_clusters, sample_weight=w, random_state=rs)[0]
    C = np.array(est.init, dtype=np.float64, copy=True)
    if C.shape != (est.n_clusters, X.shape[1]):
        raise ValueError(
            f"init array has shape {C.shape}, expected (n_clusters, n_features) = "
            f"({est.n_clusters}, {X.shape[1]})"
        )
    if not np.all(np.isfinite(C)):
        raise ValueError("init array contains NaN or infinity")
    return C


# ---------------------------------------------------------------------------------------------
# initialisation and GK norms
# ---------------------------------------------------------------------------------------------


def kmeans_plusplus(
    X: np.ndarray,
    n_clusters: int,
    *,
    sample_weight: np.ndarray | None = None,
    random_state: Any = None,
    n_local_trials: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, as in scikit-learn).

    Each new centre is the best of ``n_local_trials`` candidates drawn with probability
    proportional to ``sample_weight * D(x)^2``, keeping the one that most reduces the potential.

    Returns
    -------
    centers : ndarray of shape (n_clusters, n_features), float64
    indices : ndarray of shape (n_clusters,)
        Rows of ``X`` chosen as centres.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[0.0, 0.0], [0.1, 0.0], [10.0, 10.0], [10.1, 10.0]])
    >>> C, idx = kmeans_plusplus(X, 2, random_state=0)
    >>> sorted(int(i) // 2 for i in idx)  # one seed in each blob
    [0, 1]
    """
    rs = check_random_state(random_state)
    X = np.ascontiguousarray(X)
    n, p = X.shape
    if n < n_clusters:
        raise ValueError(f"n_samples={n} should be >= n_clusters={n_clusters}")
    w = _check_weight(sample_weight, n)
    if n_local_trials is None:
        n_local_trials = 2 + int(np.log(n_clusters))
    centers = np.empty((n_clusters, p), dtype=np.float64)
    indices = np.empty(n_clusters, dtype=np.intp)
    wsum = w.sum()
    if wsum <= 0:
        raise ValueError("sample_weight sums to zero")
    first = rs.choice(n, p=w / wsum)
    centers[0] = X[first]
    indices[0] = first
    closest = _k.sq_euclidean(X, centers[0:1])[:, 0]
    pot = float(w @ closest)
    for c in range(1, n_clusters):
        if pot <= 0.0:
            # Every point already sits on a centre: any weighted choice is as good as another.
            chosen = int(rs.choice(n, p=w / wsum))
            d_best = _k.sq_euclidean(X, np.asarray(X[chosen:chosen + 1], dtype=np.float64))[:, 0]
        else:
            cum = np.cumsum(w * closest)
            cand = np.searchsorted(cum, rs.uniform(size=n_local_trials) * cum[-1])
            np.clip(cand, None, n - 1, out=cand)
            d_cand = _k.sq_euclidean(X, np.asarray(X[cand], dtype=np.float64))
            np.minimum(closest[:, None], d_cand, out=d_cand)
            best = int(np.argmin(w @ d_cand))
            chosen = int(cand[best])
            d_best = d_cand[:, best]
        closest = np.minimum(closest, d_best)
        pot = float(w @ closest)
        centers[c] = X[chosen]
        indices[c] = chosen
    return centers, indices


def _geometric_mean_eig(F: np.ndarray, max_condition: float) -> float:
    """``det(F) ** (1/p)`` with small eigenvalues raised to ``max / max_condition`` (1.0 if F = 0)."""
    lam = np.linalg.eigvalsh(F)
    top = lam[-1]
    if not top > 0:
        return 1.0
    lam = np.maximum(lam, top / max_condition)
    return float(np.exp(np.mean(np.log(lam))))


def gk_norm_matrices(
    F: np.ndarray, scale0: float, gamma: float, max_condition: float
) -> tuple[np.ndarray, np.ndarray]:
    """Regularised Gustafson-Kessel norm-inducing matrices from fuzzy covariances.

    Following Babuska, van der Veen and Kaymak (2002), each fuzzy covariance is blended with the
    identity, ``F <- (1 - gamma) F + gamma * scale0 * I`` (``scale0 = det(F0)^(1/p)`` of the whole
    data's covariance ``F0``), then eigenvalues below ``lambda_max / max_condition`` are raised to it,
    and ``A = det(F)^(1/p) F^-1`` (cluster volumes ``rho_i = 1``).

    Parameters
    ----------
    F : ndarray of shape (c, p, p)
    scale0 : float
    gamma : float in [0, 1]
    max_condition : float > 1

    Returns
    -------
    norms : ndarray of shape (c, p, p)
        ``A_i``, each with determinant 1.
    covariances : ndarray of shape (c, p, p)
        The regularised ``F_i``.

    Examples
    --------
    >>> import numpy as np
    >>> A, F = gk_norm_matrices(np.array([np.diag([4.0, 1.0])]), 1.0, 0.0, 1e10)
    >>> np.round(A[0], 6)
    array([[0.5, 0. ],
           [0. , 2. ]])
    """
    F = np.asarray(F, dtype=np.float64)
    p = F.shape[-1]
    F = 0.5 * (F + np.swapaxes(F, -1, -2))
    F = (1.0 - gamma) * F + (gamma * scale0) * np.eye(p)
    lam, vec = np.linalg.eigh(F)
    top = lam[:, -1:]
    # A zero (or non-finite) covariance carries no shape information: fall back to a sphere.
    bad = ~(np.isfinite(top[:, 0]) & (top[:, 0] > 0))
    lam[bad] = scale0
    vec[bad] = np.eye(p)
    top = lam[:, -1:]
    lam = np.maximum(lam, top / max_condition)
    gm = np.exp(np.mean(np.log(lam), axis=1, keepdims=True))
    norms = np.einsum("cij,cj,ckj->cik", vec, gm / lam, vec)
    cov = np.einsum("cij,cj,ckj->cik", vec, lam, vec)
    return norms, cov


def _weighted_cov(
    X: np.ndarray, w: np.ndarray, full: bool = True
) -> tuple[np.ndarray, np.ndarray, float]:
    """Weighted mean, scatter matrix (or its diagonal, as a diagonal matrix) and weight total.

    einsum without ``optimize`` stays out of BLAS, whose idle threads would otherwise spin against
    Numba's on a 2-core acquisition PC (scikit-learn limits BLAS to one thread for the same reason).
    """
    wsum = float(w.sum())
    mean = np.einsum("k,kj->j", w, X) / wsum
    Xc = X - mean
    if full:
        scatter = np.einsum("k,ki,kj->ij", w, Xc, Xc)
    else:
        scatter = np.diag(np.einsum("k,kj,kj->j", w, Xc, Xc))
    return mean, scatter, wsum


# ---------------------------------------------------------------------------------------------
# shared estimator behaviour
# ---------------------------------------------------------------------------------------------


class _FCMBase(ClusterMixin, TransformerMixin, BaseEstimator):
    """predict / predict_memberships / transform from fitted centres (and GK norms)."""

    def _norms(self) -> np.ndarray | None:
        return self.norms_ if self.covariance == "gk" else None

    def _check_fitted(self) -> None:
        check_is_fitted(self, "cluster_centers_")

    def predict_memberships(self, X: Any) -> np.ndarray:
        """Memberships ``(n_samples, n_clusters)`` of ``X`` in each cluster; rows sum to 1."""
        self._check_fitted()
        X = _check_X(X, self, reset=False)
        U, _ = _k.predict_memberships(X, self.cluster_centers_, self.m, self._norms())
        return U

    def transform(self, X: Any) -> np.ndarray:
        """Same as :meth:`predict_memberships`."""
        return self.predict_memberships(X)

    def predict(self, X: Any) -> np.ndarray:
        """Hard labels: the cluster of largest membership (nearest centre in the cluster's norm)."""
        return np.argmax(self.predict_memberships(X), axis=1)

    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> float:
        """Opposite of the FCM objective of ``X`` at the current centres (higher is better)."""
        self._check_fitted()
        X = _check_X(X, self, reset=False)
        w = _check_weight(sample_weight, X.shape[0])
        _, _, _, J = _k.fcm_pass(X, w, self.cluster_centers_, self.m, self._norms())
        return -J


def _fcm_run(
    X: np.ndarray,
    w: np.ndarray,
    centres: np.ndarray,
    *,
    m: float,
    gk: bool,
    scale0: float,
    gamma: float,
    max_condition: float,
    max_iter: int,
    tol_shift: float,
    tol_objective: float,
) -> dict[str, Any]:
    """Alternate optimisation from given centres; returns centres, norms, covariances, n_iter."""
    c, p = centres.shape
    V = centres.copy()
    A = np.broadcast_to(np.eye(p), (c, p, p)).copy() if gk else None
    F = np.broadcast_to(scale0 * np.eye(p), (c, p, p)).copy() if gk else None
    J_prev = np.inf
    it = 0
    converged = False
    for it in range(1, max_iter + 1):
        W, S1, S2, J = _k.fcm_pass(X, w, V, m, A, with_scatter=gk)
        live = W > 0
        delta = np.zeros_like(V)
        delta[live] = S1[live] / W[live, None]
        V = V + delta
        if gk:
            Fn = np.empty((c, p, p))
            Fn[live] = S2[live] / W[live, None, None] - np.einsum("ci,cj->cij", delta[live], delta[live])
            Fn[~live] = scale0 * np.eye(p)
            A, F = gk_norm_matrices(Fn, scale0, gamma, max_condition)
        shift = float(np.sum(delta**2))
        if shift <= tol_shift:
            converged = True
            break
        if tol_objective > 0 and abs(J_prev - J) <= tol_objective * abs(J):
            converged = True
            break
        J_prev = J
    return {"centres": V, "norms": A, "cov": F, "n_iter": it, "converged": converged}


# ---------------------------------------------------------------------------------------------
# batch
# ---------------------------------------------------------------------------------------------


class FuzzyCMeans(_FCMBase):
    """Batch probabilistic fuzzy C-means, Euclidean or Gustafson-Kessel.

    Parameters
    ----------
    n_clusters : int, default=6
    m : float, default=DEFAULT_M
        Fuzzifier (> 1), default 1.2. Smaller is crisper; at 1.5 and 2.0 two prototypes merged
        on data shaped like a real scan, at 1.2 they did not (docs/fcm.md).
    covariance : {"euclidean", "gk"}, default="euclidean"
        ``"gk"``: Gustafson-Kessel, one adaptive Mahalanobis norm per cluster (elongated clusters).
    max_iter : int, default=300
        Maximum number of passes over the data per restart.
    tol : float, default=1e-5
        Stop when the summed squared centre shift falls below ``tol`` times the mean per-feature
        variance of ``X`` (scikit-learn's KMeans convention).
    tol_objective : float, default=1e-7
        Also stop when the objective changes by less than this fraction between passes; 0 disables.
    n_init : int, default=3
        Restarts from different k-means++ seeds; the lowest objective is kept. Ignored (1) when
        ``init`` is an array.
    init : "k-means++" or ndarray of shape (n_clusters, n_features), default="k-means++"
    gk_gamma : float, default=0.01
        Weight of the identity (scaled to the whole data's volume) blended into each GK
        covariance. 0.1 (often quoted) made GK lose two long parallel clusters to a left/right
        split in 10 of 10 seeds, 0.05 and below found them in 10 of 10 (docs/fcm.md).
    gk_max_condition : float, default=1e10
        Condition-number cap of the GK covariances.
    random_state : int, RandomState or None, default=None

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters, n_features)
    memberships_ : ndarray of shape (n_samples, n_clusters)
        Memberships of the training data at the final centres.
    labels_ : ndarray of shape (n_samples,)
    covariances_ : ndarray of shape (n_clusters, n_features, n_features)
        Regularised fuzzy covariances (GK only, else None).
    norms_ : ndarray of shape (n_clusters, n_features, n_features)
        GK norm-inducing matrices (determinant 1; GK only, else None).
    objective_ : float
        FCM objective ``sum_k w_k sum_i u_ki^m d2_ki`` at the final centres and memberships.
    n_iter_ : int
        Passes run by the kept restart.
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = np.vstack([rng.normal(0, 0.1, (50, 2)), rng.normal(5, 0.1, (50, 2))])
    >>> fcm = FuzzyCMeans(n_clusters=2, random_state=0).fit(X)
    >>> np.sort(fcm.cluster_centers_[:, 0]).round(1) + 0.0
    array([0., 5.])
    >>> bool(np.allclose(fcm.memberships_.sum(axis=1), 1.0))
    True
    """

    def __init__(
        self,
        n_clusters: int = 6,
        *,
        m: float = DEFAULT_M,
        covariance: str = "euclidean",
        max_iter: int = 300,
        tol: float = 1e-5,
        tol_objective: float = 1e-7,
        n_init: int = 3,
        init: Any = "k-means++",
        gk_gamma: float = 0.01,
        gk_max_condition: float = 1e10,
        random_state: Any = None,
    ) -> None:
        self.n_clusters = n_clusters
        self.m = m
        self.covariance = covariance
        self.max_iter = max_iter
        self.tol = tol
        self.tol_objective = tol_objective
        self.n_init = n_init
        self.init = init
        self.gk_gamma = gk_gamma
        self.gk_max_condition = gk_max_condition
        self.random_state = random_state

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> "FuzzyCMeans":
        """Fit the model to ``X`` (n_samples, n_features), optionally weighting the samples."""
        _check_params(self)
        if not isinstance(self.max_iter, numbers.Integral) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        X = _check_X(X, self, reset=True, min_samples=self.n_clusters)
        w = _check_weight(sample_weight, X.shape[0])
        if not w.sum() > 0:
            raise ValueError("sample_weight sums to zero")
        rs = check_random_state(self.random_state)
        gk = self.covariance == "gk"
        mean, scatter, wsum = _weighted_cov(X.astype(np.float64, copy=False), w, full=gk)
        tol_shift = self.tol * float(np.mean(np.diag(scatter)) / wsum)
        scale0 = _geometric_mean_eig(scatter / wsum, self.gk_max_condition) if gk else 1.0
        n_init = self.n_init if isinstance(self.init, str) else 1
        best = None
        for run in range(n_init):
            centres = _initial_centres(self, X, w, rs)
            res = _fcm_run(X, w, centres, m=self.m, gk=gk, scale0=scale0, gamma=self.gk_gamma,
                           max_condition=self.gk_max_condition, max_iter=self.max_iter,
                           tol_shift=tol_shift, tol_objective=self.tol_objective)
            res["U"], _ = _k.predict_memberships(X, res["centres"], self.m, res["norms"])
            # the fused pass's objective is that of the memberships at these centres
            res["J"] = _k.fcm_pass(X, w, res["centres"], self.m, res["norms"])[3]
            logger.debug("FCM restart %d: objective %.6g after %d passes (converged=%s)",
                         run, res["J"], res["n_iter"], res["converged"])
            if best is None or res["J"] < best["J"]:
                best = res
        if not best["converged"]:
            logger.info("FuzzyCMeans stopped at max_iter=%d before reaching tol", self.max_iter)
        self.cluster_centers_ = best["centres"]
        self.norms_ = best["norms"]
        self.covariances_ = best["cov"]
        self.memberships_ = best["U"]
        self.labels_ = np.argmax(best["U"], axis=1)
        self.objective_ = float(best["J"])
        self.n_iter_ = int(best["n_iter"])
        return self

    def fit_predict(self, X: Any, y: Any = None, sample_weight: Any = None) -> np.ndarray:
        """Fit and return the hard labels of ``X``."""
        return self.fit(X, sample_weight=sample_weight).labels_


# ---------------------------------------------------------------------------------------------
# mini-batch / streaming
# ---------------------------------------------------------------------------------------------


class MiniBatchFuzzyCMeans(_FCMBase):
    """Mini-batch fuzzy C-means for data that arrive in batches (a live scan).

    Modelled on scikit-learn's ``MiniBatchKMeans.partial_fit``: the first call(s) buffer samples
    until ``init_size`` are available (the centres are then seeded by k-means++ and refined by a
    short batch FCM on that buffer, ``n_init`` restarts, lowest objective kept); every later batch
    moves each centre toward the batch's ``u^m``-weighted mean, with the per-cluster accumulated
    weight ``W_i = sum w u^m`` as the inverse learning rate, so the centre is the running weighted
    mean of everything seen. With ``decay < 1`` old data are forgotten: before each batch of ``b``
    samples ``W_i`` is multiplied by ``decay ** b`` (memory of about ``1 / (1 - decay)`` samples),
    which lets the centres follow a scan whose content drifts.

    Parameters
    ----------
    n_clusters : int, default=6
    m : float, default=DEFAULT_M
    covariance : {"euclidean", "gk"}, default="euclidean"
    batch_size : int, default=1024
        Batch size used by :meth:`fit`.
    max_iter : int, default=100
        Maximum number of epochs of :meth:`fit`.
    tol : float, default=0.0
        :meth:`fit` stops when a batch moves the centres by less than ``tol`` times the mean
        per-feature variance (summed squared shift); 0 disables.
    max_no_improvement : int or None, default=10
        :meth:`fit` stops after this many consecutive batches without improvement of the smoothed
        per-sample objective; None disables.
    init : "k-means++" or ndarray of shape (n_clusters, n_features), default="k-means++"
    init_size : int or None, default=None
        Samples used to initialise: :meth:`partial_fit` buffers until it has this many (default
        ``max(batch_size, n_clusters)``); :meth:`fit` draws this many (default ``3 * batch_size``).
    init_max_iter : int, default=50
        Passes of the batch FCM run on the initialisation sample.
    n_init : int, default=3
    decay : float in (0, 1], default=1.0
        Per-sample forgetting factor of the accumulated weights (1: stationary data).
    gk_gamma, gk_max_condition : float
        As in :class:`FuzzyCMeans`.
    random_state : int, RandomState or None, default=None

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters, n_features)
    cluster_weights_ : ndarray of shape (n_clusters,)
        Accumulated (decayed) ``sum w u^m`` per cluster.
    covariances_, norms_ : ndarray of shape (n_clusters, n_features, n_features) or None
        GK fuzzy covariances (running, regularised) and norm matrices.
    n_steps_ : int
        Mini-batch updates applied (the initialisation counts as one).
    n_samples_seen_ : int
    n_iter_ : int
        Epochs run by :meth:`fit`.
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = np.vstack([rng.normal(0, 0.1, (300, 2)), rng.normal(5, 0.1, (300, 2))])[rng.permutation(600)]
    >>> mb = MiniBatchFuzzyCMeans(n_clusters=2, batch_size=100, random_state=0)
    >>> for start in range(0, 600, 100):
    ...     _ = mb.partial_fit(X[start:start + 100])
    >>> np.sort(mb.cluster_centers_[:, 0]).round(1) + 0.0
    array([0., 5.])
    >>> mb.n_samples_seen_, mb.n_steps_
    (600, 6)
    """

    def __init__(
        self,
        n_clusters: int = 6,
        *,
        m: float = DEFAULT_M,
        covariance: str = "euclidean",
        batch_size: int = 1024,
        max_iter: int = 100,
        tol: float = 0.0,
        max_no_improvement: int | None = 10,
        init: Any = "k-means++",
        init_size: int | None = None,
        init_max_iter: int = 50,
        n_init: int = 3,
        decay: float = 1.0,
        gk_gamma: float = 0.01,
        gk_max_condition: float = 1e10,
        random_state: Any = None,
    ) -> None:
        self.n_clusters = n_clusters
        self.m = m
        self.covariance = covariance
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.tol = tol
        self.max_no_improvement = max_no_improvement
        self.init = init
        self.init_size = init_size
        self.init_max_iter = init_max_iter
        self.n_init = n_init
        self.decay = decay
        self.gk_gamma = gk_gamma
        self.gk_max_condition = gk_max_condition
        self.random_state = random_state

    # -- parameters and state -----------------------------------------------------------------

    def _check_mb_params(self) -> None:
        _check_params(self)
        if not isinstance(self.batch_size, numbers.Integral) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay!r}")
        if self.init_size is not None and (
            not isinstance(self.init_size, numbers.Integral) or self.init_size < self.n_clusters
        ):
            raise ValueError(f"init_size must be an integer >= n_clusters, got {self.init_size!r}")

    def _check_fitted(self) -> None:
        if not hasattr(self, "cluster_centers_") and hasattr(self, "_buffer"):
            have = sum(len(b) for b, _ in self._buffer)
            raise NotFittedError(
                f"{type(self).__name__} is still buffering samples for its initialisation: "
                f"{have} of {self._partial_init_size()} seen"
            )
        check_is_fitted(self, "cluster_centers_")

    def _partial_init_size(self) -> int:
        if self.init_size is not None:
            return int(self.init_size)
        return max(int(self.batch_size), int(self.n_clusters))

    def _reset(self) -> None:
        for name in ("cluster_centers_", "cluster_weights_", "covariances_", "norms_", "n_steps_",
                     "n_samples_seen_", "n_iter_", "_buffer", "_data_mean", "_data_scatter",
                     "_data_weight", "_random_state", "n_features_in_"):
            if hasattr(self, name):
                delattr(self, name)

    def _update_data_cov(self, X: np.ndarray, w: np.ndarray, forget: float) -> None:
        """Chan's merge of the (decayed) running data covariance, for the GK volume scale."""
        mean_b, scat_b, wb = _weighted_cov(X.astype(np.float64, copy=False), w, full=True)
        if wb <= 0:
            return
        wa = self._data_weight * forget
        scat_a = self._data_scatter * forget
        tot = wa + wb
        d = mean_b - self._data_mean
        self._data_mean = self._data_mean + d * (wb / tot)
        self._data_scatter = scat_a + scat_b + np.outer(d, d) * (wa * wb / tot)
        self._data_weight = tot

    def _scale0(self) -> float:
        return _geometric_mean_eig(self._data_scatter / self._data_weight, self.gk_max_condition)

    # -- initialisation -------------------------------------------------------------------------

    def _initialise(self, X: np.ndarray, w: np.ndarray) -> None:
        gk = self.covariance == "gk"
        mean, scatter, wsum = _weighted_cov(X.astype(np.float64, copy=False), w, full=gk)
        self._data_mean, self._data_scatter, self._data_weight = mean, scatter, wsum
        scale0 = self._scale0() if gk else 1.0
        n_init = self.n_init if isinstance(self.init, str) else 1
        best = None
        for run in range(n_init):
            centres = _initial_centres(self, X, w, self._random_state)
            res = _fcm_run(X, w, centres, m=self.m, gk=gk, scale0=scale0, gamma=self.gk_gamma,
                           max_condition=self.gk_max_condition, max_iter=self.init_max_iter,
                           tol_shift=1e-5 * float(np.mean(np.diag(scatter)) / wsum),
                           tol_objective=1e-7)
            W, _, _, J = _k.fcm_pass(X, w, res["centres"], self.m, res["norms"])
            logger.debug("MiniBatchFuzzyCMeans init %d: objective %.6g", run, J)
            if best is None or J < best[1]:
                best = (res, J, W)
        res, _, W = best
        self.cluster_centers_ = res["centres"]
        self.norms_ = res["norms"]
        self.covariances_ = res["cov"]
        self.cluster_weights_ = W
        self.n_steps_ = 1
        logger.info("MiniBatchFuzzyCMeans initialised on %d samples", X.shape[0])

    # -- one mini-batch step --------------------------------------------------------------------

    def _step(self, X: np.ndarray, w: np.ndarray) -> tuple[float, float]:
        """Update centres (and GK covariances) from one batch; return (shift, batch objective)."""
        gk = self.covariance == "gk"
        V = self.cluster_centers_
        Wb, S1, S2, J = _k.fcm_pass(X, w, V, self.m, self._norms(), with_scatter=gk)
        forget = self.decay ** X.shape[0] if self.decay < 1.0 else 1.0
        W_old = self.cluster_weights_ * forget
        W_new = W_old + Wb
        live = W_new > 0
        delta = np.zeros_like(V)
        delta[live] = S1[live] / W_new[live, None]
        self.cluster_centers_ = V + delta
        self.cluster_weights_ = W_new
        if gk:
            self._update_data_cov(X, w, forget)
            scale0 = self._scale0()
            p = V.shape[1]
            F = np.empty_like(self.covariances_)
            F[live] = (W_old[live, None, None] * self.covariances_[live] + S2[live]) / W_new[
                live, None, None
            ] - np.einsum("ci,cj->cij", delta[live], delta[live])
            F[~live] = scale0 * np.eye(p)
            self.norms_, self.covariances_ = gk_norm_matrices(F, scale0, self.gk_gamma,
                                                              self.gk_max_condition)
        self.n_steps_ += 1
        return float(np.sum(delta**2)), J

    # -- public API -----------------------------------------------------------------------------

    def partial_fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> "MiniBatchFuzzyCMeans":
        """Update the model with one batch of samples.

        The first call fixes ``n_features_in_``; later calls must match it. Until ``init_size``
        samples have been seen they are buffered (and the estimator is not yet fitted).
        """
        first = not hasattr(self, "_random_state")
        if first:
            self._check_mb_params()
        X = _check_X(X, self, reset=first)
        w = _check_weight(sample_weight, X.shape[0])
        if first:
            self._random_state = check_random_state(self.random_state)
            self._buffer = []
            self.n_samples_seen_ = 0
        self.n_samples_seen_ += X.shape[0]
        if not hasattr(self, "cluster_centers_"):
            self._buffer.append((X.copy(), w))
            have = sum(len(b) for b, _ in self._buffer)
            need = self._partial_init_size()
            if have < need or sum(float(bw.sum()) for _, bw in self._buffer) <= 0:
                logger.debug("buffering for initialisation: %d of %d samples", have, need)
                return self
            Xb = np.concatenate([np.asarray(b, dtype=np.float64) for b, _ in self._buffer])
            wb = np.concatenate([bw for _, bw in self._buffer])
            self._buffer = []
            self._initialise(Xb, wb)
            return self
        self._step(X, w)
        return self

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> "MiniBatchFuzzyCMeans":
        """Fit from scratch by iterating shuffled mini-batches of ``X`` (epochs up to max_iter)."""
        self._reset()
        self._check_mb_params()
        X = _check_X(X, self, reset=True, min_samples=self.n_clusters)
        w = _check_weight(sample_weight, X.shape[0])
        if not w.sum() > 0:
            raise ValueError("sample_weight sums to zero")
        n = X.shape[0]
        self._random_state = rs = check_random_state(self.random_state)
        self._buffer = []
        init_size = self.init_size if self.init_size is not None else 3 * self.batch_size
        init_size = min(max(int(init_size), self.n_clusters), n)
        idx = rs.choice(n, init_size, replace=False) if init_size < n else np.arange(n)
        self._initialise(np.ascontiguousarray(X[idx]), w[idx])
        self.n_samples_seen_ = init_size
        var = float(np.mean(np.diag(_weighted_cov(X, w, full=False)[1])) / w.sum())
        tol_shift = self.tol * var
        ewa = None
        best_ewa = np.inf
        no_improvement = 0
        stop = False
        epoch = 0
        for epoch in range(1, self.max_iter + 1):
            order = rs.permutation(n)
            for start in range(0, n, self.batch_size):
                sel = order[start:start + self.batch_size]
                wsel = w[sel]
                wsum = float(wsel.sum())
                if wsum <= 0:
                    continue
                shift, J = self._step(np.ascontiguousarray(X[sel]), wsel)
                self.n_samples_seen_ += sel.size
                per_sample = J / wsum
                # Smoothed like sklearn's MiniBatchKMeans: alpha = batch_size * 2 / (n + 1).
                alpha = min(1.0, sel.size * 2.0 / (n + 1))
                ewa = per_sample if ewa is None else ewa * (1 - alpha) + per_sample * alpha
                if self.tol > 0 and shift <= tol_shift:
                    logger.debug("converged on centre shift at step %d", self.n_steps_)
                    stop = True
                    break
                if ewa < best_ewa:
                    best_ewa = ewa
                    no_improvement = 0
                else:
                    no_improvement += 1
                if self.max_no_improvement is not None and no_improvement >= self.max_no_improvement:
                    logger.debug("no improvement for %d batches at step %d", no_improvement,
                                 self.n_steps_)
                    stop = True
                    break
            if stop:
                break
        self.n_iter_ = epoch
        return self
