"""Reading a results file back: find it in an output folder, load it as a nested dict, check it.

The file is the one :class:`streamclust.results.writer.ResultsWriter` writes (layout in that module and
in docs/results.md); these functions need h5py only, not the writer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from streamclust.results.format import LEGACY_RESULTS_NAME, RESULTS_NAME, STATUSES

logger = logging.getLogger(__name__)

__all__ = ["find_results", "read_results", "validate_results"]


def find_results(path) -> Path:
    """The results file ``path`` names: a file, or an output folder's ``results.hspy`` (or, written
    before format version 2, ``results.h5``); a missing ``results.h5`` whose folder holds
    ``results.hspy`` gives the latter, so callers that still use the old name keep working."""
    p = Path(path)
    if p.is_dir():
        for name in (RESULTS_NAME, LEGACY_RESULTS_NAME):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"no {RESULTS_NAME} (or {LEGACY_RESULTS_NAME}) in {p}")
    if not p.exists() and p.name == LEGACY_RESULTS_NAME and p.with_name(RESULTS_NAME).is_file():
        logger.debug("%s does not exist; reading %s (the name since format 2)", p, RESULTS_NAME)
        return p.with_name(RESULTS_NAME)
    return p


def read_results(path) -> dict:
    """The whole results file (a path, or an output folder: :func:`find_results`) as a nested dict.

    Groups become dicts, datasets numpy arrays (string datasets: lists of str), and each
    group's attributes sit under the key ``"attrs"``. For convenience the JSON documents are
    also parsed: ``out["flags"]["summary_parsed"]``, ``out["flags"]["log_parsed"]``,
    ``out["config"]["parsed"]``, ``out["counters"]["parsed"]``. ``/Experiments`` (HyperSpy's
    view of the same datasets) is left out.
    """
    import h5py

    def attrs(obj) -> dict:
        out = {}
        for k, v in obj.attrs.items():
            if isinstance(v, bytes):
                v = v.decode()
            elif isinstance(v, np.generic):
                v = v.item()
            out[k] = v
        return out

    def walk(g) -> dict:
        out: dict[str, Any] = {"attrs": attrs(g)}
        for name, item in g.items():
            if isinstance(item, h5py.Group):
                if g.name == "/" and name == "Experiments":
                    continue
                out[name] = walk(item)
            elif h5py.check_string_dtype(item.dtype) is not None:
                data = item.asstr()[()]
                out[name] = data.tolist() if isinstance(data, np.ndarray) else data
            else:
                out[name] = item[()]
        return out

    with h5py.File(find_results(path), "r") as f:
        res = walk(f)
    if "flags" in res:
        res["flags"]["summary_parsed"] = [json.loads(s) for s in res["flags"].get("summary", [])]
        res["flags"]["log_parsed"] = [json.loads(s) for s in res["flags"].get("log", [])]
    for key in ("config", "counters"):
        if key in res and "json" in res[key]["attrs"]:
            res[key]["parsed"] = json.loads(res[key]["attrs"]["json"])
    return res


def validate_results(results) -> list[str]:
    """Inconsistencies of a results file (a path or :func:`read_results` output); [] if none.

    Checks what must hold whatever the status: positions seen within the scan and equal to the
    ``seen`` map, memberships either a whole finite row summing to 1 or a whole NaN row, and only
    at positions seen, labels equal to their arg-max (-1 exactly where unknown), the clustered count,
    the counters' own copy of the positions seen, and the centres' shapes.
    """
    res = results if isinstance(results, dict) else read_results(results)
    problems: list[str] = []
    a = res["attrs"]
    if a.get("status") not in STATUSES:
        problems.append(f"status {a.get('status')!r} not in {STATUSES}")
    n = int(a["n_positions"])
    u = np.asarray(res["clustering"]["memberships"], np.float64)
    ny, nx = (int(v) for v in res["scan"]["attrs"]["scan_shape"])
    if u.ndim != 3 or u.shape[:2] != (ny, nx) or ny * nx != n:
        return problems + [f"memberships of shape {u.shape} for scan {(ny, nx)} and {n} positions"]
    u = u.reshape(n, -1)
    seen = np.asarray(res["scan"]["seen"], bool).reshape(-1)
    n_seen = int(a["positions_seen"])
    if not 0 <= n_seen <= n:
        problems.append(f"positions_seen {n_seen} outside [0, {n}]")
    if int(seen.sum()) != n_seen:
        problems.append(f"seen map holds {int(seen.sum())} positions, positions_seen says {n_seen}")
    finite = np.isfinite(u)
    rows = finite.all(axis=1)
    partly = np.flatnonzero(finite.any(axis=1) & ~rows)
    if partly.size:
        problems.append(f"{partly.size} membership rows partly NaN (first at position {partly[0]})")
    ghost = np.flatnonzero(rows & ~seen)
    if ghost.size:
        problems.append(f"{ghost.size} positions have memberships but were never seen (first {ghost[0]})")
    if int(rows.sum()) != int(a.get("positions_clustered", -1)):
        problems.append(f"{int(rows.sum())} clustered rows, positions_clustered says {a.get('positions_clustered')}")
    if rows.any():
        total = u[rows].sum(axis=1)
        bad = np.flatnonzero(np.abs(total - 1.0) > 1e-3)
        if bad.size or (u[rows] < -1e-6).any():
            problems.append(f"{bad.size} membership rows do not sum to 1 or hold negatives")
    lab = np.asarray(res["clustering"]["labels"]).reshape(-1)
    if not np.array_equal(lab >= 0, rows):
        problems.append("labels are not -1 exactly where memberships are unknown")
    elif rows.any() and not np.array_equal(lab[rows], np.argmax(u[rows], axis=1)):
        problems.append("labels differ from the arg-max membership")
    if int(res["counters"]["attrs"].get("positions_seen", -1)) != n_seen:
        problems.append("counters disagree with the file on positions_seen")
    cg = res.get("centres", {})
    if cg.get("attrs", {}).get("available"):
        t = len(np.atleast_1d(cg["thresholds_used"]))
        if cg["eds"].shape[0] != t or cg["count"].shape != cg["eds"].shape[:2]:
            problems.append(f"centre shapes disagree: eds {cg['eds'].shape}, count {cg['count'].shape}")
        elif (np.asarray(cg["count"]) > n_seen).any():
            problems.append("a centre counts more positions than were seen")
    return problems
