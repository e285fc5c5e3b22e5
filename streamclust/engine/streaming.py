"""The streaming engine: one object that turns joined (frame, spectrum) batches into live memberships.

Data flow of one batch (:meth:`StreamingEngine.partial_fit`)::

    frames  ─► FrameReducer ──► cbed (n, 4096) ─┐
    spectra ─► SpectrumReducer ► eds (n, 490) ──┤
                                                ▼
    BlockBalancer.partial_fit (robust scales and block weights keep adapting: c_now)
                                                ▼
    x_warm = concat(cbed, eds) * c_warm    (c_warm: the multiplier at the end of warm-up, fixed)
         ├─► StreamingPCA.partial_fit(x_warm)             (sketch or exact accumulator)
         ├─► pending until the next refresh, then PositionStore (full vectors, or coordinates
         │   in a rank-R basis taken *after* the PCA has seen them)
         ▼
    scores = x_warm projected with the last refresh's PCA read-out
         ─► MiniBatchFuzzyCMeans.partial_fit ─► memberships of the batch

On a schedule (every ``refresh_every`` positions and/or ``refresh_seconds``, and at
:meth:`~StreamingEngine.finalize`), :meth:`~StreamingEngine.refresh` reads PCA out in the *current*
scaled space (``D = c_now / c_warm``, 1 % rule capped at ``max_components``), re-projects every stored
position, re-fits the clusters on all of them and recomputes every membership: a raster scan meets
the substrate first, so the model of the first rows is not the model of the scan (DESIGN.md).

Why the warm-up: the robust scales of the first positions define the PCA's fixed space
(``c_warm``); the PCA is read out in the current space by a diagonal map, which stays exact
however far the scales drift later (docs/streaming-statistics.md). Before ``warmup_positions``
complete positions have arrived there is neither a space nor enough samples for a basis, so the
engine buffers them (their memberships stay NaN until the warm-up ends).

Examples
--------
>>> import numpy as np
>>> from streamclust.engine.streaming import StreamingEngine
>>> rng = np.random.default_rng(0)
>>> n = 600
>>> truth = (np.arange(n) >= 300)                      # two phases met in raster order
>>> frames = rng.poisson(3.0, (n, 16, 16)).astype(np.uint16)
>>> frames[truth, :4, :4] += 12
>>> spectra = rng.poisson(1.0, (n, 64)).astype(np.uint16)
>>> spectra[truth, 10:14] += 6
>>> eng = StreamingEngine(n, frame_shape=(16, 16), n_channels=64, energy_axis=(0.0, 0.25),
...                       energy_window_kev=(0.0, 16.0), rebin=1, n_clusters=2, bin_factor=4,
...                       warmup_positions=100, refresh_every=200, basis_rank=16,
...                       max_components=5, random_state=0, host_clusters=0)  # one level
>>> for s in range(0, n, 100):
...     _ = eng.partial_fit(np.arange(s, s + 100), frames[s:s + 100], spectra[s:s + 100])
>>> _ = eng.finalize()
>>> eng.memberships_.shape, bool(np.allclose(eng.memberships_.sum(axis=1), 1.0, atol=1e-5))
((600, 2), True)
>>> lab = eng.labels_
>>> from sklearn.metrics import adjusted_rand_score
>>> bool(adjusted_rand_score(truth, lab) > 0.9)
True
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import fields
from typing import Any

import numpy as np
from scipy.linalg import subspace_angles
from scipy.optimize import linear_sum_assignment
from threadpoolctl import threadpool_limits

from streamclust.cluster import fcm_kernels
from streamclust.features.block_balance import BlockBalancer
from streamclust.cluster.merge import line_count_map, merge_columns, merge_same_composition
from streamclust.cluster.drift import NoveltyDrift
from streamclust.features.reducers import FrameReducer, SpectrumReducer
from streamclust.cluster.fcm import FuzzyCMeans, MiniBatchFuzzyCMeans
from streamclust.cluster.host_refine import HostRefinement, compose_memberships, host_group, match_by_overlap
from streamclust.decomposition.incremental_pca import StreamingPCA
from streamclust.decomposition.position_store import PositionStore
from streamclust.decomposition.sample_pca import one_percent_pca
from streamclust.cluster.spatial_pool import membership_mixing, neighbourhood_mean, neighbours, spatial_memberships
from streamclust.engine.params import EngineParams
from streamclust.engine.threads import kernel_threads
from streamclust.cluster.validity import partition_coefficient, partition_entropy, xie_beni

logger = logging.getLogger(__name__)

__all__ = ["StreamingEngine", "final_seed"]


def final_seed(random_state: int | None) -> int:
    """The seed of the engine's final refresh (PCA sample, k-means++ restarts, level 2): the first
    draw of ``RandomState(random_state)``, whatever happened during the scan."""
    return int(np.random.RandomState(random_state).randint(np.iinfo(np.int32).max))

#: a position store larger than this spills to disk with ``spill="auto"`` (256 MiB)
SPILL_MIN_BYTES = 256 * 2**20

class _HostState:
    """The level-2 state a refresh replaces, built aside and committed in one step, so a spread
    refresh never leaves the engine half-updated while batches are scored between its steps."""

    _FIELDS = {"z": "_host_z", "pool": "_host_pool", "space": "host_", "fit_size": "_host_fit_size",
               "fcm": "_host_fcm", "scorer": "_host_scorer", "merged_into": "host_merged_into_",
               "cluster": "host_cluster_", "group": "host_group_"}

    def __init__(self, **values) -> None:
        self.scores = None  # (positions, level-2 scores) of this refresh, for the composition
        self.__dict__.update(values)

    @classmethod
    def of(cls, engine) -> _HostState:
        st = cls(**{k: getattr(engine, v) for k, v in cls._FIELDS.items()})
        # the pooling grid is written in place by the refresh: a copy (batches use the engine's)
        st.z = None if st.z is None else st.z.copy()
        st.pool = st.pool.copy()
        return st

    def commit(self, engine) -> None:
        for k, v in self._FIELDS.items():
            setattr(engine, v, getattr(self, k))


_STAGES = ("reduce_frames", "reduce_spectra", "balance", "pca", "basis", "store", "cluster", "refresh", "host")


class StreamingEngine:
    """Live clustering of a 4D-STEM + EDS scan, refreshed as the model improves.

    Parameters
    ----------
    n_positions : int
        Scan positions (0-based raster indices).
    params : EngineParams, optional
        The engine's parameters (:class:`~streamclust.engine.params.EngineParams`, the
        configuration's ``[engine]``; documented there); default ``EngineParams()``. ``"auto"``
        values are resolved for ``n_positions`` (:meth:`EngineParams.for_scan`).
    scan_shape : (int, int), optional
        ``(ny, nx)`` with ``ny * nx == n_positions`` (for :meth:`membership_maps`).
    frame_shape : (int, int), default=(512, 512)
    n_channels : int, default=2048
        EDS channels a spectrum has.
    energy_axis : (float, float), default=(0.0, 0.01)
        ``(centre of channel 0, channel width)`` in keV: channel ``i`` is centred on
        ``offset + i * width``.
    on_features : callable or None, default=None
        Called as ``on_features(positions, cbed, eds, has_frame, has_spectrum)`` with every batch's
        reduced features before they are analysed (read-only; copy what you keep): the demo's
        offline yardstick keeps them instead of binning every frame a second time.
    **overrides
        Fields of ``params`` to change (``StreamingEngine(n, n_clusters=3, host_clusters=0)``),
        checked as the configuration's values are. Each parameter is also an attribute
        (``engine.n_clusters``), and ``engine.params`` holds them all.

    Attributes
    ----------
    memberships_ : ndarray (n_positions, n_clusters) float32
        NaN for positions not yet clustered (unseen, or still in the warm-up buffer).
    last_features_ : tuple (positions, cbed, eds, has_frame, has_spectrum)
        The reduced features of the last batch given to :meth:`partial_fit` (the engine's own
        arrays, not copies: rows without their signal hold imputed medians). A caller that keeps
        features reads them here instead of reducing the frames again.
    labels_ : ndarray (n_positions,) int
        Arg-max membership, -1 where unknown.
    cluster_centers_ : ndarray (n_clusters, n_components_)
        In the PCA space of the last refresh (moved by mini-batch steps since).
    n_components_ : int
    explained_variance_ratio_ : ndarray (n_components_,)
    validity_ : dict
        ``partition_coefficient``, ``partition_entropy``, ``xie_beni`` of the last refresh.
    stats_ : dict
        Counters and seconds spent per stage.
    """

    #: rows of stored positions a spread refresh reads per batch, in two steps: about 0.12 s of a
    #: batch at 256 x 256, where a whole refresh read 80,000-110,000 rows and stalled the batch
    #: that triggered it by 1-2 s (docs/engine.md, "Real scan sizes"). A tuning constant, not a
    #: parameter: the result depends on it only through which batches a refresh spans.
    refresh_step_rows = 16384


    def __init__(
        self,
        n_positions: int,
        params: EngineParams | None = None,
        *,
        scan_shape: tuple[int, int] | None = None,
        frame_shape: tuple[int, int] = (512, 512),
        n_channels: int = 2048,
        energy_axis: tuple[float, float] = (0.0, 0.01),
        on_features=None,
        **overrides: Any,
    ) -> None:
        self.params = (params or EngineParams()).replace(**overrides).for_scan(n_positions)
        self.n_positions = n_positions
        self.scan_shape = scan_shape
        self.frame_shape = frame_shape
        self.n_channels = n_channels
        self.energy_axis = energy_axis
        self.on_features = on_features
        for f in fields(self.params):  # the rest of the engine reads self.<parameter>
            setattr(self, f.name, getattr(self.params, f.name))
        self._init_state()

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------
    def _init_state(self) -> None:
        n = int(self.n_positions)
        if n < 1:
            raise ValueError(f"n_positions must be >= 1, got {self.n_positions!r}")
        if self.scan_shape is not None:
            ny, nx = (int(v) for v in self.scan_shape)
            if ny * nx != n:
                raise ValueError(f"scan_shape {self.scan_shape} does not hold {n} positions")
        if int(self.n_clusters) < 2:
            raise ValueError(f"n_clusters must be >= 2, got {self.n_clusters!r}")
        if int(self.warmup_positions) < max(int(self.n_clusters), 2):
            raise ValueError("warmup_positions must be at least n_clusters")
        if self.pca_method not in ("sketch", "exact"):
            raise ValueError(f"pca_method must be 'sketch' or 'exact', got {self.pca_method!r}")
        if self.refresh_every is not None and int(self.refresh_every) < 1:
            raise ValueError("refresh_every must be >= 1 or None")
        if not float(self.refresh_growth) >= 0.0:
            raise ValueError(f"refresh_growth must be >= 0, got {self.refresh_growth!r}")
        if int(self.max_components) < 1 or int(self.max_components) > int(self.basis_rank):
            raise ValueError("max_components must be between 1 and basis_rank")
        offset, width = (float(v) for v in self.energy_axis)
        self.frame_reducer_ = FrameReducer(
            bin_factor=int(self.bin_factor), frame_shape=tuple(self.frame_shape),
            **dict(self.frame_reducer_params or {}),
        ).fit()
        self.spectrum_reducer_ = SpectrumReducer(
            energy_window_kev=tuple(self.energy_window_kev), rebin=int(self.rebin),
            energy_offset_kev=offset, channel_width_kev=width, n_channels=int(self.n_channels),
        ).fit()
        self.n_cbed_features_ = int(self.frame_reducer_.n_features_out_)
        self.n_eds_features_ = int(self.spectrum_reducer_.n_features_out_)
        self.n_features_ = self.n_cbed_features_ + self.n_eds_features_
        self.balancer_ = BlockBalancer(blocks=("cbed", "eds"), scaler_params=self.scaler_params)
        rank = min(int(self.basis_rank), self.n_features_)
        if self.store not in ("auto", "counts", "full", "basis"):
            raise ValueError(f"store must be 'auto', 'counts', 'full' or 'basis', got {self.store!r}")
        mode = self.store
        if mode == "auto":
            mode = "counts" if n * (self.n_features_ + 9) <= int(self.full_store_max_bytes) else "basis"
        self.store_ = PositionStore(n, self.n_features_, rank=rank, mode=mode,
                                    spill_dir=self._spill_dir(n, rank, mode))
        # the basis store reads ``rank`` directions out of the PCA; the full store only needs the
        # components the 1 % rule can keep (an exact read-out of 128 vectors takes seconds)
        n_read = rank if mode == "basis" else min(int(self.max_components) + 1, rank)
        sk = self.sketch_rank if self.sketch_rank is not None else rank
        sk = max(int(sk), n_read)
        self.pca_ = StreamingPCA(
            max_components=n_read, min_explained_ratio=float(self.min_explained_ratio),
            method=self.pca_method, sketch_rank=sk, exact_max_features=max(8192, self.n_features_),
            gram_dtype="float32",
        )
        if int(self.host_clusters) < 0 or int(self.host_clusters) == 1:
            raise ValueError(f"host_clusters must be 0 (off) or >= 2, got {self.host_clusters!r}")
        if not 0.0 < float(self.host_threshold) < 1.0:
            raise ValueError(f"host_threshold must be in (0, 1), got {self.host_threshold!r}")
        if self.host_mixing is not None and not 0.0 <= float(self.host_mixing) <= 1.0:
            # below 0 every pair of clusters would count as intermixed: all would join the host
            raise ValueError(f"host_mixing must be in [0, 1] or None, got {self.host_mixing!r}")
        if not 0.0 <= float(self.host_merge_effect) < 1.0:
            raise ValueError(f"host_merge_effect must be in [0, 1) (0: off), got {self.host_merge_effect!r}")
        self.n_output_clusters_ = int(self.n_clusters) + int(self.host_clusters)
        self.memberships_ = np.full((n, self.n_output_clusters_), np.nan, dtype=np.float32)
        self.host_cluster_: int | None = None
        self.host_group_: tuple[int, ...] | None = None
        # the whole-scan partition, kept beside the composed one (the next refresh warm-starts from it)
        self.level1_memberships_ = np.full((n, int(self.n_clusters)), np.nan, dtype=np.float32)
        self.host_: HostRefinement | None = None
        self._host_fcm: FuzzyCMeans | None = None
        # the level-2 cluster each sub-cluster is merged into (itself if kept; cluster_merge), and
        # the map from raw features to element-line counts its composition test reads (None: off,
        # or no scan grid, or the lines outside the EDS window)
        self.host_merged_into_: np.ndarray | None = None
        self._line_map = None
        if float(self.host_merge_effect) > 0 and self.scan_shape is not None and int(self.host_clusters):
            self._line_map = line_count_map(self.n_cbed_features_, self.spectrum_reducer_.energies_kev_,
                                            tuple(self.host_merge_elements))
        self._host_scorer: tuple[np.ndarray, np.ndarray] | None = None
        self._host_fit_size = 0
        # live pooling (host_pooling): every position's level-2 scores in the current host space,
        # and which positions are clear host (the neighbours that may be pooled); None when off
        self._host_z: np.ndarray | None = None
        self._host_pool = np.zeros(n, dtype=bool)
        self.drift_ = NoveltyDrift(threshold=float(self.drift_threshold)) if self.drift_threshold else None
        self._drift_due = False
        self.warmed_up_ = False
        self._warm_buffer: list[tuple[np.ndarray, ...]] = []
        self._c_warm: np.ndarray | None = None
        self._rng = np.random.RandomState(self.random_state)
        self._fcm: MiniBatchFuzzyCMeans | None = None
        self._readout: dict[str, Any] | None = None  # D, V, mean of the last refresh
        self._scorer: tuple[np.ndarray, np.ndarray] | None = None  # x_warm @ A - b = scores
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # (positions, x_warm) not yet encoded
        self._arrived = np.zeros(n, dtype=bool)
        self._complete = np.zeros(n, dtype=bool)  # positions whose statistics were learned (both signals)
        self._since_refresh = 0
        self._seen_at_refresh = 0
        self._refresh_job = None  # a spread refresh in progress (a generator of its steps)
        self._last_refresh_time = time.monotonic()
        self.cluster_centers_: np.ndarray | None = None
        self.n_components_ = 0
        self.explained_variance_ratio_ = np.zeros(0)
        self.validity_: dict[str, float] = {}
        self._counts = dict(positions=0, batches=0, refreshes=0, full_refits=0, basis_updates=0,
                            pending_flushes=0, duplicates=0, incomplete=0, skipped=0,
                            host_space_fits=0, one_signal_positions=0, sample_pca=0, drift_refreshes=0)
        self._times = {s: 0.0 for s in _STAGES}
        self._busy = 0.0

    def _spill_dir(self, n: int, rank: int, mode: str) -> str | None:
        """The folder the position store spills to (the ``spill`` parameter), or None for RAM."""
        width = rank * 4 if mode == "basis" else self.n_features_ * (1 if mode == "counts" else 4)
        return self.spill_dir_for(n * width)

    def spill_dir_for(self, nbytes: int) -> str | None:
        """Where a per-position array of ``nbytes`` lives under this engine's ``spill`` setting: a
        folder (spilled) or None (RAM). The live analysis puts its centre store there too."""
        spill = "auto" if self.spill is None else str(self.spill)
        if spill == "off":
            return None
        if spill != "auto":
            if not os.path.isdir(spill):
                raise ValueError(f"spill must be 'auto', 'off' or an existing folder, got {self.spill!r}")
            return spill
        return tempfile.gettempdir() if int(nbytes) > SPILL_MIN_BYTES else None

    @contextmanager
    def _blas(self):
        # BLAS and Numba threads for one entry point (both per calling thread: the receiver's
        # threads are left alone)
        with (nullcontext() if self.blas_threads is None
              else threadpool_limits(int(self.blas_threads), user_api="blas")):
            with kernel_threads(self.kernel_threads):
                yield

    def warm_up(self) -> StreamingEngine:
        """Compile the Numba kernels (frame binning, FCM) before a detector is armed."""
        self.frame_reducer_.warm_up()
        fcm_kernels.warm_up()
        return self

    # ------------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------------
    @property
    def labels_(self) -> np.ndarray:
        known = ~np.isnan(self.memberships_[:, 0])
        lab = np.full(self.memberships_.shape[0], -1, dtype=np.intp)
        lab[known] = np.argmax(self.memberships_[known], axis=1)
        return lab

    @property
    def stats_(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self._counts)
        out["positions_seen"] = int(np.count_nonzero(self._arrived))
        out["pending"] = sum(p.size for p, _ in self._pending)
        out["seconds"] = dict(self._times)
        out["seconds_total"] = self._busy
        out["positions_per_s"] = self._counts["positions"] / self._busy if self._busy > 0 else 0.0
        out["bytes_per_position"] = self.store_.nbytes_per_position
        return out

    @property
    def host_columns_(self) -> tuple[int, ...]:
        """Columns of :attr:`memberships_` that hold the host phase (the matrix): its sub-clusters
        once the level-2 model exists, else empty (the flagger then does not know the matrix)."""
        if self._host_scorer is None or self.host_group_ is None:
            return ()
        n1 = int(self.n_clusters)
        return tuple(range(n1, n1 + int(self.host_clusters)))

    def membership_maps(self) -> np.ndarray:
        """Memberships as ``(ny, nx, n_clusters)`` images (needs ``scan_shape``)."""
        if self.scan_shape is None:
            raise ValueError("membership_maps needs scan_shape")
        return self.memberships_.reshape(*(int(v) for v in self.scan_shape), -1)

    def partial_fit(
        self,
        positions: Any,
        frames: np.ndarray | None,
        spectra: np.ndarray | None,
        has_frame: Any = None,
        has_spectrum: Any = None,
    ) -> StreamingEngine:
        """Process one joined batch: frames (n, H, W) and spectra (n, n_channels) at ``positions``.

        ``has_frame`` / ``has_spectrum`` (bool, length n) mark rows whose frame or spectrum never
        arrived (their array rows are ignored); ``frames=None`` / ``spectra=None`` means none arrived.
        A position with only one signal is imputed with the other block's current median (so it
        contributes nothing to that block's distances) and is not used to learn statistics; a
        position with neither is skipped. Both are counted in :attr:`stats_`.
        """
        t0 = time.perf_counter()
        pos = self._check_positions(positions)
        n = pos.size
        hf = self._mask(has_frame, n, "has_frame") & (frames is not None)
        hs = self._mask(has_spectrum, n, "has_spectrum") & (spectra is not None)
        with self._blas():
            t = time.perf_counter()
            cbed = np.zeros((n, self.n_cbed_features_), dtype=np.float32)
            if hf.any():
                fr = np.asarray(frames)
                if fr.ndim != 3 or fr.shape[0] != n:
                    raise ValueError(f"frames must have shape ({n}, H, W) for {n} positions; got {fr.shape}")
                if hf.all():
                    self.frame_reducer_.transform(fr, out=cbed)
                else:
                    cbed[hf] = self.frame_reducer_.transform(fr[hf])
            self._times["reduce_frames"] += time.perf_counter() - t
            t = time.perf_counter()
            eds = np.zeros((n, self.n_eds_features_), dtype=np.float32)
            if hs.any():
                sp = np.asarray(spectra)
                if sp.ndim != 2 or sp.shape[0] != n:
                    raise ValueError(f"spectra must have shape ({n}, {self.n_channels}) for {n} positions; "
                                     f"got {sp.shape}")
                eds[hs] = self.spectrum_reducer_.transform(sp[hs] if not hs.all() else sp)
            self._times["reduce_spectra"] += time.perf_counter() - t
            # for callers that keep reduced features (the centres, the demo's offline yardstick):
            # a 512 x 512 frame is binned once, not once per consumer (0.36 ms a frame on one core)
            self.last_features_ = (pos, cbed, eds, hf, hs)
            if self.on_features is not None:
                self.on_features(pos, cbed, eds, hf, hs)
            self._ingest(pos, cbed, eds, hf, hs)
        self._busy += time.perf_counter() - t0
        return self

    def partial_fit_features(
        self,
        positions: Any,
        cbed: np.ndarray,
        eds: np.ndarray,
        has_frame: Any = None,
        has_spectrum: Any = None,
    ) -> StreamingEngine:
        """As :meth:`partial_fit`, with already reduced features (binned frames, windowed spectra):
        replays of recorded scans and tests that do not regenerate frames."""
        t0 = time.perf_counter()
        pos = self._check_positions(positions)
        n = pos.size
        cbed = np.asarray(cbed, dtype=np.float32)
        eds = np.asarray(eds, dtype=np.float32)
        if cbed.shape != (n, self.n_cbed_features_) or eds.shape != (n, self.n_eds_features_):
            raise ValueError(
                f"features must have shapes ({n}, {self.n_cbed_features_}) and ({n}, {self.n_eds_features_}); "
                f"got {cbed.shape} and {eds.shape}"
            )
        hf = self._mask(has_frame, n, "has_frame")
        hs = self._mask(has_spectrum, n, "has_spectrum")
        with self._blas():
            self._ingest(pos, cbed, eds, hf, hs)
        self._busy += time.perf_counter() - t0
        return self

    def refresh(self, final: bool = False) -> StreamingEngine:
        """Re-read PCA in the current space, re-project every stored position, re-fit the clusters
        and recompute every membership. ``final=True`` also tries a full re-fit from k-means++
        restarts and keeps whichever partition has the lower FCM objective."""
        if not self.warmed_up_:
            logger.debug("refresh before the warm-up ended: nothing to do")
            return self
        t0 = time.perf_counter()
        with self._blas():
            self._refresh(final)
        dt = time.perf_counter() - t0
        self._times["refresh"] += dt
        self._busy += dt
        return self

    def finalize(self) -> StreamingEngine:
        """End of scan: end a still-running warm-up (short scans) and run a final refresh."""
        t0 = time.perf_counter()
        if not self.warmed_up_:
            with self._blas():
                self._finish_warmup(force=True)
        self._busy += time.perf_counter() - t0
        return self.refresh(final=True)

    # ------------------------------------------------------------------------------------------
    # validation
    # ------------------------------------------------------------------------------------------
    def _check_positions(self, positions: Any) -> np.ndarray:
        p = np.asarray(positions)
        if p.ndim != 1 or (p.size and not np.issubdtype(p.dtype, np.integer)):
            raise ValueError(f"positions must be a 1-D integer array; got dtype {p.dtype}, shape {p.shape}")
        n = int(self.n_positions)
        if p.size and (p.min() < 0 or p.max() >= n):
            bad = int(p[(p < 0) | (p >= n)][0])
            raise ValueError(f"scan position {bad} is outside 0..{n - 1}")
        return p.astype(np.intp)

    @staticmethod
    def _mask(mask: Any, n: int, name: str) -> np.ndarray:
        if mask is None:
            return np.ones(n, dtype=bool)
        m = np.asarray(mask, dtype=bool)
        if m.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},); got {m.shape}")
        return m

    # ------------------------------------------------------------------------------------------
    # processing
    # ------------------------------------------------------------------------------------------
    def _ingest(self, pos: np.ndarray, cbed: np.ndarray, eds: np.ndarray, hf: np.ndarray, hs: np.ndarray) -> None:
        keep = hf | hs
        n_skip = int(np.count_nonzero(~keep))
        if n_skip:
            self._counts["skipped"] += n_skip
            logger.info("%d positions without frame or spectrum skipped (first %d)", n_skip, int(pos[~keep][0]))
            pos, cbed, eds, hf, hs = pos[keep], cbed[keep], eds[keep], hf[keep], hs[keep]
        if pos.size == 0:
            return
        self._counts["batches"] += 1
        self._counts["positions"] += pos.size
        self._counts["duplicates"] += int(np.count_nonzero(self._arrived[pos]))
        self._arrived[pos] = True
        self._counts["incomplete"] += int(np.count_nonzero(~(hf & hs)))
        if not self.warmed_up_:
            self._warm_buffer.append((pos, cbed, eds, hf, hs))
            self._finish_warmup(force=False)
            return
        self._process(pos, cbed, eds, hf, hs)
        self._since_refresh += pos.size
        due = self.refresh_every is not None and self._since_refresh >= max(
            int(self.refresh_every), float(self.refresh_growth) * self._seen_at_refresh)
        if self.refresh_seconds is not None:
            due |= time.monotonic() - self._last_refresh_time >= float(self.refresh_seconds)
        if self._drift_due and self._since_refresh >= int(self.drift_min_gap):
            logger.info("the scan entered new material (positions' distances to the model rose, %d positions "
                        "since the last refresh): refreshing early", self._since_refresh)
            self._counts["drift_refreshes"] += 1
            due = True
        t = time.perf_counter()
        if self._refresh_job is not None:
            self._advance_refresh_job()
        elif due:
            # spread over this and the next batches (refresh_step_rows of read-out a batch)
            self._refresh_job = self._refresh_steps(final=False)
            self._advance_refresh_job()
        self._times["refresh"] += time.perf_counter() - t

    def _finish_warmup(self, force: bool) -> None:
        complete = sum(int(np.count_nonzero(b[3] & b[4])) for b in self._warm_buffer)
        if complete < int(self.warmup_positions) and not force:
            return
        if force and complete < max(int(self.n_clusters), 2):
            complete = self._one_signal_fallback()
        if complete < max(int(self.n_clusters), 2):
            raise ValueError(
                f"only {complete} positions with both a frame and a spectrum arrived; at least "
                f"{max(int(self.n_clusters), 2)} are needed to cluster"
            )
        pos, cbed, eds, hf, hs = (np.concatenate(parts) for parts in zip(*self._warm_buffer))
        self._warm_buffer = []
        logger.info("warm-up over after %d positions (%d complete)", pos.size, complete)
        self._process(pos, cbed, eds, hf, hs, first=True)
        self.warmed_up_ = True
        t = time.perf_counter()
        self._refresh(final=False)
        self._times["refresh"] += time.perf_counter() - t

    def _one_signal_fallback(self) -> int:
        """End of a scan in which one stream never (or almost never) arrived: cluster on the signal
        that did. The missing block is left at zero for every position, so it has no variance and
        adds nothing to any distance (balance weight 1, RobustScaler scale 1); counted in
        ``stats_["one_signal_positions"]``. Returns the positions now usable."""
        n_frames = sum(int(np.count_nonzero(b[3])) for b in self._warm_buffer)
        n_spectra = sum(int(np.count_nonzero(b[4])) for b in self._warm_buffer)
        use_frames = n_frames >= n_spectra
        used = 0
        for i, (pos, cbed, eds, hf, hs) in enumerate(self._warm_buffer):
            have = hf if use_frames else hs
            if use_frames:
                eds[have] = 0.0
            else:
                cbed[have] = 0.0
            self._warm_buffer[i] = (pos, cbed, eds, hf | have, hs | have)
            used += int(np.count_nonzero(have))
        self._counts["one_signal_positions"] += used
        logger.warning("the %s stream never arrived: clustering %d positions on %s alone",
                       "EDS" if use_frames else "frame", used, "CBED" if use_frames else "EDS")
        return used

    def _process(self, pos, cbed, eds, hf, hs, first: bool = False) -> None:
        t = time.perf_counter()
        both = hf & hs
        if both.any():
            self.balancer_.partial_fit({"cbed": cbed[both], "eds": eds[both]})
            self._complete[pos[both]] = True
        if not both.all():
            # the missing block at its median: scaled value 0, so it adds nothing to any distance
            centre = self.balancer_.center_.astype(np.float32)
            sl = self.balancer_.feature_slices_
            cbed[~hf] = centre[sl["cbed"]]
            eds[~hs] = centre[sl["eds"]]
        if first:
            self._c_warm = self.balancer_.multiplier_.copy()
            # the counts store decodes code * c_warm (float32), the product made just below
            self.store_.set_scale(self._c_warm)
        x_warm = self.balancer_.concatenate({"cbed": cbed, "eds": eds})
        x_warm *= self._c_warm.astype(np.float32)
        self._times["balance"] += time.perf_counter() - t
        t = time.perf_counter()
        if both.any():
            self.pca_.partial_fit(x_warm[both] if not both.all() else x_warm, warmup_multiplier=self._c_warm)
        self._times["pca"] += time.perf_counter() - t
        # Kept whole until the next refresh: encoded then, into a basis that has seen them
        # (encoding into a basis that predates a new phase loses that phase for good).
        self._pending.append((pos, x_warm))
        if self._scorer is not None and not first:
            t = time.perf_counter()
            A, b = self._scorer
            Z = x_warm @ A
            Z -= b
            if self.drift_ is not None and both.any():
                # before the model learns them: how far the new positions are from what it knows
                if self.drift_.update_many(self._novelty(x_warm[both], Z[both], self._fcm.cluster_centers_)) is not None:
                    self._drift_due = True
            self._fcm.partial_fit(Z)
            U1 = self._fcm.predict_memberships(Z)
            self.level1_memberships_[pos] = U1
            if self._host_z is not None:
                self._compose_pooled(pos, U1, x_warm)
            else:
                self.memberships_[pos] = self._compose(U1, x_warm)
            self._times["cluster"] += time.perf_counter() - t
        if self._refresh_job is None and sum(p.size for p, _ in self._pending) >= int(self.pending_limit):
            # (not while a spread refresh reads the store: a new basis would re-base its rows)
            self._flush_pending()

    def _flush_pending(self) -> None:
        """Update the store's basis (it has now seen the pending positions) and encode them."""
        if not self._pending:
            return
        t = time.perf_counter()
        if self.store_.mode == "basis":
            self._update_basis()
        self._times["basis"] += time.perf_counter() - t
        t = time.perf_counter()
        for pos, x in self._pending:
            self.store_.add(pos, x)
        self._pending = []
        self._counts["pending_flushes"] += 1
        self._times["store"] += time.perf_counter() - t

    def _update_basis(self) -> None:
        """Re-take the store's basis from the PCA read-out in the *current* space and re-base.

        A score is ``(D x_warm - mean_now) . v = x_warm . (D v) - const``, so what a stored position
        must keep is its projection on ``span(D V)``: the current-space eigenvectors mapped into
        warm space, orthonormalised. (The warm space's own leading eigenvectors are the wrong
        basis: a block whose weight grew after the warm-up - EDS once the film arrives - sits
        at the noise level there, and its directions were lost: ARI 0.64 against the reference
        instead of 0.99 on the phantom, docs/engine.md.)
        """
        c_now = self.balancer_.multiplier_
        self.pca_.set_current_multiplier(c_now)
        D = c_now / self._c_warm
        M = self.pca_.components_all_.T * D[:, np.newaxis]
        # at most a quarter of the slots: the old basis must keep room, or this is a replacement
        n_new = max(1, min(int(self.basis_new_directions), self.store_.rank // 4))
        top = M[:, :n_new]
        old = self.store_.basis_
        # Directions are added, not swapped: the leading current-space directions first, then the
        # old basis (minus what the new directions already hold), truncated to the rank. Replacing
        # the basis outright re-projects stored positions again and again and erodes them (scores
        # off by 40 % of their spread on the phantom, docs/engine.md).
        mu = self.pca_.mean_ / D  # warm-space mean of everything seen
        if self.store_.center_ is None:
            cand = M
        else:
            # The centre follows the mean, and the direction it moved in joins the basis: without
            # it every stored position loses the part of the mean shift outside the new span (a
            # raster scan's mean moves from substrate to film).
            shift = (mu - self.store_.center_)[:, np.newaxis]
            cand = np.hstack([top, shift, old])
        Q, Rq = np.linalg.qr(cand)
        # drop directions already held by earlier columns (a near-zero pivot after projection)
        diag = np.abs(np.diag(Rq))
        keep = diag > 1e-6 * max(float(diag.max()), 1e-300)
        self.store_.set_basis(Q[:, keep][:, : self.store_.rank], mu)
        self._counts["basis_updates"] += 1

    def _refresh(self, final: bool) -> None:
        """A whole refresh now: the warm-up's end, the final one, :meth:`refresh`. A spread
        refresh still running is completed first."""
        self._complete_refresh_job()
        for _ in self._refresh_steps(final):
            pass

    def _complete_refresh_job(self) -> None:
        job, self._refresh_job = self._refresh_job, None
        if job is not None:
            for _ in job:
                pass

    def _advance_refresh_job(self) -> None:
        """Run the spread refresh for this batch's share: steps until ``refresh_step_rows`` rows of
        read-out work are done, or it has committed. The share is counted in rows, not seconds, so
        the same batches give the same result on any machine (a replay equals the live run)."""
        done = 0
        while self._refresh_job is not None and done < self.refresh_step_rows:
            try:
                done += next(self._refresh_job)
            except StopIteration:
                self._refresh_job = None

    def _refresh_steps(self, final: bool):
        """A refresh as a generator of steps, each yielding the rows of read-out work it did.

        Everything it computes is held aside and committed at the end in one step, so batches
        that arrive while a spread refresh runs are scored with the committed model (and are
        re-scored with the new one at the commit). Why spread: at 256 x 256 a refresh reads every
        stored position twice (level 1 and level 2, 0.29 s a read-out at 40,000 positions) and
        stalled the batch that triggered it by 1-2 s, which the flags waited for.
        """
        self._since_refresh = 0
        self._seen_at_refresh = self.store_.n_seen
        self._last_refresh_time = time.monotonic()
        recent = self._recent_vectors(2048) if self.drift_ is not None and not final else None
        self._flush_pending()
        c_now = self.balancer_.multiplier_
        self.pca_.set_current_multiplier(c_now)
        D = c_now / self._c_warm
        mean_now = self.pca_.mean_.copy()
        idx = self.store_.seen_positions
        nc = int(self.n_clusters)
        seed = int(self._rng.randint(np.iinfo(np.int32).max))
        if final:
            # the final result must not depend on the history (batch sizes, drift refreshes): a
            # replay of the recording, in one process or on Dask, derives the same seed
            seed = final_seed(self.random_state)
            self.final_seed_ = seed
        k = int(min(self.pca_.n_components_, int(self.max_components)))
        V = self.pca_.components_all_[:k].T.copy()
        evr = self.pca_.explained_variance_ratio_all_[:k].copy()
        if final and int(self.final_pca_sample) > 0 and self.store_.mode != "basis":
            # the end of the scan can afford the exact read-out the sketch approximates
            V, evr = self._sample_pca(D, seed, int(self.final_pca_sample))
            k = V.shape[1]
        Z = yield from self._apply_steps(D[:, np.newaxis] * V, (mean_now @ V).astype(np.float32), idx)

        prev = self._readout
        U_prev = self.level1_memberships_[idx]
        have_prev = self._fcm is not None and not np.isnan(U_prev).any()
        warm_centres = None
        if have_prev:
            Wm = np.power(U_prev.astype(np.float64), float(self.m))
            wsum = Wm.sum(axis=0)
            if np.all(wsum > 0):
                warm_centres = (Wm.T @ Z.astype(np.float64)) / wsum[:, np.newaxis]
        angle = 90.0
        if prev is not None and prev["V"].shape[1] == k:
            angle = float(np.degrees(np.max(subspace_angles(prev["V"], V))))
        full = warm_centres is None or final or angle > float(self.refit_angle_deg)

        candidates = []
        if warm_centres is not None:
            warm = FuzzyCMeans(nc, m=self.m, init=warm_centres, n_init=1,
                               max_iter=300 if final else int(self.refresh_iter), random_state=seed).fit(Z)
            candidates.append(("warm", warm))
        if full:
            # restarts on a subsample find the basin, a warm-started run on all positions settles
            # it: the refresh stays bounded however large the scan (measured: full restarts on
            # 16k positions were half of the engine's time)
            n_init = int(self.final_n_init) if final else int(self.fcm_n_init)
            rs = np.random.RandomState(seed)
            sub = Z if Z.shape[0] <= int(self.refit_sample) else Z[
                np.sort(rs.choice(Z.shape[0], int(self.refit_sample), replace=False))]
            seeded = FuzzyCMeans(nc, m=self.m, n_init=n_init, random_state=rs).fit(sub)
            fresh = seeded if sub is Z else FuzzyCMeans(
                nc, m=self.m, init=seeded.cluster_centers_, n_init=1,
                max_iter=300 if final else int(self.refresh_iter), random_state=seed).fit(Z)
            candidates.append(("full", fresh))
            self._counts["full_refits"] += 1
        name, best = min(candidates, key=lambda c: c[1].objective_)
        centres = best.cluster_centers_
        if warm_centres is not None and name == "full":
            # keep cluster numbers stable for a live view: match the new centres to the old ones
            cost = ((warm_centres[:, np.newaxis, :] - centres[np.newaxis]) ** 2).sum(axis=2)
            _, col = linear_sum_assignment(cost)
            centres = centres[col]
        logger.info("refresh %d: %d positions, %d components, subspace moved %.1f deg, kept %s fit",
                    self._counts["refreshes"] + 1, idx.size, k, angle, name)
        # the mini-batch model continues from the refreshed centres, weighted by all positions seen
        mb = MiniBatchFuzzyCMeans(nc, m=self.m, init=centres, init_size=max(idx.size, nc),
                                  init_max_iter=1, n_init=1, random_state=seed)
        mb.partial_fit(Z)
        U = mb.predict_memberships(Z)
        # the steps that are not read-outs count too, as the rows whose read-out costs as much
        # (counting read-outs only left batches of 1.0-1.45 s at 256 x 256): the level-1 fits
        # are passes over every position
        yield idx.size
        host = _HostState.of(self)
        if int(self.host_clusters):
            yield from self._timed(self._refine_host_steps(idx, U, final, seed, host), "host")
        composed = yield from self._compose_stored_steps(U, idx, final, host)
        # the level-2 composition, pooling and merge were passes over every position
        yield idx.size
        # ---- commit: from here on nothing yields, so a batch never sees half of a refresh
        host.commit(self)
        self.level1_memberships_[idx] = U
        self.memberships_[idx] = composed
        self._fcm = mb
        self._readout = {"D": D, "V": V, "mean": mean_now}
        A = D[:, np.newaxis] * V
        self._scorer = (A.astype(np.float32), (mean_now @ V).astype(np.float32))
        self.cluster_centers_ = mb.cluster_centers_.copy()
        self.n_components_ = k
        self.explained_variance_ratio_ = evr
        if recent is not None and recent.shape[0]:
            # the reference: the new model's distance to the latest positions it was fitted on, as
            # whole vectors (not the store's: the basis store keeps no residual, and its baseline
            # would make every new position look novel)
            A32, b32 = self._scorer
            reference = self._novelty(recent, recent @ A32 - b32, mb.cluster_centers_)
            if np.median(reference) > 0:
                self.drift_.reset(reference)
        self._drift_due = False
        self.validity_ = {
            "partition_coefficient": partition_coefficient(U),
            "partition_entropy": partition_entropy(U),
            "xie_beni": xie_beni(Z, mb.cluster_centers_, U, m=float(self.m)),
        }
        self._counts["refreshes"] += 1
        # positions that arrived while a spread refresh ran were scored with the model it replaces
        self._rescore_pending()


    def _timed(self, steps, stage: str):
        """Drive the generator ``steps``, adding the time of each of its steps to ``stage``."""
        it = iter(steps)
        while True:
            t = time.perf_counter()
            try:
                work = next(it)
            except StopIteration as stop:
                self._times[stage] += time.perf_counter() - t
                return stop.value
            self._times[stage] += time.perf_counter() - t
            yield work

    def _apply_steps(self, A: np.ndarray, b: np.ndarray, idx: np.ndarray):
        """``stored_vectors(idx) @ A - b`` (float32), read in steps of half ``refresh_step_rows``."""
        out = np.empty((idx.size, A.shape[1]), dtype=np.float32)
        step = max(1, int(self.refresh_step_rows) // 2)
        for s in range(0, idx.size, step):
            sel = idx[s:s + step]
            out[s:s + sel.size] = self.store_.apply(A, sel)
            yield sel.size
        out -= b
        return out

    def _rescore_pending(self) -> None:
        """Memberships of the positions not yet encoded, with the model just committed: those a
        spread refresh left behind (they arrived while it ran; inline, there are none)."""
        if not self._pending or self._scorer is None:
            return
        A, b = self._scorer
        for pos, x_warm in self._pending:
            Z = x_warm @ A
            Z -= b
            self._fcm.partial_fit(Z)
            U1 = self._fcm.predict_memberships(Z)
            self.level1_memberships_[pos] = U1
            if self._host_z is not None:
                self._compose_pooled(pos, U1, x_warm)
            else:
                self.memberships_[pos] = self._compose(U1, x_warm)

    def _recent_vectors(self, limit: int) -> np.ndarray:
        """The whole warm-space vectors of the latest (at most ``limit``) complete positions not yet
        encoded into the store."""
        parts, have = [], 0
        for pos, x in reversed(self._pending):
            keep = x[self._complete[pos]]
            parts.append(keep[-(limit - have):])
            have += parts[-1].shape[0]
            if have >= limit:
                break
        if not parts:
            return np.zeros((0, self.n_features_), np.float32)
        return np.concatenate(parts[::-1]).astype(np.float32, copy=False)

    def _novelty(self, x_warm: np.ndarray, Z: np.ndarray, centres: np.ndarray) -> np.ndarray:
        """Squared distance of positions to the model in the full current space: the distance of
        their scores ``Z`` to the nearest centre plus what the PCA subspace does not hold (a layer
        the model never saw lies mostly outside it: measured, the film under a substrate-only model
        was not farther than the substrate *within* the subspace)."""
        r = self._readout
        y = x_warm * r["D"].astype(np.float32)
        y -= r["mean"].astype(np.float32)
        z = np.asarray(Z, dtype=np.float32)
        outside = np.maximum(np.einsum("ij,ij->i", y, y) - np.einsum("ij,ij->i", z, z), 0.0)
        return outside + fcm_kernels.sq_euclidean(z, centres).min(axis=1)

    def _sample_pca(self, D: np.ndarray, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Components (F, k) and their explained-variance ratios from a seeded sample of the stored
        complete positions, in the current space ``x_warm * D`` (:mod:`streamclust.decomposition.sample_pca`)."""
        t = time.perf_counter()
        pool = np.nonzero(self._complete)[0]
        if pool.size < 2:
            pool = self.store_.seen_positions
        sample = pool if pool.size <= size else np.sort(
            np.random.RandomState(seed).choice(pool, size, replace=False))
        X = self._stored_vectors(sample) * D.astype(np.float32)
        res = one_percent_pca(X, max_components=int(self.max_components),
                              min_explained_ratio=float(self.min_explained_ratio), random_state=seed)
        self._counts["sample_pca"] += 1
        logger.info("PCA from %d stored positions: %d components (streaming sketch: %d), %.1f s",
                    sample.size, res.n_components, min(self.pca_.n_components_, int(self.max_components)),
                    time.perf_counter() - t)
        return res.components, res.explained_variance_ratio[:res.n_components].copy()

    # ------------------------------------------------------------------------------------------
    # host refinement (level 2)
    # ------------------------------------------------------------------------------------------
    def _inv_c_warm(self) -> np.ndarray:
        c = np.asarray(self._c_warm, dtype=np.float64)
        return np.where(c > 0, 1.0 / np.where(c > 0, c, 1.0), 0.0).astype(np.float32)

    def _stored_vectors(self, idx: np.ndarray) -> np.ndarray:
        """Warm-space vectors of stored positions (exact in the full store, the basis
        reconstruction in the compact one)."""
        store = self.store_
        if hasattr(store, "vectors"):
            return np.asarray(store.vectors(idx), dtype=np.float32)
        if store.mode == "full":
            return np.asarray(store.data[idx], dtype=np.float32)
        B = store.basis_
        return (np.asarray(store.data[idx][:, : B.shape[1]], dtype=np.float32) @ B.T.astype(np.float32)
                + store.center_.astype(np.float32))

    def _refine_host_steps(self, idx: np.ndarray, U: np.ndarray, final: bool, seed: int, st: _HostState):
        """Level 2: re-cluster the host cluster among its own positions (module host_refine), in
        steps (a generator), into ``st``: the engine's own level-2 state is not touched."""
        k2 = int(self.host_clusters)
        if final:
            # the final partition is per position, even when the host is too small to refine
            # below (the live pooling grid would otherwise still pool the final composition)
            st.z = None
        # the host: the largest level-1 cluster with those sharing its positions (a film split by
        # thickness); the primary only changes for a clearly larger cluster, or the sub-clusters
        # would be renumbered (and flags flicker) at every refresh (host_refine.host_group)
        mixing = None
        if self.scan_shape is not None and self.host_mixing:
            mixing = membership_mixing(U, self.scan_shape, idx)
        # the final host is chosen without the live history (previous primary), as the Dask replay
        # and the offline reference choose it: the final partition must not depend on how the scan
        # went; the sub-cluster numbers stay stable anyway (matched by position below)
        host, group = host_group(U, overlap=float(self.host_overlap),
                                 previous=None if final else st.cluster,
                                 mixing=mixing, min_mixing=float(self.host_mixing or 0.0))
        clear = self._clear_in(U, group)
        inside = idx[clear]
        if inside.size < max(int(self.host_min_positions), 4 * k2):
            logger.debug("host %s has %d clear positions: no refinement yet", group, inside.size)
            return
        changed = host != st.cluster or group != st.group
        grew = inside.size > (1.0 + float(self.host_refit_growth)) * max(st.fit_size, 1)
        refit_space = st.space is None or changed or grew or final
        rs = np.random.RandomState(seed)
        if refit_space:
            # live spaces from half the sample: the randomized SVD is the host stage's main cost
            # (0.37 s a fit at 4,096 x 4,586, one BLAS thread) and a live space is replaced as the
            # host grows; the final space uses the whole sample
            size = int(self.host_sample_size) if final else max(int(self.host_sample_size) // 2, 4 * k2)
            sample = inside
            if inside.size > size:
                sample = np.sort(rs.choice(inside, size, replace=False))
            st.space = HostRefinement(
                self.n_cbed_features_, k2, threshold=float(self.host_threshold),
                min_components=int(self.host_min_components), max_components=int(self.max_components),
                min_explained_ratio=float(self.min_explained_ratio), sample_size=int(self.host_sample_size),
                m=float(self.m), random_state=seed,
                # the final space needs the converged spectrum (the 1 % rule sits on a flat part
                # of it: streamclust.decomposition.sample_pca); live spaces are re-fitted as the host grows and
                # 4 power iterations cost 0.6x of 7 (benchmarks/bench_engine.py: host stage)
                iterated_power=7 if final else 4,
            ).fit_space(self._stored_vectors(sample) * self._inv_c_warm())
            st.fit_size = inside.size
            self._counts["host_space_fits"] += 1
            # the space's robust scaling and randomized SVD cost as much as reading about 12 rows
            # a sample row (0.37 s at 4,096 x 4,586 against 7 us a row read, 256 x 256)
            yield 12 * sample.size
        A, b = st.space.affine()
        # the level-2 space is defined on raw features (its zero-IQR floor of 1 is in raw counts,
        # so it is not invariant to the warm multiplier): fold 1 / c_warm into the map
        A = (A * self._inv_c_warm()[:, np.newaxis]).astype(np.float32)
        # every stored position's level-2 scores, once: the host's fit uses its clear rows, and
        # _compose_stored the whole of it right after (it used to decode the store twice); with
        # the element-line counts when the merge needs them: one affine map, one pass
        W = self._line_map
        if W is None:
            Z2_all = Z2_own = yield from self._apply_steps(A, b, idx)
            lines = None
        else:
            both = yield from self._apply_steps(np.hstack([A, W * self._inv_c_warm()[:, np.newaxis]]),
                                                np.concatenate([b, np.zeros(W.shape[1], b.dtype)]), idx)
            Z2_all = Z2_own = np.ascontiguousarray(both[:, :A.shape[1]])
            lines = np.clip(np.rint(both[:, A.shape[1]:]), 0, None).astype(np.int64)
            del both
        if self._pooling(final):
            # live: cluster neighbourhood means (module spatial_pool); the final partition is per
            # position, as the paper's
            st.z = np.full((int(self.n_positions), Z2_all.shape[1]), np.nan, dtype=np.float32)
            st.z[idx] = Z2_all
            st.pool = np.zeros(int(self.n_positions), dtype=bool)
            st.pool[inside] = True
            Z2_all = neighbourhood_mean(st.z, st.pool, self.scan_shape, idx)
        else:
            st.z = None
        st.scores = (idx, Z2_all)
        Z2 = Z2_all[clear]
        prev_labels = None
        # the sub-clusters keep their numbers across a change of host group or space too: they
        # are matched by the positions they hold; only positions clearly inside the previous host
        # count (for the others the sub-columns hold a sliver of membership, and their arg-max
        # is noise)
        if st.cluster is not None:
            prev = self.memberships_[inside, int(self.n_clusters):]
            known = np.isfinite(prev).all(axis=1) & (np.nan_to_num(prev).sum(axis=1) > float(self.host_threshold))
            prev_labels = np.where(known, np.argmax(np.nan_to_num(prev), axis=1), -1)
        if refit_space or st.fcm is None:
            n_init = int(self.final_n_init) if final else int(self.fcm_n_init)
            sub = Z2 if Z2.shape[0] <= int(self.refit_sample) else Z2[
                np.sort(rs.choice(Z2.shape[0], int(self.refit_sample), replace=False))]
            fcm = FuzzyCMeans(k2, m=self.m, n_init=n_init, random_state=rs).fit(sub)
            if sub is not Z2:
                fcm = FuzzyCMeans(k2, m=self.m, init=fcm.cluster_centers_, n_init=1,
                                  max_iter=300 if final else int(self.refresh_iter), random_state=seed).fit(Z2)
        else:
            fcm = FuzzyCMeans(k2, m=self.m, init=st.fcm.cluster_centers_, n_init=1,
                              max_iter=300 if final else int(self.refresh_iter), random_state=seed).fit(Z2)
        if prev_labels is not None and (prev_labels >= 0).any():
            # keep sub-cluster numbers stable for a live view (a new space has new coordinates,
            # so match by which positions they hold, not by centres)
            perm = match_by_overlap(prev_labels, fcm.labels_, k2)
            fcm.cluster_centers_ = fcm.cluster_centers_[perm]
            fcm.memberships_ = fcm.memberships_[:, perm]
            fcm.labels_ = np.argmax(fcm.memberships_, axis=1)
        st.fcm = fcm
        st.scorer = (A, b)
        if lines is not None:
            # which sub-clusters are one composition: each position labelled by its own scores (not
            # the live neighbourhood means, which already carry the neighbours' data)
            own_labels = np.argmax(fcm.predict_memberships(Z2_own[clear]), axis=1)
            st.merged_into = merge_same_composition(lines[clear], inside, own_labels, self.scan_shape, k2,
                                                            float(self.host_merge_effect))
        st.cluster = host
        st.group = group
        logger.info("host %s refined: %d positions, %d components, %s", group, inside.size,
                    st.space.n_components_, "new space" if refit_space else "same space")

    def _compose_stored_steps(self, U: np.ndarray, idx: np.ndarray, final: bool, st: _HostState):
        """The memberships of the stored positions ``idx`` from level-1 ``U`` and the level-2 state
        ``st`` (a generator of steps; ``st``'s pooling grid is updated, not the engine's)."""
        if st.scorer is None:
            return compose_memberships(U, None, None, int(self.host_clusters))
        A, b = st.scorer
        cached, st.scores = st.scores, None
        if cached is not None and cached[0] is idx:
            Z2 = cached[1]
        else:
            Z2 = yield from self._apply_steps(A, b, idx)
            if st.z is not None:
                # the host was not refined at this refresh: pool in the space it has
                st.z[idx] = Z2
                st.pool[idx] = self._clear_in(U, st.group)
                Z2 = neighbourhood_mean(st.z, st.pool, self.scan_shape, idx)
        U2 = merge_columns(st.fcm.predict_memberships(Z2), st.merged_into)
        if final and self.host_spatial and self.scan_shape is not None:
            U2 = spatial_memberships(U2, idx, self._clear_in(U, st.group), self.scan_shape)
        return compose_memberships(U, U2, st.group, int(self.host_clusters))

    def _merged(self, U2: np.ndarray) -> np.ndarray:
        """Level-2 memberships with the sub-clusters that are one region summed (cluster_merge)."""
        return merge_columns(U2, self.host_merged_into_)

    def _clear_in(self, U: np.ndarray, group) -> np.ndarray:
        """Positions clearly inside the host group: summed level-1 membership > ``host_threshold``
        (they shape the level-2 space and are the pooling's neighbours)."""
        return U[:, list(group)].sum(axis=1) > float(self.host_threshold)

    def _pooling(self, final: bool) -> bool:
        return bool(self.host_pooling) and self.scan_shape is not None and not final

    def _compose_pooled(self, pos: np.ndarray, U1: np.ndarray, x_warm: np.ndarray) -> None:
        """New positions' memberships with live pooling: their level-2 scores join the grid, and
        they and their already scanned neighbours (whose neighbourhoods they complete) are
        re-predicted from neighbourhood means."""
        A, b = self._host_scorer
        self._host_z[pos] = x_warm @ A - b
        self._host_pool[pos] = self._clear_in(U1, self.host_group_)
        near = neighbours(pos, self.scan_shape)
        near = near[np.isfinite(self._host_z[near, 0]) & np.isfinite(self.level1_memberships_[near, 0])]
        U2 = self._merged(self._host_fcm.predict_memberships(
            neighbourhood_mean(self._host_z, self._host_pool, self.scan_shape, near)))
        self.memberships_[near] = compose_memberships(self.level1_memberships_[near], U2, self.host_group_,
                                                      int(self.host_clusters))

    def _compose(self, U: np.ndarray, x_warm: np.ndarray) -> np.ndarray:
        if not int(self.host_clusters):
            return U
        if self._host_scorer is None:
            return compose_memberships(U, None, None, int(self.host_clusters))
        A, b = self._host_scorer
        U2 = self._merged(self._host_fcm.predict_memberships(x_warm @ A - b))
        return compose_memberships(U, U2, self.host_group_, int(self.host_clusters))

    def __getstate__(self) -> dict:
        # a spread refresh in progress is a running generator: it is completed, then pickled
        self._complete_refresh_job()
        state = dict(self.__dict__)
        # a caller's callback and the last batch's arrays are not the engine's state
        state["on_features"] = None
        state.pop("last_features_", None)
        return state

    def __setstate__(self, state: dict) -> None:
        # an engine pickled before a parameter existed gets the parameter's default
        state.setdefault("host_mixing", None)
        state.setdefault("host_merge_effect", 0.0)
        state.setdefault("host_merge_elements", ("Fe", "Co"))
        state.setdefault("host_spatial", False)
        state.setdefault("kernel_threads", 1)
        state.setdefault("refresh_growth", 0.0)
        state.setdefault("_seen_at_refresh", 0)
        state.setdefault("on_features", None)
        state.setdefault("host_merged_into_", None)
        state.setdefault("_line_map", None)
        state.setdefault("spill", "off")
        state.setdefault("_refresh_job", None)
        self.__dict__.update(state)
        # wall-clock refresh timing restarts in the new process
        self._last_refresh_time = time.monotonic()
