"""The live analysis of one scan: engine, thresholded centres, second-phase flags, events, live view.

:class:`LiveAnalysis` is what runs beside the acquisition: every joined batch goes to the streaming
engine (memberships) and to the thresholded-centre store (raw signals); after each engine refresh the
flagger re-assesses the clusters, flag events go out on ZeroMQ, and the live view (if any) gets a new
snapshot. Every event is also kept with the fraction of the scan acquired when it was decided, so a
summary can say how early a second phase was flagged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from streamclust.adapters.join import Batch
from streamclust.engine.centres import ThresholdedCentres, centre_signals
from streamclust.engine.streaming import StreamingEngine
from streamclust.features.reducers import FrameReducer
from streamclust.flags.stats import line_windows, window_counts
from streamclust.flags.flagger import FLAG_EDS_REBIN, SecondPhaseFlagger, eds_window
from streamclust.results.scan_result import ScanResult, summarise_flags

logger = logging.getLogger(__name__)

__all__ = ["LiveAnalysis"]


class LiveAnalysis:
    """Glue of the live stages for one scan (a thin orchestrator; each stage owns its idea).

    Parameters
    ----------
    scan_shape : (ny, nx)
    frame_shape : (h, w)
    energy_axis_kev : ndarray
        Channel centres of the spectra.
    n_clusters : int
    events : EventPublisher, optional
        Where flag events go (PUB for viewers, PUSH for a lossless consumer).
    liveview : LiveView, optional
    assess_every : int
        Positions between flag assessments when no engine refresh happened in between.
    engine_params : dict, optional
        Extra :class:`~streamclust.engine.streaming.StreamingEngine` parameters.
    flags : FlagsConfig or mapping, optional
        The :class:`~streamclust.flags.flagger.SecondPhaseFlagger`'s parameters (``[flags]``; default its
        defaults). The flagger is built here, once: the line windows of its elements are made
        from it, so it is not replaced afterwards (:attr:`flagger` is read-only).
    """

    def __init__(self, scan_shape, frame_shape, energy_axis_kev, *, n_clusters: int = 6,
                 thresholds=(0.5, 0.75), events=None, liveview=None, assess_every: int = 1024,
                 random_state: int | None = 0, engine_params: dict | None = None,
                 flags: Mapping | Any | None = None):
        # first: bad [flags] parameters fail before the engine's stores are allocated
        self._flagger = SecondPhaseFlagger(**(asdict(flags) if is_dataclass(flags) else dict(flags or {})))
        self.scan_shape = tuple(int(v) for v in scan_shape)
        self.n_positions = int(np.prod(self.scan_shape))
        axis = np.asarray(energy_axis_kev, dtype=float)
        self.energy_axis_kev = axis
        self.engine = StreamingEngine(
            self.n_positions, scan_shape=self.scan_shape, frame_shape=tuple(frame_shape),
            n_channels=axis.size, energy_axis=(float(axis[0]), float(axis[1] - axis[0])),
            n_clusters=n_clusters, random_state=random_state, **(engine_params or {}))
        # centre patterns are kept at 32 x 32 per position: bin with the Numba reducer here (a NumPy
        # block sum of full frames inside the store measured ~1,100 frames/s, the reducer > 5,000)
        h, w = (int(v) for v in frame_shape)
        self._centre_bin = max(1, min(h, w) // 32)
        self._centre_reducer = FrameReducer(bin_factor=self._centre_bin, frame_shape=(h, w)).fit()
        self._centre_shape = (h // self._centre_bin, w // self._centre_bin)
        # with host refinement the engine reports n_clusters + host sub-clusters (engine docs)
        self.n_output_clusters = int(self.engine.n_output_clusters_)
        # the raw per-position store of the centres (8 kB a position, and the flagger's features)
        # spills to disk as the engine's position store does ([engine] spill)
        centre_bytes = ThresholdedCentres.state_bytes(self.n_positions, self.n_output_clusters, len(thresholds),
                                                      self._centre_shape, axis.size)["total"]
        self.centres = ThresholdedCentres(self.n_output_clusters, tuple(thresholds), n_positions=self.n_positions,
                                          cbed_shape=self._centre_shape,
                                          spill_dir=self.engine.spill_dir_for(centre_bytes))
        self.events = events
        self.liveview = liveview
        self.assess_every = int(assess_every)
        self._window = eds_window(axis)
        # element-line window counts of every position, for the flagger's composition test
        # ([flags] method = "test"; 2 bytes a position and element)
        self._make_line_windows()
        self._seen = np.zeros(self.n_positions, bool)
        self._last_assess = 0
        self._analysed = 0  # positions handed to the engine (where large batches are cut)
        self._last_refreshes = 0
        self.flag_log: list[dict] = []
        self.centre_set = None
        self.t0 = time.perf_counter()

    @classmethod
    def from_config(cls, config, scan_shape, frame_shape, energy_axis_kev, *, events=None, liveview=None,
                    random_state="config") -> LiveAnalysis:
        """The live analysis a :class:`~streamclust.app.config.Config` describes for this scan: the engine
        resolved for its size, the centres' thresholds and cadence, and the configured flagger
        (``streamclust run``, the demo and the benchmarks build it this one way).
        ``random_state="config"``: the configuration's ``[engine] random_state``."""
        n = int(np.prod([int(v) for v in scan_shape]))
        engine_params = config.engine.resolved(n)
        seed = engine_params.pop("random_state")
        return cls(scan_shape, frame_shape, energy_axis_kev, n_clusters=config.engine.n_clusters,
                   thresholds=config.centres.thresholds, events=events, liveview=liveview,
                   assess_every=config.centres.resolved_assess_every(n),
                   random_state=seed if random_state == "config" else random_state,
                   engine_params=engine_params, flags=config.flags)

    @property
    def flagger(self) -> SecondPhaseFlagger:
        """The second-phase flagger, built from ``flags`` at construction."""
        return self._flagger

    @property
    def seen(self) -> np.ndarray:
        """Boolean mask (n_positions,) of positions that arrived (a frame or a spectrum)."""
        return self._seen.copy()

    @property
    def n_seen(self) -> int:
        return int(self._seen.sum())

    def process(self, batch) -> None:
        """One joined batch (positions, frames, spectra, has_frame, has_spectrum).

        A batch of more than ``assess_every`` positions is analysed in pieces cut where the count
        of positions analysed in this scan reaches a multiple of ``assess_every``: the batch size
        is the transport's (memory, hand-over cost), and the refresh and assessment cadence must
        not depend on it (measured on ``make demo``, seed 0, 256-position batches: whole batches
        assessed every 4 rows instead of 2, and the second phase was flagged at 44 % of the scan
        instead of 37.5 %, 4 rows later; the processing-bound scan took 13.6 and 16.2 s in two runs
        with pieces, 13.4 s in one without: no cost beyond the run-to-run spread seen). Batches
        no larger than ``assess_every`` are analysed whole. The pieces are views, and a replay
        in the same batches cuts the same pieces. The engine counts pieces as its batches
        (``stats_["batches"]``).
        """
        n = int(np.asarray(batch.positions).shape[0])
        step = max(int(self.assess_every), 1)
        if n <= step:
            self._process(batch)
            self._analysed += n
            return
        s = 0
        while s < n:
            e = min(n, s + step - self._analysed % step)
            self._process(Batch(positions=batch.positions[s:e], frames=batch.frames[s:e],
                                spectra=batch.spectra[s:e], has_frame=batch.has_frame[s:e],
                                has_spectrum=batch.has_spectrum[s:e]))
            self._analysed += e - s
            s = e

    def _process(self, batch) -> None:
        self.engine.partial_fit(batch.positions, batch.frames, batch.spectra,
                                has_frame=batch.has_frame, has_spectrum=batch.has_spectrum)
        both = batch.has_frame & batch.has_spectrum
        if both.any():
            self.centres.add(batch.positions[both], self._centre_patterns(batch.frames, both), batch.spectra[both])
        if self._line_windows is not None and batch.has_spectrum.any():
            hs = batch.has_spectrum
            counts = window_counts(batch.spectra[hs], self._line_windows)
            self._lines[batch.positions[hs]] = np.minimum(counts, np.iinfo(np.uint16).max)
        self._seen[batch.positions[batch.has_frame | batch.has_spectrum]] = True
        refreshes = self.engine.stats_["refreshes"]
        if refreshes != self._last_refreshes or self.n_seen - self._last_assess >= self.assess_every:
            self._last_refreshes = refreshes
            self.assess()

    def _centre_patterns(self, frames, rows) -> np.ndarray:
        """The centres' binned patterns of ``frames[rows]``: block sums of the engine's own binned
        features when its bins nest in the centres' (plain sum-binning, no weights or crop), else
        binned here. A frame is then binned once: 24 s of a 256 x 256 scan's analysis thread."""
        red = self.engine.frame_reducer_
        k = self._centre_bin // int(red.bin_factor) if self._centre_bin % int(red.bin_factor) == 0 else 0
        if k and red.weights_ is None and red.crop is None and red.feature_shape_ == tuple(
                v * k for v in self._centre_shape):
            cbed = self.engine.last_features_[1][rows]
            h, w = self._centre_shape
            return cbed.reshape(-1, h, k, w, k).sum(axis=(2, 4), dtype=np.float32)
        return self._centre_reducer.transform(frames[rows]).reshape(-1, *self._centre_shape)

    def _make_line_windows(self) -> None:
        elements = self.flagger.elements
        try:
            self._line_windows = line_windows(self.energy_axis_kev, elements)
        except ValueError as exc:  # an energy axis without those lines: no composition test
            logger.info("no element-line windows for %s on this energy axis (%s)", elements, exc)
            self._line_windows = None
        n_lines = 0 if self._line_windows is None else self._line_windows.shape[0]
        self._lines = np.zeros((self.n_positions, n_lines), np.uint16)

    def assess(self) -> list:
        """Re-assess clusters from the current memberships; publish and record flag events."""
        # one BLAS thread: the flagger's matrix-vector products ran 12x slower with BLAS threads
        # spinning against the receiver and Numba on 2 cores (98 vs 7.8 ms a block distance,
        # benchmarks/bench_flag_latency.py)
        with threadpool_limits(1, user_api="blas"):
            return self._assess()

    def _assess(self) -> list:
        u = self.engine.memberships_
        if not np.isfinite(u).any():
            return []
        self._last_assess = self.n_seen
        if self.centres.stats["added"] == 0:
            # no position had both a frame and a spectrum (one stream never came): the clusters
            # exist (engine on one signal) but flags need both blocks' centres
            logger.warning("no position with both signals: no second-phase assessment")
            return []
        self.centre_set = self.centres.update(u)
        signals = centre_signals(self.centre_set, self.energy_axis_kev)
        # zero rows where nothing is stored, and the stored mask as the scanned one: the flagger
        # need not scan its blocks for NaN rows at every look (0.5 s of 0.84 s at 256 x 256)
        cbed, eds = self.centres.features(eds_rebin=FLAG_EDS_REBIN, eds_channels=self._window, missing=0.0)
        # the host's sub-clusters are the matrix an inclusion is embedded in (flags docs)
        lines = None
        if self.flagger.method == "test":
            if self._line_windows is None:
                logger.warning("[flags] method = test needs the line windows of %s on the energy axis",
                               self.flagger.elements)
                return []
            lines = self._lines
        events = self.flagger.update(u, self.scan_shape, cbed, eds, signals=signals, scanned_mask=self.centres.stored,
                                     matrix_clusters=self.engine.host_columns_, line_counts=lines,
                                     check_finite=False)
        fraction = self.n_seen / self.n_positions
        for ev in events:
            rec = {k: v for k, v in asdict(ev).items() if k != "positions"}
            rec.update(scan_fraction=fraction, elapsed_s=time.perf_counter() - self.t0)
            self.flag_log.append(rec)
            logger.info("flag %s #%d (cluster %d, score %.2f) at %.0f %% of the scan", ev.kind, ev.flag_id,
                        ev.cluster, ev.score, 100 * fraction)
        # a spilled store's pages touched by this pass leave the resident set
        self.centres.release()
        if self.events is not None and events:
            self.events.publish_all(events)
        if self.liveview is not None:
            if hasattr(self.liveview, "update_from_analysis"):
                # flags with their statistics and regions, centres, bright field, per-position data
                self.liveview.update_from_analysis(self)
            else:  # a view with the plain update() only
                flags = [dict(cluster=f.cluster, bbox=tuple(f.bbox), score=float(f.score),
                              n_positions=int(f.n_positions), label=f"flag {f.flag_id}")
                         for f in self.flagger.active_flags]
                self.liveview.update(memberships=u, flags=flags, progress=(self.n_seen, self.n_positions),
                                     counters={"positions": self.n_seen,
                                               "refreshes": self.engine.stats_["refreshes"]})
        return events

    def finish(self) -> None:
        """End of scan: the engine's final refresh, then a last assessment."""
        self.engine.finalize()
        self.assess()

    def flags_summary(self) -> list[dict]:
        """One entry per flag id: first raised (with its scan fraction) and its last state
        (:func:`~streamclust.results.scan_result.summarise_flags` of :attr:`flag_log`)."""
        return summarise_flags(self.flag_log)

    def scan_result(self, counters: Mapping | None = None) -> ScanResult:
        """The scan as analysed so far, as a value (copies; the analysis may go on).

        ``counters``: the acquisition's counters (ingest, join) to carry with it.
        """
        eng = self.engine
        try:
            cs = self.centres.centres()
        except RuntimeError:  # nothing stored yet (before the first joined position)
            cs = None
        return ScanResult(
            scan_shape=self.scan_shape, memberships=eng.memberships_, seen=self._seen,
            level1_memberships=eng.level1_memberships_ if eng.host_clusters else None,
            n_components=eng.n_components_, explained_variance_ratio=eng.explained_variance_ratio_,
            cluster_centers=eng.cluster_centers_, validity=eng.validity_ or {},
            # the level-1 cluster refined into the last host_clusters columns (-1: none yet)
            host_cluster=-1 if eng.host_cluster_ is None else eng.host_cluster_,
            host_clusters=eng.host_clusters, host_group=eng.host_group_ or (),
            centres=cs, centre_stats=self.centres.stats, flag_log=self.flag_log,
            engine_stats=eng.stats_, counters=counters or {})
