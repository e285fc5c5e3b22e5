"""Soak: a million frames through the whole live pipeline in one process, with memory sampled.

MerlinServer -> MerlinReceiver -> join with EDS spectra (EDSPublisher, PUSH) -> LiveAnalysis ->
flag events (EventPublisher PUB, drained by a subscriber) as repeated scans in ONE long-running
process: the hours-long session of a real instrument. Every scan opens and closes its own
connections and receiving threads (as :func:`streamclust.app.acquisition.acquire_scan` does), and has
its own LiveAnalysis; the simulated instruments and the event publisher live for the whole run.

A sampler thread records, every ``--sample-s`` seconds: frames done, resident memory (RSS), open
file descriptors, OS threads and Python threads, into ``out/soak/soak.csv``; ``soak.png`` plots them
against frames. The script prints the RSS slope over the second half of the run (MB per 100k frames,
least squares), the fd/thread ranges after the first scan, and the totals (frames sent, delivered,
dropped by reason, scans complete).

Frames are single-chip 256 x 256 12-bit (``--scan 64``: 4096-position scans of a LamellaPhantom,
rendered once and served from the simulator's pixel cache), spectra 1024 channels.

Run: ``NUMBA_NUM_THREADS=1 python benchmarks/soak.py`` (1,000,000 frames; ``--frames 50000`` for a
short look).
"""

from __future__ import annotations

import argparse
import ctypes
import csv
import gc
import json
import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil

from streamclust.app.acquisition import acquire_scan
from streamclust.flags.events import EventPublisher, EventSubscriber
from streamclust.app.live import LiveAnalysis
from streamclust.simulators.clock import ScanClock
from streamclust.simulators.eds import ArraySpectrumSource, EDSPublisher
from streamclust.simulators.merlin import ArraySource, MerlinServer
from streamclust.simulators.phantom import LamellaPhantom

logger = logging.getLogger("soak")

FIELDS = ("t_s", "kind", "frames", "scans", "rss_mb", "fds", "os_threads", "py_threads")


class Sampler:
    """Samples the process every ``interval_s`` seconds in a thread of its own."""

    def __init__(self, interval_s: float, progress, csv_path: Path | None = None):
        self.interval_s = float(interval_s)
        self.progress = progress  # callable -> (frames, scans)
        self.rows: list[dict] = []
        self._lock = threading.Lock()
        # rows go to the CSV as they are taken: an interrupted soak still leaves its curve
        self._fh = None if csv_path is None else open(csv_path, "w", newline="")
        self._csv = None if self._fh is None else csv.DictWriter(self._fh, fieldnames=FIELDS)
        if self._csv is not None:
            self._csv.writeheader()
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def sample(self, kind: str = "timer") -> dict:
        frames, scans = self.progress()
        row = {"t_s": round(time.perf_counter() - self._t0, 3), "kind": kind, "frames": frames, "scans": scans,
               "rss_mb": self._proc.memory_info().rss / 2**20, "fds": self._proc.num_fds(),
               "os_threads": self._proc.num_threads(), "py_threads": threading.active_count()}
        with self._lock:
            self.rows.append(row)
            if self._csv is not None:
                self._csv.writerow(row)
                self._fh.flush()
        return row

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5.0)
        self.sample()
        if self._fh is not None:
            self._fh.close()


def _wait_for_teardown(previous: dict, timeout_s: float = 2.0) -> float:
    """Wait (at most ``timeout_s``) until the open fds and OS threads are back at ``previous``'s counts.

    Why: ZeroMQ closes a TCP connection on its own I/O thread after ``close()`` has returned, and the
    simulators' connection threads end just after their peer hangs up; a count taken the instant a
    scan ends sometimes still holds one such socket (fds 51, 51, 52, 51, ... under load). A leaked fd
    or thread never comes back, so the between-scans sample still shows it, only ``timeout_s`` later.
    Returns the seconds waited.
    """
    proc = psutil.Process()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if proc.num_fds() <= previous["fds"] and proc.num_threads() <= previous["os_threads"]:
            break
        time.sleep(0.01)
    waited = time.perf_counter() - t0
    if waited > 0.05:
        logger.info("between scans: waited %.2f s for sockets and threads to close", waited)
    return waited


def rss_slope_mb_per_100k(rows: list[dict], start_frames: float, kind: str = "scan_end") -> float:
    """Least-squares slope of RSS against frames over ``kind`` samples at or after ``start_frames``.

    The slope is taken over the samples between scans (``scan_end``): within a scan RSS swings by
    the scan's working set (batches, warm-up buffer, refreshes), which is not growth.
    """
    pts = [(r["frames"], r["rss_mb"]) for r in rows if r["frames"] >= start_frames and r["kind"] == kind]
    if len(pts) < 3 or pts[-1][0] == pts[0][0]:
        return float("nan")
    x, y = np.array(pts, dtype=float).T
    return float(np.polyfit(x, y, 1)[0] * 1e5)


