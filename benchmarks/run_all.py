"""Run every benchmark script in turn (``make bench``, ``streamclust bench``), saving each one's output under out/bench/.

Each script measures its figures against a baseline run in the same process and prints both the
absolute rates and the ratios; this runner only sequences them (never in parallel: they would
measure each other) and collects the outputs.

    .venv/bin/python benchmarks/run_all.py            # the default sizes
    .venv/bin/python benchmarks/run_all.py --quick    # shorter runs where a script offers it
    .venv/bin/python benchmarks/run_all.py --json     # the headline scripts, one merged JSON object

With ``--json`` only the scripts behind the headline figures run, each with ``--json`` (one JSON
object on its last stdout line), and the last stdout line is one merged object holding at least
``ingest_u16_fps``, ``drain_u16_fps``, ``ingest_raw1_fps``, ``drain_raw1_fps`` (bench_ingest.py),
``end_to_end_fps`` (bench_end_to_end.py), ``fcm_speedup_vs_skfuzzy`` (bench_fcm.py) and
``flag_latency_s`` (bench_flag_latency.py), ``scale_256_keepup``, ``scale_256_peak_rss_gb`` and
``flag_latency_256_s`` (scale.py: the 256 x 256 demo at 2 ms dwell), plus ``details`` (each script's whole object),
``errors`` (one entry per script that failed or did not report a figure: that figure is null, never
invented), ``load_avg_1min`` and ``seconds`` per script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# script -> (default arguments, quick arguments)
SCRIPTS = {
    "bench_phantom.py": ([], ["--n", "1000"]),
    "bench_codec.py": ([], ["--quick"]),
    "bench_ingest.py": ([], ["--quick"]),
    "bench_join.py": ([], ["--positions", "1024", "--frames", "500", "--repeat", "1"]),
    "bench_stats.py": (["--blas-threads", "1"], ["--quick", "--blas-threads", "1"]),
    "bench_fcm.py": (["speed"], ["speed", "--sizes", "16384", "--iters", "10"]),
    "bench_engine.py": ([], ["--quick"]),
    "bench_end_to_end.py": ([], ["--quick"]),
    "bench_flag_latency.py": ([], ["--quick"]),
    "bench_serve.py": ([], ["--n", "1000", "--repeat", "1"]),
    "bench_results.py": ([], []),
    "bench_dask.py": ([], ["--scan", "32", "--frame", "256"]),
    # the scan size of the headline figures is the point: --quick keeps 256 x 256 at 2 ms (about 7 min)
    "scale.py": (["--sizes", "256", "--dwells", "0.002"], ["--sizes", "256", "--dwells", "0.002"]),
}

# the established implementations some scripts measure against: script -> (module, pip requirement).
# Without one the figure would be meaningless, so the script is not run: the runner says what is
# missing and how to install it, and exits non-zero (a null figure is a failure, not a result).
COMPARATORS = {
    "bench_fcm.py": [("skfuzzy", "scikit-fuzzy")],
    "bench_dask.py": [("dask.distributed", "dask[distributed]")],
}

# the headline figures of ``--json``: script -> keys it must report
HEADLINE = {
    "bench_ingest.py": ("ingest_u16_fps", "drain_u16_fps", "ingest_raw1_fps", "drain_raw1_fps"),
    "bench_end_to_end.py": ("end_to_end_fps",),
    "bench_fcm.py": ("fcm_speedup_vs_skfuzzy",),
    "bench_flag_latency.py": ("flag_latency_s",),
    "scale.py": ("scale_256_keepup", "scale_256_peak_rss_gb", "flag_latency_256_s"),
}


def last_json(stdout: str) -> dict | None:
    """The JSON object on the last non-empty stdout line, or None."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        return None
    try:
        obj = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def missing_comparators(script: str) -> list[str]:
    """Requirements of ``script``'s comparators that do not import with this interpreter.

    Tried in a child interpreter with this environment, so an import that fails (not only one that
    is absent) counts, and the runner's own process imports nothing heavy.
    """
    missing = []
    for module, requirement in COMPARATORS.get(script, []):
        probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
        if probe.returncode:
            missing.append(requirement)
    return missing


