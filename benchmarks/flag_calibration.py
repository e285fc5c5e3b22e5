"""Second-phase flag calibration on held-out phantoms (issue 17): how often does the flagger cry wolf,
how often does it find the second phase, how early, and how precisely?

Each phantom is scanned in raster order through :class:`streamclust.app.live.LiveAnalysis` built exactly
as ``streamclust run`` builds it from the default configuration (engine cadence, centres, the
configured flagger), in the joiner's batches of 256, without sockets (the sockets do not change
what is decided, only when: ``benchmarks/bench_flag_latency.py`` measures that).

Seeds are declared here, and the two sets never overlap:

* ``TUNE``: the phantoms the flagger's rules were developed on in earlier sessions (seeds 0-8 with
  inclusions, 0-7 single-phase, default phantom settings). Report on them only to compare.
* ``HELD_OUT``: seeds 1000 + i, each with a setting from ``VARIETY`` (cycled), never used while
  developing: dose x0.5 / x2, thin and thick films, weak and strong bending, few and many
  inclusions, small inclusions, inclusions only partly through the film; single-phase controls get
  the same settings with no inclusions.

Per scan size the table gives the false-alarm rate (single-phase phantoms that raised any flag) and the
detection rate (phantoms with inclusions where a flag whose positions are mostly second phase was
raised before the scan ended; flags elsewhere are counted as misplaced), each with its exact 95 %
Clopper-Pearson interval, the median rows from the first crossing of the second phase (the scan
reaching it, and the scan completing the first inclusion of at least 20 positions) to the first flag,
and the median precision of the first flag's positions (fraction that are second phase in the
phantom's truth). A flag that was raised and later retracted still counts as raised: a follow-up
acquisition was triggered.

    .venv/bin/python benchmarks/flag_calibration.py --size 64 --n 40           # held-out, 40 + 40
    .venv/bin/python benchmarks/flag_calibration.py --size 64 --set tune
    .venv/bin/python benchmarks/flag_calibration.py --size 128 --n 10 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from scipy import ndimage
from scipy.stats import beta

#: the phantoms the existing rules were developed on (earlier sessions' notes): never report them as held out
TUNE_WITH_INCLUSIONS = tuple(range(9))
TUNE_SINGLE_PHASE = tuple(range(8))
#: held-out seeds start here (both sets: a single-phase control i and a two-phase phantom i share a seed)
HELD_OUT_BASE = 1000

#: phantom settings cycled over the held-out seeds (LamellaPhantom keywords; "dose" scales the beam
#: current). Radii and widths are the phantom's, scaled by it with the scan width.
VARIETY = (
    {},
    {"dose": 0.5},
    {"dose": 2.0},
    {"thickness_nm": 40.0},
    {"thickness_nm": 90.0},
    {"bending_mrad": 2.0},
    {"bending_mrad": 8.0},
    {"n_inclusions": 3},
    {"n_inclusions": 16},
    {"inclusion_radius": (2.0, 5.0)},
    {"inclusion_depth": (0.3, 0.6)},
)


def phantom_kwargs(setting: dict, inclusions: bool) -> dict:
    kw = {k: v for k, v in setting.items() if k != "dose"}
    kw["beam_current_pa"] = 4.0 * float(setting.get("dose", 1.0))
    if not inclusions:
        kw.pop("n_inclusions", None)
        kw.pop("inclusion_radius", None)
        kw.pop("inclusion_depth", None)
        kw["n_inclusions"] = 0
    return kw


def run_phantom(size: int, seed: int, setting: dict, inclusions: bool, batch: int = 256,
                flags: dict | None = None) -> dict:
    from streamclust.adapters.join import Batch
    from streamclust.app.config import Config
    from streamclust.app.live import LiveAnalysis
    from streamclust.reference import best_f1
    from streamclust.simulators.phantom import LamellaPhantom

    ph = LamellaPhantom((size, size), seed=seed, **phantom_kwargs(setting, inclusions))
    n, nx = ph.n_positions, size
    config = Config().override("flags", **(flags or {})) if flags else Config()
    live = LiveAnalysis.from_config(config, ph.scan_shape, ph.frame_shape, ph.energy_axis_kev, random_state=seed)
    raised_positions = record_raised_positions(live.flagger)
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        pos = np.arange(s, min(s + batch, n))
        ones = np.ones(pos.size, bool)
        live.process(Batch(pos, ph.frames(pos), ph.spectra(pos), ones, ones))
    live.finish()
    truth = ph.truth.second_phase.ravel()
    labels_truth = ph.truth.labels.ravel()
    matrix = labels_truth == list(ph.truth.label_names).index("cfs_matrix")
    lab = live.engine.labels_
    out = {"size": size, "seed": seed, "setting": setting, "inclusions": inclusions,
           "seconds": round(time.perf_counter() - t0, 1), "n_flags": len(live.flags_summary())}
    # the map: the share of the matrix's positions in its largest live cluster
    known = matrix & (lab >= 0)
    out["matrix_largest_share"] = round(float(np.bincount(lab[known]).max() / known.sum()), 3) if known.any() else None
    raised = [r for r in live.flag_log if r["kind"] == "raised"]
    if raised:
        first = raised[0]
        out["first_flag_fraction"] = round(first["scan_fraction"], 3)
        out["first_flag_rows_done"] = int(round(first["scan_fraction"] * n)) // nx
        p = raised_positions.get(first["flag_id"], np.zeros(0, int))
        out["first_flag_precision"] = round(float(truth[p].mean()), 3) if p.size else None
    # every raised flag: when, and what fraction of its positions are second phase
    out["flags_raised"] = [
        {"fraction": round(r["scan_fraction"], 3),
         "precision": (round(float(truth[raised_positions[r["flag_id"]]].mean()), 3)
                       if raised_positions.get(r["flag_id"]) is not None and raised_positions[r["flag_id"]].size
                       else None)}
        for r in raised]
    if inclusions and truth.any():
        out["second_phase_positions"] = int(truth.sum())
        out["f1_live"] = round(best_f1(lab, truth).single, 3)
        grid = truth.reshape(ph.scan_shape)
        out["second_phase_first_row"] = int(np.flatnonzero(grid.any(axis=1))[0])
        comp, _ = ndimage.label(grid, structure=np.ones((3, 3), bool))
        ends = [sl[0].stop - 1 for i, sl in enumerate(ndimage.find_objects(comp), start=1)
                if np.count_nonzero(comp == i) >= 20]
        out["first_inclusion_crossed_row"] = min(ends) if ends else None
    return out


def record_raised_positions(flagger) -> dict:
    """``{flag_id: positions}`` of each flag when it was raised, filled as ``flagger`` updates (the
    flag log keeps no positions, and precision needs them)."""
    raised: dict[int, np.ndarray] = {}
    update = flagger.update

    def keep_positions(*args, **kwargs):
        events = update(*args, **kwargs)
        for ev in events:
            if ev.kind == "raised" and ev.flag_id not in raised:
                raised[ev.flag_id] = np.asarray(ev.positions)
        return events

    flagger.update = keep_positions
    return raised


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for k successes in n trials."""
    if n == 0:
        return (0.0, 1.0)
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def summarise(rows: list[dict]) -> dict:
    single = [r for r in rows if not r["inclusions"]]
    two = [r for r in rows if r["inclusions"] and r.get("second_phase_positions")]
    fa = sum(r["n_flags"] > 0 for r in single)
    flagged = [r for r in two if r.get("first_flag_fraction") is not None and r["first_flag_fraction"] < 1.0]
    # a detection is a flag at the second phase (most of its positions are), raised before the end
    found = [r for r in two if any(f["fraction"] < 1.0 and (f["precision"] or 0) >= 0.5
                                   for f in r.get("flags_raised", []))]
    # flags elsewhere on a two-phase sample: a follow-up aimed at nothing
    misplaced = sum(sum((f["precision"] or 0) < 0.5 for f in r.get("flags_raised", [])) for r in two)
    after_reach = [r["first_flag_rows_done"] - 1 - r["second_phase_first_row"] for r in flagged]
    after_cross = [r["first_flag_rows_done"] - 1 - r["first_inclusion_crossed_row"] for r in flagged
                   if r.get("first_inclusion_crossed_row") is not None]
    prec = [r["first_flag_precision"] for r in flagged if r.get("first_flag_precision") is not None]

    def med(v):
        return float(np.median(v)) if v else None

    return {
        "single_phase": len(single), "false_alarms": fa,
        "false_alarm_rate": round(fa / len(single), 3) if single else None,
        "false_alarm_ci95": [round(v, 3) for v in clopper_pearson(fa, len(single))],
        "two_phase": len(two), "flagged": len(flagged), "detected": len(found),
        "detection_rate": round(len(found) / len(two), 3) if two else None,
        "detection_ci95": [round(v, 3) for v in clopper_pearson(len(found), len(two))],
        "misplaced_flags_on_two_phase": misplaced,
        "median_rows_after_reaching": med(after_reach),
        "median_rows_after_first_inclusion_crossed": med(after_cross),
        "median_first_flag_precision": med(prec),
        "median_f1_live": med([r["f1_live"] for r in two]),
        "median_matrix_largest_share": med([r["matrix_largest_share"] for r in rows
                                            if r.get("matrix_largest_share") is not None]),
    }


