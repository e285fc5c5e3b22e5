"""Scaling of the Dask replay from 1 to 2 workers on a recorded simulated scan.

A phantom scan is recorded once to a temporary directory (Merlin ``.mib`` + EDS HDF5), then
replayed three ways in the same process, each timed without cluster start-up and after a JIT
warm-up on every worker:

* ``in-process``: :func:`streamclust.distributed.dask_replay.replay_local` (the same passes, no Dask) - the
  baseline;
* ``dask 1 worker`` and ``dask 2 workers``: :func:`~streamclust.distributed.dask_replay.replay_dask` on a
  ``LocalCluster(n, threads_per_worker=1, processes=True)``.

Printed: positions/s for each, the 2-worker / 1-worker ratio and each against the baseline, the
seconds per pass, the ARI between the partitions (they should agree), and ``uptime``'s load.

    .venv/bin/python benchmarks/bench_dask.py [--scan 64] [--frame 256] [--chunk 512] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np


def _warm_worker() -> bool:
    from streamclust.cluster import fcm_kernels
    from streamclust.features.reducers import FrameReducer

    fcm_kernels.warm_up()
    FrameReducer(bin_factor=8, frame_shape=(256, 256)).fit().warm_up()
    return True


def _labels(summary: dict) -> np.ndarray:
    with h5py.File(summary["results_path"], "r") as f:
        g = f["clustering"] if "clustering" in f else f  # ResultsWriter's layout or the minimal one
        return g["labels"][()].ravel()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", type=int, default=64, help="scan is SCAN x SCAN positions")
    ap.add_argument("--frame", type=int, choices=(256, 512), default=256,
                    help="frame side: 256 (one chip, layout 1x1) or 512 (quad)")
    ap.add_argument("--chunk", type=int, default=512, help="positions per task")
    ap.add_argument("--pca", default="auto", choices=("auto", "exact", "sketch"))
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--keep", default=None, help="directory for the recording (default: a temporary one)")
    args = ap.parse_args(argv)

    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    from dask.distributed import Client, LocalCluster
    from sklearn.metrics import adjusted_rand_score

    from streamclust.distributed.dask_replay import replay_dask, replay_local
    from streamclust.simulators.phantom import LamellaPhantom
    from streamclust.simulators.recording import record_scan

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_dask_"))
    try:
        shape = (args.scan, args.scan)
        t = time.perf_counter()
        ph = LamellaPhantom(scan_shape=shape, seed=5, frame_shape=(args.frame, args.frame), n_inclusions=6,
                            inclusion_radius=(4, 10))
        rec = record_scan(ph, tmp / "scan", layout="1x1" if args.frame == 256 else "2x2")
        t_record = time.perf_counter() - t
        n = rec.n_positions
        cfg = {"pca_method": args.pca}

        _warm_worker()
        runs = {}
        s = replay_local(rec.mib, rec.eds, tmp / "local", chunk_positions=args.chunk, config=cfg)
        runs["in-process"] = s
        for workers in (1, 2):
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, \
                    Client(cl) as client:
                client.run(_warm_worker)
                runs[f"dask {workers} worker" + ("s" if workers > 1 else "")] = replay_dask(
                    rec.mib, rec.eds, tmp / f"dask{workers}", scheduler=client, chunk_positions=args.chunk, config=cfg)
        base = runs["in-process"]["positions_per_s"]
        one = runs["dask 1 worker"]["positions_per_s"]
        two = runs["dask 2 workers"]["positions_per_s"]
        ref = _labels(runs["in-process"])
        load = os.getloadavg()
        out = {
            "positions": n, "scan": list(shape), "frame": args.frame, "chunk": args.chunk,
            "recording_seconds": t_record, "mib_bytes": os.path.getsize(rec.mib),
            "runs": {name: {"positions_per_s": r["positions_per_s"], "seconds": r["seconds"],
                            "n_components": r["n_components"], "pca_method": r["pca_method"],
                            "ari_vs_in_process": float(adjusted_rand_score(ref, _labels(r)))}
                     for name, r in runs.items()},
            "ratio_2_over_1_workers": two / one,
            "ratio_1_worker_over_in_process": one / base,
            "ratio_2_workers_over_in_process": two / base,
            "load_average": list(load),
            "cpus": os.cpu_count(),
        }
        if args.json:
            print(json.dumps(out, indent=1))
        else:
            print(f"recording {shape[0]}x{shape[1]} positions, {args.frame}x{args.frame} frames "
                  f"({out['mib_bytes'] / 2**20:.0f} MiB .mib), chunks of {args.chunk}; load {load[0]:.2f} on "
                  f"{os.cpu_count()} CPUs")
            print(f"{'run':<16}{'positions/s':>12}{'vs in-process':>15}{'ARI':>7}   seconds per pass")
            for name, r in out["runs"].items():
                secs = " ".join(f"{k}={v:.2f}" for k, v in r["seconds"].items())
                print(f"{name:<16}{r['positions_per_s']:>12.0f}{r['positions_per_s'] / base:>15.2f}"
                      f"{r['ari_vs_in_process']:>7.3f}   {secs}")
            print(f"2 workers / 1 worker: {out['ratio_2_over_1_workers']:.2f}x")
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
