"""The live view's operator actions: follow-ups of a flag on the microscope, dismissals, and what of
them goes into the results file.

:class:`OperatorActions` is the part of :class:`streamclust.app.liveview.LiveView` that acts (the rest
shows). It is a base of ``LiveView`` and uses the state ``LiveView.__init__`` sets: the snapshot
(``_snapshot``), the flags' regions (``_regions``), the position provider, the follow-up settings,
``host`` and ``action_token``, and the actions' own lock, dictionary and logs.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
import time
from typing import Any

import numpy as np

from streamclust.adapters.security import is_loopback
from streamclust.app.liveview_render import finite_or_none, json_ready, jsonable

logger = logging.getLogger(__name__)

__all__ = ["OperatorActions", "HISTORY_KEYS"]

#: flag statistics ([flags] method = "test") kept per flag over the scan, for the page's history
#: plot, and recorded with an operator's judgement
HISTORY_KEYS = ("score", "p_value_eds", "p_value_cbed", "effect_eds", "effect_cbed", "level")


class OperatorActions:
    """Acting on a flag from the page (a base of :class:`~streamclust.app.liveview.LiveView`)."""

    def actions(self) -> dict[str, dict]:
        """Per flag id (as a string, JSON's keys): ``followup`` (``state`` sent / acknowledged /
        done / failed, ``dwell_s``, and when done ``fe_co_ratio``, ``snr_fe``, ``n_acquired``)
        and ``judgement`` (the operator's, e.g. ``dismissed``)."""
        with self._actions_lock:
            return {str(k): json.loads(json.dumps(v, default=jsonable)) for k, v in self._actions.items()}

    def request_followup(self, flag_id: int, dwell_s: float | None = None) -> dict:
        """Ask the microscope to re-acquire flag ``flag_id``'s regions at ``dwell_s`` (a worker
        thread does it through :func:`streamclust.flags.followup.follow_up_flag`); returns its state.
        A follow-up already under way for that flag is not sent twice."""
        if self.followup_endpoint is None:
            raise PermissionError("no follow-up endpoint configured for this live view")
        dwell = self.followup_dwell_s if dwell_s is None else float(dwell_s)
        if not (math.isfinite(dwell) and 0 < dwell <= self.max_followup_dwell_s):
            raise ValueError(f"dwell_s must be in (0, {self.max_followup_dwell_s}], got {dwell_s!r}")
        fid = int(flag_id)
        region = self._regions.get(fid)
        if region is None:
            raise KeyError(f"no flag {fid} with a region in this live view")
        with self._actions_lock:
            act = self._actions.setdefault(fid, {})
            current = act.get("followup")
            if current is not None and current["state"] in ("sent", "acknowledged"):
                return dict(current)
            act["followup"] = {"state": "sent", "dwell_s": dwell, "time_unix": time.time()}
            state = dict(act["followup"])
            self.followup_log.append({"flag_id": fid, "state": "sent", "time_unix": state["time_unix"],
                                      "dwell_s": dwell})
        event = {"flag_id": fid, **region}
        worker = threading.Thread(target=self._run_followup, args=(fid, event, dwell), daemon=True,
                                  name=f"liveview-followup-{fid}")
        self._followup_threads.append(worker)
        worker.start()
        logger.info("live view: follow-up of flag %d requested (dwell %.3g s)", fid, dwell)
        return state

    def _set_followup(self, fid: int, **fields: Any) -> None:
        with self._actions_lock:
            fu = self._actions[fid]["followup"]
            if fields.get("state", fu["state"]) != fu["state"]:
                self.followup_log.append({"flag_id": fid, "state": fields["state"], "time_unix": time.time(),
                                          **({"error": fields["error"]} if "error" in fields else {})})
            fu.update(fields)

    def wait_followups(self, timeout: float | None = None) -> bool:
        """Wait until every follow-up requested so far has ended (done or failed), at most
        ``timeout`` seconds (default the follow-up timeout); True when none is still running.
        The scan commands call it before writing the results file, so a follow-up the operator
        started at the end of a scan is in it."""
        deadline = time.monotonic() + (self.followup_timeout_s if timeout is None else float(timeout))
        for worker in list(self._followup_threads):
            worker.join(max(0.0, deadline - time.monotonic()))
        running = [w for w in self._followup_threads if w.is_alive()]
        if running:
            logger.warning("live view: %d follow-up(s) still running; the results file will not have them",
                           len(running))
        return not running

    def _scan_spectrum(self, positions: Any) -> np.ndarray | None:
        """The live scan's summed spectrum over ``positions`` (None without a position provider or
        where a position is not acquired): the baseline a follow-up is compared with."""
        if self.position_provider is None or positions is None:
            return None
        total = None
        for p in np.asarray(positions).reshape(-1).tolist():
            got = self.position_provider(int(p))
            if got is None:
                return None
            total = np.asarray(got[0], np.float64) + (0.0 if total is None else total)
        return None if total is None else total.round().astype(np.int64)

    def _run_followup(self, fid: int, event: dict, dwell: float) -> None:
        from streamclust.flags.followup import FollowUpClient, FollowUpError, follow_up_flag

        try:
            with FollowUpClient(self.followup_endpoint, timeout_s=self.followup_timeout_s) as client:
                report = follow_up_flag(client, event, dwell,
                                        on_reply=lambda i, n: self._set_followup(
                                            fid, state="acknowledged", regions_done=i + 1, regions=n))
        except (FollowUpError, ValueError, KeyError) as exc:
            logger.warning("live view: follow-up of flag %d failed: %s", fid, exc)
            self._set_followup(fid, state="failed", error=str(exc))
            return
        except Exception as exc:  # a worker thread must not die silently
            logger.exception("live view: follow-up of flag %d failed", fid)
            self._set_followup(fid, state="failed", error=repr(exc))
            return
        scan = self._scan_spectrum(report.positions)
        scan_lines = self._scan_lines(scan, report)
        with self._actions_lock:
            self.followup_reports.append(report)
            self.followup_scan_spectra.append(scan)
        # the page shows the follow-up's Fe SNR beside the scan's over the same positions
        self._set_followup(fid, state="done", fe_co_ratio=finite_or_none(report.fe_co_ratio),
                           snr_fe=finite_or_none(report.snr_fe), n_acquired=report.n_acquired,
                           n_flag_positions=report.n_flag_positions,
                           scan_snr_fe=None if scan_lines is None else finite_or_none(float(scan_lines.snr_fe)))

    @staticmethod
    def _scan_lines(scan: np.ndarray | None, report: Any):
        """Fe/Co K-alpha lines of the scan's spectrum over a follow-up's positions (None without
        it, or when the follow-up's energy axis has another channel count)."""
        from streamclust.engine.centres import fe_co_lines

        axis = report.results[0].energy_axis_kev
        if scan is None or axis.size != scan.size:
            return None
        return fe_co_lines(scan, axis)

    def dismiss(self, flag_id: int, note: str = "") -> dict:
        """Record the operator's judgement that flag ``flag_id`` is not worth following up
        (appended to :attr:`judgements`, with the flag's statistics at that moment)."""
        fid = int(flag_id)
        snap = self._snapshot
        flag = next((f for f in snap.flags if f.get("flag_id") == fid), None)
        if flag is None and fid not in self._regions:
            raise KeyError(f"no flag {fid} in this live view")
        done, total = snap.progress if snap.progress is not None else (0, 1)
        rec = {"flag_id": fid, "judgement": "dismissed", "time_unix": time.time(),
               "scan_fraction": done / total, "note": str(note)[:500]}
        if flag is not None:
            rec.update({k: flag.get(k) for k in ("cluster", "score", *HISTORY_KEYS[1:])})
        with self._actions_lock:
            self.judgements.append(rec)
            self._actions.setdefault(fid, {})["judgement"] = "dismissed"
        logger.info("live view: flag %d dismissed by the operator", fid)
        return rec

    def results_entries(self) -> dict[str, Any]:
        """The operator's actions as ``extra`` entries of the results file
        (:meth:`streamclust.results.writer.ResultsWriter.finalize`; docs/liveview.md): the JSON documents
        ``liveview/judgements``, ``liveview/followups`` (one row per follow-up done) and
        ``liveview/followup_log`` (every state change), and per follow-up the arrays
        ``liveview/followup_spectra/<name>`` (its spectrum summed over the flag's own positions),
        ``liveview/followup_scan_spectra/<name>`` (the live scan's over the same positions) and
        ``liveview/followup_positions/<name>``, ``<name>`` being ``flag_<id>`` (``flag_<id>_2``
        for a second follow-up of one flag)."""
        from streamclust.results.writer import json_default

        with self._actions_lock:
            reports = list(zip(self.followup_reports, self.followup_scan_spectra))
            judgements, log = list(self.judgements), list(self.followup_log)
        out: dict[str, Any] = {}
        rows, seen = [], {}
        for r, scan in reports:
            seen[r.flag_id] = seen.get(r.flag_id, 0) + 1
            name = f"flag_{r.flag_id}" + ("" if seen[r.flag_id] == 1 else f"_{seen[r.flag_id]}")
            row = {"name": name, "flag_id": r.flag_id, "bbox": list(r.bbox),
                   "regions": [list(res.bbox) for res in r.results], "dwell_s": r.dwell_s,
                   "n_flag_positions": r.n_flag_positions, "n_acquired": r.n_acquired,
                   "counts": int(np.sum(r.spectrum)), "fe_co_ratio": r.fe_co_ratio, "snr_fe": r.snr_fe}
            out[f"liveview/followup_spectra/{name}"] = np.asarray(r.spectrum)
            if r.positions is not None:
                out[f"liveview/followup_positions/{name}"] = np.asarray(r.positions, np.int64)
            if scan is not None:
                out[f"liveview/followup_scan_spectra/{name}"] = scan
                row["scan_counts"] = int(scan.sum())
                lines = self._scan_lines(scan, r)
                if lines is not None:
                    row.update(scan_fe_co_ratio=float(lines.ratio), scan_snr_fe=float(lines.snr_fe))
            rows.append(json_ready(row))
        out["liveview/judgements"] = json.dumps(judgements, default=json_default)
        out["liveview/followups"] = json.dumps(rows, default=json_default)
        out["liveview/followup_log"] = json.dumps(log, default=json_default)
        return out

    def authorised(self, token: str | None) -> bool:
        """May a viewer act on flags? On loopback, yes; bound elsewhere, only with the
        configured ``action_token`` (compared in constant time), and never without one."""
        if is_loopback(self.host.strip("[]")):
            return True
        if self.action_token is None or token is None:
            return False
        return hmac.compare_digest(token.encode(), self.action_token.encode())