def phantoms(which: str, n: int, first: int = 0) -> list[tuple[int, dict, bool]]:
    if which == "tune":
        return ([(s, {}, True) for s in TUNE_WITH_INCLUSIONS] + [(s, {}, False) for s in TUNE_SINGLE_PHASE])
    out = []
    for i in range(int(first), int(first) + n):
        setting = VARIETY[i % len(VARIETY)]
        out.append((HELD_OUT_BASE + i, setting, True))
        out.append((HELD_OUT_BASE + i, setting, False))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="scan positions a side")
    ap.add_argument("--n", type=int, default=40, help="held-out phantoms of each kind")
    ap.add_argument("--set", choices=("held-out", "tune"), default="held-out")
    ap.add_argument("--first", type=int, default=0,
                    help="start at held-out phantom FIRST (seed 1000 + FIRST): runs split over sessions add up")
    ap.add_argument("--json", action="store_true", help="the summary as one JSON object on the last line")
    ap.add_argument("--flag", action="append", default=[], metavar="KEY=VALUE",
                    help="a [flags] setting for this run, e.g. --flag method=test --flag alpha=0.01")
    ap.add_argument("--only", choices=("both", "single", "two"), default="both",
                    help="only single-phase controls or only phantoms with inclusions")
    args = ap.parse_args(argv)
    flags = {}
    for kv in args.flag:
        key, _, value = kv.partition("=")
        try:
            flags[key] = json.loads(value)
        except json.JSONDecodeError:
            flags[key] = value
    rows = []
    for seed, setting, inclusions in phantoms(args.set, args.n, args.first):
        if args.only != "both" and inclusions != (args.only == "two"):
            continue
        row = run_phantom(args.size, seed, setting, inclusions, flags=flags)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    summary = {"size": args.size, "set": args.set, "flags": flags, **summarise(rows)}
    for k, v in summary.items():
        print(f"{k}: {v}")
    if args.json:
        print(json.dumps({"benchmark": "flag_calibration", "summary": summary, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
