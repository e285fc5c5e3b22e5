"""The replay's result: the :class:`~streamclust.results.scan_result.ScanResult` the live analysis
also produces, written by :class:`~streamclust.results.writer.ResultsWriter` with the replay's own
``/replay`` group beside it, and the summary :func:`~streamclust.distributed.dask_replay.replay_dask`
returns.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from streamclust.distributed.recording import RecordingInfo
from streamclust.distributed.replay_config import ReplayConfig
from streamclust.results.scan_result import ScanResult, summarise_flags
from streamclust.results.writer import ResultsWriter

__all__ = ["scan_result", "write_results", "summary"]


def scan_result(info: RecordingInfo, cfg: ReplayConfig, res: dict) -> ScanResult:
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


def write_results(path: Path, info: RecordingInfo, cfg: ReplayConfig, res: dict) -> None:
    """Write with :class:`streamclust.results.writer.ResultsWriter` (the single-process replay's file)
    plus ``/replay``."""
    writer = ResultsWriter(path, scan_shape=info.scan_shape, frame_shape=info.frame_shape,
                           energy_axis_kev=np.asarray(info.energy_axis_kev), n_clusters=int(cfg.n_clusters),
                           thresholds=tuple(cfg.thresholds), config={"replay_dask": asdict(cfg)},
                           scan_id=f"replay-dask-{Path(info.mib_path).stem}", source=str(info.mib_path))
    writer.finalize(scan_result(info, cfg, res), extra=_extra(res))


def summary(path: Path, res: dict, n_positions: int) -> dict[str, Any]:
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
