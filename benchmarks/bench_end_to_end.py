"""End to end: the simulated microscope served as fast as it goes -> acquire_scan -> LiveAnalysis.

The microscope (``streamclust simulate --dwell 0``: phantom + Merlin TCP server + EDS publisher) runs
in its own process, as the detector PC and EDS system would be other machines. Measured in the same
run, on the same scan of the same phantom, in interleaved rounds:

* ``drain`` (baseline): a bare client that reads the Merlin stream's bytes (counting frame messages
  from the MPX prefixes, nothing decoded) and pulls the EDS messages: how fast the simulated
  microscope delivers;
* ``end_to_end``: :func:`streamclust.app.acquisition.acquire_scan` (receive, decode, join) feeding every
  batch to the live analysis built by :class:`streamclust.app.run.ScanSession` (engine, thresholded
  centres, flags, events, results checkpoints), as ``streamclust run`` does. Its rate counts the
  streaming part (first byte to last batch analysed); the end-of-scan refresh and final results are
  reported separately (``finalize_s``). The JIT warm-up happens before the scan, as in ``run``.

The ratio end_to_end / drain says how much of the delivered stream the live pipeline keeps up with
(1.0: the microscope is the limit). Run::

    NUMBA_NUM_THREADS=1 .venv/bin/python benchmarks/bench_end_to_end.py            # 64 x 64
    NUMBA_NUM_THREADS=1 .venv/bin/python benchmarks/bench_end_to_end.py --quick    # 32 x 32
    NUMBA_NUM_THREADS=1 .venv/bin/python benchmarks/bench_end_to_end.py --json     # + one JSON line

With ``--json`` the last stdout line is one JSON object: ``end_to_end_fps``, ``drain_fps``,
``end_to_end_ratio``, ``finalize_s``, the scan shape, rounds and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import zmq

from streamclust.adapters.framing import MPX_PREFIX_SIZE


class Microscope:
    """``streamclust simulate`` in a child process, on free ports, one scan per instance."""

    def __init__(self, scan: int, seed: int):
        cmd = [sys.executable, "-m", "streamclust.app.cli", "simulate", "--scan", str(scan), "--seed", str(seed),
               "--dwell", "0", "--data-port", "0", "--control-port", "0", "--eds-port", "0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"simulate did not start: {self.proc.stderr.read()[-2000:]}")
        self.endpoints = json.loads(line)
        host, port = self.endpoints["merlin_data"].rsplit(":", 1)
        self.data_address = (host, int(port))
        self.eds = self.endpoints["eds"]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def drain(scope: Microscope, n: int) -> float:
    """Seconds to receive n frame messages and n EDS messages without decoding anything."""
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.connect(scope.eds)
    got_spectra = [0]

    def spectra():
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        while got_spectra[0] < n:
            if not poller.poll(10_000):
                break
            parts = pull.recv_multipart(copy=False)
            if b'"end"' not in parts[0].bytes[:200]:
                got_spectra[0] += 1

    th = threading.Thread(target=spectra, daemon=True)
    t0 = time.perf_counter()
    th.start()
    sock = socket.create_connection(scope.data_address, timeout=30)
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    frames = 0
    try:
        while frames < n:
            prefix = _recv_exact(sock, view, MPX_PREFIX_SIZE)
            length = int(bytes(prefix[4:14]))
            first = _recv_exact(sock, view, min(3, length - 1))
            if bytes(first) == b"MQ1":
                frames += 1
            _skip(sock, view, length - 1 - len(first))
    finally:
        sock.close()
    th.join(timeout=30)
    elapsed = time.perf_counter() - t0
    pull.close()
    if got_spectra[0] < n:
        raise RuntimeError(f"drain got {got_spectra[0]} of {n} spectra")
    return elapsed


def _recv_exact(sock, view, k):
    got = 0
    while got < k:
        r = sock.recv_into(view[got:k])
        if r == 0:
            raise ConnectionError("stream closed")
        got += r
    return view[:k]


def _skip(sock, view, k):
    while k > 0:
        r = sock.recv_into(view[:min(k, len(view))])
        if r == 0:
            raise ConnectionError("stream closed")
        k -= r


def end_to_end(scope: Microscope, n: int, scan: int, out_dir: str, config_path: str | None = None
               ) -> tuple[float, float, dict]:
    """(streaming seconds, finalize seconds, summary) of one live scan."""
    from streamclust.app.acquisition import acquire_scan
    from streamclust.app.config import load_config
    from streamclust.app.run import ScanSession
    from streamclust.simulators.phantom import LamellaPhantom

    ph = LamellaPhantom(scan_shape=(scan, scan), seed=0)
    cfg = load_config(config_path).override("scan", shape=[scan, scan])
    session = ScanSession(cfg, scan_shape=(scan, scan), frame_shape=ph.frame_shape,
                          energy_axis_kev=ph.energy_axis_kev, out_dir=out_dir, scan_id="bench",
                          events_endpoint="tcp://127.0.0.1:0")
    session.warm_up()
    t0 = time.perf_counter()
    report = acquire_scan(scope.data_address, scope.eds, n, session.on_batch, batch_size=cfg.scan.batch_size)
    t1 = time.perf_counter()
    summary = session.finish(report, status="complete" if report.complete else "partial")
    t2 = time.perf_counter()
    if summary["frames_processed"] != n:
        raise RuntimeError(f"end to end processed {summary['frames_processed']} of {n} frames")
    return t1 - t0, t2 - t1, summary


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", type=int, default=64, help="positions a side")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (best is shown)")
    ap.add_argument("--quick", action="store_true", help="32 x 32, one round")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--config", default=None, help="TOML configuration of the live analysis (default: defaults)")
    args = ap.parse_args(argv)
    if args.quick:
        args.scan, args.rounds = 32, 1
    n = args.scan * args.scan
    best_drain, best_e2e, finalize = float("inf"), float("inf"), None
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            scope = Microscope(args.scan, seed=0)
            try:
                best_drain = min(best_drain, drain(scope, n))
            finally:
                scope.close()
            scope = Microscope(args.scan, seed=0)
            try:
                t, f, _ = end_to_end(scope, n, args.scan, os.path.join(tmp, f"r{r}"), args.config)
            finally:
                scope.close()
            if t < best_e2e:
                best_e2e, finalize = t, f
            print(f"round {r + 1}: drain {n / best_drain:.0f} frames/s, end to end {n / t:.0f} frames/s "
                  f"(finalize {f:.2f} s)", flush=True)
    load = os.getloadavg()
    result = {
        "end_to_end_fps": round(n / best_e2e, 1),
        "drain_fps": round(n / best_drain, 1),
        "end_to_end_ratio": round(best_drain / best_e2e, 3),
        "finalize_s": round(finalize, 3),
        "scan_shape": [args.scan, args.scan],
        "rounds": args.rounds,
        "config": args.config,
        "load_avg_1min": round(load[0], 2),
    }
    print(f"{args.scan} x {args.scan} scan, quad 12-bit + 2048-channel EDS: end to end {result['end_to_end_fps']} "
          f"frames/s vs drain {result['drain_fps']} frames/s (ratio {result['end_to_end_ratio']}); "
          f"end-of-scan refresh + results {result['finalize_s']} s; load {load[0]:.2f}")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
