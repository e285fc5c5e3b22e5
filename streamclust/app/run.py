"""A live scan on the instrument, and the session every scan command shares (run, replay, demo).

:class:`ScanSession` is the part of a scan that does not depend on where the data comes from: it
builds the :class:`~streamclust.app.live.LiveAnalysis` from the configuration (engine, thresholded
centres, second-phase flags, event socket, optional live view), takes every joined batch, keeps the
counters the progress display shows, checkpoints the results file, and at the end finalises the
results, draws the pictures and writes ``summary.json``.

:func:`run_scan` is ``streamclust run``: the real Merlin's data (and control) port and the EDS
ZeroMQ stream, received and joined by scan position by :func:`streamclust.app.acquisition.acquire_scan`
(the demo's ingest); with ``[detector] start_acquisition`` it sends ``CMD STARTACQUISITION`` once
the data port is connected (a Merlin does not keep frames for a client that connects late).
"""

from __future__ import annotations

import json
import logging
import platform
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from streamclust import __version__
from streamclust.app.acquisition import IngestReport, acquire_scan
from streamclust.app.config import Config
from streamclust.app.progress import ProgressDisplay
from streamclust.results.writer import RESULTS_NAME, json_default  # json_default re-exported: one JSON fallback

logger = logging.getLogger(__name__)

__all__ = ["ScanSession", "run_scan", "json_default"]

SUMMARY_NAME = "summary.json"


