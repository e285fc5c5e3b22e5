"""The results file of one scan: HDF5, written incrementally, crash-safe, a calibrated HyperSpy file.

:class:`ResultsWriter` turns a :class:`~streamclust.results.scan_result.ScanResult` (what the live
analysis, the replay and the Dask replay produce) into one HDF5 file per scan (layout in
docs/results.md):

``/``                 attrs: ``status`` (partial / complete / aborted), ``scan_id``, ``positions_seen``,
                      ``n_positions``, ``checkpoint``, ``written_utc``, format versions
``/scan``             ``energy_axis_kev``, ``seen`` (ny, nx) bool; attrs scan/frame shape, thresholds
``/clustering``       ``memberships`` (ny, nx, k) float32 (NaN = not yet clustered), ``labels`` (ny, nx)
                      int16 (-1 = unknown), ``cluster_centers`` (PCA space), ``explained_variance_ratio``;
                      attrs ``n_components``, validity indices
``/centres``          thresholded centres: ``cbed`` (T, k, h, w), ``eds`` (T, k, channels), ``weight``,
                      ``count``, ``fe_co_ratio`` (T, k), ``thresholds``
``/flags``            ``summary`` and ``log`` (one JSON document per flag / event) and a numeric table
                      of the summary (``flag_id``, ``cluster``, ``score``, ``bbox``, ...)
``/counters``         every counter as a scalar attribute, nested names joined by ``.``
                      (``merlin.frames_received``, ``join.frames_without_spectrum``, ``engine.refreshes``)
``/config``           attrs: the configuration flattened, and ``json`` (the whole of it)
``/versions``         attrs: streamclust, numpy, numba, h5py, hdf5, python
``/instrument``       attrs: the calibration written into the HyperSpy metadata (beam energy, dwell,
                      camera length, mrad per pixel, detectors, scan step; only what is known)
``/Experiments``      HyperSpy's layout (hspy format 3.1): ``memberships``, ``labels`` (their ``data`` a
                      *hard link* to the datasets above), ``centre_spectra`` (EDS_TEM, zero where a
                      centre is empty) and ``centre_patterns`` (electron_diffraction, in
                      rosettasciio's orientation); scan axes in nm, ``Acquisition_instrument.TEM``

The file is named ``results.hspy`` (:data:`RESULTS_NAME`): HyperSpy picks its reader by the
extension, and four readers claim ``.h5``, so only ``.hspy`` opens with a plain ``hs.load(path)``.
Every dataset HyperSpy reads is chunked, so ``hs.load(path, lazy=True)`` works too.

Crash safety: h5py writes in place, and a process killed in the middle of an HDF5 write leaves a
file that may not open. Every checkpoint is therefore written whole to a temporary file next to the
target, flushed and fsync'ed, then moved over the target with :func:`os.replace` (atomic on POSIX),
and the directory is fsync'ed. The target is always either the previous complete checkpoint or the
new one; a ``kill -9`` loses at most what happened since the last checkpoint.

The names, versions and value encoding are in :mod:`streamclust.results.format`, the readers
(:func:`find_results`, :func:`read_results`, :func:`validate_results`) in
:mod:`streamclust.results.read`; both are re-exported here, where callers import them.

Examples
--------
>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> flat = flatten_counters({"merlin": {"frames_received": 10, "dropped": {"truncated": 1}}, "complete": False})
>>> sorted(flat.items())
[('complete', False), ('merlin.dropped.truncated', 1), ('merlin.frames_received', 10)]
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np

# the names, the value encoding and the readers are re-exported: callers import them from here
from streamclust.results.format import (
    HSPY_FORMAT_VERSION,
    LEGACY_RESULTS_NAME,
    PATTERN_ORIENTATION,
    RESULTS_FORMAT_VERSION,
    RESULTS_NAME,
    STATUSES,
    attr_value,
    flatten_counters,
    json_default,
    to_json,
)
from streamclust.results.read import find_results, read_results, validate_results
from streamclust.results.scan_result import ScanResult

logger = logging.getLogger(__name__)

__all__ = ["RESULTS_FORMAT_VERSION", "RESULTS_NAME", "LEGACY_RESULTS_NAME", "STATUSES", "ResultsWriter", "ScanResult",
           "find_results", "read_results", "validate_results", "flatten_counters", "json_default"]

#: the Merlin pixel pitch (Medipix3), the default of ``[instrument] pixel_size_um``
MEDIPIX_PIXEL_UM = 55.0
#: top-level names the writer owns; ``extra`` may not write into them
_RESERVED = ("scan", "clustering", "centres", "flags", "counters", "config", "versions", "instrument",
             "Experiments")


def versions() -> dict[str, str]:
    """Versions of everything that shapes a result (written to ``/versions``)."""
    import h5py

    from streamclust import __version__

    out = {"streamclust": __version__, "numpy": np.__version__, "h5py": h5py.__version__,
           "hdf5": h5py.version.hdf5_version, "python": platform.python_version(),
           "platform": platform.platform()}
    for mod in ("numba", "sklearn"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:  # an optional dependency missing is recorded, not fatal
            out[mod] = "not installed"
    return out


_INSTRUMENT_NUMBERS = ("beam_energy_kev", "dwell_s", "camera_length_mm", "mrad_per_px", "pixel_size_um",
                       "eds_resolution_mnka_ev")
_INSTRUMENT_TEXT = ("detector", "eds_detector")


def _calibration(config: Mapping, scan_step_nm, instrument: Mapping | None) -> dict[str, Any]:
    """The calibration the file states: ``config``'s ``[scan] step_nm`` and ``[instrument]``,
    overridden by what the caller passes; "auto" and None mean unknown (nothing is written).

    ``mrad_per_px`` unknown but the camera length known: ``pixel_size_um / camera_length_mm``
    (a 55 um pixel at 1 m is 0.055 mrad). Raises ValueError for a non-positive number.
    """
    cfg_inst = config.get("instrument") if isinstance(config.get("instrument"), Mapping) else {}
    merged = {k: v for k, v in dict(cfg_inst).items() if v is not None and v != "auto"}
    merged.update({k: v for k, v in dict(instrument or {}).items() if v is not None and v != "auto"})
    unknown = set(merged) - set(_INSTRUMENT_NUMBERS) - set(_INSTRUMENT_TEXT)
    if unknown:
        raise ValueError(f"unknown instrument keys {sorted(unknown)}; known: "
                         f"{', '.join(_INSTRUMENT_NUMBERS + _INSTRUMENT_TEXT)}")
    out: dict[str, Any] = {}
    for key in _INSTRUMENT_NUMBERS:
        if key in merged:
            out[key] = _positive(merged[key], f"instrument {key}")
    for key in _INSTRUMENT_TEXT:
        if key in merged:
            out[key] = str(merged[key])
    out.setdefault("pixel_size_um", MEDIPIX_PIXEL_UM)
    if "mrad_per_px" not in out and "camera_length_mm" in out:
        out["mrad_per_px"] = out["pixel_size_um"] / out["camera_length_mm"]
    step = scan_step_nm
    if step is None:
        cfg_scan = config.get("scan") if isinstance(config.get("scan"), Mapping) else {}
        step = cfg_scan.get("step_nm")
    if step is not None and step != "auto":
        pair = tuple(np.broadcast_to(np.asarray(step, dtype=object), (2,)).tolist())
        out["step_nm"] = tuple(_positive(v, "scan step_nm") for v in pair)
    return out


def _positive(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number > 0, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{what} must be a number > 0, got {value!r}")
    return v


# ---------------------------------------------------------------------------------------------
# the writer
# ---------------------------------------------------------------------------------------------
class ResultsWriter:
    """Write one scan's results file, incrementally and crash-safe.

    Parameters
    ----------
    path : str or Path
        The results file; name it ``*.hspy`` (:data:`RESULTS_NAME`) for a plain ``hs.load(path)``.
    scan_shape : (ny, nx)
    frame_shape : (h, w)
        Detector frame shape (recorded; the centre patterns are stored binned).
    energy_axis_kev : array
        Channel centres of the spectra.
    n_clusters : int
        Clusters asked for (the engine may output more columns, e.g. host sub-clusters; the
        file records both).
    thresholds : sequence of float
        Membership thresholds of the centres.
    config : dict
        The run's configuration (JSON-serialisable, nested allowed).
    scan_id : str
    checkpoint_every_s : float
        Least time between two checkpoints unless forced.
    source : str, optional
        What was analysed: the recording's path, or the detector's address for a live scan
        (HyperSpy's ``General.original_filename`` gets its file name).
    scan_step_nm : float or (float, float), optional
        Scan step (y, x) in nm; default ``config["scan"]["step_nm"]`` when that is a number,
        else the scan axes count positions.
    instrument : dict, optional
        Calibration known to the caller, overriding ``config["instrument"]`` key by key (None
        values are ignored): ``beam_energy_kev``, ``dwell_s``, ``camera_length_mm``,
        ``mrad_per_px``, ``pixel_size_um``, ``detector``, ``eds_detector``,
        ``eds_resolution_mnka_ev`` (see ``[instrument]`` in docs/configuration.md).

    Attributes
    ----------
    n_checkpoints_ : int
        Files written (checkpoints and the final one).
    last_write_ : dict
        ``{"bytes", "seconds", "status"}`` of the last file written.

    Notes
    -----
    The writer reads nothing but the :class:`ScanResult` it is given (a copy the producer made),
    so a checkpoint written in another thread than the analysis' sees one consistent moment.
    """

    def __init__(self, path, *, scan_shape, frame_shape, energy_axis_kev, n_clusters: int, thresholds,
                 config: dict, scan_id: str, checkpoint_every_s: float = 10.0, source: str | None = None,
                 scan_step_nm=None, instrument: Mapping | None = None) -> None:
        self.path = Path(path)
        self.scan_shape = tuple(int(v) for v in scan_shape)
        self.frame_shape = tuple(int(v) for v in frame_shape)
        self.energy_axis_kev = np.asarray(energy_axis_kev, dtype=np.float64)
        self.n_clusters = int(n_clusters)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.config = dict(config)
        self.scan_id = str(scan_id)
        self.checkpoint_every_s = float(checkpoint_every_s)
        if len(self.scan_shape) != 2 or min(self.scan_shape) < 1:
            raise ValueError(f"scan_shape must be (ny, nx) >= 1, got {scan_shape!r}")
        if self.energy_axis_kev.ndim != 1 or self.energy_axis_kev.size < 2:
            raise ValueError("energy_axis_kev must be 1-D with at least 2 channels")
        if self.n_clusters < 1 or not self.thresholds:
            raise ValueError("n_clusters must be >= 1 and thresholds non-empty")
        if self.checkpoint_every_s < 0:
            raise ValueError("checkpoint_every_s must be >= 0")
        try:
            self._config_json = to_json(self.config)
        except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: a circular config
            raise ValueError(f"config is not JSON-serialisable: {exc}") from exc
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"results directory {self.path.parent} does not exist")
        self.source = None if source is None else str(source)
        self.calibration = _calibration(self.config, scan_step_nm, instrument)
        if self.path.suffix.lower() != ".hspy":
            logger.info("%s: HyperSpy's plain hs.load reads the .hspy extension only; this file needs "
                        "hs.load(path, file_format='hspy')", self.path)
        self.n_checkpoints_ = 0
        self.last_write_: dict[str, Any] = {}
        self._last_time: float | None = None
        self._finalized = False
        self._versions = versions()
        # a writer killed mid-checkpoint leaves its temporary file behind (the target is intact)
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            logger.info("removing %s, left by an interrupted checkpoint", stale)
            stale.unlink(missing_ok=True)

    # ------------------------------------------------------------------ public
    def due(self) -> bool:
        """Whether ``checkpoint_every_s`` has passed since the last file (a producer asks before it
        builds the :class:`ScanResult` of a checkpoint: building one copies the memberships)."""
        return self._last_time is None or time.monotonic() - self._last_time >= self.checkpoint_every_s

    def checkpoint(self, result: ScanResult, *, force: bool = False) -> bool:
        """Write a complete file of ``result`` marked ``status="partial"`` if it is :meth:`due` (or
        ``force``); return whether a file was written."""
        if self._finalized:
            raise RuntimeError(f"{self.path} is finalised; no more checkpoints")
        if not force and not self.due():
            return False
        self._write(result, status="partial", extra=None)
        return True

    def finalize(self, result: ScanResult, *, status: str = "complete", extra: dict | None = None) -> Path:
        """Write the final file of ``result`` with ``status`` in {"complete", "partial", "aborted"}.

        ``extra`` maps ``"group/name"`` paths to arrays or scalars written beside the results (for
        example ``{"ground_truth/labels": truth}`` from the demo); they may not go into the
        writer's own groups.
        """
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        for key in extra or {}:
            top = str(key).strip("/").split("/")[0]
            if not str(key).strip("/") or top in _RESERVED:
                raise ValueError(f"extra entry {key!r} would overwrite the writer's group {top!r}")
        self._write(result, status=status, extra=extra)
        self._finalized = True
        return self.path

    # ------------------------------------------------------------------ snapshot
    def _snapshot(self, result: ScanResult) -> dict[str, Any]:
        """What the file holds of ``result``, in the file's shapes (cheap; no HDF5 yet)."""
        if not isinstance(result, ScanResult):
            raise TypeError(f"the results file is written from a ScanResult, got {type(result).__name__}")
        ny, nx = self.scan_shape
        if result.scan_shape != self.scan_shape:
            raise ValueError(f"the result's scan_shape {result.scan_shape} != writer's {self.scan_shape}")
        cs = result.centres
        snap: dict[str, Any] = {
            "memberships": result.memberships.reshape(ny, nx, -1),
            "labels": result.labels.reshape(ny, nx),
            "seen": result.seen.reshape(ny, nx),
            "positions_seen": result.n_seen,
            "positions_clustered": result.n_clustered,
            "n_components": result.n_components,
            "host_cluster": result.host_cluster,
            "host_clusters": result.host_clusters,
            "host_group": list(result.host_group),
            "explained_variance_ratio": result.explained_variance_ratio,
            "cluster_centers": result.cluster_centers,
            "validity": result.validity,
            "engine_stats": result.engine_stats,
            "centres": cs,
            "flags_summary": result.flags_summary,
            "flag_log": list(result.flag_log),
            "counters": result.counters,
            "centre_stats": result.centre_stats,
        }
        if cs is not None:
            from streamclust.engine.centres import fe_co_ratio

            try:
                ratio = np.asarray(fe_co_ratio(np.nan_to_num(cs.eds), self.energy_axis_kev), np.float64)
                ratio = np.where(cs.count > 0, ratio, np.nan)
            except ValueError as exc:  # an energy axis without the Fe/Co windows
                logger.debug("no Fe/Co ratio: %s", exc)
                ratio = np.full(cs.count.shape, np.nan)
            snap["fe_co_ratio"] = ratio
        return snap

    # ------------------------------------------------------------------ file
    def _write(self, result: ScanResult, *, status: str, extra: Mapping | None) -> None:
        t0 = time.perf_counter()
        snap = self._snapshot(result)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self._write_hdf5(tmp, snap, status, extra)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)  # the data is on disk before the name points at it
            finally:
                os.close(fd)
            size = tmp.stat().st_size
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.path.parent)
        self._last_time = time.monotonic()
        self.n_checkpoints_ += 1
        self.last_write_ = {"bytes": size, "seconds": time.perf_counter() - t0, "status": status}
        logger.debug("results %s: %s, %d positions, %d bytes in %.3f s", self.path, status,
                     snap["positions_seen"], size, self.last_write_["seconds"])

    def _write_hdf5(self, path: Path, snap: dict, status: str, extra: Mapping | None) -> None:
        import h5py

        ny, nx = self.scan_shape
        with h5py.File(path, "w") as f:
            a = f.attrs
            a["file_format"] = "HyperSpy"  # so HyperSpy recognises /Experiments
            a["file_format_version"] = HSPY_FORMAT_VERSION
            a["streamclust_results_version"] = RESULTS_FORMAT_VERSION
            a["status"] = status
            a["scan_id"] = self.scan_id
            a["n_positions"] = ny * nx
            a["positions_seen"] = snap["positions_seen"]
            a["positions_clustered"] = snap["positions_clustered"]
            a["checkpoint"] = self.n_checkpoints_ + 1
            a["written_utc"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
            a["source"] = "" if self.source is None else self.source

            g = f.create_group("scan")
            g.attrs["scan_shape"] = np.array(self.scan_shape)
            g.attrs["frame_shape"] = np.array(self.frame_shape)
            g.attrs["n_clusters"] = self.n_clusters
            g.attrs["thresholds"] = np.array(self.thresholds)
            g.create_dataset("energy_axis_kev", data=self.energy_axis_kev)
            g.create_dataset("seen", data=snap["seen"])
            if "step_nm" in self.calibration:
                g.attrs["step_nm"] = np.array(self.calibration["step_nm"])

            g = f.create_group("instrument")
            for k, v in self.calibration.items():
                g.attrs[k] = np.array(v) if isinstance(v, tuple) else v

            g = f.create_group("clustering")
            # chunked: HyperSpy's lazy loading (hs.load(..., lazy=True)) needs chunks on the data it reads
            mem = g.create_dataset("memberships", data=snap["memberships"], chunks=True)
            mem.attrs["description"] = "fuzzy memberships (ny, nx, k); NaN = not yet clustered"
            lab = g.create_dataset("labels", data=snap["labels"], chunks=True)
            lab.attrs["description"] = "arg-max membership; -1 = not yet clustered"
            g.attrs["n_output_clusters"] = snap["memberships"].shape[2]
            g.attrs["n_components"] = snap["n_components"]
            g.attrs["host_cluster"] = snap["host_cluster"]
            g.attrs["host_clusters"] = snap["host_clusters"]
            g.attrs["host_group"] = np.asarray(snap["host_group"], dtype=np.int64)
            g.create_dataset("explained_variance_ratio", data=snap["explained_variance_ratio"])
            if snap["cluster_centers"] is not None:
                g.create_dataset("cluster_centers", data=snap["cluster_centers"])
            vg = g.create_group("validity")
            for k, v in snap["validity"].items():
                vg.attrs[str(k)] = attr_value(v)

            g = f.create_group("centres")
            cs = snap["centres"]
            g.attrs["available"] = cs is not None
            g.attrs["thresholds"] = np.array(self.thresholds)
            if cs is not None:
                g.create_dataset("thresholds_used", data=np.array(cs.thresholds))
                g.create_dataset("cbed", data=cs.cbed.astype(np.float32))
                g.create_dataset("eds", data=cs.eds.astype(np.float32))
                g.create_dataset("weight", data=cs.weight)
                g.create_dataset("count", data=cs.count.astype(np.int64))
                g.create_dataset("fe_co_ratio", data=snap["fe_co_ratio"])
                g["cbed"].attrs["description"] = "membership-weighted mean binned raw CBED (T, k, h, w)"
                g["eds"].attrs["description"] = "membership-weighted mean raw spectrum (T, k, channels)"
            for k, v in snap["centre_stats"].items():
                g.attrs[f"stats.{k}"] = attr_value(v)

            self._write_flags(f.create_group("flags"), snap)

            g = f.create_group("counters")
            flat = flatten_counters(snap["counters"])
            flat.update(flatten_counters({"engine": snap["engine_stats"]}))
            flat["positions_seen"] = snap["positions_seen"]
            flat["positions_clustered"] = snap["positions_clustered"]
            for k, v in flat.items():
                g.attrs[k] = attr_value(v)
            g.attrs["json"] = to_json({"ingest": snap["counters"], "engine": snap["engine_stats"]})

            g = f.create_group("config")
            g.attrs["json"] = self._config_json
            for k, v in flatten_counters(self.config, numeric_lists=True).items():
                g.attrs[k] = attr_value(v)

            g = f.create_group("versions")
            for k, v in self._versions.items():
                g.attrs[k] = v

            self._write_hyperspy(f, cs, status)

            for key, value in (extra or {}).items():
                name = str(key).strip("/")
                arr = np.asarray(value)
                if arr.dtype.kind in "OU":
                    f.create_dataset(name, data=to_json(value) if arr.dtype.kind == "O" else str(value))
                else:
                    f.create_dataset(name, data=arr)
            f.flush()

    @staticmethod
    def _write_flags(g, snap: dict) -> None:
        import h5py

        strs = h5py.string_dtype()
        summary, log = snap["flags_summary"], snap["flag_log"]
        g.attrs["n_flags"] = len(summary)
        g.attrs["n_events"] = len(log)
        g.attrs["n_active"] = sum(1 for s in summary if s.get("last_kind") != "retracted")
        g.create_dataset("summary", data=np.array([to_json(s) for s in summary], dtype=object), dtype=strs)
        g.create_dataset("log", data=np.array([to_json(r) for r in log], dtype=object), dtype=strs)
        # the summary as a numeric table too, for tools that do not parse JSON
        n = len(summary)
        g.create_dataset("flag_id", data=np.array([s.get("flag_id", -1) for s in summary], np.int64).reshape(n))
        g.create_dataset("cluster", data=np.array([s.get("cluster", -1) for s in summary], np.int64).reshape(n))
        g.create_dataset("score", data=np.array([_num(s.get("score")) for s in summary], np.float64).reshape(n))
        g.create_dataset("n_positions",
                         data=np.array([s.get("n_positions", 0) for s in summary], np.int64).reshape(n))
        g.create_dataset("scan_fraction_at_first_flag",
                         data=np.array([_num(s.get("scan_fraction_at_first_flag")) for s in summary],
                                       np.float64).reshape(n))
        g.create_dataset("fe_co_ratio", data=np.array([_num(s.get("fe_co_ratio")) for s in summary],
                                                      np.float64).reshape(n))
        bbox = np.array([list(s.get("bbox", (-1, -1, -1, -1))) for s in summary], np.int64).reshape(n, 4)
        d = g.create_dataset("bbox", data=bbox)
        d.attrs["description"] = "(y0, x0, y1, x1), half-open, scan-position units"
        g.create_dataset("active", data=np.array([s.get("last_kind") != "retracted" for s in summary], bool))

    def _write_hyperspy(self, f, cs, status: str) -> None:
        """HyperSpy's hspy layout, calibrated (docs/results.md, "HyperSpy")."""
        ny, nx = self.scan_shape
        cal = self.calibration
        k = f["clustering/memberships"].shape[2]
        exps = f.create_group("Experiments")
        if "step_nm" in cal:
            (sy, sx), units = cal["step_nm"], "nm"
        else:  # no step known: the axes count positions (HyperSpy's default scale 1)
            (sy, sx), units = (1.0, 1.0), "position"
        scan_axes = [_axis("y", ny, navigate=True, units=units, scale=sy),
                     _axis("x", nx, navigate=True, units=units, scale=sx)]
        common = {"Streamclust": {"scan_id": self.scan_id, "status": status, "source": self.source or "",
                                  "results_format_version": RESULTS_FORMAT_VERSION}}
        tem = self._tem_metadata(diffraction=False, eds=False)
        _hspy_signal(exps, "memberships", f["clustering/memberships"],
                     scan_axes + [_axis("cluster", k, navigate=False)],
                     self._metadata(f"{self.scan_id}: fuzzy memberships (s.T.plot(): one map per cluster)",
                                    record_by="spectrum", quantity="Membership", tem=tem, extra=common))
        _hspy_signal(exps, "labels", f["clustering/labels"],
                     [dict(ax, navigate=False) for ax in scan_axes],
                     self._metadata(f"{self.scan_id}: arg-max cluster (-1 = not yet clustered)", record_by="image",
                                    quantity="Cluster", tem=tem, extra=common))
        if cs is None:
            return
        count = np.asarray(cs.count, np.int64)
        centre_md = {"Streamclust": dict(common["Streamclust"], thresholds=np.array(cs.thresholds),
                                         positions_above_threshold=count, empty=count == 0,
                                         note="membership-weighted mean per position over the positions whose "
                                              "membership exceeds the threshold; an empty centre "
                                              "(positions_above_threshold 0) is all zeros")}
        thr = _axis_values("threshold", np.array(cs.thresholds), navigate=True)
        n_clu = cs.eds.shape[1]
        e = self.energy_axis_kev
        energy = _axis("Energy", e.size, navigate=False, units="keV", offset=float(e[0]),
                       scale=float(e[1] - e[0]), is_binned=True)
        # an empty centre is zero with its count 0 beside it; NaN rows break sums and fits in exspy
        spectra = np.nan_to_num(np.asarray(cs.eds, np.float32), nan=0.0)
        _hspy_signal(exps, "centre_spectra", spectra,
                     [thr, _axis("cluster", n_clu, navigate=True), energy],
                     self._metadata(f"{self.scan_id}: thresholded cluster-centre EDS spectra", record_by="spectrum",
                                    signal_type="EDS_TEM", quantity="X-rays (Counts)",
                                    tem=self._tem_metadata(diffraction=False, eds=True), extra=centre_md))
        h, w = cs.cbed.shape[2:]
        fy, fx = self.frame_shape[0] / h, self.frame_shape[1] / w
        if "mrad_per_px" in cal:
            # 0 mrad at the detector's centre: half-way between the two middle binned pixels
            ky = _axis("ky", h, navigate=False, units="mrad", scale=cal["mrad_per_px"] * fy,
                       offset=-cal["mrad_per_px"] * fy * (h - 1) / 2)
            kx = _axis("kx", w, navigate=False, units="mrad", scale=cal["mrad_per_px"] * fx,
                       offset=-cal["mrad_per_px"] * fx * (w - 1) / 2)
        else:  # uncalibrated: the axes count detector pixels, so the binning is on them
            ky = _axis("ky", h, navigate=False, units="px", scale=fy)
            kx = _axis("kx", w, navigate=False, units="px", scale=fx)
        patterns = np.flip(np.nan_to_num(np.asarray(cs.cbed, np.float32), nan=0.0), axis=-2)
        pat_md = {"Streamclust": dict(centre_md["Streamclust"], orientation=PATTERN_ORIENTATION,
                                      binning=np.array([fy, fx]))}
        _hspy_signal(exps, "centre_patterns", np.ascontiguousarray(patterns),
                     [thr, _axis("cluster", n_clu, navigate=True), ky, kx],
                     self._metadata(f"{self.scan_id}: thresholded cluster-centre CBED patterns (binned)",
                                    record_by="image", signal_type="electron_diffraction",
                                    quantity="Electrons (Counts)",
                                    tem=self._tem_metadata(diffraction=True, eds=False), extra=pat_md))

    def _tem_metadata(self, *, diffraction: bool, eds: bool) -> dict:
        """HyperSpy's ``Acquisition_instrument.TEM`` from what is known (unknown keys left out)."""
        cal = self.calibration
        tem: dict[str, Any] = {"acquisition_mode": "STEM"}
        if "beam_energy_kev" in cal:
            tem["beam_energy"] = cal["beam_energy_kev"]
        if "dwell_s" in cal:
            tem["dwell_time"] = cal["dwell_s"]
        if "camera_length_mm" in cal:
            tem["camera_length"] = cal["camera_length_mm"]
        det: dict[str, Any] = {}
        if diffraction:
            d = {"detector_name": cal.get("detector"), "pixel_size_um": cal["pixel_size_um"],
                 "mrad_per_px": cal.get("mrad_per_px"), "camera_length": cal.get("camera_length_mm"),
                 "exposure_time": cal.get("dwell_s"), "frame_shape": np.array(self.frame_shape)}
            det["Diffraction"] = {key: v for key, v in d.items() if v is not None}
        if eds:
            # a centre spectrum is a mean per position: its live time is one position's dwell
            d = {"detector_name": cal.get("eds_detector"), "live_time": cal.get("dwell_s"),
                 "real_time": cal.get("dwell_s"), "energy_resolution_MnKa": cal.get("eds_resolution_mnka_ev")}
            det["EDS"] = {key: v for key, v in d.items() if v is not None}
        if det:
            tem["Detector"] = det
        return {"TEM": tem}

    def _metadata(self, title: str, *, record_by: str, quantity: str, tem: dict, extra: dict,
                  signal_type: str = "") -> dict:
        general: dict[str, Any] = {"title": title}
        if self.source and "://" not in self.source:  # a file, not a live detector's address
            general["original_filename"] = Path(self.source).name
        return {"General": general, "Signal": {"signal_type": signal_type, "record_by": record_by,
                                               "quantity": quantity},
                "Acquisition_instrument": tem, **extra}


def _num(v) -> float:
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _fsync_dir(directory: Path) -> None:
    # the rename itself must reach the disk, or a power cut can bring the old name back
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows); the data file is synced already
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _axis(name: str, size: int, *, navigate: bool, units: str = "", offset: float = 0.0, scale: float = 1.0,
          is_binned: bool = False) -> dict:
    """HyperSpy's ``UniformDataAxis.get_axis_dictionary()`` keys (hspy 3.1)."""
    return {"_type": "UniformDataAxis", "name": name, "units": units, "navigate": bool(navigate),
            "is_binned": bool(is_binned), "size": int(size), "scale": float(scale), "offset": float(offset)}