def missing_message(script: str, missing: list[str]) -> str:
    reqs = " ".join(f"'{r}'" for r in missing)
    return (f"{script} not run: its comparator {', '.join(missing)} is not installed (or does not import) in "
            f"{sys.executable}. Install it with: {sys.executable} -m pip install -c constraints.txt {reqs} "
            "(or `make test`, which installs the test extras)")


def _json_args(script: str, args: list[str]) -> list[str]:
    # subcommand scripts (bench_fcm.py speed ...) take --json after the subcommand
    return [*args, "--json"]


def run_json(names: list[str], quick: bool, timeout_s: float, out: Path) -> dict:
    """Run the headline scripts with ``--json`` and merge their figures (see the module docstring)."""
    merged: dict = {key: None for keys in HEADLINE.values() for key in keys}
    merged.update(details={}, errors=[], seconds={})
    for script, keys in HEADLINE.items():
        if names and script not in names:
            continue
        path = HERE / script
        if not path.exists():
            merged["errors"].append({"script": script, "error": "script not present", "keys": list(keys)})
            continue
        missing = missing_comparators(script)
        if missing:
            message = missing_message(script, missing)
            print(f"-- {message}", file=sys.stderr, flush=True)
            merged["errors"].append({"script": script, "error": message, "missing": missing, "keys": list(keys)})
            continue
        full, quick_args = SCRIPTS[script]
        attempts = [_json_args(script, quick_args if quick else full)]
        if attempts[0][-1] == "--json" and attempts[0][:1] and not attempts[0][0].startswith("-"):
            attempts.append(["--json", *attempts[0][:-1]])  # --json defined before the subcommand
        obj, proc, err = None, None, None
        t0 = time.perf_counter()
        for args in attempts:
            try:
                proc = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                                      timeout=timeout_s)
            except subprocess.TimeoutExpired:
                err = f"timed out after {timeout_s:.0f} s"
                break
            if proc.returncode == 2 and "unrecognized arguments" in proc.stderr:
                continue
            break
        merged["seconds"][script] = round(time.perf_counter() - t0, 1)
        if proc is not None:
            (out / (path.stem + ".txt")).write_text(proc.stdout + f"\n[stderr]\n{proc.stderr}")
            if proc.returncode:
                err = f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}"
            else:
                obj = last_json(proc.stdout)
                if obj is None:
                    err = "no JSON object on the last stdout line"
        if obj is not None:
            merged["details"][script] = obj
            missing = [k for k in keys if obj.get(k) is None]
            for k in keys:
                merged[k] = obj.get(k)
            if missing:
                merged["errors"].append({"script": script, "error": "figure missing from its JSON",
                                         "keys": missing})
        else:
            merged["errors"].append({"script": script, "error": err, "keys": list(keys)})
        print(f"-- {script}: {'ok' if obj is not None else err} in {merged['seconds'][script]} s",
              file=sys.stderr, flush=True)
    merged["quick"] = quick
    merged["load_avg_1min"] = round(os.getloadavg()[0], 2)
    return merged


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help="headline scripts only; one merged JSON object")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds a script may take (--json)")
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("names", nargs="*", help="only these scripts (e.g. bench_codec.py)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.json:
        merged = run_json(args.names, args.quick, args.timeout, out)
        print(json.dumps(merged))
        return 1 if merged["errors"] else 0  # a figure that is null must not look like a result
    failed = []
    for script, (full, quick) in SCRIPTS.items():
        if args.names and script not in args.names:
            continue
        path = HERE / script
        if not path.exists():
            print(f"-- {script}: not present, skipped")
            continue
        missing = missing_comparators(script)
        if missing:
            print(f"-- {missing_message(script, missing)}", file=sys.stderr, flush=True)
            failed.append(script)
            continue
        cmd = [sys.executable, str(path), *(quick if args.quick else full)]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        text = proc.stdout + (f"\n[stderr]\n{proc.stderr}" if proc.returncode else "")
        (out / (path.stem + ".txt")).write_text(text)
        print(proc.stdout, end="")
        print(f"-- {script}: exit {proc.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
        if proc.returncode:
            failed.append(script)
            print(proc.stderr[-2000:], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
