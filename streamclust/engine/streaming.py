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
from threadpoolctl import threadpool_limits

from streamclust.cluster import fcm_kernels
from streamclust.features.block_balance import BlockBalancer
from streamclust.cluster.merge import line_count_map
from streamclust.cluster.drift import NoveltyDrift
from streamclust.features.reducers import FrameReducer, SpectrumReducer
from streamclust.cluster.fcm import FuzzyCMeans, MiniBatchFuzzyCMeans
from streamclust.cluster.host_refine import HostRefinement
from streamclust.decomposition.incremental_pca import StreamingPCA
from streamclust.decomposition.position_store import PositionStore
from streamclust.engine.host_level import HostLevel
from streamclust.engine.params import EngineParams
from streamclust.engine.refresh import Refresh, final_seed
from streamclust.engine.threads import kernel_threads

logger = logging.getLogger(__name__)

__all__ = ["StreamingEngine", "final_seed"]


#: a position store larger than this spills to disk with ``spill="auto"`` (256 MiB)
SPILL_MIN_BYTES = 256 * 2**20

_STAGES = ("reduce_frames", "reduce_spectra", "balance", "pca", "basis", "store", "cluster", "refresh", "host")


class StreamingEngine(Refresh, HostLevel):
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
            self._learn_and_score(pos, x_warm, Z)
            self._times["cluster"] += time.perf_counter() - t
        if self._refresh_job is None and sum(p.size for p, _ in self._pending) >= int(self.pending_limit):
            # (not while a spread refresh reads the store: a new basis would re-base its rows)
            self._flush_pending()

    def _learn_and_score(self, pos: np.ndarray, x_warm: np.ndarray, Z: np.ndarray) -> None:
        """The mini-batch model learns positions ``pos`` (level-1 scores ``Z``), then their
        memberships are predicted and composed with level 2 (pooled on the scan grid if on)."""
        self._fcm.partial_fit(Z)
        U1 = self._fcm.predict_memberships(Z)
        self.level1_memberships_[pos] = U1
        if self._host_z is not None:
            self._compose_pooled(pos, U1, x_warm)
        else:
            self.memberships_[pos] = self._compose(U1, x_warm)

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