def _axis_values(name: str, values: np.ndarray, *, navigate: bool, units: str = "") -> dict:
    """A uniform axis when the values are evenly spaced, else a non-uniform ``DataAxis``."""
    v = np.asarray(values, np.float64)
    if v.size == 1:
        return _axis(name, 1, navigate=navigate, units=units, offset=float(v[0]))
    step = np.diff(v)
    if np.allclose(step, step[0]):
        return _axis(name, v.size, navigate=navigate, units=units, offset=float(v[0]), scale=float(step[0]))
    return {"_type": "DataAxis", "name": name, "units": units, "navigate": bool(navigate),
            "is_binned": False, "size": int(v.size), "axis": v}


def _hspy_signal(exps, name: str, data, axes: list[dict], metadata: dict) -> None:
    """One ``/Experiments/<name>`` group: ``data`` a dataset (hard-linked) or an array (written chunked)."""
    if len(axes) != data.ndim:
        raise ValueError(f"{name}: {len(axes)} axes for a {data.ndim}-D dataset")
    g = exps.create_group(name)
    g.attrs["package"] = ""
    g.attrs["package_version"] = ""
    if isinstance(data, np.ndarray):
        g.create_dataset("data", data=data, chunks=True)
    else:
        g["data"] = data  # a hard link: the same bytes as the canonical dataset
    for i, ax in enumerate(axes):
        ag = g.create_group(f"axis-{i}")
        for key, value in ax.items():
            ag.attrs[key] = value
    _write_tree(g.create_group("metadata"), metadata)
    g.create_group("original_metadata")
    g.create_group("learning_results")


def _write_tree(group, tree: Mapping) -> None:
    """Nested dicts -> HDF5 groups, leaves -> attributes (how hspy stores metadata)."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            _write_tree(group.create_group(str(key)), value)
        elif value is not None:
            group.attrs[str(key)] = value