def _drain_events(endpoint: str, stop: threading.Event, counts: Counter) -> None:
    with EventSubscriber(endpoint) as sub:
        while not stop.is_set():
            ev = sub.recv(timeout_s=0.2)
            if ev is not None:
                counts[ev.get("event", "end")] += 1


def run_soak(n_frames: int = 1_000_000, *, scan: int = 64, out_dir: str | Path = "out/soak",
             sample_s: float = 2.0, seed: int = 1, batch_size: int = 256, plot: bool = True,
             trim: bool = False, engine_params: dict | None = None) -> dict:
    """Push at least ``n_frames`` frames through the pipeline as repeated ``scan x scan`` scans.

    With ``trim``, every scan ends with ``gc.collect()`` and glibc's ``malloc_trim(0)`` before the
    between-scans sample, so RSS shows live memory rather than what the allocator keeps cached
    (the short test uses it to tell a leak from allocator noise; the full soak runs without it).
    ``engine_params`` go to the StreamingEngine (``--no-host`` sets ``host_clusters=0``, as in the
    first million-frame run).

    Returns a summary dict (also written to ``summary.json``) with the samples under ``"samples"``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_setup = time.perf_counter()
    phantom = LamellaPhantom(scan_shape=(scan, scan), seed=seed, frame_shape=(256, 256), n_channels=1024)
    n = phantom.n_positions
    frames = np.empty((n, 256, 256), np.uint16)
    for i in range(n):
        phantom.frame_into(i, frames[i])
    spectra = np.stack([phantom.spectrum(i) for i in range(n)])
    axis = phantom.energy_axis_kev
    frame_source = ArraySource(frames, scan_shape=(scan, scan))
    spectrum_source = ArraySpectrumSource(spectra, scan_shape=(scan, scan), energy_offset_kev=float(axis[0]),
                                          channel_width_kev=float(axis[1] - axis[0]))
    setup_s = time.perf_counter() - t_setup

    clock = ScanClock()
    eds = EDSPublisher(spectrum_source, clock=clock, random_state=seed).start()
    eds.wait_for_listen()
    server = MerlinServer(frame_source, data_port=0, control_port=0, clock=clock, layout="1x1", headless=True,
                          cache_bytes=2 * frames.nbytes)
    server.start()
    server.wait_for_listen()
    events = EventPublisher()
    stop_events = threading.Event()
    event_counts: Counter = Counter()
    drainer = threading.Thread(target=_drain_events, args=(events.endpoint, stop_events, event_counts),
                               name="soak-events", daemon=True)
    drainer.start()

    state = {"frames": 0, "scans": 0}
    dropped: Counter = Counter()
    totals = Counter()
    first_scan_samples = 0
    t0 = time.perf_counter()
    try:
        with Sampler(sample_s, lambda: (state["frames"], state["scans"]), out / "soak.csv") as sampler:
            while state["frames"] < n_frames:
                live = LiveAnalysis((scan, scan), (256, 256), axis, n_clusters=6, events=events,
                                    random_state=state["scans"], engine_params=engine_params)

                def on_batch(batch, live=live):
                    live.process(batch)
                    state["frames"] += int(batch.has_frame.sum())

                sent_before = server.frames_sent
                report = acquire_scan(server.data_address, eds.endpoint, n, on_batch, timeout_s=10.0,
                                      batch_size=batch_size)
                live.finish()
                server.wait_until_idle(timeout=10.0)
                account = report.frame_account()
                totals["frames_sent"] += server.frames_sent - sent_before
                totals["frames_delivered"] += account["delivered"]
                totals["frames_accounted"] += account["total"]
                totals["spectra_delivered"] += report.spectra_delivered
                totals["scans_complete"] += bool(report.complete)
                totals["flags"] += len(live.flags_summary())
                dropped.update(account["dropped"])
                state["scans"] += 1
                if trim:
                    _trim()
                if state["scans"] > 1:
                    # against the lowest counts so far: a first sample that still held a closing
                    # socket must not become a lenient baseline
                    _wait_for_teardown(settled)
                row = sampler.sample("scan_end")
                settled = row if state["scans"] == 1 else {k: min(settled[k], row[k]) for k in ("fds", "os_threads")}
                if state["scans"] == 1:
                    first_scan_samples = len(sampler.rows)
                logger.info("scan %d: %d frames (%d total), rss %.0f MB", state["scans"], account["delivered"],
                            state["frames"], psutil.Process().memory_info().rss / 2**20)
    finally:
        elapsed = time.perf_counter() - t0
        # PUB/SUB: let the last events of the last scan reach the drainer before it stops
        deadline = time.monotonic() + 2.0
        while sum(event_counts.values()) < events.stats["sent"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stop_events.set()
        drainer.join(5.0)
        events.close()
        server.stop()
        eds.stop(linger_s=0)

    rows = sampler.rows
    after_warmup = rows[max(first_scan_samples, 1):] or rows
    ends = [r for r in rows if r["kind"] == "scan_end"]
    summary = {
        "frames_target": n_frames, "scan_shape": [scan, scan], "frame_shape": [256, 256], "counter_depth": 12,
        "setup_s": round(setup_s, 2), "elapsed_s": round(elapsed, 2),
        "frames_per_s": round(state["frames"] / elapsed, 1) if elapsed else None,
        "scans": state["scans"], **{k: int(v) for k, v in totals.items()},
        "dropped_by_reason": dict(dropped), "events_received": dict(event_counts),
        "events_sent": int(events.stats["sent"]),
        "rss_mb_start": round(rows[0]["rss_mb"], 1), "rss_mb_after_first_scan": round(after_warmup[0]["rss_mb"], 1),
        "rss_mb_end": round(rows[-1]["rss_mb"], 1), "rss_mb_max": round(max(r["rss_mb"] for r in rows), 1),
        "rss_mb_between_scans_first_last": [round(ends[0]["rss_mb"], 1), round(ends[-1]["rss_mb"], 1)],
        "rss_mb_between_scans_second_half_range": _range([r["rss_mb"] for r in ends
                                                          if r["frames"] >= state["frames"] / 2]),
        "rss_slope_second_half_mb_per_100k_frames": round(rss_slope_mb_per_100k(rows, state["frames"] / 2), 3),
        "fds_range_after_first_scan": [min(r["fds"] for r in after_warmup), max(r["fds"] for r in after_warmup)],
        "os_threads_range_after_first_scan": [min(r["os_threads"] for r in after_warmup),
                                              max(r["os_threads"] for r in after_warmup)],
        "py_threads_range_after_first_scan": [min(r["py_threads"] for r in after_warmup),
                                              max(r["py_threads"] for r in after_warmup)],
        "load_average": list(os.getloadavg()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if plot:
        _plot(rows, out / "soak.png", summary)
    summary["samples"] = rows
    return summary


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: collecting is all we can do
        pass


def _range(values) -> list:
    return [round(min(values), 1), round(max(values), 1)] if values else []


def _plot(rows: list[dict], path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = np.array([r["frames"] for r in rows]) / 1e3
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(frames, [r["rss_mb"] for r in rows], lw=0.8, label="every sample")
    ends = [(f, r["rss_mb"]) for f, r in zip(frames, rows) if r["kind"] == "scan_end"]
    if ends:
        ax1.plot(*zip(*ends), "o-", ms=2, lw=1, label="between scans")
    ax1.legend(fontsize=8)
    ax1.set_ylabel("RSS (MB)")
    ax1.set_title(f"soak: {summary['frames_delivered']:,} frames in {summary['scans']} scans, "
                  f"RSS slope (2nd half) {summary['rss_slope_second_half_mb_per_100k_frames']} MB/100k frames",
                  fontsize=9)
    ax2.plot(frames, [r["fds"] for r in rows], lw=1, label="open fds")
    ax2.plot(frames, [r["os_threads"] for r in rows], lw=1, label="OS threads")
    ax2.plot(frames, [r["py_threads"] for r in rows], lw=1, label="Python threads")
    ax2.set_xlabel("frames (thousands)")
    ax2.set_ylabel("count")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--scan", type=int, default=64, help="scan is scan x scan positions")
    ap.add_argument("--sample-s", type=float, default=2.0)
    ap.add_argument("--out", default="out/soak")
    ap.add_argument("--trim", action="store_true", help="gc.collect + malloc_trim between scans")
    ap.add_argument("--no-host", action="store_true", help="engine host refinement off (host_clusters=0)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    s = run_soak(args.frames, scan=args.scan, out_dir=args.out, sample_s=args.sample_s, trim=args.trim,
                 engine_params={"host_clusters": 0} if args.no_host else None)
    s.pop("samples")
    print(f"soak: {s['frames_delivered']:,} frames delivered of {s['frames_sent']:,} sent "
          f"({s['frames_accounted']:,} accounted) in {s['scans']} scans, {s['elapsed_s']:.0f} s "
          f"({s['frames_per_s']:.0f} frames/s), scans complete {s['scans_complete']}/{s['scans']}")
    print(f"dropped by reason: {s['dropped_by_reason'] or 'none'}; events sent {s['events_sent']}, "
          f"received {s['events_received']}")
    print(f"RSS: start {s['rss_mb_start']} MB, after first scan {s['rss_mb_after_first_scan']} MB, "
          f"end {s['rss_mb_end']} MB, max {s['rss_mb_max']} MB")
    print(f"RSS between scans: first {s['rss_mb_between_scans_first_last'][0]} MB, last "
          f"{s['rss_mb_between_scans_first_last'][1]} MB, second-half range {s['rss_mb_between_scans_second_half_range']}")
    print(f"RSS slope over the second half (between scans): {s['rss_slope_second_half_mb_per_100k_frames']} MB "
          f"per 100k frames")
    print(f"open fds after the first scan: {s['fds_range_after_first_scan']}, OS threads "
          f"{s['os_threads_range_after_first_scan']}, Python threads {s['py_threads_range_after_first_scan']}")
    print(f"load average {', '.join(f'{v:.2f}' for v in s['load_average'])}; CSV/PNG/summary in {args.out}")


if __name__ == "__main__":
    main()
