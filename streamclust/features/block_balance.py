"""Block variance balancing: give the diffraction (CBED) and EDS blocks equal total variance.

After robust scaling, feature ``j`` of block ``b`` is ``z_j = (x_j - median_j) / s_j``, whose variance is
``var_j / s_j**2``. The *total variance* of a block is the sum over its features,
``T_b = sum_j var_j / s_j**2`` (``= sum_j c_j**2 var_j`` with per-feature multipliers ``c_j = 1 / s_j``).
Multiplying a block's scaled data by a factor ``w_b`` multiplies its total variance by ``w_b**2``, so
the factor that makes block ``b`` carry the reference block's total variance is

    ``w_b = sqrt(T_ref / T_b)``

the square root of the ratio of block variances (the reference block keeps ``w = 1``). Without this,
4,096 diffraction features would outvote a few hundred EDS channels in PCA and clustering simply by
number. Because the per-feature Welford variances and the current scales are both known at all
times, the balance is exact on the data seen at any moment, not an estimate, and it follows the
scales as they drift during a non-stationary scan.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from streamclust.features.robust_scaling import StreamingRobustScaler

logger = logging.getLogger(__name__)

__all__ = ["BlockBalancer", "balance_weights", "block_total_variance"]


def block_total_variance(var: np.ndarray, scale: np.ndarray) -> float:
    """Total variance ``sum(var / scale**2)`` of a block after dividing each feature by ``scale``.

    Examples
    --------
    >>> import numpy as np
    >>> block_total_variance(np.array([4.0, 9.0]), np.array([2.0, 3.0]))
    2.0
    """
    var = np.asarray(var, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    return float(np.sum(var / (scale * scale)))


def balance_weights(total_variances: Mapping[str, float], reference: str) -> dict[str, float]:
    """Data multipliers ``w_b = sqrt(T_ref / T_b)`` that give every block the reference's total variance.

    A block with zero total variance (nothing seen varies) keeps ``w = 1``: there is nothing to
    balance and no factor could help.

    Examples
    --------
    >>> balance_weights({"cbed": 400.0, "eds": 25.0}, "cbed")
    {'cbed': 1.0, 'eds': 4.0}
    """
    t_ref = float(total_variances[reference])
    out = {}
    for name, t in total_variances.items():
        t = float(t)
        out[name] = float(np.sqrt(t_ref / t)) if (t > 0.0 and t_ref > 0.0) else 1.0
    return out


class BlockBalancer(TransformerMixin, BaseEstimator):
    """Robust-scale several feature blocks online and balance their total variances.

    Owns one :class:`~streamclust.features.robust_scaling.StreamingRobustScaler` per block. The combined
    feature vector is the concatenation, in ``blocks`` order, of ``w_b * (x_b - median_b) / scale_b``.

    Parameters
    ----------
    blocks : sequence of str, default=("cbed", "eds")
        Block names, in concatenation order.
    reference : str, optional
        Block whose weight is 1 (default the first block).
    scaler_params : dict, optional
        Keyword arguments of every block's ``StreamingRobustScaler``.

    Attributes
    ----------
    scalers_ : dict of str -> StreamingRobustScaler
    n_features_in_ : dict of str -> int
    feature_slices_ : dict of str -> slice
        Where each block sits in the combined vector.
    total_variances_ : dict of str -> float
        ``T_b`` at the current scales, before weighting.
    weights_ : dict of str -> float
        The data multipliers ``w_b``.
    multiplier_ : ndarray of float64
        Per-feature combined multiplier ``c = w_b / scale_b`` (what PCA needs as the current scale).
    center_ : ndarray of float64
        Per-feature centre (the block medians).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> data = {"cbed": rng.poisson(50.0, (300, 8)).astype(np.float32),
    ...         "eds": rng.poisson(2.0, (300, 4)).astype(np.float32)}
    >>> bal = BlockBalancer().partial_fit(data)
    >>> Z = bal.transform(data)
    >>> Z.shape
    (300, 12)
    >>> v = Z.var(axis=0, ddof=1, dtype=np.float64)
    >>> bool(np.isclose(v[:8].sum(), v[8:].sum(), rtol=1e-5))
    True
    """

    def __init__(
        self,
        blocks: Sequence[str] = ("cbed", "eds"),
        reference: str | None = None,
        scaler_params: Mapping | None = None,
    ) -> None:
        self.blocks = blocks
        self.reference = reference
        self.scaler_params = scaler_params

    def _blocks_from(self, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = tuple(self.blocks)
        missing = [b for b in names if b not in data]
        extra = [b for b in data if b not in names]
        if missing or extra:
            raise ValueError(f"blocks {names} expected; missing {missing}, unexpected {extra}")
        arrays = {b: np.asarray(data[b]) for b in names}
        rows = {b: a.shape[0] if a.ndim == 2 else None for b, a in arrays.items()}
        if None in rows.values() or len(set(rows.values())) != 1:
            raise ValueError(f"every block must be 2-D with the same number of rows; got {rows}")
        return arrays

    def _init(self, arrays: Mapping[str, np.ndarray]) -> None:
        names = tuple(self.blocks)
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"block names must be unique and non-empty; got {names}")
        ref = names[0] if self.reference is None else self.reference
        if ref not in names:
            raise ValueError(f"reference {ref!r} is not one of {names}")
        params = dict(self.scaler_params or {})
        self.scalers_ = {b: StreamingRobustScaler(**params) for b in names}
        self.n_features_in_ = {b: int(arrays[b].shape[1]) for b in names}
        start = 0
        self.feature_slices_ = {}
        for b in names:
            self.feature_slices_[b] = slice(start, start + self.n_features_in_[b])
            start += self.n_features_in_[b]
        self.reference_ = ref

    def partial_fit(self, data: Mapping[str, np.ndarray], y: None = None) -> BlockBalancer:
        """Update every block's statistics with its rows (same number of rows per block). Returns self."""
        arrays = self._blocks_from(data)
        if not hasattr(self, "scalers_"):
            self._init(arrays)
        for b, X in arrays.items():
            self.scalers_[b].partial_fit(X)
        return self

    def fit(self, data: Mapping[str, np.ndarray], y: None = None) -> BlockBalancer:
        """Forget everything seen and fit on ``data``. Returns self."""
        if hasattr(self, "scalers_"):
            del self.scalers_
        return self.partial_fit(data)

    def merge(self, other: BlockBalancer) -> BlockBalancer:
        """Add another balancer's statistics (same blocks) into this one. Returns self."""
        if not hasattr(other, "scalers_"):
            return self
        if tuple(other.blocks) != tuple(self.blocks):
            raise ValueError(f"cannot merge balancers over blocks {other.blocks} and {self.blocks}")
        if not hasattr(self, "scalers_"):
            self._init({b: np.empty((0, n)) for b, n in other.n_features_in_.items()})
        for b in self.blocks:
            self.scalers_[b].merge(other.scalers_[b])
        return self

    def __iadd__(self, other: BlockBalancer) -> BlockBalancer:
        return self.merge(other)

    def _fitted(self) -> None:
        if not hasattr(self, "scalers_") or any(s.n_samples_seen_ == 0 for s in self.scalers_.values()):
            raise AttributeError("BlockBalancer has seen no data yet; call partial_fit first")

    @property
    def n_samples_seen_(self) -> int:
        self._fitted()
        return self.scalers_[self.blocks[0]].n_samples_seen_

    @property
    def total_variances_(self) -> dict[str, float]:
        self._fitted()
        return {b: block_total_variance(s.var_, s.scale_) for b, s in self.scalers_.items()}

    @property
    def weights_(self) -> dict[str, float]:
        return balance_weights(self.total_variances_, self.reference_)

    @property
    def multiplier_(self) -> np.ndarray:
        w = self.weights_
        return np.concatenate([w[b] / self.scalers_[b].scale_ for b in self.blocks])

    @property
    def center_(self) -> np.ndarray:
        self._fitted()
        return np.concatenate([self.scalers_[b].center_ for b in self.blocks])

    def transform(self, data: Mapping[str, np.ndarray]) -> np.ndarray:
        """Concatenate ``w_b * (x_b - median_b) / scale_b`` over blocks, as float32 (n, sum F_b)."""
        self._fitted()
        arrays = self._blocks_from(data)
        n = next(iter(arrays.values())).shape[0]
        total = sum(self.n_features_in_.values())
        out = np.empty((n, total), dtype=np.float32)
        w = self.weights_
        for b in self.blocks:
            z = self.scalers_[b].transform(arrays[b])
            z *= np.float32(w[b])
            out[:, self.feature_slices_[b]] = z
        return out

    def concatenate(self, data: Mapping[str, np.ndarray]) -> np.ndarray:
        """Concatenate the raw blocks in ``blocks`` order (float32), the layout of :attr:`multiplier_`."""
        arrays = self._blocks_from(data)
        return np.concatenate([np.asarray(arrays[b], dtype=np.float32) for b in self.blocks], axis=1)
