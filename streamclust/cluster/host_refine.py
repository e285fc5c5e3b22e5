"""Second-level clustering of the host phase: where a minor phase hides on a whole lamella.

Why this exists
---------------
On a whole FIB lamella the paper's single-level pipeline spends its clusters on what differs most:
the Si substrate (thickness and bending contrast), the Pt/Pd and carbon caps, the interfaces. The
scaled variance of those layers is > 90 % of the total, so the 1 % PCA rule keeps only the
directions that separate layers, and the faint superlattice discs and the Fe/Co contrast of an
embedded second phase fall below the cut (measured on the default phantom, 64 x 64, seed 0:
second-phase F1 0.17 for merged signals and for each alone, ``docs/engine.md``). The paper's maps
are of the film, and on the film the same pipeline works (F1 0.82).

:class:`HostRefinement` automates that region of interest. After the whole-scan clustering, the
*host* cluster (largest total membership: the film matrix on a lamella) is taken, the positions
clearly inside it (membership > ``threshold``) are robust-scaled and balanced *among themselves*
(their own medians and inter-quartile ranges), projected on their own PCA (1 % rule, with a
floor of ``min_components``: with 3 components the second phase was lost on 1 seed of 3), and
clustered again with fuzzy C-means. The final memberships are the product rule of a two-level
fuzzy partition: ``u(sub j) = u1(host) * u2(j)``, other clusters keep ``u1``. They still sum to 1.

Because robust scaling is per-feature affine, scaling the engine's stored warm-space vectors
(``x * c_warm``) with the host's medians and IQRs equals scaling the raw features: the level-2
space is an affine map of what the store already holds, so every stored position can be
re-projected exactly (full store) without re-reading data.

Examples
--------
>>> import numpy as np
>>> from streamclust.cluster.host_refine import HostRefinement
>>> rng = np.random.default_rng(0)
>>> x = rng.poisson(20.0, (600, 40)).astype(np.float32)
>>> x[:60, :5] += 12            # a minor phase inside the host, seen in the first block
>>> x[:60, 30:33] += 8          # and in the second
>>> ref = HostRefinement(n_cbed=30, n_clusters=3, random_state=0).fit_space(x)
>>> z = ref.project(x)
>>> z.shape[1] == ref.n_components_
True
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import linear_sum_assignment
from streamclust.cluster.fcm import DEFAULT_M
from streamclust.decomposition.sample_pca import one_percent_pca

logger = logging.getLogger(__name__)

__all__ = ["HostRefinement", "host_group", "match_by_overlap", "compose_memberships"]


class HostRefinement:
    """The level-2 feature space of the host phase (robust scaling, balance, PCA).

    Parameters
    ----------
    n_cbed : int
        Leading features that form the CBED block (the rest is EDS). 0 or all features: a single
        block, not balanced.
    n_clusters : int, default=6
        Sub-clusters of the host (used by the engine's level-2 FCM).
    threshold : float, default=0.9
        Host membership a position needs to shape the level-2 space.
    min_components, max_components : int
        Floor and cap of the 1 % rule (``min_explained_ratio``).
    min_explained_ratio : float, default=0.01
    sample_size : int, default=4096
        Host positions the statistics and the PCA are computed on (a seeded sample beyond it: the
        quantiles of 4k positions are within a few % of the full set; the fit is then about a
        second on one core at 4,586 features).
    m : float
        Fuzzifier of the level-2 clustering.
    iterated_power : int, default=7
        Power iterations of the randomized SVD (:mod:`streamclust.decomposition.sample_pca`).
    random_state : int or None

    Attributes
    ----------
    center_, scale_ : ndarray (F,)
        Medians and IQRs (zero IQR -> 1, as scikit-learn's RobustScaler) of the host positions.
    eds_factor_ : float
        EDS block multiplier (square root of the block-variance ratio: equal variance).
    components_ : ndarray (F, k)
    mean_ : ndarray (F,)
        ``D * x`` mean of the sample (with ``D`` = :attr:`multiplier_`), the projection's offset.
    multiplier_ : ndarray (F,)
        Per-feature factor: ``z = (x * multiplier_ - mean_) @ components_``.
    n_components_ : int
    explained_variance_ratio_ : ndarray
    n_samples_fit_ : int
    """

    def __init__(self, n_cbed: int, n_clusters: int = 6, *, threshold: float = 0.9, min_components: int = 5,
                 max_components: int = 20, min_explained_ratio: float = 0.01, sample_size: int = 4096,
                 m: float = DEFAULT_M, iterated_power: int = 7, random_state: int | None = None) -> None:
        self.n_cbed = n_cbed
        self.n_clusters = n_clusters
        self.threshold = threshold
        self.min_components = min_components
        self.max_components = max_components
        self.min_explained_ratio = min_explained_ratio
        self.sample_size = sample_size
        self.m = m
        self.iterated_power = iterated_power
        self.random_state = random_state

    def fit_space(self, X: np.ndarray) -> HostRefinement:
        """Scaling, balance and PCA from host vectors ``X`` (n, F) (already sampled if large)."""
        X = np.asarray(X, dtype=np.float32)
        n, f = X.shape
        nc = int(self.n_cbed)
        if not 0 <= nc <= f:
            raise ValueError(f"n_cbed must be between 0 and {f} (0 or {f}: one block, no balance), "
                             f"got {self.n_cbed!r}")
        if n < max(int(self.n_clusters) * 4, 8):
            raise ValueError(f"{n} host positions are too few to refine into {self.n_clusters} clusters")
        q1, med, q3 = np.percentile(X, [25, 50, 75], axis=0)
        iqr = (q3 - q1).astype(np.float64)
        # a feature constant over the host (IQR 0): scale 1, as RobustScaler does
        iqr[iqr <= 0] = 1.0
        S = (X - med.astype(np.float32)) / iqr.astype(np.float32)
        factor = 1.0
        if 0 < nc < f:
            v_c = float(S[:, :nc].var(axis=0).sum())
            v_e = float(S[:, nc:].var(axis=0).sum())
            factor = float(np.sqrt(v_c / v_e)) if v_e > 0 else 1.0
        S[:, nc:] *= np.float32(factor)
        # randomized SVD with 7 power iterations: the host's spectrum is flat near 1 %, and fewer
        # flipped the kept count and the level-2 partition with it (streamclust.decomposition.sample_pca)
        pca = one_percent_pca(S, max_components=int(self.max_components), min_components=int(self.min_components),
                              min_explained_ratio=float(self.min_explained_ratio),
                              iterated_power=int(self.iterated_power), random_state=self.random_state)
        k = pca.n_components
        evr = pca.explained_variance_ratio
        w = np.ones(f)
        w[nc:] = factor
        self.center_ = med.astype(np.float64)
        self.scale_ = iqr
        self.eds_factor_ = factor
        self.multiplier_ = w / iqr
        self.components_ = pca.components
        self.mean_ = self.center_ * self.multiplier_ + pca.mean
        self.n_components_ = k
        self.explained_variance_ratio_ = evr[:k].copy()
        self.n_samples_fit_ = n
        logger.info("host refinement space: %d positions, %d components (%.1f %% of the host's variance), "
                    "EDS factor %.3g", n, k, 100 * evr[:k].sum(), factor)
        return self

    def project(self, X: np.ndarray) -> np.ndarray:
        """Level-2 scores (n, k) float32 of vectors ``X`` (n, F)."""
        A, b = self.affine()
        return np.asarray(X, dtype=np.float32) @ A - b

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """``(A, b)`` float32 with scores ``= X @ A - b``."""
        A = (self.multiplier_[:, np.newaxis] * self.components_).astype(np.float32)
        b = (self.mean_ @ self.components_).astype(np.float32)
        return A, b


def host_group(u1: np.ndarray, *, overlap: float = 0.1, previous: int | None = None,
               switch_ratio: float = 1.25, mixing: np.ndarray | None = None,
               min_mixing: float = 0.5) -> tuple[int, tuple[int, ...]]:
    """The host: the level-1 cluster of largest total membership, with the clusters that share its
    positions (fuzzy overlap ``sum_p u_pi u_pj / min(sum_p u_pi^2, sum_p u_pj^2)`` above
    ``overlap``, transitively). Returns ``(primary, members)``.

    Why a group: level 1 splits a film by thickness into neighbouring clusters whose positions share
    membership (overlap 0.27-0.32 measured on the phantom), while substrate, caps and film share
    almost none (<= 0.04); a minor phase embedded in the film may sit in either part (measured at
    row 24 of a 64 x 64 scan: 115 of 118 second-phase positions in the smaller film cluster).
    ``previous`` keeps the old primary unless another cluster has ``switch_ratio`` times its mass
    (two similar film clusters would otherwise swap at every refresh).

    ``mixing``, optional: :func:`streamclust.cluster.spatial_pool.spatial_mixing` of the level-1 labels. A
    cluster also joins when ``min(mixing[i, j], mixing[j, i]) > min_mixing`` with a member: one layer
    split by noise into clusters that alternate position by position, with crisp memberships
    (measured on the phantom, seed 7, row 20: fuzzy overlap 0.009, and the host flipped between one
    and both halves from refresh to refresh, re-clustering level 2 from scratch each time).

    >>> u = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.3, 0.7, 0.0], [0.0, 0.0, 1.0]])
    >>> host_group(u)
    (0, (0, 1))
    """
    u = np.nan_to_num(np.asarray(u1, dtype=np.float64))
    mass = u.sum(axis=0)
    primary = int(np.argmax(mass))
    if previous is not None and primary != previous and mass[primary] < switch_ratio * mass[previous]:
        primary = int(previous)
    co = u.T @ u
    d = np.diag(co)
    with np.errstate(divide="ignore", invalid="ignore"):
        ov = np.where(np.minimum.outer(d, d) > 0, co / np.minimum.outer(d, d), 0.0)
    mixed = np.zeros_like(ov, dtype=bool)
    if mixing is not None:
        mix = np.asarray(mixing, dtype=np.float64)
        mixed = np.minimum(mix, mix.T) > float(min_mixing)
    members = {primary}
    grew = True
    while grew:
        grew = False
        for j in range(u.shape[1]):
            if j not in members and any(ov[i, j] > overlap or mixed[i, j] for i in members):
                members.add(j)
                grew = True
    return primary, tuple(sorted(members))


def match_by_overlap(old_labels: np.ndarray, new_labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """Permutation ``perm`` so that new cluster ``perm[j]`` takes the number ``j`` of the old cluster
    it overlaps most (Hungarian assignment on the contingency table). Space-independent, so it also
    keeps numbers stable across a change of PCA space.

    >>> match_by_overlap(np.array([0, 0, 1, 1, 2]), np.array([2, 2, 0, 0, 1]), 3).tolist()
    [2, 0, 1]
    """
    k = int(n_clusters)
    table = np.zeros((k, k))
    ok = (old_labels >= 0) & (new_labels >= 0)
    np.add.at(table, (old_labels[ok], new_labels[ok]), 1.0)
    _, col = linear_sum_assignment(-table)
    return col


def compose_memberships(u1: np.ndarray, u2: np.ndarray | None, host, n_sub: int) -> np.ndarray:
    """Two-level memberships ``(n, k1 + n_sub)``: level-1 columns, the host's mass moved into the
    ``n_sub`` sub-cluster columns (``u1[:, host] * u2``; ``host`` one cluster or a group, whose
    memberships are then summed) and the host columns left at 0. Without a
    level-2 model the sub-columns are 0 and the host keeps its mass.

    >>> u1 = np.array([[0.2, 0.8], [1.0, 0.0]], np.float32)
    >>> compose_memberships(u1, np.array([[0.25, 0.75], [0.5, 0.5]], np.float32), 1, 2).tolist()
    [[0.20000000298023224, 0.0, 0.20000000298023224, 0.6000000238418579], [1.0, 0.0, 0.0, 0.0]]
    """
    n, k1 = u1.shape
    out = np.zeros((n, k1 + int(n_sub)), dtype=np.float32)
    out[:, :k1] = u1
    if u2 is not None and host is not None:
        members = [int(host)] if np.ndim(host) == 0 else [int(h) for h in host]
        out[:, k1:] = u1[:, members].sum(axis=1, keepdims=True) * u2
        out[:, members] = 0.0
    return out
