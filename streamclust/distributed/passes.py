"""The replay's per-chunk tasks: each reads (or is given) one chunk and returns a small result or a
mergeable partial state (:mod:`streamclust.distributed.mergeable`).

Module-level functions, so they pickle to the Dask workers; each holds BLAS to one thread (the
tasks are the parallelism, docs/streaming-statistics.md). In pass order: reduced features
(:func:`chunk_features`, cached on the workers when they fit), scaling, PCA, scores, level-2
scores, memberships, and the last pass's validity, thresholded-centre and flag sums.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import wraps

import numpy as np
from threadpoolctl import threadpool_limits

from streamclust.cluster.fcm_kernels import predict_memberships, sq_euclidean
from streamclust.cluster.host_refine import HostRefinement, compose_memberships
from streamclust.cluster.validity import ValidityAccumulator
from streamclust.decomposition.incremental_pca import StreamingPCA
from streamclust.decomposition.sample_pca import one_percent_pca
from streamclust.distributed.mergeable import CentreSums, FCMSums
from streamclust.distributed.recording import ChunkRaw, ChunkSpec, RecordingInfo, read_chunk
from streamclust.distributed.replay_config import ReplayConfig
from streamclust.features.block_balance import BlockBalancer
from streamclust.features.reducers import FrameReducer, SpectrumReducer
from streamclust.features.robust_scaling import FeatureMoments
from streamclust.flags.sums import DistancePlan, FoldSums, ProjectionMoments, eds_window, flag_features, scan_fold


def _one_blas_thread(fn: Callable) -> Callable:
    """BLAS held to one thread inside a task: tasks are the parallelism (docs/streaming-statistics.md)."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        with threadpool_limits(1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper


@dataclass
class ChunkFeatures:
    """Reduced features of one chunk's positions that have a frame or a spectrum (raw units)."""

    positions: np.ndarray
    cbed: np.ndarray
    eds: np.ndarray
    has_frame: np.ndarray
    has_spectrum: np.ndarray
    counters: dict


def reducers(info: RecordingInfo, cfg: ReplayConfig) -> tuple[FrameReducer, SpectrumReducer]:
    """The engine's frame and spectrum reducers for this recording (feature counts, EDS energies)."""
    axis = info.energy_axis_kev
    width = axis[1] - axis[0] if len(axis) > 1 else 0.01
    fr = FrameReducer(bin_factor=int(cfg.bin_factor), frame_shape=tuple(info.frame_shape),
                      **dict(cfg.frame_reducer_params or {})).fit()
    sr = SpectrumReducer(energy_window_kev=tuple(cfg.energy_window_kev), rebin=int(cfg.rebin),
                         energy_offset_kev=float(axis[0]), channel_width_kev=float(width),
                         n_channels=int(info.n_channels)).fit()
    return fr, sr


@_one_blas_thread
def chunk_features(info: RecordingInfo, cfg: ReplayConfig, spec: ChunkSpec) -> ChunkFeatures:
    """Read a chunk and reduce it as the engine does (8 x 8 binning, energy window and rebinning)."""
    raw = read_chunk(info, spec)
    keep = raw.has_frame | raw.has_spectrum
    raw.counters["skipped"] += int(np.count_nonzero(~keep))
    fr, sr = reducers(info, cfg)
    hf, hs = raw.has_frame[keep], raw.has_spectrum[keep]
    n = int(np.count_nonzero(keep))
    cbed = np.zeros((n, fr.n_features_out_), dtype=np.float32)
    eds = np.zeros((n, sr.n_features_out_), dtype=np.float32)
    if hf.any():
        cbed[hf] = fr.transform(raw.frames[keep][hf])
    if hs.any():
        eds[hs] = sr.transform(raw.spectra[keep][hs])
    raw.counters["positions"] += n
    raw.counters["incomplete"] += int(np.count_nonzero(~(hf & hs)))
    return ChunkFeatures(raw.positions[keep], cbed, eds, hf, hs, raw.counters)


def _features(src: ChunkFeatures | ChunkSpec, info: RecordingInfo, cfg: ReplayConfig) -> ChunkFeatures:
    """Cached features (a resolved future) or a chunk to read now."""
    return src if isinstance(src, ChunkFeatures) else chunk_features(info, cfg, src)


