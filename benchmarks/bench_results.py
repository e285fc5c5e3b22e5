"""Checkpoint cost of ResultsWriter: bytes and ms per checkpoint at 128x128 and 512x512 scans.

State: a real LiveAnalysis fed 1,024 phantom positions (fitted engine, real centres, flags), then the
memberships of every position replaced by random Dirichlet rows (a full scan's worth of data) and
every position marked seen. Baseline in the same process: np.save of the memberships array alone
(write + fsync), i.e. the raw cost of getting those bytes on disk.
"""
import os, sys, time, tempfile
import numpy as np
from pathlib import Path
from streamclust.adapters.join import Batch
from streamclust.app.live import LiveAnalysis
from streamclust.results.writer import ResultsWriter
from streamclust.simulators.phantom import LamellaPhantom

def bench(scan, k=6, host=0, reps=5, out=Path(tempfile.mkdtemp(dir="/tmp"))):
    ph = LamellaPhantom(scan_shape=(32, 32), seed=0)
    n = scan[0] * scan[1]
    live = LiveAnalysis(scan, ph.frame_shape, ph.energy_axis_kev, n_clusters=k, random_state=0,
                        assess_every=256, engine_params={"warmup_positions": 256, "refresh_every": 512,
                                                         "host_clusters": host, "store": "basis"})
    for i in range(0, 1024, 128):
        p = np.arange(i, i + 128)
        ones = np.ones(p.size, bool)
        live.process(Batch(p, ph.frames(p), ph.spectra(p), ones, ones))
    live.assess()
    rng = np.random.default_rng(0)
    live.engine.memberships_[:] = rng.dirichlet(np.ones(live.engine.memberships_.shape[1]), n).astype(np.float32)
    live._seen[:] = True
    w = ResultsWriter(out / "r.h5", scan_shape=scan, frame_shape=ph.frame_shape, energy_axis_kev=ph.energy_axis_kev,
                      n_clusters=k, thresholds=(0.5, 0.75), config={"bench": True}, scan_id="bench")
    counters = {"merlin": {"frames_received": n}, "join": {"joined": n}}
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        w.checkpoint(live.scan_result(counters), force=True)
        times.append(time.perf_counter() - t)
    base = []
    for _ in range(reps):
        t = time.perf_counter()
        with open(out / "base.npy", "wb") as fh:
            np.save(fh, live.engine.memberships_); fh.flush(); os.fsync(fh.fileno())
        base.append(time.perf_counter() - t)
    size = w.last_write_["bytes"]
    mb = live.engine.memberships_.nbytes
    print(f"scan {scan[0]}x{scan[1]}, {live.engine.memberships_.shape[1]} membership columns: "
          f"{size/1e6:.2f} MB/checkpoint (memberships {mb/1e6:.2f} MB), "
          f"median {1e3*np.median(times):.1f} ms (min {1e3*min(times):.1f}), "
          f"baseline np.save+fsync of memberships {1e3*np.median(base):.1f} ms, ratio {np.median(times)/np.median(base):.2f}")

if __name__ == "__main__":
    # usage: .venv/bin/python benchmarks/bench_results.py
    print(os.popen("uptime").read().strip())
    bench((128, 128))
    bench((512, 512))
    bench((512, 512), host=6)
    print(os.popen("uptime").read().strip())
