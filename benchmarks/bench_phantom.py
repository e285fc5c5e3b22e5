"""Phantom throughput: quad 512x512 12-bit frames (and spectra) a second on one core.

Prints absolute rates and the ratio to a baseline measured in the same run: plain NumPy Poisson
sampling of the full expected frame (``rng.poisson(lambda)`` on all 262,144 pixels) for the same
positions. Goal: >= 2,000 positions/s for ``frame_into``.

Usage::

    .venv/bin/python benchmarks/bench_phantom.py [--scan 128] [--n 4000] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", type=int, default=128, help="scan is scan x scan positions")
    ap.add_argument("--n", type=int, default=4000, help="positions timed (spread over the scan)")
    ap.add_argument("--baseline-n", type=int, default=40, help="positions for the NumPy baseline")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from streamclust.simulators.phantom import LamellaPhantom

    t0 = time.perf_counter()
    ph = LamellaPhantom((args.scan, args.scan), seed=args.seed)
    t_init = time.perf_counter() - t0
    out = np.empty(ph.frame_shape, ph.frame_dtype)
    ph.frame_into(0, out)  # JIT warm-up (cached after the first run)
    ph.frames(np.arange(2))
    ph.spectrum(0)
    ph.spectra(np.arange(2))
    # positions spread evenly over the raster: substrate, film, inclusions and capping layer
    pos = np.linspace(0, ph.n_positions - 1, min(args.n, ph.n_positions)).astype(np.int64)

    t0 = time.perf_counter()
    for p in pos:
        ph.frame_into(int(p), out)
    r_into = pos.size / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    for p in pos:
        ph.frame_into(int(p), out)
        ph.spectrum(int(p))
    r_both = pos.size / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    for i in range(0, pos.size, 64):
        ph.frames(pos[i:i + 64])
    r_batch = pos.size / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    ph.spectra(pos)
    r_spec = pos.size / (time.perf_counter() - t0)

    # baseline: dense NumPy Poisson of the full expected frame (lambda precomputed, not timed)
    bpos = pos[np.linspace(0, pos.size - 1, args.baseline_n).astype(np.int64)]
    lams = [ph.expected_frame(int(p)) for p in bpos]
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    for lam in lams:
        np.minimum(rng.poisson(lam), ph.saturation).astype(ph.frame_dtype)
    r_base = len(lams) / (time.perf_counter() - t0)

    print(f"phantom init ({args.scan}x{args.scan} scan): {t_init:.2f} s")
    print(f"baseline  numpy full-frame Poisson      : {r_base:9.1f} frames/s")
    print(f"frame_into (quad 512x512, 12-bit)       : {r_into:9.1f} positions/s  ({r_into / r_base:6.1f}x baseline)")
    print(f"frame_into + spectrum                   : {r_both:9.1f} positions/s  ({r_both / r_base:6.1f}x baseline)")
    print(f"frames() batches of 64                  : {r_batch:9.1f} positions/s  ({r_batch / r_base:6.1f}x baseline)")
    print(f"spectra() ({ph.n_channels} channels)             : {r_spec:9.1f} spectra/s")
    print(f"goal >= 2000 positions/s for frame_into : {'met' if r_into >= 2000 else 'NOT met'}")


if __name__ == "__main__":
    main()