class ScanSession:
    """One scan's analysis and outputs, whatever feeds it.

    Parameters
    ----------
    config : Config
    scan_shape, frame_shape : (int, int)
    energy_axis_kev : ndarray
        Channel centres of the spectra.
    out_dir : path-like
        Where ``results.hspy``, the pictures and ``summary.json`` go.
    scan_id : str
    progress : ProgressDisplay, optional
    liveview : LiveView or callable, optional
        Updated by the live analysis after each assessment; a callable is a factory called as
        ``factory(scan_shape, n_output_clusters, title)`` once the engine is built.
    events_endpoint : str, optional
        Overrides ``[events] endpoint`` (the demo binds a free port unless one is configured).
    results : bool, default True
        Write ``results.hspy`` through :class:`streamclust.results.writer.ResultsWriter` (checkpointed every
        ``[results] checkpoint_every_s``). The demo writes its own file and passes False.
    """

    def __init__(self, config: Config, *, scan_shape, frame_shape, energy_axis_kev, out_dir,
                 scan_id: str, progress: ProgressDisplay | None = None, liveview=None,
                 events_endpoint: str | None = None, results: bool = True, source: str | None = None,
                 instrument: Mapping[str, Any] | None = None) -> None:
        from streamclust.flags.events import EventPublisher
        from streamclust.app.live import LiveAnalysis

        self.config = config
        self.scan_shape = tuple(int(v) for v in scan_shape)
        self.n_positions = self.scan_shape[0] * self.scan_shape[1]
        self.frame_shape = tuple(int(v) for v in frame_shape)
        self.energy_axis_kev = np.asarray(energy_axis_kev, dtype=float)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.scan_id = scan_id
        self.progress = progress
        self.events = EventPublisher(events_endpoint or config.events.endpoint,
                                     socket_type=config.events.socket_type, scan_id=scan_id)
        try:
            self.live = LiveAnalysis.from_config(config, self.scan_shape, self.frame_shape, self.energy_axis_kev,
                                                 events=self.events)
            if liveview is not None and not hasattr(liveview, "update"):
                # a factory: the view needs the engine's output cluster count (host sub-clusters)
                n_out = int(getattr(self.live.engine, "n_output_clusters_", config.engine.n_clusters))
                liveview = liveview(self.scan_shape, n_out, f"streamclust: {scan_id}")
            self.live.liveview = liveview
        except BaseException:
            self.events.close()
            raise
        self.counters = {"positions": 0, "frames": 0, "spectra": 0, "missing spectra": 0,
                         "missing frames": 0, "flags active": 0}
        self.writer = None
        if results:
            from streamclust.results.writer import ResultsWriter

            self.writer = ResultsWriter(
                self.out_dir / RESULTS_NAME, scan_shape=self.scan_shape, frame_shape=self.frame_shape,
                energy_axis_kev=self.energy_axis_kev, n_clusters=config.engine.n_clusters,
                thresholds=tuple(config.centres.thresholds), config=config.as_dict(), scan_id=scan_id,
                checkpoint_every_s=config.results.checkpoint_every_s, source=source, instrument=instrument)
        self.t0 = time.perf_counter()
        self._ended = False

    def warm_up(self) -> None:
        """JIT-compile the engine's kernels: before the detector is armed, never on a live frame."""
        self.live.engine.warm_up()
        if self.progress is not None:
            self.progress.start()

    def on_batch(self, batch) -> None:
        """Analyse one joined batch, then update counters, progress and the results checkpoint."""
        self.live.process(batch)
        c = self.counters
        fm, sm = batch.has_frame, batch.has_spectrum
        c["positions"] = self.live.n_seen
        c["frames"] += int(fm.sum())
        c["spectra"] += int(sm.sum())
        c["missing spectra"] += int((fm & ~sm).sum())
        c["missing frames"] += int((sm & ~fm).sum())
        c["flags active"] = len(self.live.flagger.active_flags)
        if self.progress is not None:
            self.progress.update(c["positions"], {k: c[k] for k in
                                                  ("missing frames", "missing spectra", "flags active")})
        if self.writer is not None and self.writer.due():
            self.writer.checkpoint(self.live.scan_result(self._counters_now()))

    def _counters_now(self) -> dict:
        return {"live": dict(self.counters)}

    def end_scan(self) -> None:
        """The scan is over: close the progress line, run the engine's final refresh and last flag
        assessment, send the end-of-scan event. Idempotent; :meth:`finish` calls it."""
        if self._ended:
            return
        self._ended = True
        if self.progress is not None:
            self.progress.close()
        try:
            if self.live.n_seen:
                try:
                    self.live.finish()
                except ValueError as exc:  # e.g. fewer positions than clusters in an aborted scan
                    logger.warning("final refresh impossible (%s); results hold the live state", exc)
            self.events.end()
        finally:
            self.events.close()

    def finish(self, report: IngestReport | Mapping | None, *, status: str = "complete",
               extra: Mapping[str, Any] | None = None, pictures: bool = True,
               recording: Mapping | None = None) -> dict:
        """End of scan: final refresh and assessment, results, pictures, ``summary.json``.

        ``status`` is ``"complete"``, ``"partial"`` (the scan ended short) or ``"aborted"``.
        Returns the summary.
        """
        self.end_scan()
        ingest = report.as_dict() if isinstance(report, IngestReport) else dict(report or {})
        counters = {"ingest": ingest, "live": dict(self.counters)}
        summary = self.summary(ingest, status=status)
        if recording is not None:
            summary["recording"] = dict(recording)
        extra = dict(extra or {})
        view = self.live.liveview
        if view is not None and hasattr(view, "results_entries"):
            # what the operator did at the live view (dismissed flags, follow-ups with their
            # spectra): a follow-up still running at the end of the scan is waited for
            view.wait_followups()
            extra = {**view.results_entries(), **extra}
            summary["liveview"] = {"judgements": len(view.judgements),
                                   "followups": len(view.followup_reports),
                                   "followups_failed": sum(e["state"] == "failed" for e in view.followup_log)}
        if self.writer is not None:
            self.writer.finalize(self.live.scan_result(counters), status=status, extra=extra)
            if pictures and self.config.results.pictures:
                from streamclust.results.pictures import write_pictures

                summary["pictures"] = [str(p) for p in (write_pictures(self.out_dir / RESULTS_NAME,
                                                                       self.out_dir) or [])]
        (self.out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=json_default))
        return summary

    def summary(self, ingest: Mapping, *, status: str) -> dict:
        """The summary of the scan so far (the keys of the demo's summary that do not need truth)."""
        c = self.counters
        merlin = ingest.get("merlin", {}) or {}
        elapsed = time.perf_counter() - self.t0
        ingest_s = float(ingest.get("elapsed_s") or 0.0)
        frames_received = int(merlin.get("frames_received", c["frames"]))
        account = ingest.get("frame_account")
        if account is not None:  # every frame that reached us: delivered or dropped, by reason
            dropped = int(sum(account.get("dropped", {}).values()))
        else:
            dropped = int(merlin.get("frames_dropped", 0))
        return {
            "streamclust_version": __version__,
            "scan_id": self.scan_id,
            "status": status,
            "scan_shape": list(self.scan_shape),
            "frames_received": frames_received,
            "frames_processed": c["frames"],
            "frames_dropped": dropped,
            "spectra_received": c["spectra"],
            "positions_seen": self.live.n_seen,
            "elapsed_s": round(elapsed, 3),
            "frames_per_s": round(c["frames"] / ingest_s, 1) if ingest_s else (
                round(c["frames"] / elapsed, 1) if elapsed else None),
            "n_clusters": self.config.engine.n_clusters,
            "flags": self.live.flags_summary(),
            "engine": {k: v for k, v in self.live.engine.stats_.items() if not isinstance(v, np.ndarray)},
            "ingest": dict(ingest),
            "config": self.config.as_dict(),
            "machine": {"python": platform.python_version(), "platform": platform.platform()},
        }


