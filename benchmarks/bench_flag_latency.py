"""Flag latency: seconds from the acquisition of the positions that decide a flag to the event
arriving at a subscriber, with the live analysis running at full rate.

The simulated lamella's positions are handed to :class:`streamclust.app.live.LiveAnalysis`, built with
the default configuration resolved for the scan as ``streamclust run`` builds it (refresh and
assessment cadence, flagger), in the joiner's batches on a scan clock: position ``p`` is *acquired* at ``t0 + (p + 1) / rate``, and a
batch is handed over once its last position is acquired (or at once, when the analysis is behind:
then the backlog counts in the latency, as it would on the instrument). Flag events go out on a
real ZeroMQ PUSH socket; a PULL subscriber thread stamps their arrival. For each ``raised`` event
the latency is ``arrival - acquisition time of the last position of the batch whose processing
raised it`` (the deciding positions are in that batch or earlier).

``--rate`` is positions a second: 500 is a 2 ms dwell, the shortest dwell at which the EDS
spectrum still holds counts worth clustering (docs/phantom.md); 0 hands batches over as fast as the
analysis takes them (processing-bound; acquisition time = hand-over time). Frames are rendered
ahead of their acquisition time in a thread of their own (the detector's machine), so phantom
rendering is not in the figures.

Baseline in the same run: the median time ``LiveAnalysis.process`` takes for a batch that does not
assess (ingest only); the ratio says how many plain batches' worth of time a decision costs.

    .venv/bin/python benchmarks/bench_flag_latency.py [--scan 64] [--rate 500] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import threading
import time

import numpy as np


def run(scan: int = 64, rate: float = 500.0, seed: int = 0, batch: int = 128) -> dict:
    from streamclust.adapters.join import Batch
    from streamclust.app.config import Config
    from streamclust.flags.events import EventPublisher, EventSubscriber
    from streamclust.app.live import LiveAnalysis
    from streamclust.simulators.phantom import LamellaPhantom

    ph = LamellaPhantom((scan, scan), seed=seed)
    n = ph.n_positions
    pub = EventPublisher("tcp://127.0.0.1:0", socket_type="push", scan_id="latency")
    sub = EventSubscriber(pub.endpoint, socket_type="pull")
    arrivals: list[tuple[float, dict]] = []
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            ev = sub.recv(timeout_s=0.1)
            if ev is not None:
                arrivals.append((time.perf_counter(), ev))

    th = threading.Thread(target=listen, daemon=True)
    th.start()
    # the product's parameters, resolved for this scan exactly as `streamclust run` resolves them
    config = Config()
    live = LiveAnalysis.from_config(config, ph.scan_shape, ph.frame_shape, ph.energy_axis_kev, events=pub,
                                    random_state=seed)
    live.engine.warm_up()
    decided: dict[int, float] = {}  # flag id -> acquisition time of its deciding batch
    plain, deciding = [], []
    # The phantom renders in a thread of its own, ahead of the scan clock (its Numba kernels release
    # the GIL), as the detector renders on its own machine: rendered in the analysis thread, a
    # 256 x 256 scan's 512 x 512 frames took about 50 s of its 131 s (0.1 s a batch of 128), and the backlog that left was
    # counted as latency.
    ahead: queue.Queue = queue.Queue(maxsize=8)

    def render() -> None:
        for start in range(0, n, batch):
            pos = np.arange(start, min(start + batch, n))
            ahead.put((pos, ph.frames(pos), ph.spectra(pos)))

    renderer = threading.Thread(target=render, daemon=True)
    renderer.start()
    t0 = time.perf_counter()
    for _ in range(0, n, batch):
        pos, frames, spectra = ahead.get()
        ones = np.ones(pos.size, bool)
        acquired = t0 + (pos[-1] + 1) / rate if rate > 0 else None
        if acquired is not None:
            wait = acquired - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        else:
            acquired = time.perf_counter()
        before = len(live.flag_log)
        updates = live.flagger.n_updates_
        t = time.perf_counter()
        live.process(Batch(pos, frames, spectra, ones, ones))
        dt = time.perf_counter() - t
        (deciding if live.flagger.n_updates_ != updates else plain).append(dt)
        for rec in live.flag_log[before:]:
            if rec["kind"] == "raised":
                decided[rec["flag_id"]] = acquired
    live.finish()
    time.sleep(0.3)
    stop.set()
    th.join()
    pub.close()
    sub.close()
    lat = []
    for t_arr, ev in arrivals:
        if ev.get("event") == "raised" and ev.get("flag_id") in decided:
            lat.append(t_arr - decided[ev["flag_id"]])
    base = float(np.median(plain)) if plain else float("nan")
    out = {
        "scan": scan, "rate_positions_per_s": rate, "batch": batch,
        "flags_raised": len(decided),
        "flag_latency_s": float(max(lat)) if lat else None,
        "flag_latency_all_s": [round(float(v), 4) for v in lat],
        "assessing_batch_s_median": float(np.median(deciding)) if deciding else None,
        "plain_batch_s_median": base,
        "latency_vs_plain_batch": (float(max(lat)) / base) if lat and base > 0 else None,
        "load": os.getloadavg(),
    }
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", type=int, default=64)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a 48 x 48 scan")
    ap.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = ap.parse_args(argv)
    res = run(scan=48 if args.quick else args.scan, rate=args.rate, seed=args.seed)
    print(f"flag latency on a {res['scan']}x{res['scan']} scan at {res['rate_positions_per_s']:.0f} positions/s: "
          f"{res['flags_raised']} flag(s) raised, worst latency "
          + (f"{res['flag_latency_s']:.3f} s (all: {res['flag_latency_all_s']})" if res["flag_latency_s"] is not None
             else "n/a (no flag raised)"))
    if res["latency_vs_plain_batch"] is not None:
        print(f"  baseline: a plain batch takes {1e3 * res['plain_batch_s_median']:.1f} ms, an assessing batch "
              f"{1e3 * res['assessing_batch_s_median']:.1f} ms; latency = {res['latency_vs_plain_batch']:.1f}x a plain batch")
    print(f"  load average {res['load']}")
    if args.json:
        print(json.dumps({k: v for k, v in res.items()}))


if __name__ == "__main__":
    main()
