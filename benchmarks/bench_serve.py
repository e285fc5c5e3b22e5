"""Simulated microscope throughput: positions/s generated and served, quad 512x512 12-bit.

Two figures, each against a baseline measured in the same run:

* **generated**: :class:`~streamclust.simulators.phantom.LamellaPhantom` rendering one CBED frame
  (``frame_into``) and one EDS spectrum (``spectrum``) per position, on one thread. Baseline: the
  kernels' NumPy twins (``render_frame_numpy`` / ``render_spectrum_numpy``, the reference the
  Numba kernels are tested against) on a few of the same positions.
* **served**: phantom -> MIB encode (``U16`` big-endian, real MQ1 headers) ->
  :class:`~streamclust.simulators.merlin.MerlinServer` -> loopback TCP -> a bare ``recv_into`` drain
  in another process (this one; the server runs in a child process, as the detector PC is its own
  machine). The server's pixel cache is off, so every frame is rendered and encoded while serving.
  Baseline: the same server sending pre-encoded frames (an :class:`ArraySource` of phantom frames
  with the pixel cache on: a header format and a memcpy per frame): the transport's own limit.

Goal (issue 2): >= 2,000 positions/s generated and served.

Run::

    NUMBA_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serve.py [--n 4000] [--repeat 3] [--json]

With ``--json`` the last stdout line is one JSON object: ``generated_pps``, ``generated_frame_pps``,
``generated_numpy_twin_pps``, ``served_pps``, ``served_preencoded_pps``, the ratios, the load.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import time

import numpy as np
import psutil

from streamclust.adapters.framing import MPX_PREFIX_SIZE
from streamclust.adapters.merlin_control import MerlinControl
from streamclust.simulators.mib_encode import FrameEncoder, encode_acquisition_header

SCAN = (128, 128)
STREAM = dict(layout="2x2", counter_depth=12, raw=False)


def _positions(n_positions: int, n: int) -> np.ndarray:
    # spread over the raster: substrate, film, inclusions and capping layer all take part
    return np.linspace(0, n_positions - 1, min(n, n_positions)).astype(np.int64)


def generated(phantom, n: int, n_twin: int, seed: int) -> dict:
    from streamclust.simulators import phantom_kernels as pk

    ph = phantom
    out = np.empty(ph.frame_shape, ph.frame_dtype)
    spec = np.empty(ph.n_channels, ph.spectrum_dtype)
    pos = _positions(ph.n_positions, n)
    ph.frame_into(int(pos[0]), out)  # JIT warm-up (cached on disk after the first run)
    ph.spectrum(int(pos[0]))

    t0 = time.perf_counter()
    for p in pos:
        ph.frame_into(int(p), out)
    frame_pps = pos.size / (time.perf_counter() - t0)

    t0, c0 = time.perf_counter(), time.process_time()
    for p in pos:
        ph.frame_into(int(p), out)
        ph.spectrum(int(p))
    both_pps = pos.size / (time.perf_counter() - t0)
    both_cpu_us = (time.process_time() - c0) / pos.size * 1e6

    # baseline: the NumPy twins of the same kernels, same positions (fewer: they are slow)
    rng = np.random.default_rng(seed)
    twin_pos = pos[np.linspace(0, pos.size - 1, n_twin).astype(np.int64)]
    flat = out.reshape(-1)
    t0 = time.perf_counter()
    for p in twin_pos:
        p = int(p)
        pk.render_frame_numpy(rng, flat, ph._wa[p], ph._wb[p], *ph._frame_args(), ph._dy[p], ph._dx[p],
                              *ph._detector_args())
        pk.render_spectrum_numpy(rng, spec, ph._spec_w[p], ph._spec_totals, ph._spec_prob,
                                 ph._spec_alias, 65535)
    twin_pps = twin_pos.size / (time.perf_counter() - t0)
    return {"generated_pps": both_pps, "generated_frame_pps": frame_pps, "generated_numpy_twin_pps": twin_pps,
            "generated_cpu_us": both_cpu_us}


def _serve(conn, kind: str, seed: int) -> None:
    """Child process: a simulated Merlin serving the phantom (rendered live) or pre-encoded frames."""
    from streamclust.simulators.merlin import ArraySource, MerlinServer
    from streamclust.simulators.phantom import LamellaPhantom

    ph = LamellaPhantom(SCAN, seed=seed)
    ph.frame(0)  # JIT warm-up before the detector is "armed"
    if kind == "phantom":
        source, cache = ph, False
    else:
        source, cache = ArraySource(ph.frames(_positions(ph.n_positions, 64))), True
    with MerlinServer(source, data_port=0, control_port=0, headless=True, cache=cache, **STREAM) as server:
        conn.send((server.data_address, server.control_address))
        conn.recv()


class RemoteServer:
    def __init__(self, kind: str, seed: int):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, kind, seed), daemon=True)
        self._proc.start()
        self.data_address, control_address = self._conn.recv()
        self._ps = psutil.Process(self._proc.pid)
        self.control = MerlinControl(*control_address, timeout=30.0).connect()

    def drain(self, n_frames: int) -> tuple[float, float]:
        """Frames/s a bare client receives, from the first frame to the last, and the server
        process's CPU microseconds a frame (all its threads, the whole acquisition)."""
        cpu0 = sum(self._ps.cpu_times()[:2])
        self.control.set("NUMFRAMESTOACQUIRE", n_frames)
        hdr = MPX_PREFIX_SIZE + len(encode_acquisition_header(n_frames=n_frames, counter_depth=12,
                                                              layout="2x2", raw=False))
        msg = MPX_PREFIX_SIZE + FrameEncoder(image_shape=(512, 512), **STREAM).message_size
        total = hdr + n_frames * msg
        buf = bytearray(4 * 2**20)
        view = memoryview(buf)
        with socket.create_connection(self.data_address, timeout=30.0) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 2**20)
            got, t0 = 0, None
            while got < total:
                k = s.recv_into(view, min(len(buf), total - got))
                if k == 0:
                    raise RuntimeError(f"server closed after {got} of {total} bytes")
                got += k
                if t0 is None and got >= hdr + msg:
                    t0, got0 = time.perf_counter(), got
            t1 = time.perf_counter()
        deadline = time.monotonic() + 30.0
        while self.control.status() != 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        cpu_us = (sum(self._ps.cpu_times()[:2]) - cpu0) / n_frames * 1e6
        return (total - got0) / msg / (t1 - t0), cpu_us

    def stop(self) -> None:
        self.control.close()
        self._conn.send("stop")
        self._proc.join(10.0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000, help="positions timed")
    ap.add_argument("--twin-n", type=int, default=8, help="positions for the NumPy-twin baseline")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds (best is shown)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    from streamclust.simulators.phantom import LamellaPhantom

    print(f"simulated microscope, quad 512x512 12-bit, {SCAN[0]}x{SCAN[1]} scan; best of {args.repeat}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    result: dict = {"load_avg_1min": os.getloadavg()[0], "n": args.n, "repeat": args.repeat}
    ph = LamellaPhantom(SCAN, seed=args.seed)
    gens = [generated(ph, args.n, args.twin_n, args.seed) for _ in range(args.repeat)]
    gen = {k: (min if k.endswith("cpu_us") else max)(g[k] for g in gens) for k in gens[0]}
    live, pre = RemoteServer("phantom", args.seed), RemoteServer("preencoded", args.seed)
    live_threads = min(4, os.cpu_count() or 1)  # MerlinServer render_threads="auto" for the phantom
    try:
        pre.drain(256)  # warm the pixel cache (64 distinct frames) and the sockets
        live.drain(64)
        runs = [(live.drain(args.n), pre.drain(args.n)) for _ in range(args.repeat)]
    finally:
        live.stop()
        pre.stop()
    served, served_pre = (max(r[0] for r in c) for c in zip(*runs))
    served_cpu, pre_cpu = (min(r[1] for r in c) for c in zip(*runs))
    g, t = gen["generated_pps"], gen["generated_numpy_twin_pps"]
    print(f"generated: frame + spectrum (Numba)       {g:9.0f} positions/s  {g / t:7.1f}x NumPy twin")
    print(f"generated: frame + spectrum, CPU time     {gen['generated_cpu_us']:9.1f} us/position "
          f"(= {1e6 / gen['generated_cpu_us']:.0f} positions/s on one free core)")
    print(f"generated: frame only                     {gen['generated_frame_pps']:9.0f} positions/s")
    print(f"baseline: NumPy twins, frame + spectrum   {t:9.1f} positions/s")
    print(f"served: phantom -> encode -> TCP -> drain  {served:9.0f} positions/s  "
          f"{served / served_pre:5.2f}x pre-encoded")
    print(f"  server CPU ({live_threads} render threads, encode, send) {served_cpu:8.1f} us/frame")
    print(f"baseline: serving pre-encoded frames      {served_pre:9.0f} positions/s")
    print(f"  server CPU (header + memcpy + send)     {pre_cpu:9.1f} us/frame")
    ok = g >= 2000 and served >= 2000
    print(f"goal >= 2000 positions/s generated and served: {'met' if ok else 'NOT met'}")
    result.update({k: round(v, 1) for k, v in gen.items()})
    result.update({"served_pps": round(served, 1), "served_preencoded_pps": round(served_pre, 1),
                   "generated_vs_twin": round(g / t, 1), "served_vs_preencoded": round(served / served_pre, 3),
                   "server_cpu_us_per_frame": round(served_cpu, 1), "preencoded_cpu_us_per_frame": round(pre_cpu, 1),
                   "load_avg_1min_end": os.getloadavg()[0]})
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
