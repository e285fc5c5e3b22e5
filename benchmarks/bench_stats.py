"""Throughput of the streaming statistics, each against a baseline measured in the same process.

Run: ``.venv/bin/python benchmarks/bench_stats.py`` (about a minute on 2 cores; ``--quick`` for less).

Prints, for each stage, the absolute rate (frames/s) and the ratio to its baseline:

* FrameReducer on quad 512x512 uint16 frames (8x8 binning -> 4,096 features) vs a NumPy reshape-sum;
* StreamingRobustScaler.partial_fit at 4,096 and 16,384 features vs ``np.percentile`` over the same
  batch (what recomputing per-batch quantiles would cost; not a streaming result, just a yardstick);
* StreamingPCA.partial_fit (exact, float64 and float32-buffered products, 4,096 + 1,024 features) vs
  scikit-learn's IncrementalPCA(10) on the same batches, and the sketch at 16,384 features.
  The exact accumulator costs O(F^2) a row, IncrementalPCA O(F k): at 5,120 features the exact one is
  not expected to win on speed; it buys exactness and merges by addition.
JIT compilation is done before timing (as the engine does before a detector is armed).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
from sklearn.decomposition import IncrementalPCA
from threadpoolctl import threadpool_limits

from streamclust.features.reducers import FrameReducer
from streamclust.features.kernels import bin_sum_frames_numpy
from streamclust.decomposition.incremental_pca import StreamingPCA
from streamclust.features.robust_scaling import StreamingRobustScaler


def _rate(fn: Callable[[], object], n_items: int, min_time: float) -> float:
    """Items per second of ``fn`` (best of repeated runs lasting at least ``min_time`` in total)."""
    fn()  # warm (JIT, caches, BLAS threads)
    best = np.inf
    spent = 0.0
    runs = 0
    while spent < min_time or runs < 3:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = min(best, dt)
        spent += dt
        runs += 1
    return n_items / best


def _row(name: str, rate: float, base_name: str, base: float) -> None:
    print(f"{name:<46s} {rate:>11,.0f} /s   {base_name:<34s} {base:>10,.0f} /s   ratio {rate / base:6.2f}x")


def bench_reducer(min_time: float, batch: int, pool_mib: int) -> None:
    rng = np.random.default_rng(0)
    # a pool larger than the last-level cache, so frames come from memory as they do live
    n_batches = max(1, (pool_mib * 2**20) // (batch * 512 * 512 * 2))
    pool = rng.poisson(0.8, size=(n_batches * batch, 512, 512)).astype(np.uint16)
    red = FrameReducer().warm_up()
    out = np.empty((batch, red.n_features_out_), dtype=np.float32)
    masked = FrameReducer(direct_beam_radius=30, chip_gap="mask").warm_up()

    def cycle(fn: Callable[[np.ndarray], object]) -> Callable[[], None]:
        def run() -> None:
            for k in range(n_batches):
                fn(pool[k * batch : (k + 1) * batch])
        return run

    n = n_batches * batch
    r = _rate(cycle(lambda f: red.transform(f, out=out)), n, min_time)
    rm = _rate(cycle(lambda f: masked.transform(f, out=out)), n, min_time)
    b = _rate(cycle(lambda f: bin_sum_frames_numpy(f, 8)), n, min_time)
    _row("FrameReducer 512x512 u16 -> 4096 (fast path)", r, "numpy reshape-sum", b)
    _row("FrameReducer (beam + chip-cross masks)", rm, "numpy reshape-sum", b)
    print(f"{'':<46s} from a {pool.nbytes / 2**20:.0f} MiB pool: {r * pool[0].nbytes / 2**30:.1f} GiB/s read")


def bench_scaler(min_time: float, batch: int, n_features: int) -> None:
    rng = np.random.default_rng(1)
    X = rng.poisson(rng.gamma(1.0, 30.0, n_features), size=(batch, n_features)).astype(np.float32)
    sc = StreamingRobustScaler()
    sc.partial_fit(X)
    r = _rate(lambda: sc.partial_fit(X), batch, min_time)
    b = _rate(lambda: np.percentile(X, [25, 50, 75], axis=0), batch, min_time)
    t0 = time.perf_counter()
    sc._cache_ = None
    _ = sc.scale_
    readout = time.perf_counter() - t0
    _row(f"StreamingRobustScaler.partial_fit F={n_features}", r, "np.percentile on the batch", b)
    print(f"{'':<46s} median/IQR read-out: {readout * 1e3:.1f} ms; histogram {sc._counts_.nbytes / 2**20:.0f} MiB")


def bench_pca(min_time: float, batch: int, n_features: int, method: str, gram_dtype: str = "float64") -> None:
    rng = np.random.default_rng(2)
    X = rng.normal(size=(batch * 4, n_features)).astype(np.float32)
    pca = StreamingPCA(max_components=10, method=method, sketch_rank=32 if method == "sketch" else 64,
                       gram_dtype=gram_dtype)
    ipca = IncrementalPCA(10)
    state = {"i": 0}

    def ours() -> None:
        i = state["i"] = (state["i"] + 1) % 4
        pca.partial_fit(X[i * batch : (i + 1) * batch])

    def theirs() -> None:
        i = (state["i"] + 1) % 4
        ipca.partial_fit(X[i * batch : (i + 1) * batch])

    r = _rate(ours, batch, min_time)
    b = _rate(theirs, batch, min_time)
    t0 = time.perf_counter()
    _ = pca.components_
    readout = time.perf_counter() - t0
    label = method if method == "sketch" else f"{method}/{gram_dtype}"
    _row(f"StreamingPCA.partial_fit {label} F={n_features}", r, "sklearn IncrementalPCA(10)", b)
    print(f"{'':<46s} read-out (10 components): {readout * 1e3:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing runs")
    parser.add_argument("--batch", type=int, default=64, help="rows per partial_fit / frames per call")
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="cap BLAS threads (PCA); on a busy shared machine 1 avoids spinning threads")
    args = parser.parse_args()
    with threadpool_limits(limits=args.blas_threads, user_api="blas"):
        _run(args)


def _run(args: argparse.Namespace) -> None:
    min_time = 0.3 if args.quick else 1.5
    print(f"bench_stats: batch {args.batch}, {os.cpu_count()} CPUs, NUMBA_NUM_THREADS="
          f"{os.environ.get('NUMBA_NUM_THREADS', 'default')}, BLAS threads {args.blas_threads or 'default'}, "
          f"load average {os.getloadavg()[0]:.1f}")
    bench_reducer(min_time, args.batch, 64 if args.quick else 512)
    for f in (4096, 16384):
        bench_scaler(min_time, args.batch, f)
    bench_pca(min_time, args.batch, 4096 + 1024, "exact")
    bench_pca(min_time, args.batch, 4096 + 1024, "exact", "float32")
    bench_pca(min_time, args.batch, 16384, "sketch")


if __name__ == "__main__":
    main()
