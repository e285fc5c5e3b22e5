"""Compact per-position representation of a live scan, so earlier memberships can be recomputed.

DESIGN.md ("Streaming statistics must survive non-stationary scans") asks the engine to refresh the
memberships of *every* position seen whenever scaling, PCA or the clusters change. That needs each
position's reduced feature vector again, and a 512 x 512 scan of 4,586-feature vectors is 4.8 GB in
float32 (2.4 GB even in float16). So :class:`PositionStore` keeps each vector ``x`` (in the PCA's
fixed warm-up-scaled space) as its coordinates in a rank-``R`` orthonormal basis:

    ``a = B^T (x - mu)``,  ``x ~ mu + B a``

with ``B`` (F x R) the leading eigenvectors of the warm-space covariance (from the streaming PCA) and
``mu`` the warm-space mean at the time the basis was taken. When the PCA learns new directions the
basis is replaced and every stored coordinate re-based exactly within the old span:

    ``a_new = B_new^T B_old a_old + B_new^T (mu_old - mu_new)``

A projection onto current-space principal components ``V`` (F x k) with the per-feature read-out map
``D = c_now / c_warm`` and the current mean ``m_now`` is then a small matrix product:

    ``scores = (D (mu + B a) - m_now) V = a (B^T (D V)) + (D mu - m_now) V``

At R = 128 coordinates in float32 a position costs 512 bytes plus a 1-byte "seen" flag: 134 MB for a
512 x 512 scan (the full float32 vector: 18,345 bytes, 4.8 GB). The coordinates are lossy when the
scales drift feature by feature (docs/engine.md measures how much). ``mode="full"`` stores the warm-space vectors themselves (float32; for small scans and
to measure what the compact store costs in accuracy: docs/engine.md).

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> X = rng.normal(size=(50, 3)) @ rng.normal(size=(3, 8))          # rank-3 data in 8 features
>>> store = PositionStore(n_positions=100, n_features=8, rank=4)
>>> B = np.linalg.svd(X - X.mean(0), full_matrices=False)[2][:4].T
>>> store.set_basis(B, X.mean(0))
>>> store.add(np.arange(50), X)  # returns how many positions were already stored
0
>>> V = np.eye(8)[:, :2]; D = np.ones(8)
>>> bool(np.allclose(store.project(D, V, np.zeros(8)), X[:, :2], atol=1e-4))
True
>>> store.n_seen, store.nbytes_per_position
(50, 17)
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["PositionStore"]


class PositionStore:
    """Per-position reduced vectors, compact (basis coordinates) or full, with exact re-basing.

    Parameters
    ----------
    n_positions : int
        Scan positions (0-based indices ``0 .. n_positions - 1``).
    n_features : int
        Length ``F`` of a reduced, warm-up-scaled feature vector.
    rank : int, default=128
        Basis size ``R`` (``mode="basis"``).
    mode : {"basis", "full"}, default="basis"

    Attributes
    ----------
    seen : ndarray of bool, shape (n_positions,)
        Positions stored so far.
    basis_ : ndarray (F, r) float64 or None
        Current orthonormal basis (``r <= rank`` columns), ``None`` before :meth:`set_basis`.
    center_ : ndarray (F,) float64 or None
        The ``mu`` the coordinates are taken about.
    n_rebases_ : int
    """

    def __init__(self, n_positions: int, n_features: int, rank: int = 128, mode: str = "basis") -> None:
        if mode not in ("basis", "full"):
            raise ValueError(f"mode must be 'basis' or 'full', got {mode!r}")
        if int(n_positions) < 1 or int(n_features) < 1 or int(rank) < 1:
            raise ValueError("n_positions, n_features and rank must be >= 1")
        self.n_positions = int(n_positions)
        self.n_features = int(n_features)
        self.rank = min(int(rank), self.n_features)
        self.mode = mode
        width = self.rank if mode == "basis" else self.n_features
        self.data = np.zeros((self.n_positions, width), dtype=np.float32)
        self.seen = np.zeros(self.n_positions, dtype=bool)
        self.basis_: np.ndarray | None = None
        self.center_: np.ndarray | None = None
        self.n_rebases_ = 0

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def nbytes_per_position(self) -> int:
        """Bytes a position costs (coordinates or vector, plus its seen flag)."""
        return int(self.data.shape[1] * self.data.itemsize + self.seen.itemsize)

    @property
    def n_seen(self) -> int:
        return int(np.count_nonzero(self.seen))

    @property
    def seen_positions(self) -> np.ndarray:
        return np.flatnonzero(self.seen)

    # -- basis ----------------------------------------------------------------------------------
    def set_basis(self, basis: np.ndarray, center: np.ndarray) -> None:
        """Replace the basis (F x r, orthonormal columns) and centre; re-base stored coordinates.

        ``mode="full"`` ignores the basis (vectors are stored as they are).
        """
        if self.mode == "full":
            return
        B = np.asarray(basis, dtype=np.float64)
        mu = np.asarray(center, dtype=np.float64).ravel()
        if B.ndim != 2 or B.shape[0] != self.n_features or B.shape[1] > self.rank or B.shape[1] < 1:
            raise ValueError(f"basis must have shape ({self.n_features}, 1..{self.rank}); got {B.shape}")
        if mu.shape != (self.n_features,):
            raise ValueError(f"center must have {self.n_features} entries; got {mu.shape}")
        r = B.shape[1]
        if self.basis_ is not None and self.seen.any():
            T = B.T @ self.basis_  # (r_new, r_old)
            t = B.T @ (self.center_ - mu)
            r_old = self.basis_.shape[1]
            idx = self.seen_positions
            # in slices so a 512 x 512 scan never needs a second full copy of the coordinates
            step = 65536
            Tt = T.T.astype(np.float32)
            t32 = t.astype(np.float32)
            for s in range(0, idx.size, step):
                sel = idx[s:s + step]
                new = self.data[sel, :r_old] @ Tt
                new += t32
                self.data[sel, :r] = new
                self.data[sel, r:] = 0.0
            self.n_rebases_ += 1
        self.basis_ = B
        self.center_ = mu

    # -- storing and projecting ------------------------------------------------------------------
    def _check_positions(self, positions: np.ndarray) -> np.ndarray:
        p = np.asarray(positions)
        if p.ndim != 1 or not np.issubdtype(p.dtype, np.integer):
            raise ValueError(f"positions must be a 1-D integer array; got {p.dtype} {p.shape}")
        if p.size and (p.min() < 0 or p.max() >= self.n_positions):
            bad = int(p[(p < 0) | (p >= self.n_positions)][0])
            raise ValueError(f"scan position {bad} is outside 0..{self.n_positions - 1}")
        return p.astype(np.intp)

    def encode(self, X: np.ndarray) -> np.ndarray:
        """Coordinates (or vectors, ``mode="full"``) of warm-space rows ``X`` (n, F), float32."""
        X = np.asarray(X)
        if self.mode == "full":
            return np.asarray(X, dtype=np.float32)
        if self.basis_ is None:
            raise RuntimeError("PositionStore has no basis yet; call set_basis first")
        a = (X.astype(np.float64) - self.center_) @ self.basis_
        out = np.zeros((X.shape[0], self.rank), dtype=np.float32)
        out[:, : a.shape[1]] = a
        return out

    def residual(self, X: np.ndarray) -> np.ndarray:
        """Squared distance of each warm-space row from the affine span ``mu + span(B)`` (0 if full)."""
        if self.mode == "full":
            return np.zeros(np.asarray(X).shape[0])
        Xc = np.asarray(X, dtype=np.float64) - self.center_
        a = Xc @ self.basis_
        return np.maximum(np.einsum("ij,ij->i", Xc, Xc) - np.einsum("ij,ij->i", a, a), 0.0)

    def add(self, positions: np.ndarray, X: np.ndarray) -> int:
        """Store warm-space rows ``X`` at ``positions``; returns how many were already stored
        (re-sent positions overwrite the earlier vector)."""
        p = self._check_positions(positions)
        X = np.asarray(X)
        if X.ndim != 2 or X.shape != (p.size, self.n_features):
            raise ValueError(f"X must have shape ({p.size}, {self.n_features}); got {X.shape}")
        dup = int(np.count_nonzero(self.seen[p]))
        self.data[p] = self.encode(X)
        self.seen[p] = True
        return dup

    def projection(self, D: np.ndarray, V: np.ndarray, mean_now: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (P, p0) with ``scores = data @ P + p0`` for read-out map ``D``, components ``V`` (F, k)
        and current mean ``mean_now``."""
        D = np.asarray(D, dtype=np.float64)
        V = np.asarray(V, dtype=np.float64)
        mean_now = np.asarray(mean_now, dtype=np.float64)
        DV = D[:, np.newaxis] * V
        if self.mode == "full":
            return DV.astype(np.float32), (-(mean_now @ V)).astype(np.float32)
        P = np.zeros((self.rank, V.shape[1]))
        P[: self.basis_.shape[1]] = self.basis_.T @ DV
        p0 = (D * self.center_ - mean_now) @ V
        return P.astype(np.float32), p0.astype(np.float32)

    def project(self, D: np.ndarray, V: np.ndarray, mean_now: np.ndarray,
                positions: np.ndarray | None = None) -> np.ndarray:
        """Scores (n, k) float32 of the stored ``positions`` (default: all seen, in index order)."""
        P, p0 = self.projection(D, V, mean_now)
        idx = self.seen_positions if positions is None else self._check_positions(positions)
        out = np.empty((idx.size, P.shape[1]), dtype=np.float32)
        step = 65536
        for s in range(0, idx.size, step):
            sel = idx[s:s + step]
            np.matmul(self.data[sel], P, out=out[s:s + sel.size])
        out += p0
        return out
