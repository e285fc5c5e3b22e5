"""Throughput of the streaming engine on quad 512x512 uint16 frames plus 2048-channel spectra.

Run: ``.venv/bin/python benchmarks/bench_engine.py`` (``--quick`` for a short run; ``--accuracy``
measures what each per-position store costs against the offline reference instead; ``--json`` adds
one JSON object as the last stdout line).

Frames and spectra come from the lamella phantom and are generated *before* timing (a pool of
``--pool`` positions spread over the scan, replayed in raster order), so only the engine is measured:
frame reduction, spectrum windowing, robust scaling and block balancing, streaming PCA, the
per-position store, mini-batch fuzzy C-means and the scheduled refreshes. BLAS is held to one
thread (the engine's default, ``blas_threads=1``); Numba uses its default threads.

Printed against baselines measured in the same process:

* the FrameReducer alone on the same frames (the floor: the engine cannot beat its first stage);
* the offline reference (``streamclust.reference.run_reference`` with FuzzyCMeans, BLAS at one
  thread) on the same data, as positions per second of wall time - a batch pipeline only gives
  its answer at the end, the engine keeps one current all along;
* the engine's time per stage from ``stats_["seconds"]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np
from threadpoolctl import threadpool_limits

from streamclust.engine.streaming import StreamingEngine
from streamclust.cluster.fcm import FuzzyCMeans
from streamclust.features.reducers import FrameReducer
from streamclust.reference import bin_frames, eds_window, run_reference
from streamclust.simulators.phantom import LamellaPhantom


def _pool(scan: int, pool: int, seed: int) -> tuple[LamellaPhantom, np.ndarray, np.ndarray, np.ndarray]:
    ph = LamellaPhantom(scan_shape=(scan, scan), seed=seed)
    sel = np.linspace(0, ph.n_positions - 1, pool).astype(np.int64)  # raster order, all phases
    frames = np.empty((pool, *ph.frame_shape), dtype=np.uint16)
    for i in range(0, pool, 128):
        frames[i:i + 128] = ph.frames(sel[i:i + 128])
    spectra = ph.spectra(sel)
    return ph, sel, frames, spectra


def _set_sketch_dtype(eng: StreamingEngine, sketch_dtype: str | None) -> None:
    """Choose the StreamingPCA sketch update (before any data): float32 (default) or the float64
    reference, to measure what the float32 update changes in the same run."""
    if sketch_dtype is not None:
        eng.pca_.set_params(sketch_dtype=sketch_dtype)


def accuracy(stores: tuple[str, ...] = ("full", "counts", "basis"), sketch_dtype: str | None = None) -> dict:
    """What the per-position store costs: each store against the offline reference."""
    from sklearn.metrics import adjusted_rand_score

    ph = LamellaPhantom(scan_shape=(48, 48), seed=5, n_inclusions=4, inclusion_radius=(8.0, 16.0))
    n = ph.n_positions
    cbed = np.concatenate([bin_frames(ph.frames(np.arange(s, min(s + 256, n))), 8) for s in range(0, n, 256)])
    eds = eds_window(ph.spectra(np.arange(n)), ph.energy_axis_kev, (0.2, 10.0), rebin=2)
    ref = run_reference(cbed, eds, clusterer=FuzzyCMeans(6, n_init=10, random_state=0), n_clusters=6)
    print(f"reference: {ref.n_components} components, ratios {np.round(ref.explained_variance_ratio[:4], 3)}")
    out: dict = {}
    for store in stores:
        try:
            # as tests/test_live_vs_offline.py: one level of clusters against the paper's reference
            eng = StreamingEngine(n, scan_shape=(48, 48), energy_axis=(float(ph.energy_axis_kev[0]),
                                  ph.channel_width_kev), warmup_positions=256, refresh_every=512,
                                  store=store, random_state=0, host_clusters=0)
            eng.partial_fit_features(np.arange(0), cbed[:0], eds[:0])  # validates the parameters
            _set_sketch_dtype(eng, sketch_dtype)
        except ValueError as exc:
            print(f"store={store:6s} not available in this engine: {exc}")
            continue
        for s in range(0, n, 128):
            pos = np.arange(s, min(s + 128, n))
            eng.partial_fit_features(pos, cbed[pos], eds[pos])
        eng.finalize()
        r = eng._readout  # the final read-out, to score every position exactly for comparison
        xw = eng.balancer_.concatenate({"cbed": cbed, "eds": eds}) * eng._c_warm.astype(np.float32)
        exact = (xw * r["D"] - r["mean"]) @ r["V"]
        stored = eng.store_.project(r["D"], r["V"], r["mean"])
        err = np.linalg.norm(stored - exact, axis=1) / np.linalg.norm(exact - exact.mean(0), axis=1).mean()
        quarters = [float(err[i * n // 4:(i + 1) * n // 4].mean()) for i in range(4)]
        ari = float(adjusted_rand_score(ref.labels, eng.labels_))
        exact_rows = float(np.mean(np.all(eng.store_.vectors(np.arange(n)) == xw, axis=1)))
        print(f"store={store:6s} {eng.stats_['bytes_per_position']:6d} B/position  "
              f"ARI vs reference {ari:.3f}  components {eng.n_components_}  "
              f"score error by quarter {np.round(quarters, 3)}  rows stored bit-exactly {exact_rows:.3f}")
        out[store] = dict(bytes_per_position=int(eng.stats_["bytes_per_position"]), ari_vs_reference=ari,
                          score_error_by_quarter=quarters, exact_rows=exact_rows,
                          n_components=int(eng.n_components_))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=16384, help="positions streamed (default 128 x 128)")
    ap.add_argument("--pool", type=int, default=1024, help="distinct positions generated and replayed")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reference-positions", type=int, default=4096)
    ap.add_argument("--refresh-every", type=int, default=4096)
    ap.add_argument("--store", default="auto", choices=("auto", "counts", "full", "basis"))
    ap.add_argument("--quick", action="store_true", help="4,096 positions, pool 512, reference on 2,048")
    ap.add_argument("--accuracy", action="store_true",
                    help="instead of throughput: full vs basis store against the offline reference")
    ap.add_argument("--host-clusters", type=int, default=None,
                    help="engine host_clusters (default: the engine's; 0 = the paper's single level)")
    ap.add_argument("--pca-sketch-dtype", choices=("float32", "float64"), default=None,
                    help="StreamingPCA sketch update (default: the engine's, float32)")
    ap.add_argument("--json", action="store_true", help="one JSON object with the figures as the last line")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if args.accuracy:
        res = accuracy(sketch_dtype=args.pca_sketch_dtype)
        if args.json:
            print(json.dumps({"benchmark": "engine_store_accuracy", "stores": res, "load_average": os.getloadavg()}))
        return
    if args.quick:
        args.positions, args.pool, args.reference_positions = 4096, 512, 2048
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    t = time.perf_counter()
    ph, _, frames, spectra = _pool(128, args.pool, seed=0)
    print(f"pool: {args.pool} positions of {ph.frame_shape} uint16 frames + {ph.n_channels}-channel spectra "
          f"({frames.nbytes / 2**20:.0f} MiB), generated in {time.perf_counter() - t:.1f} s (not timed)")
    n = args.positions
    idx = np.arange(n) % args.pool

    # baseline 1: the FrameReducer alone, same frames, same batches
    red = FrameReducer().warm_up()
    out = np.empty((args.batch, red.n_features_out_), dtype=np.float32)
    with threadpool_limits(1, user_api="blas"):
        t = time.perf_counter()
        for s in range(0, n, args.batch):
            sel = idx[s:s + args.batch]
            red.transform(frames[sel], out=out[: sel.size])
        t_red = time.perf_counter() - t
    r_red = n / t_red

    # the engine
    extra = {} if args.host_clusters is None else {"host_clusters": args.host_clusters}
    eng = StreamingEngine(n, frame_shape=ph.frame_shape, n_channels=ph.n_channels,
                          energy_axis=(float(ph.energy_axis_kev[0]), ph.channel_width_kev),
                          n_clusters=6, warmup_positions=512, refresh_every=args.refresh_every,
                          store=args.store, random_state=0, **extra).warm_up()
    _set_sketch_dtype(eng, args.pca_sketch_dtype)
    t = time.perf_counter()
    for s in range(0, n, args.batch):
        pos = np.arange(s, min(s + args.batch, n))
        sel = idx[pos]
        eng.partial_fit(pos, frames[sel], spectra[sel])
    t_stream = time.perf_counter() - t
    t = time.perf_counter()
    eng.finalize()
    t_final = time.perf_counter() - t
    r_eng = n / t_stream

    # baseline 2: the offline reference on the same data (first reference-positions positions)
    m = min(args.reference_positions, n)
    cbed = bin_frames(frames[idx[:m] % args.pool], 8)
    eds = eds_window(spectra[idx[:m]], ph.energy_axis_kev, (0.2, 10.0), rebin=2)
    with threadpool_limits(1, user_api="blas"):
        t = time.perf_counter()
        run_reference(cbed, eds, clusterer=FuzzyCMeans(6, random_state=0), n_clusters=6, random_state=0)
        t_ref = time.perf_counter() - t
    r_ref = m / t_ref

    st = eng.stats_
    print(f"\n{'engine.partial_fit (streaming, all stages)':<48s} {r_eng:>9,.0f} positions/s "
          f"({n:,} positions in {t_stream:.1f} s; finalize {t_final:.2f} s)")
    print(f"{'  vs FrameReducer alone (same frames)':<48s} {r_red:>9,.0f} frames/s     ratio {r_eng / r_red:5.2f}x")
    print(f"{'  vs offline reference (features given)':<48s} {r_ref:>9,.0f} positions/s  ratio {r_eng / r_ref:5.2f}x "
          f"({m:,} positions in {t_ref:.1f} s)")
    print(f"\nper stage (s, and positions/s if that stage ran alone); {st['refreshes']} refreshes, "
          f"{st['full_refits']} full FCM re-fits, {st['basis_updates']} basis updates "
          f"({st['pending_flushes']} encodings of pending positions); store mode {eng.store_.mode}")
    for stage, sec in sorted(st["seconds"].items(), key=lambda kv: -kv[1]):
        rate = n / sec if sec > 0 else float("inf")
        print(f"  {stage:<16s} {sec:8.2f} s  {100 * sec / st['seconds_total']:5.1f} %  {rate:>12,.0f} /s")
    print(f"store ({eng.store_.mode}): {st['bytes_per_position']} bytes/position -> "
          f"{st['bytes_per_position'] * 512 * 512 / 1e6:.0f} MB if a 512 x 512 scan used it; "
          f"{eng.n_components_} PCA components, validity {eng.validity_}")
    if args.json:
        print(json.dumps({
            "benchmark": "engine",
            "engine_positions_per_s": r_eng,
            "baseline": "offline reference (run_reference, FuzzyCMeans) on the same data, positions/s",
            "baseline_positions_per_s": r_ref,
            "engine_vs_baseline_ratio": r_eng / r_ref,
            "frame_reducer_frames_per_s": r_red,
            "engine_vs_frame_reducer_ratio": r_eng / r_red,
            "positions": n, "finalize_s": t_final, "store": eng.store_.mode,
            "pca_sketch_dtype": eng.pca_.sketch_dtype, "host_clusters": int(eng.host_clusters),
            "bytes_per_position": int(st["bytes_per_position"]),
            "seconds_per_stage": st["seconds"],
            "load_average": os.getloadavg(),
        }))


if __name__ == "__main__":
    main()
