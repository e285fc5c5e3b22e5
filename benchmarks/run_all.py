"""Run every benchmark script in turn (``make bench``), saving each one's output under out/bench/.

Each script measures its figures against a baseline run in the same process and prints both the
absolute rates and the ratios; this runner only sequences them (never in parallel: they would
measure each other) and collects the outputs.

    .venv/bin/python benchmarks/run_all.py            # the default sizes
    .venv/bin/python benchmarks/run_all.py --quick    # shorter runs where a script offers it
"""

from __future__ import annotations

import argparse
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
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("names", nargs="*", help="only these scripts (e.g. bench_codec.py)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for script, (full, quick) in SCRIPTS.items():
        if args.names and script not in args.names:
            continue
        path = HERE / script
        if not path.exists():
            print(f"-- {script}: not present, skipped")
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
