"""Replay a recorded scan on Dask distributed: chunks read on the workers, merged statistics, passes.

A recorded scan (Merlin ``.mib`` + ``.hdr`` and the EDS recording, ``docs/wire-formats.md``) too
large for one machine is re-analysed in chunks of scan positions. Every task opens the files itself
(the ``.mib`` memory-mapped with :class:`~streamclust.adapters.mib.MibFile`, the spectra as an HDF5
row slice) and returns a *partial state*; states are merged in a tree (:mod:`streamclust.distributed.mergeable`)
and the client only ever holds merged, small results. The passes compute what the single-process
engine holds after :meth:`~streamclust.engine.streaming.StreamingEngine.finalize`:

1. **scaling**: per-block robust scalers and Welford variances (``BlockBalancer``) on the complete
   positions -> the final multiplier ``c`` and centre (block medians);
2. **PCA** of ``x * c`` (exact scatter, or the sketch) -> the 1 % rule read-out. The engine
   accumulates in its warm-up space and reads out with ``D = c_now / c_warm``; with the exact
   accumulator both are the PCA of the data at the final scales, which is what is computed here;
3. **scores** ``x c V - mean V`` of every position, kept on the workers (``n x k`` floats);
4. **fuzzy C-means**: ``final_n_init`` k-means++ restarts on at most ``refit_sample`` positions
   (gathered, as the engine's final re-fit does), refined on all positions by distributed passes
   (:class:`~streamclust.distributed.mergeable.FCMSums`) with the engine's stopping rule, then the one extra
   pass the engine's mini-batch model makes from the refreshed centres;
5. **level 2** (``host_clusters`` > 0, as the engine's :mod:`~streamclust.cluster.host_refine`): the host
   (largest total membership) is re-scaled and projected on a sample of its clear positions
   (``HostRefinement.fit_space`` on a worker), its positions are clustered as in 4, and every
   position's memberships are composed by the product rule;
6. **memberships, validity and thresholded centres** per chunk (frames re-read and binned to
   32 x 32, as the live analysis stores them), merged;
7. **second-phase flags** (``cfg.flags``): the live analysis' end-of-scan assessment, with the block
   distances from mergeable per-fold sums (:mod:`streamclust.flags.sums`; the sums share pass 6,
   the projections on the fitted directions are one more pass) and the map-level criteria on the
   client (:class:`~streamclust.flags.flagger.SecondPhaseFlagger` through its ``block_distances`` hook).

Reduced features are cached on the workers between passes when they fit ``cache_features_bytes``;
otherwise each pass re-reads its chunk. Results go to ``out_dir/results.hspy``.

The seed is the engine's final one, :func:`streamclust.engine.streaming.final_seed` (the first draw of
``RandomState(random_state)``, independent of the scan's history: batches, scheduled and drift
refreshes). Level 2 on a small host has near-equal FCM optima, so another seed is another split
of the host (ARI 0.96 against the single-process replay when the two seeds differed). What still differs from the
streaming engine (``docs/dask.md``): its final refresh also runs a warm start from its live
memberships and keeps the lower objective; its host choice prefers the previous refresh's host
(``host_group(previous=...)``); the flags have no history (a flag raised earlier in the scan and
retracted is not in the replay's log; a flag kept only by hysteresis is not raised).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import wraps
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from threadpoolctl import threadpool_limits

from streamclust.adapters.eds_file import EDSRecordingError
from streamclust.adapters.errors import ProtocolError
from streamclust.adapters.mib import MibFile

from streamclust.features.block_balance import BlockBalancer
from streamclust.cluster.merge import line_count_map, merge_columns, merge_same_composition
from streamclust.engine.centres import centre_signals
from streamclust.engine.params import CentresParams, EngineParams
from streamclust.engine.streaming import final_seed
from streamclust.features.reducers import FrameReducer, SpectrumReducer
from streamclust.cluster.fcm import FuzzyCMeans
from streamclust.cluster.fcm_kernels import predict_memberships, sq_euclidean
from streamclust.cluster.host_refine import HostRefinement, compose_memberships, host_group
from streamclust.decomposition.incremental_pca import StreamingPCA
from streamclust.decomposition.sample_pca import one_percent_pca
from streamclust.flags.flagger import SecondPhaseFlagger
from streamclust.flags.params import FlagParams
from streamclust.flags.sums import DistancePlan, FoldSums, ProjectionMoments, eds_window, flag_features, pair_distances, scan_fold
from streamclust.distributed.mergeable import CentreSums, FCMSums, merge_all, merge_into
from streamclust.cluster.spatial_pool import membership_mixing, spatial_memberships
from streamclust.results.writer import RESULTS_NAME, ResultsWriter
from streamclust.features.robust_scaling import FeatureMoments
from streamclust.results.scan_result import ScanResult, summarise_flags
from streamclust.cluster.validity import ValidityAccumulator

logger = logging.getLogger(__name__)

__all__ = ["ReplayConfig", "RecordingInfo", "probe_recording", "replay_dask", "replay_flags",
           "replay_local"]


# -------------------------------------------------------------------------------------------------
# configuration and the recording
# -------------------------------------------------------------------------------------------------
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

    def engine_params(self) -> EngineParams:
        """The parameters shared with the engine, as the engine's (checked as the engine checks them)."""
        engine = {f.name for f in fields(EngineParams)}
        return EngineParams(**{f.name: getattr(self, f.name) for f in fields(self)
                               if f.name in engine and f.name not in _NOT_ENGINE})

    def validate(self) -> None:
        self.engine_params()
        if self.pca_method not in ("auto", "exact", "sketch"):
            raise ValueError(f"pca_method must be 'auto', 'exact' or 'sketch', got {self.pca_method!r}")
        if int(self.fan_in) < 2 or int(self.refit_sample) < int(self.n_clusters):
            raise ValueError("fan_in >= 2 and refit_sample >= n_clusters are required")