def _add_counts(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    return {k: int(a.get(k, 0)) + int(b.get(k, 0)) for k in {**a, **b}}


@dataclass
class _ScalingState:
    """Pass 1: the balancer of the complete positions and the chunk counters."""

    balancer: BlockBalancer | None
    counters: dict
    masks: list = field(default_factory=list)  # (positions, has_frame, has_spectrum) per chunk

    def merge(self, other: _ScalingState) -> _ScalingState:
        if other.balancer is not None:
            self.balancer = other.balancer if self.balancer is None else self.balancer.merge(other.balancer)
        self.counters = _add_counts(self.counters, other.counters)
        self.masks = self.masks + other.masks
        return self


@_one_blas_thread
def scaling_partial(src, info: RecordingInfo, cfg: ReplayConfig) -> _ScalingState:
    """Pass 1 on one chunk: robust-scaler histograms and Welford variances of complete positions."""
    feats = _features(src, info, cfg)
    both = feats.has_frame & feats.has_spectrum
    bal = None
    if both.any():
        bal = BlockBalancer(blocks=("cbed", "eds"), scaler_params=cfg.scaler_params)
        bal.partial_fit({"cbed": feats.cbed[both], "eds": feats.eds[both]})
    # which positions have which signal: the engine's refresh schedule and the flags' scanned mask
    masks = [(feats.positions.astype(np.int64), feats.has_frame.copy(), feats.has_spectrum.copy())]
    return _ScalingState(bal, dict(feats.counters), masks)


def _scaled(feats: ChunkFeatures, multiplier: np.ndarray, centre: np.ndarray, n_cbed: int) -> np.ndarray:
    """``concat(cbed, eds) * c`` in float32 with a missing block at its median (the engine's rule:
    scaled value 0, no contribution to that block's distances)."""
    x = np.concatenate([feats.cbed, feats.eds], axis=1)
    hf, hs = feats.has_frame, feats.has_spectrum
    if not hf.all():
        x[~hf, :n_cbed] = centre[:n_cbed]
    if not hs.all():
        x[~hs, n_cbed:] = centre[n_cbed:]
    x *= multiplier.astype(np.float32)
    return x


def _new_pca(cfg: ReplayConfig, n_features: int) -> StreamingPCA:
    # the engine reads max_components + 1 directions (the 1 % rule needs to see the next one)
    n_read = min(int(cfg.max_components) + 1, n_features)
    return StreamingPCA(max_components=n_read, min_explained_ratio=float(cfg.min_explained_ratio),
                        method=cfg.pca_method, sketch_rank=max(int(cfg.sketch_rank), n_read),
                        exact_max_features=int(cfg.exact_max_features), gram_dtype=cfg.pca_gram_dtype)


def _complete_scaled(src, info: RecordingInfo, cfg: ReplayConfig, scaling: dict) -> np.ndarray | None:
    """One chunk's complete positions (frame and spectrum) at the final scales, or None."""
    feats = _features(src, info, cfg)
    both = feats.has_frame & feats.has_spectrum
    if not both.any():
        return None
    return _scaled(feats, scaling["multiplier"], scaling["centre"], scaling["n_cbed"])[both]


@_one_blas_thread
def pca_partial(src, info: RecordingInfo, cfg: ReplayConfig, scaling: dict) -> StreamingPCA | None:
    """Pass 2 on one chunk: PCA state of the complete positions at the final scales."""
    x = _complete_scaled(src, info, cfg, scaling)
    if x is None:
        return None
    pca = _new_pca(cfg, x.shape[1])
    return pca.partial_fit(x, warmup_multiplier=scaling["multiplier"])


@_one_blas_thread
def pca_readout(pca: StreamingPCA, cfg: ReplayConfig) -> dict:
    """The 1 % rule read-out of the merged PCA (on a worker: the exact scatter stays there)."""
    k = int(min(pca.n_components_, int(cfg.max_components)))
    return {
        "components": pca.components_all_[:k].copy(),
        "mean": pca.mean_.copy(),
        "explained_variance_ratio": pca.explained_variance_ratio_all_[:k].copy(),
        "explained_variance_ratio_all": pca.explained_variance_ratio_all_.copy(),
        "n_components": k,
        "method": pca.method_,
        "n_samples": int(pca.n_samples_seen_),
    }


@dataclass
class ChunkScores:
    positions: np.ndarray
    scores: np.ndarray


@_one_blas_thread
def chunk_scores(src, info: RecordingInfo, cfg: ReplayConfig, scaling: dict, projection: dict) -> ChunkScores:
    """Pass 3: PCA scores ``x c V - mean V`` (float32, as the engine's store projects them)."""
    feats = _features(src, info, cfg)
    x = _scaled(feats, scaling["multiplier"], scaling["centre"], scaling["n_cbed"])
    Z = x @ projection["P"]
    Z += projection["p0"]
    return ChunkScores(feats.positions, Z)


def concat_scores(chunks: Sequence[ChunkScores]) -> ChunkScores:
    """Scores of consecutive chunks as one block: the FCM passes then run one task per group."""
    return ChunkScores(np.concatenate([c.positions for c in chunks]), np.concatenate([c.scores for c in chunks]))


@_one_blas_thread
def chunk_vectors(src, info: RecordingInfo, cfg: ReplayConfig, scaling: dict, positions: np.ndarray) -> np.ndarray:
    """Scaled vectors ``x * c`` (float32) of the given positions of one chunk (the host sample)."""
    feats = _features(src, info, cfg)
    rows = np.searchsorted(feats.positions, positions)
    return _scaled(feats, scaling["multiplier"], scaling["centre"], scaling["n_cbed"])[rows]


@_one_blas_thread
def fit_host_space(parts: Sequence[np.ndarray], n_cbed: int, params: dict) -> HostRefinement:
    """Level 2: the host's own scaling, balance and PCA (:mod:`streamclust.cluster.host_refine`) on its sample."""
    return HostRefinement(n_cbed, **params).fit_space(np.concatenate(parts))


@_one_blas_thread
def chunk_affine_scores(src, info: RecordingInfo, cfg: ReplayConfig, scaling: dict, A: np.ndarray,
                        b: np.ndarray) -> ChunkScores:
    """Level-2 scores ``(x c) A - b`` of every position of one chunk."""
    feats = _features(src, info, cfg)
    Z = _scaled(feats, scaling["multiplier"], scaling["centre"], scaling["n_cbed"]) @ A
    Z -= b
    return ChunkScores(feats.positions, Z)


def select_positions(chunk: ChunkScores, positions: np.ndarray) -> ChunkScores:
    rows = np.searchsorted(chunk.positions, positions)
    return ChunkScores(chunk.positions[rows], chunk.scores[rows])


@_one_blas_thread
def chunk_compose(level1: ChunkResult, host_u2: ChunkScores | None, host: int | None, n_sub: int) -> ChunkResult:
    """Two-level memberships (the engine's product rule) from the level-2 memberships of the
    chunk's positions (:func:`_level2_memberships`); without a level-2 model the sub-columns are 0."""
    U2 = None
    if host_u2 is not None:
        rows = np.searchsorted(host_u2.positions, level1.positions)
        U2 = host_u2.scores[rows]
    return ChunkResult(level1.positions, compose_memberships(level1.memberships, U2, host, int(n_sub)))


def score_moments(chunk: ChunkScores) -> FeatureMoments:
    return FeatureMoments(ddof=0).update(chunk.scores)


def score_rows(chunk: ChunkScores, rows: np.ndarray | None = None) -> np.ndarray:
    return chunk.scores if rows is None else chunk.scores[rows]


def n_rows(chunk: ChunkScores) -> int:
    return int(chunk.positions.size)


@_one_blas_thread
def fcm_sums(chunk: ChunkScores, centres: np.ndarray, m: float) -> FCMSums:
    return FCMSums.from_data(chunk.scores, centres, m=m)


@dataclass
class ChunkResult:
    positions: np.ndarray
    memberships: np.ndarray


@dataclass
class _FinalState:
    validity: ValidityAccumulator
    centres: CentreSums | None
    folds: FoldSums | None = None
    both: list = field(default_factory=list)  # (positions, has both signals) per chunk

    def merge(self, other: _FinalState) -> _FinalState:
        self.validity += other.validity
        self.both = self.both + other.both
        if other.centres is not None:
            self.centres = other.centres if self.centres is None else self.centres.merge(other.centres)
        if other.folds is not None:
            self.folds = other.folds if self.folds is None else self.folds.merge(other.folds)
        return self


@dataclass
class _FlagMoments:
    """Projection moments of both flag blocks (:class:`~streamclust.flags.sums.ProjectionMoments`)."""

    cbed: ProjectionMoments
    eds: ProjectionMoments

    def merge(self, other: _FlagMoments) -> _FlagMoments:
        self.cbed.merge(other.cbed)
        self.eds.merge(other.eds)
        return self


def _chunk_flag_inputs(result: ChunkResult, raw: ChunkRaw, info: RecordingInfo, cfg: ReplayConfig,
                       spec: ChunkSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Memberships, folds and binned patterns of the chunk's positions with both signals."""
    both = raw.has_frame & raw.has_spectrum
    u = np.full((raw.positions.size, result.memberships.shape[1]), np.nan, dtype=np.float32)
    u[result.positions - spec.start] = result.memberships
    h, w = info.frame_shape
    b = max(1, min(h, w) // int(cfg.centre_shape[0]))
    reducer = FrameReducer(bin_factor=b, frame_shape=(h, w)).fit()
    shape = (h // b, w // b)
    binned = reducer.transform(raw.frames[both]).reshape(-1, *shape)
    return both, u[both], binned, raw.spectra[both], scan_fold(raw.positions[both], info.scan_shape[1])


@_one_blas_thread
def chunk_flag_moments(result: ChunkResult, info: RecordingInfo, cfg: ReplayConfig, spec: ChunkSpec,
                       plan: DistancePlan) -> _FlagMoments | None:
    """Second flag pass: moments of the chunk's projections on the fitted directions (frames re-read)."""
    raw = read_chunk(info, spec)
    both, u, binned, spectra, fold = _chunk_flag_inputs(result, raw, info, cfg, spec)
    if not both.any():
        return None
    cbed, eds = flag_features(binned, spectra, eds_window(np.asarray(info.energy_axis_kev)))
    member = np.nan_to_num(u.astype(np.float64)) > cfg.flag_params.membership_threshold
    return _FlagMoments(*plan.moments(member, fold, cbed, eds))


@_one_blas_thread
def chunk_memberships(chunk: ChunkScores, centres: np.ndarray, m: float) -> ChunkResult:
    """Pass 4: memberships (float32, as the engine stores them)."""
    U, _ = predict_memberships(np.ascontiguousarray(chunk.scores), centres, float(m))
    return ChunkResult(chunk.positions, U.astype(np.float32))


@_one_blas_thread
def chunk_final(result: ChunkResult, level1: ChunkResult | None, chunk: ChunkScores | None, info: RecordingInfo,
                cfg: ReplayConfig, centres: np.ndarray | None, spec: ChunkSpec) -> _FinalState:
    """Last pass: validity sums (level 1, as the engine's ``validity_``; skipped without
    ``level1``), thresholded-centre sums of the output memberships (frames re-read, binned as the
    live analysis stores them) and, with ``cfg.flags``, the flags' per-fold sums."""
    acc = ValidityAccumulator(m=float(cfg.m))
    if level1 is not None and chunk is not None and chunk.scores.shape[0]:
        acc.update(level1.memberships, sq_euclidean(np.ascontiguousarray(chunk.scores), centres))
    raw = read_chunk(info, spec)
    both, u, binned, spectra, fold = _chunk_flag_inputs(result, raw, info, cfg, spec)
    masks = [(raw.positions, both)]
    if not both.any():
        return _FinalState(acc, None, None, masks)
    sums = CentreSums.from_data(u, binned, spectra, thresholds=tuple(cfg.thresholds),
                                cbed_shape=binned.shape[1:])
    folds = None
    if cfg.flags:
        cbed, eds = flag_features(binned, spectra, eds_window(np.asarray(info.energy_axis_kev)))
        member = np.nan_to_num(u.astype(np.float64)) > cfg.flag_params.membership_threshold
        folds = FoldSums.from_data(member, fold, cbed, eds)
    return _FinalState(acc, sums, folds, masks)


@_one_blas_thread
def complete_moments(src, info: RecordingInfo, cfg: ReplayConfig, scaling: dict) -> FeatureMoments | None:
    """Per-feature moments of one chunk's complete positions at the final scales (the PCA mean)."""
    x = _complete_scaled(src, info, cfg, scaling)
    if x is None:
        return None
    acc = FeatureMoments(ddof=0)
    for i in range(0, x.shape[0], 1024):  # float64 copies of 1,024 rows at a time, not of the chunk
        acc.update(x[i:i + 1024])
    return acc


@_one_blas_thread
def fit_sample_pca(parts: Sequence[np.ndarray], mean: np.ndarray, cfg: ReplayConfig, seed: int) -> dict:
    """The engine's final PCA (:func:`streamclust.decomposition.sample_pca.one_percent_pca`) of the sampled rows;
    the mean is all complete positions' (the engine's streaming mean), as the scores use it."""
    X = np.concatenate(parts)
    res = one_percent_pca(X, max_components=int(cfg.max_components), min_explained_ratio=float(cfg.min_explained_ratio),
                          random_state=int(seed))
    k = int(res.n_components)
    return {
        "components": res.components[:, :k].T.copy(),
        "mean": np.asarray(mean, dtype=np.float64),
        "explained_variance_ratio": res.explained_variance_ratio[:k].copy(),
        "explained_variance_ratio_all": res.explained_variance_ratio.copy(),
        "n_components": k,
        "method": "sample",
        "n_samples": int(X.shape[0]),
    }
