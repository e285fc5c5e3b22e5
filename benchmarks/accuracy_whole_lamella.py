"""Whole-lamella accuracy of the live analysis, per phantom seed: live vs offline, and flag timing.

Not a speed benchmark: the figures behind docs/engine.md (live vs offline on the whole lamella)
and docs/events.md (when the second phase is flagged). For each seed, a 64 x 64 default phantom is
streamed in raster order through :class:`streamclust.app.live.LiveAnalysis` (128-position batches, the
configuration's automatic ``refresh_every`` 256 and ``assess_every`` 128 at 4,096 positions), and the paper's offline pipeline
with the same second level (``run_reference(refine_host=6)``, FCM with 10 restarts) runs on the
same scan. Printed per seed:

* ARI between the live final partition and the reference's, components live / reference;
* second-phase F1 (best single cluster) live and reference;
* the first flag raised: after how many rows, its scan fraction, the precision of its positions;
  the row at which the scan first reached the second phase, and the row at which it had first
  crossed a whole inclusion of at least 20 positions (its last row); the state of every flag at
  the end.

``--single-phase SEED ...`` runs phantoms without inclusions (no flag may be raised).

Run::

    NUMBA_NUM_THREADS=1 .venv/bin/python benchmarks/accuracy_whole_lamella.py --seeds 0 1 2 3 4 5 6 7 8 \
        --single-phase 0 1 2 3 4 5 6 7 [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import adjusted_rand_score

from streamclust.adapters.join import Batch
from streamclust.cluster.fcm import FuzzyCMeans
from streamclust.flags.flagger import SecondPhaseFlagger
from streamclust.app.live import LiveAnalysis
from streamclust.reference import best_f1, bin_frames, eds_window, run_reference
from streamclust.simulators.phantom import LamellaPhantom

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flag_calibration import record_raised_positions  # noqa: E402

SCAN = (64, 64)
BATCH = 128


def run_seed(seed: int, inclusions: bool = True, flag_params: dict | None = None) -> dict:
    ph = LamellaPhantom(SCAN, seed=seed, **({} if inclusions else {"n_inclusions": 0}))
    n, nx = ph.n_positions, SCAN[1]
    truth = ph.truth.second_phase.ravel()
    defaults = SecondPhaseFlagger()  # the types of the what-if values
    flags = {}
    for key, value in (flag_params or {}).items():  # what-if runs of the flagger's parameters
        if not hasattr(defaults, key):
            raise ValueError(f"SecondPhaseFlagger has no parameter {key!r}")
        flags[key] = type(getattr(defaults, key))(value)
    live = LiveAnalysis(ph.scan_shape, ph.frame_shape, ph.energy_axis_kev, random_state=seed, assess_every=128,
                        engine_params={"warmup_positions": 512, "refresh_every": 256}, flags=flags)
    raised_positions = record_raised_positions(live.flagger)
    cbed, spectra = [], []
    t0 = time.perf_counter()
    for s in range(0, n, BATCH):
        pos = np.arange(s, min(s + BATCH, n))
        frames, spec = ph.frames(pos), ph.spectra(pos)
        cbed.append(bin_frames(frames, 8))
        spectra.append(spec)
        ones = np.ones(pos.size, bool)
        live.process(Batch(pos, frames, spec, ones, ones))
    live.finish()
    seconds = time.perf_counter() - t0
    out = {"seed": seed, "inclusions": inclusions, "live_seconds": round(seconds, 1),
           "flags": live.flags_summary(), "drift_refreshes": live.engine.stats_["drift_refreshes"]}
    raised = [r for r in live.flag_log if r["kind"] == "raised"]
    if raised:
        first = raised[0]
        out["first_raise_rows_done"] = int(round(first["scan_fraction"] * n)) // nx
        out["first_raise_fraction"] = round(first["scan_fraction"], 3)
        out["first_raise_fe_co"] = first.get("signals", {}).get("fe_co_ratio")
        p = raised_positions.get(first["flag_id"], np.zeros(0, int))
        out["first_raise_precision"] = round(float(truth[p].mean()), 2) if p.size else None
    if inclusions:
        rows = np.flatnonzero(truth.reshape(SCAN).any(axis=1))
        out["second_phase_first_row"] = int(rows[0]) if rows.size else None
        lab, n_inc = ndimage.label(truth.reshape(SCAN), structure=np.ones((3, 3), bool))
        ends = [sl[0].stop - 1 for i, sl in enumerate(ndimage.find_objects(lab), start=1)
                if np.count_nonzero(lab == i) >= 20]
        out["first_inclusion_crossed_row"] = min(ends) if ends else None
        eds = eds_window(np.concatenate(spectra), ph.energy_axis_kev, (0.2, 10.0), rebin=2)
        ref = run_reference(np.concatenate(cbed), eds, n_clusters=6, random_state=seed, refine_host=6, scan_shape=SCAN,
                            clusterer=FuzzyCMeans(6, n_init=10, random_state=seed))
        lab = live.engine.labels_
        out.update(ari_live_vs_reference=round(float(adjusted_rand_score(ref.labels, lab)), 3),
                   components_live=int(live.engine.n_components_), components_reference=int(ref.n_components),
                   f1_live=round(best_f1(lab, truth).single, 3), f1_reference=round(best_f1(ref.labels, truth).single, 3))
        for f in live.flagger.active_flags:
            p = np.asarray(f.positions)
            out.setdefault("active_precision", []).append(round(float(truth[p].mean()), 2) if p.size else None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 2, 3])
    ap.add_argument("--single-phase", type=int, nargs="*", default=[0, 2])
    ap.add_argument("--flag", action="append", default=[], metavar="KEY=VALUE",
                    help="override a SecondPhaseFlagger parameter (what-if runs), e.g. --flag max_open=0.5")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    flag_params = dict(kv.split("=", 1) for kv in args.flag)
    results = ([run_seed(s, flag_params=flag_params) for s in args.seeds]
               + [run_seed(s, inclusions=False, flag_params=flag_params) for s in args.single_phase])
    for r in results:
        if r["inclusions"]:
            print(f"seed {r['seed']}: ARI live vs reference {r['ari_live_vs_reference']:.3f} (components "
                  f"{r['components_live']} / {r['components_reference']}), F1 live {r['f1_live']:.3f} reference "
                  f"{r['f1_reference']:.3f}; second phase from row {r['second_phase_first_row']}, first inclusion "
                  f"crossed at row {r['first_inclusion_crossed_row']}; first flag "
                  + (f"after row {r['first_raise_rows_done'] - 1} ({r['first_raise_fraction']:.2f}, Fe/Co "
                     f"{r['first_raise_fe_co']:.2f}, precision {r['first_raise_precision']})"
                     if "first_raise_fraction" in r else "none")
                  + f"; at the end {[f['last_kind'] for f in r['flags']]} precision {r.get('active_precision')}")
        else:
            print(f"single phase seed {r['seed']}: flags raised {len(r['flags'])}")
    print(summary_line(results))
    if args.json:
        print(json.dumps({"benchmark": "accuracy_whole_lamella", "results": results}))


def summary_line(results: list[dict]) -> str:
    """Across seeds: phantoms flagged mid-scan, single-phase phantoms with a flag, and how many
    rows after the scan crossed the first inclusion (and first reached the second phase) the first
    flag came."""
    inc = [r for r in results if r["inclusions"]]
    single = [r for r in results if not r["inclusions"]]
    flagged = [r for r in inc if "first_raise_rows_done" in r and r["first_raise_fraction"] < 1.0]
    after_cross = [r["first_raise_rows_done"] - 1 - r["first_inclusion_crossed_row"] for r in flagged
                   if r["first_inclusion_crossed_row"] is not None]
    after_reach = [r["first_raise_rows_done"] - 1 - r["second_phase_first_row"] for r in flagged]

    def spread(v):
        return f"{min(v)} to {max(v)} (median {float(np.median(v)):g})" if v else "n/a"

    return (f"flagged mid-scan: {len(flagged)} of {len(inc)} phantoms with inclusions; single-phase phantoms "
            f"with a flag: {sum(bool(r['flags']) for r in single)} of {len(single)}; first flag {spread(after_cross)} "
            f"rows after the first inclusion was crossed, {spread(after_reach)} rows after the second phase "
            f"was first reached")


if __name__ == "__main__":
    main()