@dataclass(frozen=True)
class RecordingInfo:
    """What a task needs to read its chunk: paths and the validated layout of both files."""

    mib_path: str
    eds_path: str
    scan_shape: tuple
    n_positions: int
    n_frames: int
    frame_shape: tuple
    n_channels: int
    energy_axis_kev: tuple = field(repr=False)


def _eds_dataset(f: h5py.File, path: str) -> h5py.Dataset:
    group = f.get("eds")
    if not isinstance(group, h5py.Group) or group.attrs.get("format") not in ("streamclust-eds", b"streamclust-eds"):
        raise EDSRecordingError(f"{path}: no /eds group of format 'streamclust-eds'")
    if int(group.attrs.get("version", -1)) != 1:
        raise EDSRecordingError(f"{path}: /eds version {group.attrs.get('version')!r} is not supported (expected 1)")
    dset = group.get("spectra")
    if not isinstance(dset, h5py.Dataset) or dset.ndim != 3 or dset.dtype.kind not in "ui":
        raise EDSRecordingError(f"{path}: /eds/spectra must be an integer (ny, nx, channels) dataset")
    return dset


def probe_recording(mib_path: str | os.PathLike, eds_path: str | os.PathLike) -> RecordingInfo:
    """Validate both files' headers and layouts without reading the data (client side).

    The scan shape comes from the ``.hdr`` (``ScanX``/``ScanY``) when present, else from the EDS
    recording; both must agree when both give one. A ``.mib`` holding fewer frames than positions
    (a truncated recording) is accepted: the missing positions have no frame.

    Raises
    ------
    HeaderError, PixelDataError
        From :class:`~streamclust.adapters.mib.MibFile` (with the byte offset).
    EDSRecordingError
        Not a streamclust EDS recording, or a scan shape that disagrees with the ``.mib``'s.
    """
    mib_path, eds_path = os.fspath(mib_path), os.fspath(eds_path)
    with MibFile(mib_path, on_truncated="skip") as mf:
        n_frames = len(mf)
        frame_shape = tuple(int(v) for v in mf.image_shape)
        mib_scan = mf.acquisition_header.scan_shape if mf.acquisition_header is not None else None
    if not os.path.exists(eds_path):
        raise FileNotFoundError(eds_path)
    with h5py.File(eds_path, "r") as f:
        dset = _eds_dataset(f, eds_path)
        ny, nx, nch = (int(v) for v in dset.shape)
        attrs = dset.attrs
        try:
            width = float(attrs["channel_width_kev"])
            offset = float(attrs["energy_offset_kev"])
        except KeyError as exc:
            raise EDSRecordingError(f"{eds_path}: /eds/spectra lacks attribute {exc}") from None
        axis_ds = f["eds"].get("energy_axis_kev")
        if isinstance(axis_ds, h5py.Dataset) and axis_ds.shape == (nch,):
            axis = np.asarray(axis_ds[()], dtype=np.float64)
        else:
            axis = offset + width * np.arange(nch, dtype=np.float64)
    scan = (ny, nx)
    if mib_scan is not None and tuple(int(v) for v in mib_scan) != scan:
        raise EDSRecordingError(f"{eds_path}: scan shape {scan} differs from {mib_path}'s header {tuple(mib_scan)}")
    n = ny * nx
    if n_frames > n:
        logger.warning("%s holds %d frames for %d positions: the extra frames are ignored", mib_path, n_frames, n)
    return RecordingInfo(mib_path, eds_path, scan, n, min(n_frames, n), frame_shape, nch,
                         tuple(float(v) for v in axis))


# -------------------------------------------------------------------------------------------------
# chunk tasks (run on the workers; module-level so they pickle)
# -------------------------------------------------------------------------------------------------
def _one_blas_thread(fn: Callable) -> Callable:
    """BLAS held to one thread inside a task: tasks are the parallelism (docs/streaming-statistics.md)."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        with threadpool_limits(1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class ChunkSpec:
    """Positions ``start <= p < stop`` of the scan."""

    start: int
    stop: int


@dataclass
class ChunkRaw:
    positions: np.ndarray
    frames: np.ndarray
    spectra: np.ndarray
    has_frame: np.ndarray
    has_spectrum: np.ndarray
    counters: dict


@dataclass
class ChunkFeatures:
    """Reduced features of one chunk's positions that have a frame or a spectrum (raw units)."""

    positions: np.ndarray
    cbed: np.ndarray
    eds: np.ndarray
    has_frame: np.ndarray
    has_spectrum: np.ndarray
    counters: dict


def read_chunk(info: RecordingInfo, spec: ChunkSpec) -> ChunkRaw:
    """Read the frames and spectra of ``spec``'s positions (frames memory-mapped, spectra sliced).

    A frame whose header is damaged is skipped, counted (``bad_frames``) and logged with its byte
    offset; positions past the end of a truncated ``.mib`` have no frame; spectra follow the
    recording's ``acquired`` mask.
    """
    start, stop = int(spec.start), int(spec.stop)
    if not 0 <= start <= stop <= info.n_positions:
        raise ValueError(f"chunk {start}..{stop} outside the scan's 0..{info.n_positions}")
    n = stop - start
    pos = np.arange(start, stop, dtype=np.int64)
    counters = dict.fromkeys(_COUNTERS, 0)
    has_frame = pos < info.n_frames
    with MibFile(info.mib_path, on_truncated="skip") as mf:
        frames = np.zeros((n, *info.frame_shape), dtype=mf.image_dtype)
        for i in np.flatnonzero(has_frame):
            try:
                mf.frame(int(pos[i]), out=frames[i])
            except ProtocolError as exc:
                has_frame[i] = False
                counters["bad_frames"] += 1
                key = f"bad_frames_{exc.reason}"
                counters[key] = counters.get(key, 0) + 1
                logger.warning("position %d: frame skipped (%s)", int(pos[i]), exc)
    counters["missing_frames"] += int(np.count_nonzero(~has_frame))
    ny, nx = info.scan_shape
    with h5py.File(info.eds_path, "r") as f:
        dset = _eds_dataset(f, info.eds_path)
        if tuple(dset.shape) != (ny, nx, info.n_channels):
            raise EDSRecordingError(f"{info.eds_path}: /eds/spectra changed shape to {dset.shape}")
        y0, y1 = start // nx, -(-stop // nx)
        lo, hi = start - y0 * nx, stop - y0 * nx
        spectra = np.asarray(dset[y0:y1]).reshape(-1, info.n_channels)[lo:hi]
        acq_ds = f["eds"].get("acquired")
        if isinstance(acq_ds, h5py.Dataset) and acq_ds.shape == (ny, nx):
            has_spectrum = np.asarray(acq_ds[y0:y1], dtype=bool).reshape(-1)[lo:hi].copy()
        else:
            has_spectrum = np.ones(n, dtype=bool)
    counters["missing_spectra"] += int(np.count_nonzero(~has_spectrum))
    return ChunkRaw(pos, frames, spectra, has_frame, has_spectrum, counters)


