"""The Dask replay's parameters, :class:`ReplayConfig`: the engine's, the centres' and the flagger's
(their defaults taken from :mod:`streamclust.engine.params` and :mod:`streamclust.flags.params`), and the
replay's own (how the PCA is merged, the chunk cache, the reduction fan-in).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from streamclust.cluster.fcm import FuzzyCMeans
from streamclust.decomposition.incremental_pca import StreamingPCA
from streamclust.engine.params import CentresParams, EngineParams
from streamclust.flags.params import FlagParams

__all__ = ["ReplayConfig"]

#: defaults of the parameters the replay shares with the engine, the centres and the FCM re-fit
_ENGINE, _CENTRES, _FCM, _PCA = EngineParams(), CentresParams(), FuzzyCMeans(), StreamingPCA()
#: the replay's own meaning of these engine names (the accumulator merged across workers)
_NOT_ENGINE = ("pca_method", "sketch_rank")


@dataclass(frozen=True)
class ReplayConfig:
    """Parameters of a replay. Those named as the engine's are the engine's, with its defaults
    (:class:`~streamclust.engine.params.EngineParams`, ``[engine]``); ``thresholds`` are the centres'
    (``[centres]``); ``flag_params`` the flagger's (:class:`~streamclust.flags.params.FlagParams`,
    ``[flags]``; a mapping of its fields is accepted); ``max_iter``, ``tol`` and ``tol_objective``
    those of the final re-fit's :class:`~streamclust.cluster.fcm.FuzzyCMeans`.

    ``pca_method``: ``"exact"`` (F x F float64 scatter: 168 MB a partial state at 4,586 features;
    exact and order-independent), ``"sketch"`` (rank ``sketch_rank``; merged sketches are an
    approximation, docs/dask.md) or ``"auto"`` (exact up to ``exact_max_features``).
    ``pca_gram_dtype``: "float64" (exact), or "float32" as the engine uses (``ssyrk`` products
    flushed into the float64 scatter: about 2x faster, relative error of order 1e-6).
    ``cache_features_bytes``: reduced features (4 bytes a feature and position) are kept on the
    workers between passes when the whole scan needs at most this much; else every pass re-reads.
    ``centre_shape``: binned pattern shape of the thresholded centres (the live analysis uses 32 x 32).
    ``fan_in``: partial states merged per reduction task.
    ``final_pca_sample``: the PCA as the engine's final refresh takes it, a randomized PCA
    (:mod:`streamclust.decomposition.sample_pca`) of at most this many complete positions, the engine's seeded
    sample; 0: the exact scatter (or sketch, ``pca_method``) of all complete positions, merged.
    ``flags``: the end-of-scan second-phase assessment (:mod:`streamclust.flags.sums`).
    """

    n_clusters: int = _ENGINE.n_clusters
    m: float = _ENGINE.m
    bin_factor: int = _ENGINE.bin_factor
    frame_reducer_params: Mapping | None = _ENGINE.frame_reducer_params
    energy_window_kev: tuple = _ENGINE.energy_window_kev
    rebin: int = _ENGINE.rebin
    scaler_params: Mapping | None = _ENGINE.scaler_params
    max_components: int = _ENGINE.max_components
    min_explained_ratio: float = _ENGINE.min_explained_ratio
    pca_method: str = "auto"
    sketch_rank: int = _ENGINE.basis_rank  # the engine's sketch rank unless set: its basis rank
    exact_max_features: int = _PCA.exact_max_features
    pca_gram_dtype: str = "float64"
    final_n_init: int = _ENGINE.final_n_init
    refit_sample: int = _ENGINE.refit_sample
    max_iter: int = _FCM.max_iter
    tol: float = _FCM.tol
    tol_objective: float = _FCM.tol_objective
    host_clusters: int = _ENGINE.host_clusters
    host_threshold: float = _ENGINE.host_threshold
    host_min_positions: int = _ENGINE.host_min_positions
    host_sample_size: int = _ENGINE.host_sample_size
    host_min_components: int = _ENGINE.host_min_components
    host_overlap: float = _ENGINE.host_overlap
    host_mixing: float | None = _ENGINE.host_mixing
    host_merge_effect: float = _ENGINE.host_merge_effect
    host_merge_elements: tuple = _ENGINE.host_merge_elements
    host_spatial: bool = _ENGINE.host_spatial
    thresholds: tuple = _CENTRES.thresholds
    centre_shape: tuple = (32, 32)
    random_state: int | None = _ENGINE.random_state
    cache_features_bytes: int = 2**30
    fan_in: int = 4
    final_pca_sample: int = _ENGINE.final_pca_sample
    flags: bool = True
    flag_params: FlagParams = field(default_factory=FlagParams)

    def __post_init__(self) -> None:
        if not isinstance(self.flag_params, FlagParams):  # None or a mapping of its fields (checked there)
            object.__setattr__(self, "flag_params", FlagParams().replace(**dict(self.flag_params or {})))

    @classmethod
    def from_any(cls, config: ReplayConfig | Mapping | None) -> ReplayConfig:
        """``None`` (defaults), a mapping of field names, or a config."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown replay configuration keys {unknown}; known: {sorted(known)}")
        return cls(**dict(config))

    @classmethod
    def from_params(cls, engine: EngineParams, centres: CentresParams, flags: FlagParams,
                    **replay: Any) -> ReplayConfig:
        """The replay of a scan the live analysis would run with these parameters (the
        configuration's ``[engine]``, ``[centres]``, ``[flags]``); ``replay``: the replay's own
        fields (``pca_method``, ``cache_features_bytes``...)."""
        return cls(**{name: getattr(engine, name) for name in _shared_with_engine()},
                   thresholds=centres.thresholds, flag_params=flags, **replay)

    def engine_params(self) -> EngineParams:
        """The parameters shared with the engine, as the engine's (checked as the engine checks them)."""
        return EngineParams(**{name: getattr(self, name) for name in _shared_with_engine()})

    def validate(self) -> None:
        self.engine_params()
        if self.pca_method not in ("auto", "exact", "sketch"):
            raise ValueError(f"pca_method must be 'auto', 'exact' or 'sketch', got {self.pca_method!r}")
        if int(self.fan_in) < 2 or int(self.refit_sample) < int(self.n_clusters):
            raise ValueError("fan_in >= 2 and refit_sample >= n_clusters are required")


def _shared_with_engine() -> list[str]:
    """The fields of :class:`ReplayConfig` that are the engine's parameters."""
    engine = {f.name for f in fields(EngineParams)}
    return [f.name for f in fields(ReplayConfig) if f.name in engine and f.name not in _NOT_ENGINE]
