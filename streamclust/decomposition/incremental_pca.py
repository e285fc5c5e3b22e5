"""Streaming PCA that stays right while the scaling statistics drift.

The problem (DESIGN.md, measured on this machine): a raster scan crosses substrate first and the film
later, so the robust scales ``s`` (and block weights) keep changing for a long time. Feeding PCA data
scaled by the *current* statistics mixes rows scaled in different ways; freezing the scales after a
warm-up leaves PCA in a space that no longer matches the data. Both gave 24-86 degrees from batch PCA.

What works: accumulate everything in the *warm-up-scaled* space ``x * c_warm`` (fixed for the whole
scan, so every row is scaled the same way) and, at read-out, map the second moments to the current
space with ``D = diag(c_now / c_warm)``: ``cov_now = D cov_warm D``, ``mean_now = D mean_warm``. This is
exact for the exact accumulator (a linear change of coordinates) and came within 1 degree of batch PCA
(captured variance 0.9999) for the sketch. ``c`` is the per-feature *multiplier* applied to the data
(for robust scaling plus block balancing ``c = w_block / scale``, see
:attr:`streamclust.features.block_balance.BlockBalancer.multiplier_`).

Two accumulators, both mergeable:

* ``"exact"`` (default up to ``exact_max_features`` = 8,192): running mean and the full scatter matrix
  in float64, accumulated around a fixed shift vector with BLAS ``dsyrk`` (upper triangle only), so
  the covariance of everything seen is exact to float64 rounding; merging adds sums. The read-out
  uses an iterative symmetric eigensolver (ARPACK via ``scipy.sparse.linalg.eigsh``) on the operator
  ``D cov D`` without forming it, so it needs no second F x F matrix.
* ``"sketch"``: a rank-``sketch_rank`` incremental SVD (the scatter ``B.T @ B`` of a small matrix ``B``):
  each batch is stacked under ``B`` with its centred rows and the mean-shift row, and truncated back
  to ``sketch_rank`` rows through the eigendecomposition of the small Gram matrix (faster than an SVD
  of the stacked matrix: measured about 4,100 frames/s against 1,340 for scikit-learn's
  IncrementalPCA at 16,384 features). Merging stacks two sketches. Per-feature variances are kept
  exactly, so explained-variance *ratios* use the exact total variance.
  ``sketch_dtype="float32"`` (default) keeps the sketch rows in float32 and uses that they are
  orthogonal (``B B^T = diag(lambda)``, known without a product): each update forms only the new
  rows' products (``ssyrk`` and one ``sgemm``) and rotates with two ``sgemm`` calls, and every
  ``reorth_every`` updates the rows are re-orthogonalised in float64. 2.1-2.6x faster than the
  float64 path (docs/engine.md), which is kept (``sketch_dtype="float64"``) as the reference the tests compare with.

The number of components follows the paper's rule, re-evaluated on every read-out in the current
space: keep components until the next one would add less than ``min_explained_ratio`` (1 %) of the
total variance, at most ``max_components``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from scipy.linalg import blas, eigh
from scipy.sparse.linalg import LinearOperator, eigsh
from sklearn.base import BaseEstimator, TransformerMixin

logger = logging.getLogger(__name__)

__all__ = ["StreamingPCA"]

_DENSE_EIGH_MAX = 1024  # below this many features a dense eigh is as fast as ARPACK and simpler


def _flip_signs(components: np.ndarray) -> np.ndarray:
    """Deterministic signs: the largest-magnitude entry of each component is positive."""
    if components.size == 0:
        return components
    idx = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(components.shape[0]), idx])
    signs[signs == 0] = 1.0
    return components * signs[:, np.newaxis]


class StreamingPCA(TransformerMixin, BaseEstimator):
    """Incremental PCA in warm-up-scaled space, read out in the current scaled space.

    Parameters
    ----------
    max_components : int, default=20
        Components computed at read-out; ``n_components_`` never exceeds it.
    min_explained_ratio : float, default=0.01
        The 1 % rule: stop before the first component that explains less than this fraction of the
        total (current-space) variance. At least one component is always kept.
    method : {"auto", "exact", "sketch"}, default="auto"
        "auto" uses "exact" for at most ``exact_max_features`` features, else "sketch".
    sketch_rank : int, default=64
        Rows kept by the sketch.
    exact_max_features : int, default=8192
        8,192 features make a 512 MiB float64 scatter matrix.
    gram_dtype : {"float64", "float32"}, default="float64"
        Exact accumulator only. "float32" forms each batch's products with ``ssyrk`` into a float32
        buffer that is added into the float64 scatter every ``flush_rows`` rows: about twice as fast
        and an extra F x F float32 buffer, with a relative error of order 1e-6 instead of float64
        rounding (irrelevant to PCA directions; the default stays exact).
    flush_rows : int, default=2048
        Rows accumulated in the float32 buffer before it is added into float64.
    sketch_dtype : {"float32", "float64"}, default="float32"
        Sketch accumulator only: the float32 update described above, or the plain float64 one
        (stack, full Gram matrix, eigh), the reference.
    reorth_every : int, default=16
        float32 sketch: updates between float64 re-orthogonalisations of its rows.

    Attributes
    ----------
    n_features_in_ : int
    n_samples_seen_ : int
    method_ : str
        The accumulator in use.
    warmup_multiplier_ : ndarray of float64
        ``c_warm``: the multiplier the fed data were scaled with (fixed at the first call).
    current_multiplier_ : ndarray of float64
        ``c_now`` used by the read-out (``c_warm`` until :meth:`set_current_multiplier`).
    mean_ : ndarray, shape (n_features_in_,)
        Mean in the current space.
    components_ : ndarray, shape (n_components_, n_features_in_)
    explained_variance_, explained_variance_ratio_ : ndarray, shape (n_components_,)
    n_components_ : int
    components_all_, explained_variance_all_, explained_variance_ratio_all_
        The same for all ``max_components`` computed components (to see where the 1 % rule cut).
    total_variance_ : float
        Total variance in the current space (exact for both accumulators).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(500, 6)) * np.array([5.0, 2.0, 1.0, 0.1, 0.1, 0.1])
    >>> pca = StreamingPCA(max_components=4).partial_fit(X[:250]).partial_fit(X[250:])
    >>> pca.n_components_
    3
    >>> from sklearn.decomposition import PCA
    >>> ref = PCA(4).fit(X)
    >>> bool(np.allclose(pca.explained_variance_all_, ref.explained_variance_))
    True

    Scales drift: data stay in the warm-up space; the read-out follows ``c_now``.

    >>> c_warm = np.ones(6); c_now = np.array([0.2, 1.0, 1.0, 1.0, 1.0, 1.0])
    >>> pca = StreamingPCA(max_components=2).partial_fit(X * c_warm, warmup_multiplier=c_warm)
    >>> _ = pca.set_current_multiplier(c_now)
    >>> ref = PCA(2).fit(X * c_now)
    >>> bool(np.allclose(np.abs(pca.components_all_ @ ref.components_.T), np.eye(2), atol=1e-8))
    True
    """

    def __init__(
        self,
        max_components: int = 20,
        min_explained_ratio: float = 0.01,
        method: str = "auto",
        sketch_rank: int = 64,
        exact_max_features: int = 8192,
        gram_dtype: str = "float64",
        flush_rows: int = 2048,
        sketch_dtype: str = "float32",
        reorth_every: int = 16,
    ) -> None:
        self.max_components = max_components
        self.min_explained_ratio = min_explained_ratio
        self.method = method
        self.sketch_rank = sketch_rank
        self.exact_max_features = exact_max_features
        self.gram_dtype = gram_dtype
        self.flush_rows = flush_rows
        self.sketch_dtype = sketch_dtype
        self.reorth_every = reorth_every

    # -- state ------------------------------------------------------------------------------------
    def _init_state(self, n_features: int, warmup_multiplier: np.ndarray | None) -> None:
        if self.method not in ("auto", "exact", "sketch"):
            raise ValueError(f"method must be 'auto', 'exact' or 'sketch'; got {self.method!r}")
        if self.gram_dtype not in ("float64", "float32"):
            raise ValueError(f"gram_dtype must be 'float64' or 'float32'; got {self.gram_dtype!r}")
        if self.sketch_dtype not in ("float64", "float32"):
            raise ValueError(f"sketch_dtype must be 'float64' or 'float32'; got {self.sketch_dtype!r}")
        if int(self.reorth_every) < 1:
            raise ValueError(f"reorth_every must be >= 1; got {self.reorth_every!r}")
        if int(self.max_components) < 1 or int(self.sketch_rank) < 1:
            raise ValueError("max_components and sketch_rank must be >= 1")
        method = self.method
        if method == "auto":
            method = "exact" if n_features <= int(self.exact_max_features) else "sketch"
        if method == "sketch" and int(self.max_components) > int(self.sketch_rank):
            raise ValueError(f"max_components ({self.max_components}) exceeds sketch_rank ({self.sketch_rank})")
        if method == "exact" and n_features > int(self.exact_max_features):
            logger.warning("StreamingPCA: exact accumulator for %d features needs %.1f GB",
                           n_features, n_features**2 * 8 / 1e9)
        self.method_ = method
        self.n_features_in_ = n_features
        self.n_samples_seen_ = 0
        self.warmup_multiplier_ = self._check_multiplier(
            np.ones(n_features) if warmup_multiplier is None else warmup_multiplier, "warmup_multiplier"
        )
        self.current_multiplier_ = self.warmup_multiplier_.copy()
        if method == "exact":
            self._shift_ = None  # fixed at the first batch: its mean
            self._sum_ = np.zeros(n_features)  # sum of (x - shift)
            self._scatter_ = np.zeros((n_features, n_features), order="F")  # upper: sum (x-shift)(x-shift)^T
            self._buffer_ = (
                np.zeros((n_features, n_features), dtype=np.float32, order="F")
                if self.gram_dtype == "float32" else None
            )
            self._buffer_rows_ = 0
        else:
            self._mean_w_ = np.zeros(n_features)
            self._m2_ = np.zeros(n_features)  # exact per-feature sum of squared deviations
            self._sketch_ = np.zeros((0, n_features), dtype=np.dtype(self.sketch_dtype))
            self._sketch_sq_ = np.zeros(0)  # squared row norms (float32 sketch: rows are orthogonal)
            self._updates_since_reorth_ = 0
        self._cache_ = None

    def _check_multiplier(self, c: Any, name: str) -> np.ndarray:
        c = np.asarray(c, dtype=np.float64).ravel()
        if c.shape != (self.n_features_in_,):
            raise ValueError(f"{name} must have {self.n_features_in_} entries; got {c.shape[0]}")
        if not (np.all(np.isfinite(c)) and np.all(c > 0)):
            raise ValueError(f"{name} must be finite and > 0 (feature {int(np.argmin(c > 0))} is not)")
        return c

    def partial_fit(
        self, X: np.ndarray, y: None = None, *, warmup_multiplier: np.ndarray | None = None
    ) -> StreamingPCA:
        """Add rows ``X`` (n, F) given in warm-up-scaled space (``x * c_warm``). Returns self.

        ``warmup_multiplier`` (``c_warm``) is fixed by the first call (default all ones); later calls
        may repeat it but not change it.
        """
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"expected a 2-D array (n_samples, n_features); got shape {X.shape}")
        if not hasattr(self, "n_features_in_"):
            self._init_state(X.shape[1], warmup_multiplier)
        elif X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but StreamingPCA was fitted with {self.n_features_in_}")
        elif warmup_multiplier is not None and not np.array_equal(
            np.asarray(warmup_multiplier, dtype=np.float64).ravel(), self.warmup_multiplier_
        ):
            raise ValueError("warmup_multiplier is fixed by the first partial_fit and cannot change")
        if X.shape[0] == 0:
            return self
        fast = self.method_ == "sketch" and self.sketch_dtype == "float32"
        if not (fast and X.dtype == np.float32):
            X = np.asarray(X, dtype=np.float64)
        if not np.isfinite(X.sum(dtype=np.float64)):
            bad = np.argwhere(~np.isfinite(X))[0]
            raise ValueError(f"non-finite value at row {bad[0]}, feature {bad[1]}")
        if self.method_ == "exact":
            self._update_exact(X)
        else:
            # bound the small Gram matrix: feed big batches in pieces
            step = max(int(self.sketch_rank), 256)
            update = self._update_sketch32 if fast else self._update_sketch
            for start in range(0, X.shape[0], step):
                update(X[start : start + step])
        self._cache_ = None
        return self

    def fit(self, X: np.ndarray, y: None = None, *, warmup_multiplier: np.ndarray | None = None) -> StreamingPCA:
        """Forget everything seen and fit on ``X`` (warm-up-scaled space). Returns self."""
        if hasattr(self, "n_features_in_"):
            del self.n_features_in_
        return self.partial_fit(X, warmup_multiplier=warmup_multiplier)

    def _update_exact(self, X: np.ndarray) -> None:
        if self._shift_ is None:
            # Accumulating around a shift close to the mean keeps sum-of-products cancellation small.
            self._shift_ = X.mean(axis=0)
        Xs = X - self._shift_
        self._sum_ += Xs.sum(axis=0)
        # Xs.T is an F-ordered (F, n) view: dsyrk computes A @ A.T into the upper triangle in place.
        if self._buffer_ is None:
            self._scatter_ = blas.dsyrk(1.0, Xs.T, beta=1.0, c=self._scatter_, trans=0, lower=0, overwrite_c=1)
        else:
            Xs32 = Xs.astype(np.float32)
            self._buffer_ = blas.ssyrk(1.0, Xs32.T, beta=1.0, c=self._buffer_, trans=0, lower=0, overwrite_c=1)
            self._buffer_rows_ += X.shape[0]
            if self._buffer_rows_ >= int(self.flush_rows):
                self._flush()
        self.n_samples_seen_ += X.shape[0]

    def _flush(self) -> None:
        """Add the float32 product buffer into the float64 scatter (exact accumulator only)."""
        if getattr(self, "_buffer_", None) is not None and self._buffer_rows_:
            self._scatter_ += self._buffer_
            self._buffer_.fill(0.0)
            self._buffer_rows_ = 0

    def _update_sketch(self, X: np.ndarray) -> None:
        n_a = self.n_samples_seen_
        n_b = X.shape[0]
        n = n_a + n_b
        mean_b = X.mean(axis=0)
        Xc = X - mean_b
        delta = mean_b - self._mean_w_
        rows = [self._sketch_, Xc]
        if n_a:
            rows.append((np.sqrt(n_a * n_b / n) * delta)[np.newaxis])
        self._m2_ += (Xc * Xc).sum(axis=0) + delta * delta * (n_a * n_b / n)
        self._mean_w_ += delta * (n_b / n)
        self.n_samples_seen_ = n
        self._sketch_ = self._truncate(np.vstack(rows))

    def _update_sketch32(self, X: np.ndarray) -> None:
        """float32 update: only the new rows' products are formed (the sketch's rows are orthogonal)."""
        n_a = self.n_samples_seen_
        n_b = X.shape[0]
        n = n_a + n_b
        # mean and per-feature variances stay exact (float64), as in the float64 path
        mean_b = X.mean(axis=0, dtype=np.float64)
        Xc = X - mean_b
        delta = mean_b - self._mean_w_
        self._m2_ += np.einsum("ij,ij->j", Xc, Xc) + delta * delta * (n_a * n_b / n)
        Y = Xc.astype(np.float32)
        self._mean_w_ += delta * (n_b / n)
        self.n_samples_seen_ = n
        if n_a:
            Y = np.vstack([Y, (np.sqrt(n_a * n_b / n) * delta).astype(np.float32)[np.newaxis]])
        S = self._sketch_
        if S.dtype != np.float32:  # a float64 sketch (merge, older pickle): re-orthogonalise once
            S, self._sketch_sq_ = self._orthogonal_rows(S)
        k = int(self.sketch_rank)
        r, m = S.shape[0], Y.shape[0]
        if r + m <= k:
            Z = np.vstack([S, Y]) if r else Y
            self._sketch_, self._sketch_sq_ = self._orthogonal_rows(Z)
            self._updates_since_reorth_ = 0
            return
        # Gram of [S; Y]: [[diag(sq), S Y^T], [Y S^T, Y Y^T]]
        G = np.empty((r + m, r + m))
        G[:r, :r] = np.diag(self._sketch_sq_)
        SY = (S @ Y.T).astype(np.float64) if r else np.zeros((0, m))
        G[:r, r:] = SY
        G[r:, :r] = SY.T
        YY = blas.ssyrk(1.0, Y.T, trans=1).astype(np.float64)  # upper triangle of Y Y^T (Y.T: no copy)
        G[r:, r:] = np.triu(YY) + np.triu(YY, 1).T
        # a full float32 divide-and-conquer eigh is 2-3x faster here than float64 or a subset
        # (measured at 385 x 385); its rounding only mixes rows within the kept scatter
        lam, U = eigh(G.astype(np.float32), driver="evd", check_finite=False)
        lam, U = lam[::-1][:k].astype(np.float64), U[:, ::-1][:, :k]
        U32 = np.ascontiguousarray(U.T, dtype=np.float32)
        new = U32[:, r:] @ Y
        if r:
            new += U32[:, :r] @ S
        self._sketch_ = new
        self._sketch_sq_ = np.maximum(lam, 0.0)
        self._updates_since_reorth_ = getattr(self, "_updates_since_reorth_", 0) + 1
        if self._updates_since_reorth_ >= int(self.reorth_every):
            # float32 rotations drift from exact orthogonality; restore it in float64
            self._sketch_, self._sketch_sq_ = self._orthogonal_rows(self._sketch_)
            self._updates_since_reorth_ = 0

    @staticmethod
    def _orthogonal_rows(Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The same scatter ``Z^T Z`` as orthogonal float32 rows (largest first) and their squared norms."""
        Z64 = np.asarray(Z, dtype=np.float64)
        if Z64.shape[0] == 0:
            return Z64.astype(np.float32), np.zeros(0)
        lam, U = eigh(Z64 @ Z64.T)
        lam, U = lam[::-1], U[:, ::-1]
        return (U.T @ Z64).astype(np.float32), np.maximum(lam, 0.0)

    def _truncate(self, Z: np.ndarray) -> np.ndarray:
        k = int(self.sketch_rank)
        if Z.shape[0] <= k:
            return Z
        G = Z @ Z.T
        lam, U = eigh(G, subset_by_index=(G.shape[0] - k, G.shape[0] - 1))
        return U[:, ::-1].T @ Z  # rows sqrt(lam_i) v_i, largest first

    def merge(self, other: StreamingPCA) -> StreamingPCA:
        """Add another StreamingPCA's data (same features, method and ``c_warm``). Returns self."""
        if not hasattr(other, "n_features_in_") or other.n_samples_seen_ == 0:
            return self
        if not hasattr(self, "n_features_in_"):
            self._init_state(other.n_features_in_, other.warmup_multiplier_)
        if other.n_features_in_ != self.n_features_in_ or other.method_ != self.method_:
            raise ValueError("cannot merge StreamingPCA objects with different features or methods")
        if not np.array_equal(other.warmup_multiplier_, self.warmup_multiplier_):
            raise ValueError("cannot merge StreamingPCA objects fed in different warm-up spaces")
        if self.method_ == "exact":
            self._flush()
            other._flush()  # moves the other's buffered products into its scatter: same statistics
            if self._shift_ is None:
                self._shift_ = other._shift_.copy()
            e = other._shift_ - self._shift_
            n2 = other.n_samples_seen_
            s2 = other._sum_
            # re-express the other's sums about our shift: x - K = (x - K2) + e
            self._scatter_ += other._scatter_ + np.outer(s2, e) + np.outer(e, s2) + n2 * np.outer(e, e)
            self._sum_ += s2 + n2 * e
            self.n_samples_seen_ += n2
        else:
            n_a, n_b = self.n_samples_seen_, other.n_samples_seen_
            n = n_a + n_b
            delta = other._mean_w_ - self._mean_w_
            rows = [np.asarray(self._sketch_, dtype=np.float64), np.asarray(other._sketch_, dtype=np.float64)]
            if n_a:
                rows.append((np.sqrt(n_a * n_b / n) * delta)[np.newaxis])
            self._m2_ += other._m2_ + delta * delta * (n_a * n_b / n)
            self._mean_w_ += delta * (n_b / n)
            self.n_samples_seen_ = n
            self._sketch_ = self._truncate(np.vstack(rows))
            if n_a == 0 and other._sketch_.dtype == np.dtype(self.sketch_dtype):
                # merging into an empty estimator copies the other's sketch as it is
                self._sketch_ = other._sketch_.copy()
                self._sketch_sq_ = np.array(getattr(other, "_sketch_sq_", np.zeros(0)), dtype=np.float64)
            elif self.sketch_dtype == "float32":
                self._sketch_, self._sketch_sq_ = self._orthogonal_rows(self._sketch_)
                self._updates_since_reorth_ = 0
        self._cache_ = None
        return self

    def __iadd__(self, other: StreamingPCA) -> StreamingPCA:
        return self.merge(other)

    def set_current_multiplier(self, multiplier: np.ndarray) -> StreamingPCA:
        """Set ``c_now``, the per-feature multiplier of the current scaled space. Returns self."""
        if not hasattr(self, "n_features_in_"):
            raise AttributeError("StreamingPCA is not fitted yet; call partial_fit first")
        c = self._check_multiplier(multiplier, "multiplier")
        if not np.array_equal(c, self.current_multiplier_):
            self.current_multiplier_ = c
            self._cache_ = None
        return self

    # -- read-out -----------------------------------------------------------------------------
    def _decompose(self) -> dict[str, Any]:
        if not hasattr(self, "n_features_in_") or self.n_samples_seen_ < 2:
            raise AttributeError("StreamingPCA needs at least 2 samples before a read-out")
        if self._cache_ is not None:
            return self._cache_
        n = self.n_samples_seen_
        nf = self.n_features_in_
        d = self.current_multiplier_ / self.warmup_multiplier_
        k = min(int(self.max_components), nf)
        if self.method_ == "exact":
            self._flush()
            mean_w = self._shift_ + self._sum_ / n
            s = self._sum_
            S = self._scatter_
            diag_cov_w = (np.diag(S) - s * s / n) / (n - 1)
            total = float(np.sum(d * d * diag_cov_w))
            if nf <= _DENSE_EIGH_MAX or k >= nf - 1:
                C = np.triu(S) + np.triu(S, 1).T
                C -= np.outer(s, s) / n
                C *= np.outer(d, d) / (n - 1)
                lam, V = eigh(C, subset_by_index=(nf - k, nf - 1))
            else:
                ds = d * s

                def matvec(v: np.ndarray) -> np.ndarray:
                    v = np.asarray(v).ravel()
                    dv = d * v
                    return d * blas.dsymv(1.0, S, dv, lower=0) / (n - 1) - ds * (ds @ v) / (n * (n - 1))

                op = LinearOperator((nf, nf), matvec=matvec, dtype=np.float64)
                v0 = np.full(nf, 1.0 / np.sqrt(nf))  # deterministic start: reproducible read-outs
                lam, V = eigsh(op, k=k, which="LA", v0=v0, tol=1e-12)
            order = np.argsort(lam)[::-1]
            lam, V = np.maximum(lam[order], 0.0), V[:, order]
            components = V.T
        else:
            mean_w = self._mean_w_
            total = float(np.sum(d * d * self._m2_) / (n - 1))
            Bn = np.asarray(self._sketch_, dtype=np.float64) * d
            G = Bn @ Bn.T
            r = G.shape[0]
            kk = min(k, r)
            lam, U = eigh(G, subset_by_index=(r - kk, r - 1))
            lam, U = lam[::-1], U[:, ::-1]
            keep = lam > lam[0] * 1e-14 if lam.size else lam.astype(bool)
            lam, U = lam[keep], U[:, keep]
            components = (U.T @ Bn) / np.sqrt(lam)[:, np.newaxis]
            lam = lam / (n - 1)
        components = _flip_signs(components)
        ratio = lam / total if total > 0 else np.zeros_like(lam)
        below = np.flatnonzero(ratio < float(self.min_explained_ratio))
        n_comp = int(below[0]) if below.size else lam.size
        n_comp = max(1, min(n_comp, lam.size))
        self._cache_ = {
            "mean": d * mean_w,
            "components_all": components,
            "explained_variance_all": lam,
            "explained_variance_ratio_all": ratio,
            "total": total,
            "n_components": n_comp,
            "components_f32": np.ascontiguousarray(components[:n_comp].T, dtype=np.float32),
        }
        return self._cache_

    @property
    def mean_(self) -> np.ndarray:
        return self._decompose()["mean"]

    @property
    def n_components_(self) -> int:
        return self._decompose()["n_components"]

    @property
    def components_(self) -> np.ndarray:
        c = self._decompose()
        return c["components_all"][: c["n_components"]]

    @property
    def explained_variance_(self) -> np.ndarray:
        c = self._decompose()
        return c["explained_variance_all"][: c["n_components"]]

    @property
    def explained_variance_ratio_(self) -> np.ndarray:
        c = self._decompose()
        return c["explained_variance_ratio_all"][: c["n_components"]]

    @property
    def components_all_(self) -> np.ndarray:
        return self._decompose()["components_all"]

    @property
    def explained_variance_all_(self) -> np.ndarray:
        return self._decompose()["explained_variance_all"]

    @property
    def explained_variance_ratio_all_(self) -> np.ndarray:
        return self._decompose()["explained_variance_ratio_all"]

    @property
    def total_variance_(self) -> float:
        return self._decompose()["total"]

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Project rows in the *current* scaled space onto the ``n_components_`` leading components.

        Rows are centred by :attr:`mean_`; data centred differently (e.g. by a drifting median) get
        scores shifted by one constant vector, which changes no distance between positions.
        Returns float32 (n, n_components_).
        """
        c = self._decompose()
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X must have shape (n, {self.n_features_in_}); got {X.shape}")
        Xc = np.subtract(X, c["mean"].astype(np.float32), dtype=np.float32)
        return Xc @ c["components_f32"]

    def __getstate__(self) -> dict:
        self._flush()  # the pickle then holds all data in the float64 scatter
        state = dict(super().__getstate__())
        state["_cache_"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        # a pickle from before the float32 sketch update continues with the float64 one it began
        # with (its sketch is float64 and has no squared row norms)
        state = dict(state)
        state.setdefault("sketch_dtype", "float64")
        state.setdefault("reorth_every", 16)
        super().__setstate__(state)