def _reducers(info: RecordingInfo, cfg: ReplayConfig) -> tuple[FrameReducer, SpectrumReducer]:
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
    fr, sr = _reducers(info, cfg)
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


_COUNTERS = ("positions", "incomplete", "skipped", "missing_frames", "bad_frames", "missing_spectra")


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


# -------------------------------------------------------------------------------------------------
# executors: Dask, or in-process (the same tasks, for a one-machine run and as the tests' yardstick)
# -------------------------------------------------------------------------------------------------
class _LocalBackend:
    """Runs every task at once in this process; handles are the values."""

    n_workers = 1

    def map(self, fn, *iterables, **kwargs):
        return [fn(*args, **kwargs) for args in zip(*iterables)]

    def submit(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    def share(self, obj):
        return obj

    def gather(self, handles):
        return list(handles)


class _DaskBackend:
    def __init__(self, client) -> None:
        self.client = client
        self.n_workers = len(client.scheduler_info().get("workers", {})) or 1

    def map(self, fn, *iterables, **kwargs):
        return self.client.map(fn, *iterables, pure=False, **kwargs)

    def submit(self, fn, *args, **kwargs):
        return self.client.submit(fn, *args, pure=False, **kwargs)

    def share(self, obj):
        # sent to every worker once instead of once per task
        # (wrapped in a list: scatter would split a dict into one future per value)
        return self.client.scatter([obj], broadcast=True, hash=False)[0]

    def gather(self, handles):
        return self.client.gather(list(handles))


def fold_chunks(fn: Callable, sources: Sequence, *args) -> Any:
    """Apply ``fn(source, *args)`` to each chunk in turn, merging each partial state into one
    accumulator as soon as it exists: a task holds one large state (histograms, scatter), not one
    per chunk."""
    acc = None
    for src in sources:
        acc = merge_into(acc, fn(src, *args))
    return acc


def _grouped(backend, fn: Callable, sources: Sequence, *args) -> list:
    """One task per group of consecutive chunks (twice as many groups as workers, for balance):
    the number of large partial states alive at once is bounded by the groups, not the chunks."""
    n_groups = min(len(sources), max(1, 2 * int(backend.n_workers)))
    groups = [list(g) for g in np.array_split(np.arange(len(sources)), n_groups)]
    return [backend.submit(fold_chunks, fn, [sources[i] for i in g], *args) for g in groups]


def _tree_reduce(backend, handles: Sequence, fan_in: int):
    """Merge partial states ``fan_in`` at a time until one is left (on the workers)."""
    handles = list(handles)
    if not handles:
        raise ValueError("nothing to merge")
    while len(handles) > 1:
        handles = [backend.submit(merge_all, handles[i:i + fan_in]) for i in range(0, len(handles), fan_in)]
    return handles[0]


# -------------------------------------------------------------------------------------------------
# the replay
# -------------------------------------------------------------------------------------------------
def _fit_fcm(backend, scores: Sequence, sizes: np.ndarray, n_clusters: int, cfg: ReplayConfig,
             rs: np.random.RandomState, *, moments: FeatureMoments | None, extra_pass: bool) -> dict[str, Any]:
    """The engine's final re-fit on distributed scores: ``final_n_init`` k-means++ restarts on all
    scores (at most ``refit_sample``) or a seeded sample of them, then merged FCM passes over all
    positions to convergence; ``extra_pass``: the one pass the engine's mini-batch model makes from
    the refreshed centres."""
    k = len(scores)
    m = float(cfg.m)
    # an FCM pass is a round trip: one task per group of chunks (n x k floats, cheap to move)
    n_groups = min(k, max(1, 2 * int(backend.n_workers)))
    grouped = [backend.submit(concat_scores, [scores[i] for i in g]) for g in np.array_split(np.arange(k), n_groups)]
    kg = len(grouped)
    n_total = int(sizes.sum())
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if n_total <= int(cfg.refit_sample):
        sample = np.concatenate(backend.gather(backend.map(score_rows, grouped)))
        whole = True
    else:
        idx = np.sort(rs.choice(n_total, int(cfg.refit_sample), replace=False))
        chunk_of = np.searchsorted(offsets, idx, side="right") - 1
        parts = [backend.submit(score_rows, scores[c], idx[chunk_of == c] - offsets[c]) for c in np.unique(chunk_of)]
        sample = np.concatenate(backend.gather(parts))
        whole = False
    seeded = FuzzyCMeans(n_clusters, m=m, n_init=int(cfg.final_n_init), max_iter=int(cfg.max_iter),
                         tol=float(cfg.tol), tol_objective=float(cfg.tol_objective), random_state=rs).fit(sample)
    V = seeded.cluster_centers_
    n_iter, converged, J = (int(seeded.n_iter_) if whole else 0), True, float(seeded.objective_)

    def one_pass(V):
        return backend.gather([_tree_reduce(backend, backend.map(fcm_sums, grouped, [V] * kg, [m] * kg),
                                            int(cfg.fan_in))])[0]

    if not whole:
        if moments is None:
            moments = backend.gather([_tree_reduce(backend, backend.map(score_moments, grouped), int(cfg.fan_in))])[0]
        tol_shift = float(cfg.tol) * float(np.mean(moments.m2_ / moments.n_))
        J_prev = np.inf
        converged = False
        for n_iter in range(1, int(cfg.max_iter) + 1):
            sums = one_pass(V)
            V, shift = sums.step()
            J = sums.objective
            if shift <= tol_shift or (cfg.tol_objective > 0 and abs(J_prev - J) <= float(cfg.tol_objective) * abs(J)):
                converged = True
                break
            J_prev = J
        if not converged:
            logger.info("FCM refinement stopped at max_iter=%d before reaching tol", cfg.max_iter)
    if extra_pass:
        sums = one_pass(V)
        J = float(sums.objective)
        V, _ = sums.step()
    return {"centres": V, "objective": J, "n_iter": n_iter, "converged": converged}


def _refine_host(backend, U1: np.ndarray, src: Sequence, specs: Sequence[ChunkSpec], info_h, cfg: ReplayConfig,
                 cfg_h, scaling_h, n_cbed: int, seed: int, scan_shape=None,
                 eds_energies_kev: np.ndarray | None = None) -> dict[str, Any] | None:
    """Level 2 as :meth:`StreamingEngine._refine_host` does it at ``finalize``: the host (largest
    total membership) re-scaled, projected and clustered among its clear positions."""
    k2 = int(cfg.host_clusters)
    mixing = None
    if scan_shape is not None and cfg.host_mixing:
        mixing = membership_mixing(U1, tuple(scan_shape))
    host, group = host_group(U1, overlap=float(cfg.host_overlap), mixing=mixing,
                             min_mixing=float(cfg.host_mixing or 0.0))  # as the engine
    inside = np.flatnonzero(np.nan_to_num(U1[:, list(group)]).sum(axis=1) > float(cfg.host_threshold))
    if inside.size < max(int(cfg.host_min_positions), 4 * k2):
        logger.info("host cluster %d has %d clear positions: no level-2 refinement", host, inside.size)
        return None
    rs = np.random.RandomState(seed)
    sample = inside
    if inside.size > int(cfg.host_sample_size):
        sample = np.sort(rs.choice(inside, int(cfg.host_sample_size), replace=False))
    starts = np.array([sp.start for sp in specs])
    stops = np.array([sp.stop for sp in specs])
    chunk_of = np.searchsorted(starts, sample, side="right") - 1
    k = len(specs)
    parts = [backend.submit(chunk_vectors, src[c], info_h, cfg_h, scaling_h, sample[chunk_of == c])
             for c in np.unique(chunk_of)]
    params = dict(n_clusters=k2, threshold=float(cfg.host_threshold), min_components=int(cfg.host_min_components),
                  max_components=int(cfg.max_components), min_explained_ratio=float(cfg.min_explained_ratio),
                  sample_size=int(cfg.host_sample_size), m=float(cfg.m), random_state=seed)
    space = backend.gather([backend.submit(fit_host_space, parts, n_cbed, params)])[0]
    A, b = space.affine()
    A_h, b_h = backend.share(A), backend.share(b)
    all_scores = backend.map(chunk_affine_scores, src, [info_h] * k, [cfg_h] * k, [scaling_h] * k, [A_h] * k,
                             [b_h] * k)
    chunk_in = [inside[(inside >= a) & (inside < z)] for a, z in zip(starts, stops)]
    keep = [i for i in range(k) if chunk_in[i].size]
    inside_scores = [backend.submit(select_positions, all_scores[i], chunk_in[i]) for i in keep]
    sizes = np.array([chunk_in[i].size for i in keep], dtype=np.int64)
    fit = _fit_fcm(backend, inside_scores, sizes, k2, cfg, rs, moments=None, extra_pass=False)
    # the level-2 memberships of every position on the driver: a few floats a position, and the
    # merge and the spatial step need the scan's grid (the engine decides on the same scores)
    every = backend.gather(all_scores)
    lines = None
    W = line_count_map(n_cbed, eds_energies_kev, tuple(cfg.host_merge_elements)) if (
        scan_shape is not None and eds_energies_kev is not None and float(cfg.host_merge_effect) > 0) else None
    if W is not None:
        # the clear host's element-line counts (a few integers a position), as the engine reads
        # them from its store: raw features times the line map
        W_h, zero_h = backend.share(W), backend.share(np.zeros(W.shape[1], np.float32))
        counted = [backend.submit(select_positions, backend.submit(chunk_affine_scores, src[i], info_h, cfg_h,
                                                                   scaling_h, W_h, zero_h), chunk_in[i])
                   for i in keep]
        lines = np.clip(np.rint(np.concatenate([c.scores for c in backend.gather(counted)])), 0, None).astype(np.int64)
    merged_into, u2 = _level2_memberships(every, inside, fit["centres"], cfg, k2, scan_shape, lines)
    logger.info("host %s refined: %d positions, %d components", group, inside.size, space.n_components_)
    return {"host": host, "group": tuple(int(h) for h in group), "n_inside": int(inside.size), "space": space,
            "centres": fit["centres"], "merged_into": merged_into, "u2": u2, "objective": fit["objective"], "n_iter": fit["n_iter"]}


def _level2_memberships(chunks: Sequence[ChunkScores], inside: np.ndarray, centres: np.ndarray, cfg: ReplayConfig,
                        k2: int, scan_shape, lines: np.ndarray | None) -> tuple[np.ndarray, list[ChunkScores]]:
    """The final level-2 memberships per chunk, as the engine's final refresh makes them: predicted
    from the centres, sub-clusters that are one region summed (:mod:`streamclust.cluster.merge`),
    then the spatial step (:func:`streamclust.cluster.spatial_pool.spatial_memberships`)."""
    positions = np.concatenate([c.positions for c in chunks])
    U2, _ = predict_memberships(np.ascontiguousarray(np.concatenate([c.scores for c in chunks])), centres,
                                float(cfg.m))
    clear = np.isin(positions, inside)
    merged_into = np.arange(k2)
    if lines is not None:
        # lines: the clear host's, in position order, as positions[clear]
        merged_into = merge_same_composition(lines, positions[clear], np.argmax(U2[clear], axis=1),
                                             tuple(scan_shape), k2, float(cfg.host_merge_effect))
    U2 = merge_columns(U2, merged_into)
    if scan_shape is not None and cfg.host_spatial:
        U2 = spatial_memberships(U2, positions, clear, tuple(scan_shape))
    out, s0 = [], 0
    for c in chunks:
        out.append(ChunkScores(c.positions, U2[s0:s0 + c.positions.size]))
        s0 += c.positions.size
    return merged_into, out


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


def _sample_pca(backend, src: Sequence, specs: Sequence[ChunkSpec], info_h, cfg_h, scaling_h, complete: np.ndarray,
                cfg: ReplayConfig, seed: int) -> dict | None:
    """The PCA as the engine's final refresh takes it (``final_pca_sample``): a randomized PCA of at
    most ``final_pca_sample`` complete positions (the same seeded sample as the engine draws) at
    the final scales, gathered on one worker; None with fewer than two complete positions."""
    pool = np.flatnonzero(complete)
    size = int(cfg.final_pca_sample)
    if pool.size < 2:
        return None
    sample = pool if pool.size <= size else np.sort(np.random.RandomState(seed).choice(pool, size, replace=False))
    moments = backend.gather([_tree_reduce(backend, backend.map(complete_moments, src, [info_h] * len(src),
                                                                [cfg_h] * len(src), [scaling_h] * len(src)),
                                           int(cfg.fan_in))])[0]
    starts = np.array([sp.start for sp in specs])
    chunk_of = np.searchsorted(starts, sample, side="right") - 1
    parts = [backend.submit(chunk_vectors, src[c], info_h, cfg_h, scaling_h, sample[chunk_of == c])
             for c in np.unique(chunk_of)]
    return backend.gather([backend.submit(fit_sample_pca, parts, moments.mean_, cfg_h, seed)])[0]


def _signal_masks(masks: Sequence, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole-scan ``has_frame`` and ``has_spectrum`` from the chunks' (positions, masks)."""
    has_frame = np.zeros(n, bool)
    has_spectrum = np.zeros(n, bool)
    for pos, hf, hs in masks:
        has_frame[pos] = hf
        has_spectrum[pos] = hs
    return has_frame, has_spectrum


def _assess_flags(backend, info: RecordingInfo, cfg: ReplayConfig, cfg_h, info_h, U: np.ndarray,
                  scanned: np.ndarray, folds: FoldSums, centre_set, outputs: Sequence, specs: Sequence[ChunkSpec], *,
                  n_seen: int, t_start: float, matrix_clusters: tuple = ()) -> tuple[list[dict], list]:
    """The live analysis' end-of-scan assessment (:meth:`LiveAnalysis._assess` after ``finish``) on
    the replay's memberships, with the block distances from mergeable sums.

    The flagger runs twice on the client: once to learn which ``(k, j)`` pairs it measures (their
    distances are the only per-position work: one pass of projections on the workers), once with
    those distances, which gives the events. Returns the flag log records (as
    ``LiveAnalysis.flag_log``) and the assessments.
    """
    # one assessment with no history: what passes now is flagged (raise_after debounces a live
    # sequence of updates; here there is one)
    params = cfg.flag_params.replace(raise_after=1)
    shape = tuple(info.scan_shape)
    pairs: list[tuple[int, int]] = []

    def record(k, j, in_k, in_j, fold):
        pairs.append((int(k), int(j)))
        return 0.0, 0.0

    SecondPhaseFlagger(params).assess(U, shape, None, None, scanned, block_distances=record,
                                        matrix_clusters=matrix_clusters)
    distances: dict = {}
    plan = None
    if pairs:
        plan = DistancePlan.fit(folds, pairs, eds_shape_only=params.eds_shape_only)
        plan_h = backend.share(plan)
        k = len(specs)
        moments = _tree_reduce(backend, backend.map(chunk_flag_moments, outputs, [info_h] * k, [cfg_h] * k, specs,
                                                    [plan_h] * k), int(cfg.fan_in))
        mom = backend.gather([moments])[0]
        if mom is not None:
            distances = pair_distances(plan, mom.cbed, mom.eds)

    def lookup(k, j, in_k, in_j, fold):
        p = plan.pairs.index((int(k), int(j)))
        got = (int(np.count_nonzero(in_k & fold)), int(np.count_nonzero(in_j & fold)),
               int(np.count_nonzero(in_k & ~fold)), int(np.count_nonzero(in_j & ~fold)))
        if got != tuple(int(v) for v in plan.counts[p]):
            # the workers thresholded other memberships than the flagger sees: a bug, not data
            raise RuntimeError(f"flag sums of clusters {(k, j)} count {tuple(plan.counts[p])} positions per "
                               f"fold, the memberships {got}")
        return distances.get((int(k), int(j)), (0.0, 0.0))

    signals = centre_signals(centre_set, np.asarray(info.energy_axis_kev)) if centre_set is not None else {}
    flagger = SecondPhaseFlagger(params)
    events = flagger.update(U, shape, None, None, scanned_mask=scanned, signals=signals, block_distances=lookup,
                            matrix_clusters=matrix_clusters)
    fraction = n_seen / info.n_positions
    log = []
    for ev in events:
        rec = {key: v for key, v in asdict(ev).items() if key != "positions"}
        rec.update(scan_fraction=fraction, elapsed_s=time.perf_counter() - t_start)
        log.append(rec)
        logger.info("flag %s #%d (cluster %d, score %.2f) at the end of the replay", ev.kind, ev.flag_id,
                    ev.cluster, ev.score)
    return log, flagger.assessments_


def _run(backend, info: RecordingInfo, cfg: ReplayConfig, chunk_positions: int) -> dict[str, Any]:
    cfg.validate()
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    n = info.n_positions
    step = max(1, int(chunk_positions))
    specs = [ChunkSpec(s, min(n, s + step)) for s in range(0, n, step)]
    fr, sr = _reducers(info, cfg)
    n_cbed, n_eds = int(fr.n_features_out_), int(sr.n_features_out_)
    n_features = n_cbed + n_eds
    cache = n * n_features * 4 <= int(cfg.cache_features_bytes)
    info_h, cfg_h = backend.share(info), backend.share(cfg)
    # in-process this reads and reduces every chunk now; on Dask it only submits (time in "scaling")
    t = time.perf_counter()
    src = backend.map(chunk_features, [info_h] * len(specs), [cfg_h] * len(specs), specs) if cache else specs
    seconds["read"] = time.perf_counter() - t
    k = len(specs)

    # 1. scaling
    t = time.perf_counter()
    scal = backend.gather([_tree_reduce(backend, _grouped(backend, scaling_partial, src, info_h, cfg_h),
                                        int(cfg.fan_in))])[0]
    counters = dict(scal.counters)
    if scal.balancer is None or scal.balancer.n_samples_seen_ < int(cfg.n_clusters):
        raise ValueError(f"{info.mib_path}: at least {cfg.n_clusters} positions with both a frame and a spectrum "
                         f"are needed to cluster")
    bal = scal.balancer
    has_frame, has_spectrum = _signal_masks(scal.masks, n)
    scaling = {"multiplier": bal.multiplier_, "centre": bal.center_, "n_cbed": n_cbed}
    scaling_h = backend.share(scaling)
    seconds["scaling"] = time.perf_counter() - t

    # the engine's final refresh seed (its PCA sample, FCM restarts and level 2 derive from it)
    seed = final_seed(cfg.random_state)

    # 2. PCA at the final scales
    t = time.perf_counter()
    readout = None
    if int(cfg.final_pca_sample) > 0:
        readout = _sample_pca(backend, src, specs, info_h, cfg_h, scaling_h, has_frame & has_spectrum, cfg, seed)
    if readout is None:
        pca_state = _tree_reduce(backend, _grouped(backend, pca_partial, src, info_h, cfg_h, scaling_h),
                                 int(cfg.fan_in))
        readout = backend.gather([backend.submit(pca_readout, pca_state, cfg_h)])[0]
        del pca_state
    V = readout["components"].T
    projection = {"P": V.astype(np.float32), "p0": (-(readout["mean"] @ V)).astype(np.float32)}
    seconds["pca"] = time.perf_counter() - t

    # 3. scores, kept on the workers (the cached features stay until level 2 has used them)
    t = time.perf_counter()
    proj_h = backend.share(projection)
    scores = backend.map(chunk_scores, src, [info_h] * k, [cfg_h] * k, [scaling_h] * k, [proj_h] * k)
    sizes = np.asarray(backend.gather(backend.map(n_rows, scores)), dtype=np.int64)
    seconds["scores"] = time.perf_counter() - t

    # 4. fuzzy C-means: restarts on (a sample of) the scores, refined on all by distributed passes
    t = time.perf_counter()
    nc, m = int(cfg.n_clusters), float(cfg.m)
    fit = _fit_fcm(backend, scores, sizes, nc, cfg, np.random.RandomState(seed), moments=None, extra_pass=True)
    centres = fit["centres"]
    seconds["fcm"] = time.perf_counter() - t

    # 5. memberships (level 1) and the host's level 2
    t = time.perf_counter()
    level1 = backend.map(chunk_memberships, scores, [centres] * k, [m] * k)
    U1 = np.full((n, nc), np.nan, dtype=np.float32)
    for res in backend.gather(level1):
        U1[res.positions] = res.memberships
    host_info = None
    k2 = int(cfg.host_clusters)
    outputs = level1
    if k2:
        # level 2 is defined on raw features, as the engine's (x_warm / c_warm): its zero-IQR
        # floor of 1 is in raw counts, so the whole-scan multiplier must not be applied first
        raw_h = backend.share({**scaling, "multiplier": np.ones_like(scaling["multiplier"])})
        host_info = _refine_host(backend, U1, src, specs, info_h, cfg, cfg_h, raw_h, n_cbed, seed,
                                 scan_shape=info.scan_shape, eds_energies_kev=sr.energies_kev_)
        if host_info is None:
            outputs = backend.map(chunk_compose, level1, [None] * k, [None] * k, [k2] * k)
        else:
            outputs = backend.map(chunk_compose, level1, host_info.pop("u2"), [host_info["group"]] * k, [k2] * k)
    del src
    seconds["host"] = time.perf_counter() - t

    # 6. output memberships, validity, thresholded centres
    t = time.perf_counter()
    final = _tree_reduce(backend, backend.map(chunk_final, outputs, level1, scores, [info_h] * k, [cfg_h] * k,
                                              [centres] * k, specs), int(cfg.fan_in))
    U = np.full((n, nc + k2), np.nan, dtype=np.float32)
    for res in backend.gather(outputs):
        U[res.positions] = res.memberships
    final = backend.gather([final])[0]
    seconds["final"] = time.perf_counter() - t

    # second-phase flags: the live analysis' end-of-scan assessment
    t = time.perf_counter()
    flag_log: list[dict] = []
    assessments: list = []
    centre_set = final.centres.centres() if final.centres is not None else None
    if cfg.flags and final.folds is not None:
        # the host's sub-clusters are the matrix, as the live analysis tells its flagger
        matrix = tuple(range(nc, nc + k2)) if host_info is not None else ()
        flag_log, assessments = _assess_flags(backend, info, cfg, cfg_h, info_h, U, has_frame & has_spectrum,
                                              final.folds, centre_set, outputs, specs,
                                              n_seen=int(np.count_nonzero(has_frame | has_spectrum)), t_start=t_start,
                                              matrix_clusters=matrix)
    seconds["flags"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_start
    acc = final.validity
    validity = {
        "partition_coefficient": acc.partition_coefficient(),
        "partition_entropy": acc.partition_entropy(),
        "xie_beni": acc.xie_beni(centres),
    }
    counters.update(chunks=len(specs), fcm_passes=fit["n_iter"] + 1, workers=backend.n_workers)
    return {
        "memberships": U,
        "level1_memberships": U1 if k2 else None,
        "cluster_centers": centres,
        "objective": fit["objective"],
        "n_iter": fit["n_iter"],
        "converged": fit["converged"],
        "host": host_info,
        "pca": readout,
        "scaling": {"multiplier": scaling["multiplier"], "centre": scaling["centre"],
                    "weights": dict(bal.weights_)},
        "centre_set": centre_set,
        "flag_log": flag_log,
        "assessments": assessments,
        "validity": validity,
        "counters": dict(counters),
        "seconds": seconds,
        "features_cached": cache,
    }


def _scan_result(info: RecordingInfo, cfg: ReplayConfig, res: dict) -> ScanResult:
    """The replay's final state as the value the live analysis produces (the results file's input).

    ``seen`` is the positions with memberships: the passes do not return which positions
    delivered a signal but were left unclustered.
    """
    U = res["memberships"]
    stats = dict(res["counters"])
    stats["seconds"] = dict(res["seconds"])
    host = res["host"]
    return ScanResult(
        scan_shape=info.scan_shape, memberships=U, seen=np.isfinite(U).all(axis=1),
        level1_memberships=res.get("level1_memberships"),
        n_components=int(res["pca"]["n_components"]), explained_variance_ratio=res["pca"]["explained_variance_ratio"],
        cluster_centers=res["cluster_centers"], validity=res["validity"],
        host_cluster=-1 if host is None else int(host["host"]), host_clusters=int(cfg.host_clusters),
        host_group=() if host is None else host["group"],
        centres=res["centre_set"], flag_log=res.get("flag_log", ()), engine_stats=stats,
        counters={"replay": dict(res["counters"])})


def _extra(res: dict) -> dict[str, Any]:
    """Replay-specific results beside the writer's groups (``/replay``)."""
    out = {
        "replay/objective": float(res["objective"]),
        "replay/fcm_iterations": int(res["n_iter"]),
        "replay/pca_method": str(res["pca"]["method"]),
        "replay/pca_components": res["pca"]["components"],
        "replay/pca_mean": res["pca"]["mean"],
        "replay/scaling_multiplier": res["scaling"]["multiplier"],
        "replay/scaling_centre": res["scaling"]["centre"],
    }
    host = res["host"]
    if host is not None:
        out.update({
            "replay/host_cluster": int(host["host"]),
            "replay/host_n_inside": int(host["n_inside"]),
            "replay/host_cluster_centers": host["centres"],
            "replay/host_components": host["space"].components_,
            "replay/host_multiplier": host["space"].multiplier_,
            "replay/host_mean": host["space"].mean_,
            "replay/host_explained_variance_ratio": host["space"].explained_variance_ratio_,
        })
    return out


def _write_results(path: Path, info: RecordingInfo, cfg: ReplayConfig, res: dict) -> None:
    """Write with :class:`streamclust.results.writer.ResultsWriter` (the single-process replay's file)
    plus ``/replay``."""
    writer = ResultsWriter(path, scan_shape=info.scan_shape, frame_shape=info.frame_shape,
                           energy_axis_kev=np.asarray(info.energy_axis_kev), n_clusters=int(cfg.n_clusters),
                           thresholds=tuple(cfg.thresholds), config={"replay_dask": asdict(cfg)},
                           scan_id=f"replay-dask-{Path(info.mib_path).stem}", source=str(info.mib_path))
    writer.finalize(_scan_result(info, cfg, res), extra=_extra(res))


def _summary(path: Path, res: dict, n_positions: int) -> dict[str, Any]:
    return {
        "results_path": str(path),
        "n_positions": n_positions,
        "n_components": int(res["pca"]["n_components"]),
        "explained_variance_ratio": [float(v) for v in res["pca"]["explained_variance_ratio"]],
        "pca_method": res["pca"]["method"],
        "objective": res["objective"],
        "fcm_iterations": res["n_iter"],
        "converged": bool(res["converged"]),
        "validity": res["validity"],
        "counters": res["counters"],
        "seconds": res["seconds"],
        "positions_per_s": n_positions / res["seconds"]["total"] if res["seconds"]["total"] > 0 else 0.0,
        "features_cached": bool(res["features_cached"]),
        "host": None if res["host"] is None else {
            "host_cluster": int(res["host"]["host"]), "n_inside": int(res["host"]["n_inside"]),
            "n_components": int(res["host"]["space"].n_components_), "objective": float(res["host"]["objective"]),
            "fcm_iterations": int(res["host"]["n_iter"])},
        "n_output_clusters": int(res["memberships"].shape[1]),
        "flags": summarise_flags(res["flag_log"]),
    }


def replay_flags(mib_path, eds_path, memberships: np.ndarray, *, client=None, chunk_positions: int = 4096,
                 config: ReplayConfig | Mapping | None = None) -> dict[str, Any]:
    """The live analysis' end-of-scan second-phase assessment of given memberships, on the recording.

    What :func:`replay_dask` does after clustering, for memberships from elsewhere (another run,
    another engine): per-fold sums with the thresholded centres, then the projections of the
    measured pairs, both per chunk; the flagger on the client.

    Parameters
    ----------
    mib_path, eds_path : path-like
    memberships : ndarray (n_positions, c)
        NaN rows: positions without a result.
    client : distributed.Client, optional
        Where the chunk tasks run; by default in this process.
    chunk_positions : int
    config : ReplayConfig or mapping, optional
        ``flag_params``, ``thresholds``, ``fan_in`` are used.

    Returns
    -------
    dict
        ``flag_log`` (the records of ``LiveAnalysis.flag_log``), ``flags`` (its summary),
        ``assessments`` (:class:`~streamclust.flags.flagger.ClusterAssessment` per cluster).
    """
    cfg = ReplayConfig.from_any(config)
    cfg.validate()
    cfg = replace(cfg, flags=True)
    info = probe_recording(mib_path, eds_path)
    U = np.asarray(memberships, dtype=np.float32)
    n = info.n_positions
    if U.ndim != 2 or U.shape[0] != n:
        raise ValueError(f"memberships must be ({n}, c) for {info.mib_path}, got {U.shape}")
    t_start = time.perf_counter()
    backend = _LocalBackend() if client is None else _DaskBackend(client)
    step = max(1, int(chunk_positions))
    specs = [ChunkSpec(s, min(n, s + step)) for s in range(0, n, step)]
    k = len(specs)
    finite = np.isfinite(U).all(axis=1)
    results = []
    for sp in specs:
        pos = np.arange(sp.start, sp.stop)[finite[sp.start:sp.stop]]
        results.append(ChunkResult(pos, U[pos]))
    info_h, cfg_h = backend.share(info), backend.share(cfg)
    # each chunk's memberships go to one worker (not broadcast)
    outputs = client.scatter(results, hash=False) if client is not None else results
    with threadpool_limits(1, user_api="blas"):
        final = backend.gather([_tree_reduce(backend, backend.map(chunk_final, outputs, [None] * k, [None] * k,
                                                                   [info_h] * k, [cfg_h] * k, [None] * k, specs),
                                             int(cfg.fan_in))])[0]
        both = np.zeros(n, bool)
        for pos, b in final.both:
            both[pos] = b
        log, assessments = [], []
        if final.folds is not None:
            # level-2 columns holding membership: the host was refined, its sub-clusters are the matrix
            nc = int(cfg.n_clusters)
            matrix = (tuple(range(nc, U.shape[1])) if U.shape[1] > nc and np.nansum(U[:, nc:]) > 0 else ())
            log, assessments = _assess_flags(backend, info, cfg, cfg_h, info_h, U, both & finite, final.folds,
                                             final.centres.centres(), outputs, specs,
                                             n_seen=int(np.count_nonzero(finite)), t_start=t_start,
                                             matrix_clusters=matrix)
    return {"flag_log": log, "flags": summarise_flags(log),
            "assessments": assessments}


def replay_local(mib_path, eds_path, out_dir, *, chunk_positions: int | None = None,
                 config: ReplayConfig | Mapping | None = None) -> dict[str, Any]:
    """The same passes in this process, without Dask (``chunk_positions=None``: one chunk).

    Returns the same summary as :func:`replay_dask` and writes the same results file.
    """
    cfg = ReplayConfig.from_any(config)
    info = probe_recording(mib_path, eds_path)
    with threadpool_limits(1, user_api="blas"):
        res = _run(_LocalBackend(), info, cfg, chunk_positions or info.n_positions)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_NAME
    _write_results(path, info, cfg, res)
    return _summary(path, res, info.n_positions)


def replay_dask(mib_path, eds_path, out_dir, *, scheduler=None, n_workers: int = 2,
                chunk_positions: int = 4096, config: ReplayConfig | Mapping | None = None) -> dict[str, Any]:
    """Replay a recorded scan on Dask distributed and write ``out_dir/results.hspy``.

    Parameters
    ----------
    mib_path, eds_path : path-like
        The Merlin recording (``.hdr`` beside it) and the EDS recording. With a remote scheduler the
        workers must see the same paths (shared file system).
    out_dir : path-like
    scheduler : str or distributed.Client, optional
        A scheduler address (``"tcp://host:8786"``) or a client; by default a
        ``LocalCluster(n_workers, threads_per_worker=1, processes=True)`` for the call.
    n_workers : int, default=2
        Workers of the local cluster (ignored with ``scheduler``).
    chunk_positions : int, default=4096
        Positions per task.
    config : ReplayConfig or mapping, optional

    Returns
    -------
    dict
        ``results_path``, ``n_components``, ``explained_variance_ratio``, ``objective``,
        ``fcm_iterations``, ``validity``, ``counters`` (positions, incomplete, skipped, missing or
        bad frames and spectra, chunks, passes, workers), ``seconds`` per pass (``total`` excludes
        the cluster's start-up, given as ``startup``), ``positions_per_s``.
    """
    from dask.distributed import Client, LocalCluster

    cfg = ReplayConfig.from_any(config)
    cfg.validate()
    info = probe_recording(mib_path, eds_path)
    t0 = time.perf_counter()
    cluster = client = None
    own = not hasattr(scheduler, "submit")
    try:
        if scheduler is None:
            cluster = LocalCluster(n_workers=int(n_workers), threads_per_worker=1, processes=True,
                                   dashboard_address=":0", silence_logs=logging.WARNING)
            client = Client(cluster)
        elif own:
            client = Client(scheduler)
        else:
            client = scheduler
        startup = time.perf_counter() - t0
        logger.info("replaying %d positions of %s on %s", info.n_positions, info.mib_path, client)
        res = _run(_DaskBackend(client), info, cfg, chunk_positions)
    finally:
        if own and client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    res["seconds"]["startup"] = startup
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_NAME
    _write_results(path, info, cfg, res)
    return _summary(path, res, info.n_positions)
