"""Cost of the live view: producer side, bytes and milliseconds per update, and the slowdown of the
analysis it feeds (issue 20: "does not slow the analysis by more than 5 %").

Two parts:

* ``--part producer`` (the original figures of docs/liveview.md): ``LiveView.update()`` against a
  plain copy of the same arrays, one render and one PNG, at 64, 256 and 512 squared.
* ``--part analysis`` (default): a :class:`streamclust.app.live.LiveAnalysis` on the 256 x 256 lamella
  phantom (64 x 64 frames to keep it feasible here) for the first ``--rows`` rows, run twice on the
  same pre-generated batches with the configuration's parameters: once without a live view, once
  feeding one (``LiveView.update_from_analysis`` after every assessment, as the lead's wiring in
  ``LiveAnalysis._assess`` does) while ``--viewers`` clients poll it like the page (``state.json``
  every 300 ms; on a new version ``map.png``, ``bf.png`` and the selected flag's ``evidence.json``,
  at most once a second; with no flag yet, the largest cluster's, as if the operator had selected
  it: a worst case). Prints per-batch times of both runs, the cost of each
  ``update_from_analysis``, bytes and server milliseconds per endpoint, and **per update** (what
  one viewer downloads and what the server and the analysis thread spend for each new version),
  and the slowdown of the analysis in % against the runs without a view in the same process
  (``--pairs`` A B B A sequences: the machine is shared, and drift over the minutes of a run is as
  large as the effect). ``--json`` adds one JSON object as the last line.

Run: ``NUMBA_NUM_THREADS=1 .venv/bin/python benchmarks/bench_liveview.py --rows 24``
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import threading
import time

import numpy as np


def best(f, n=30):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def producer() -> None:
    import urllib.request

    from streamclust.app.liveview import LiveView
    from streamclust.app.liveview_render import cluster_palette, encode_png, render_rgba

    rng = np.random.default_rng(0)
    for ny in (64, 256, 512):
        n, c = ny * ny, 6
        u = rng.random((n, c), dtype=np.float32)
        u /= u.sum(1, keepdims=True)
        lab = u.argmax(1)
        flags = [{"cluster": 1, "score": 0.9, "bbox": (1, 1, 5, 5), "n_positions": 16, "label": "x"}]
        with LiveView(scan_shape=(ny, ny), n_clusters=c) as v:
            t_copy = best(lambda: (u.copy(), lab.copy()))
            t_up = best(lambda: v.update(labels=lab, memberships=u, flags=flags, progress=(n // 2, n), counters={"a": 1}))
            t_own = best(lambda: v.update(labels=lab, memberships=u, copy=False))
            t_small = best(lambda: v.update(progress=(n // 2, n), counters={"a": 1}))
            t_rend = best(lambda: render_rgba(lab, u, (ny, ny), cluster_palette(c)), 10)
            rgba = render_rgba(lab, u, (ny, ny), cluster_palette(c))
            t_png = best(lambda: encode_png(rgba), 10)
            png = encode_png(rgba)

            def fetch():
                v.update(progress=(1, n))
                urllib.request.urlopen(v.url + "map.png").read()
            t_http = best(fetch, 10)
        print(f"{ny}x{ny} c={c}: update(labels+memberships, copy) {t_up*1e6:8.1f} us = {t_up/t_copy:4.2f} x plain copy "
              f"({t_copy*1e6:.1f} us); update(copy=False) {t_own*1e6:6.1f} us; update(counters only) {t_small*1e6:5.1f} us; "
              f"render {t_rend*1e3:6.2f} ms, PNG {t_png*1e3:6.2f} ms ({len(png)/1e3:.0f} kB), GET map.png after update {t_http*1e3:6.2f} ms")


class Poller(threading.Thread):
    """A viewer like the page: keep-alive connection, state every 300 ms, pictures on a new version."""

    def __init__(self, view, poll_s: float = 0.3) -> None:
        super().__init__(daemon=True)
        self.view, self.poll_s = view, poll_s
        self.stop = threading.Event()
        self.bytes: dict[str, list[int]] = {}
        self.ms: dict[str, list[float]] = {}
        self.versions = 0  # new versions this viewer displayed

    def get(self, conn, path: str) -> bytes:
        t = time.perf_counter()
        conn.request("GET", "/" + path)
        r = conn.getresponse()
        body = r.read()
        key = path.split("?")[0]
        self.ms.setdefault(key, []).append(1e3 * (time.perf_counter() - t))
        self.bytes.setdefault(key, []).append(len(body))
        return body if r.status == 200 else b""

    def run(self) -> None:
        host, port = self.view.address
        conn = http.client.HTTPConnection(host, port, timeout=30)
        shown, last_ev = -1, 0.0
        while not self.stop.wait(self.poll_s):
            st = json.loads(self.get(conn, "state.json"))
            if st["version"] == shown:
                continue
            shown = st["version"]
            self.versions += 1
            self.get(conn, f"map.png?v={shown}")
            if st["bf_version"] is not None:
                self.get(conn, f"bf.png?v={st['bf_version']}")
            if st["evidence"] and time.monotonic() - last_ev > 1.0:
                last_ev = time.monotonic()
                if st["flags"] and st["flags"][0].get("flag_id") is not None:
                    self.get(conn, f"evidence.json?flag={st['flags'][0]['flag_id']}")
                else:  # no flag yet: the largest cluster, as if selected (a worst case)
                    k = int(np.argmax(st["cluster_counts"]))
                    self.get(conn, f"evidence.json?cluster={k}")
        conn.close()


def analysis(scan: int, rows: int, batch: int, viewers: int, seed: int = 0, pairs: int = 1) -> dict:

    from streamclust.adapters.join import Batch
    from streamclust.app.config import Config
    from streamclust.app.live import LiveAnalysis
    from streamclust.app.liveview import LiveView
    from streamclust.simulators.phantom import LamellaPhantom

    ph = LamellaPhantom((scan, scan), seed=seed, frame_shape=(64, 64))
    n = ph.n_positions
    m = min(rows * scan, n)
    t = time.perf_counter()
    batches = []
    for start in range(0, m, batch):
        pos = np.arange(start, min(start + batch, m))
        ones = np.ones(pos.size, bool)
        batches.append(Batch(pos, ph.frames(pos), ph.spectra(pos), ones, ones))
    print(f"{len(batches)} batches of {batch} generated in {time.perf_counter() - t:.1f} s")
    config = Config()

    def make():
        live = LiveAnalysis.from_config(config, ph.scan_shape, ph.frame_shape, ph.energy_axis_kev, random_state=seed)
        live.engine.warm_up()
        return live

    class Feed:
        """What the lead's wiring does in LiveAnalysis._assess: update_from_analysis, timed."""

        def __init__(self, view, live):
            self.view, self.live, self.times = view, live, []

        def update(self, **_):
            t = time.perf_counter()
            self.view.update_from_analysis(self.live)
            self.times.append(time.perf_counter() - t)

    def run(with_view: bool):
        live = make()
        view = pollers = feed = None
        if with_view:
            view = LiveView(scan_shape=ph.scan_shape, n_clusters=live.n_output_clusters).start()
            feed = Feed(view, live)
            live.liveview = feed
            pollers = [Poller(view) for _ in range(viewers)]
            for p in pollers:
                p.start()
        per = []
        t0, c0 = time.perf_counter(), time.process_time()
        for b in batches:
            t = time.perf_counter()
            live.process(b)
            per.append(time.perf_counter() - t)
        total = time.perf_counter() - t0
        # CPU seconds of the whole process (analysis, server and viewer threads): what the view
        # adds there is less sensitive than wall time to the other jobs on a shared machine
        cpu = time.process_time() - c0
        if with_view:
            for p in pollers:
                p.stop.set()
                p.join()
            view.stop()
        return np.array(per), total, feed, pollers, live, cpu

    # A B B A: the machine is shared, and drift over the minutes of a run is as large as the effect
    order = (False, True, True, False) * max(1, int(pairs))
    load = os.getloadavg()[0]
    runs = [run(w) for w in order]
    alone = [r for r, w in zip(runs, order) if not w]
    viewed = [r for r, w in zip(runs, order) if w]
    _, _, feed, pollers, live, _ = viewed[-1]
    print(f"scan {scan}x{scan}, first {m} positions, {len(batches)} batches, "
          f"{live.engine.stats_['refreshes']} refreshes, {len(feed.times)} live-view updates, {viewers} viewer(s)")
    for name, rs in (("analysis alone", alone), ("analysis + view", viewed)):
        print(f"{name:16s} totals " + ", ".join(f"{r[1]:6.2f} s" for r in rs)
              + "; per batch median " + ", ".join(f"{1e3 * np.median(r[0]):6.1f} ms" for r in rs))
    ta, tb = np.mean([r[1] for r in alone]), np.mean([r[1] for r in viewed])
    slowdown = 100 * (tb / ta - 1)
    # the median batch is less sensitive to another job's burst than a total
    ma = np.median(np.concatenate([r[0] for r in alone]))
    mb = np.median(np.concatenate([r[0] for r in viewed]))
    ca, cb = np.mean([r[5] for r in alone]), np.mean([r[5] for r in viewed])
    print(f"  -> view costs {slowdown:+.1f} % of the total (mean of {len(alone)} runs each), "
          f"{100 * (mb / ma - 1):+.1f} % of the median batch; process CPU {ca:.2f} s alone, {cb:.2f} s "
          f"with view ({100 * (cb / ca - 1):+.1f} %; the viewers' client side included)")
    ft = 1e3 * np.concatenate([r[2].times for r in viewed])
    thread_pct = ft.sum() / (1e3 * sum(r[1] for r in viewed)) * 100
    print(f"update_from_analysis: {ft.mean():.2f} ms mean, {ft.max():.2f} ms max, per update; "
          f"{thread_pct:.2f} % of the runs in the analysis thread")
    for key in sorted(pollers[0].bytes):
        b = np.concatenate([p.bytes[key] for r in viewed for p in r[3] if key in p.bytes])
        ms = np.concatenate([p.ms[key] for r in viewed for p in r[3] if key in p.ms])
        print(f"  GET {key:15s} {b.size:4d} x, {b.mean() / 1e3:8.1f} kB mean, {np.median(ms):7.2f} ms median, {ms.max():7.1f} ms max")
    # per update, per viewer: everything one viewer fetched (state polls included) over the
    # versions it displayed, and the server milliseconds those requests took
    all_p = [p for r in viewed for p in r[3]]
    n_versions = sum(p.versions for p in all_p)
    per_bytes = sum(sum(sum(v) for v in p.bytes.values()) for p in all_p) / max(n_versions, 1)
    per_ms = sum(sum(sum(v) for v in p.ms.values()) for p in all_p) / max(n_versions, 1)
    print(f"per update and viewer: {per_bytes / 1e3:.1f} kB, {per_ms:.1f} ms of requests "
          f"({n_versions} versions displayed by {len(all_p)} viewers over {len(viewed)} runs); "
          f"analysis thread {ft.mean():.2f} ms per update")
    # the evidence of one cluster (no flag is raised this early at 256 x 256): its cost does not
    # grow with the scan (centres are per cluster, patterns 32 x 32)
    from streamclust.app.liveview import LiveView as _LV
    view = _LV(scan_shape=ph.scan_shape, n_clusters=live.n_output_clusters)
    view.update_from_analysis(live)
    k = int(np.argmax(live.centre_set.count[-1]))
    t_ev = best(lambda: view.evidence(cluster=k), 10)
    body = view.evidence_json(cluster=k)
    print(f"  evidence.json (cluster {k}): {len(body) / 1e3:.1f} kB, {1e3 * t_ev:.2f} ms to compute")
    print(f"load average (1 min) at the start: {load:.1f} on {os.cpu_count()} cores (a shared machine: "
          "totals drift by more than the effect; the analysis thread's share is the part measured exactly)")
    return {"scan": scan, "positions": m, "batches": len(batches), "viewers": viewers, "runs_each": len(alone),
            "updates_per_run": len(feed.times),
            "liveview_update_ms_mean": round(float(ft.mean()), 3), "liveview_update_ms_max": round(float(ft.max()), 3),
            "liveview_bytes_per_update": round(per_bytes), "liveview_request_ms_per_update": round(per_ms, 2),
            "liveview_analysis_thread_pct": round(float(thread_pct), 3),
            "liveview_slowdown_total_pct": round(float(slowdown), 2),
            "liveview_slowdown_median_batch_pct": round(float(100 * (mb / ma - 1)), 2),
            "liveview_cpu_pct": round(float(100 * (cb / ca - 1)), 2),
            "totals_alone_s": [round(r[1], 3) for r in alone], "totals_with_view_s": [round(r[1], 3) for r in viewed],
            "evidence_json_bytes": len(body), "evidence_ms": round(1e3 * t_ev, 3), "load_avg_1min": round(load, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("analysis", "producer"), default="analysis")
    ap.add_argument("--scan", type=int, default=256)
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--viewers", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=1, help="A B B A sequences (alone / with view)")
    ap.add_argument("--json", action="store_true", help="one JSON object as the last stdout line")
    a = ap.parse_args()
    if a.part == "producer":
        producer()
    else:
        out = analysis(a.scan, a.rows, a.batch, a.viewers, pairs=a.pairs)
        if a.json:
            print(json.dumps(out))


if __name__ == "__main__":
    main()