def run_scan(config: Config, out_dir: str | Path | None = None, *, progress: ProgressDisplay | None = None,
             liveview=None, stop: threading.Event | None = None, scan_id: str | None = None,
             record: str | Path | None = None, beam_energy_kev: float | None = None,
             record_dwell_s: float = 1e-3, session_factory=None) -> dict:
    """``streamclust run``: analyse one scan from the instrument; returns the summary.

    Scan shape, frame shape and energy axis come from ``config`` (``[scan]``, ``[detector]``,
    ``[eds]``). Results, pictures and ``summary.json`` go to ``out_dir`` (default ``[results]
    out_dir``). A scan that ends short is finalised with status ``"partial"``; an exception or
    Ctrl-C during it with ``"aborted"`` (the results written so far are kept), then re-raised.

    With ``record`` (a folder) every batch is also handed to a
    :class:`~streamclust.adapters.recording.ScanRecorder` (MIB + ``.hdr`` + EDS spectrum image,
    written by its own thread; what the disk cannot take is counted, never waited for); its
    counters go into the summary under ``recording``. ``beam_energy_kev`` goes into the EDS
    file's metadata; ``record_dwell_s`` is the time-stamp step of the recorded frames (the live
    frames are re-encoded from their decoded pixels, which are exact; their time stamps are not
    kept). ``session_factory`` (default :class:`ScanSession`) builds the session, as for
    :func:`streamclust.app.replay.replay_scan`.
    """
    out = Path(out_dir if out_dir is not None else config.results.out_dir)
    ny, nx = config.scan.shape
    n = ny * nx
    e = config.eds
    axis = e.energy_offset_kev + e.channel_width_kev * np.arange(e.channels)
    scan_id = scan_id or time.strftime("scan-%Y%m%dT%H%M%S")
    session = (session_factory or ScanSession)(config, scan_shape=(ny, nx), frame_shape=config.detector.frame_shape,
                          energy_axis_kev=axis, out_dir=out, scan_id=scan_id, progress=progress,
                          liveview=liveview, source=f"merlin://{config.detector.host}:{config.detector.data_port}")
    session.warm_up()
    det, scan = config.detector, config.scan
    recorder = None
    on_batch = session.on_batch
    if record is not None:
        from streamclust.adapters.recording import ScanRecorder

        recorder = ScanRecorder(record, scan_shape=(ny, nx), energy_offset_kev=e.energy_offset_kev,
                                channel_width_kev=e.channel_width_kev, dwell_s=record_dwell_s,
                                beam_energy_kev=beam_energy_kev)

        def on_batch(batch):
            recorder.put_batch(batch)  # before the analysis: the disk works while the engine does
            session.on_batch(batch)
    try:
        report = acquire_scan((det.host, det.data_port), config.eds.endpoint, n, on_batch,
                              eds_socket_type=config.eds.socket_type, timeout_s=det.timeout,
                              batch_size=scan.batch_size, join_timeout_s=scan.join_timeout_s,
                              on_missing=scan.on_missing, control_port=det.control_port,
                              arm=det.start_acquisition, stop=stop)
    except BaseException as exc:
        # one line at info; the command line shows the error (and the traceback with -v)
        logger.info("scan %s aborted (%s: %s)", scan_id, type(exc).__name__, exc)
        recording = recorder.close() if recorder is not None else None
        session.finish({"aborted": True}, status="aborted", recording=recording)
        raise
    status = "complete" if report.complete and session.live.n_seen == n else "partial"
    recording = recorder.close() if recorder is not None else None
    return session.finish(report, status=status, recording=recording)
