"""Fuzzy C-means: speed against scikit-fuzzy, and the choice of the default fuzzifier m.

Two measurements, each printed as ratios against a baseline run in the same process:

``python benchmarks/bench_fcm.py speed``
    Time per FCM iteration (and to convergence) of our Numba FCM versus scikit-fuzzy's
    ``cmeans`` on the same data from the same initial memberships, at 16,384 x 10 and
    262,144 x 10 with 6 clusters; also the NumPy twin, and the fused kernel on 1 thread versus
    all threads (does ``prange`` pay?). JIT warm-up happens before any timing. ``--json`` adds one
    JSON object as the last stdout line: ``fcm_speedup_vs_skfuzzy`` (per iteration, the smallest
    over the sizes) and ``fcm_whole_fit_ratio`` (to convergence from the same start, smallest),
    with the per-size figures and the load average.

``python benchmarks/bench_fcm.py choose-m``
    On synthetic data shaped like the real case (10 PCA-like dimensions, 6 clusters of very
    unequal sizes, one of about 2 % close to the biggest), compare m in {1.2, 1.3, 1.5, 2.0} by
    adjusted Rand index against the truth, by how often two prototypes merge, and by whether the
    small cluster keeps its own prototype.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numba
import numpy as np
from sklearn.metrics import adjusted_rand_score

from streamclust.cluster import fcm_kernels as K
from streamclust.cluster.fcm import FuzzyCMeans


def make_phase_like_data(n: int, rng: np.random.Generator, p: int = 10, small_distance: float = 5.0):
    """Six anisotropic Gaussian clusters, sizes 45/25/14/9/5/2 %, the 2 % one near the biggest.

    Per-dimension within-cluster stds are 0.6-1.4 (the small one half that); the four other
    clusters sit 8-11 stds from the biggest, the small one ``small_distance`` stds from it.

    Returns X, labels, true means, per-dimension within-cluster std of each cluster.
    """
    fractions = np.array([0.45, 0.25, 0.14, 0.09, 0.05, 0.02])
    sizes = np.maximum((fractions * n).astype(int), 2)
    sizes[0] += n - sizes.sum()
    means = np.zeros((6, p))
    for i in range(1, 5):
        d = rng.normal(size=p)
        means[i] = d / np.linalg.norm(d) * rng.uniform(8.0, 11.0)
    d = rng.normal(size=p)
    means[5] = means[0] + d / np.linalg.norm(d) * small_distance  # second phase, near the matrix
    X, y, spreads = [], [], []
    for i, s in enumerate(sizes):
        q, _ = np.linalg.qr(rng.normal(size=(p, p)))
        scale = (0.5 if i == 5 else 1.0) * rng.uniform(0.6, 1.4, size=p)
        X.append(means[i] + (rng.normal(size=(s, p)) * scale) @ q.T)
        y.append(np.full(s, i))
        spreads.append(np.sqrt(np.mean(scale**2)))
    X = np.vstack(X)
    y = np.concatenate(y)
    order = rng.permutation(len(y))
    return X[order], y[order], means, np.array(spreads)


def choose_m(n_datasets: int, n: int, covariance: str, small_distance: float) -> None:
    ms = (1.2, 1.3, 1.5, 2.0)
    rows = {m: {"ari": [], "merged": 0, "small_found": 0} for m in ms}
    for seed in range(n_datasets):
        rng = np.random.default_rng(seed)
        X, y, means, spreads = make_phase_like_data(n, rng, small_distance=small_distance)
        for m in ms:
            fcm = FuzzyCMeans(6, m=m, covariance=covariance, n_init=3, random_state=seed).fit(X)
            V = fcm.cluster_centers_
            rows[m]["ari"].append(adjusted_rand_score(y, fcm.labels_))
            dist = np.linalg.norm(V[:, None] - V[None], axis=-1)
            np.fill_diagonal(dist, np.inf)
            # merged: two prototypes closer than one within-cluster std (true means are further)
            if dist.min() < 1.0:
                rows[m]["merged"] += 1
            # the small phase keeps its own prototype: a centre within 1 std of its true mean
            # that is the nearest centre to that mean and not also the matrix's nearest centre
            near_small = int(np.argmin(np.linalg.norm(V - means[5], axis=1)))
            near_big = int(np.argmin(np.linalg.norm(V - means[0], axis=1)))
            if near_small != near_big and np.linalg.norm(V[near_small] - means[5]) < 1.0:
                rows[m]["small_found"] += 1
    print(f"covariance={covariance}, {n_datasets} data sets of {n} points x 10 dims, 6 clusters "
          f"(sizes 45/25/14/9/5/2 %, the 2 % one {small_distance} std from the 45 % one); n_init=3")
    print(f"{'m':>5} {'mean ARI':>9} {'min ARI':>8} {'merged':>8} {'small found':>12}")
    for m in ms:
        r = rows[m]
        print(f"{m:>5} {np.mean(r['ari']):9.4f} {np.min(r['ari']):8.4f} "
              f"{r['merged']:>5}/{n_datasets} {r['small_found']:>9}/{n_datasets}")


def _time(fn, repeat: int) -> float:
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def speed(sizes: list[int], m: float, iters: int) -> list[dict]:
    try:
        import skfuzzy
    except ImportError as exc:  # the speed-up is *against* scikit-fuzzy: without it there is no figure
        raise SystemExit(f"bench_fcm.py: the comparator scikit-fuzzy is not installed ({exc}); install it "
                         "with: pip install -c constraints.txt scikit-fuzzy") from exc

    p, c = 10, 6
    results = []
    for n in sizes:
        rng = np.random.default_rng(0)
        X, _, _, _ = make_phase_like_data(n, rng, p)
        w = np.ones(n)
        u0 = rng.random((c, n))
        u0 /= u0.sum(axis=0)
        um = u0**m
        V0 = um @ X / um.sum(axis=1)[:, None]
        # JIT warm-up (and cache load) outside every timing
        K.fcm_pass(X[:100], w[:100], V0, m)
        K.fcm_pass(X, w, V0, m)
        FuzzyCMeans(c, m=m, init=V0, max_iter=2, tol=0, tol_objective=0).fit(X[:1000])
        repeat = 5 if n <= 20_000 else 2
        n_it = iters if n <= 20_000 else max(5, iters // 4)

        t_sk = _time(lambda: skfuzzy.cluster.cmeans(X.T, c, m, error=0.0, maxiter=n_it,
                                                    init=u0.copy()), repeat) / n_it
        # per iteration of the estimator: the difference of n_it passes and 1 pass removes the
        # once-per-fit costs (validation, data variance, final memberships)
        t_fit1 = _time(lambda: FuzzyCMeans(c, m=m, init=V0, max_iter=1, tol=0,
                                           tol_objective=0).fit(X), repeat + 2)
        t_ours = (_time(lambda: FuzzyCMeans(c, m=m, init=V0, max_iter=n_it, tol=0,
                                            tol_objective=0).fit(X), repeat) - t_fit1) / (n_it - 1)
        t_pass = _time(lambda: K.fcm_pass(X, w, V0, m), 5 * repeat)
        e, ie = 1.0 / (m - 1.0), K.integer_exponent(m)
        nt = numba.get_num_threads()
        t_passn = _time(lambda: K._fcm_pass(X, w, V0, K._EMPTY_NORMS, m, e, ie, False, False, nt),
                        5 * repeat)
        t_pass1 = _time(lambda: K._fcm_pass(X, w, V0, K._EMPTY_NORMS, m, e, ie, False, False, 1),
                        5 * repeat)
        t_np = _time(lambda: K.fcm_pass_numpy(X, w, V0, m), repeat)
        A = np.broadcast_to(np.eye(p), (c, p, p)).copy()
        t_gk = _time(lambda: K.fcm_pass(X, w, V0, m, A, with_scatter=True), 3 * repeat)

        print(f"\n{n} x {p}, c={c}, m={m}: time per iteration")
        print(f"  scikit-fuzzy cmeans     {t_sk * 1e3:9.2f} ms   (baseline)")
        print(f"  FuzzyCMeans.fit         {t_ours * 1e3:9.2f} ms   {t_sk / t_ours:7.1f}x faster "
              f"({n / t_ours / 1e6:.1f} M points/s)")
        print(f"  fused kernel (default)  {t_pass * 1e3:9.2f} ms   {t_sk / t_pass:7.1f}x "
              f"({K._n_chunks(n, c)} chunk(s))")
        print(f"  fused kernel, {nt} thr.   {t_passn * 1e3:9.2f} ms   {t_sk / t_passn:7.1f}x")
        print(f"  fused kernel, 1 thread  {t_pass1 * 1e3:9.2f} ms   {t_sk / t_pass1:7.1f}x "
              f"(prange speed-up {t_pass1 / t_passn:.2f}x)")
        print(f"  FuzzyCMeans.fit fixed   {t_fit1 * 1e3:9.2f} ms   once per fit (1 pass included)")
        print(f"  NumPy twin              {t_np * 1e3:9.2f} ms   {t_sk / t_np:7.1f}x")
        print(f"  GK pass (+scatter)      {t_gk * 1e3:9.2f} ms")

        # to convergence, same start: skfuzzy's own rule (membership change < 1e-5) vs ours
        t0 = time.perf_counter()
        cntr, u, _, _, _, it_sk, _ = skfuzzy.cluster.cmeans(X.T, c, m, error=1e-5, maxiter=1000,
                                                            init=u0.copy())
        t_sk_conv = time.perf_counter() - t0
        t0 = time.perf_counter()
        f = FuzzyCMeans(c, m=m, init=V0, max_iter=1000).fit(X)
        t_conv = time.perf_counter() - t0
        dc = np.abs(np.sort(f.cluster_centers_, axis=0) - np.sort(cntr, axis=0)).max()
        print(f"  to convergence: skfuzzy {t_sk_conv:.3f} s ({it_sk} it), ours {t_conv:.3f} s "
              f"({f.n_iter_} it): {t_sk_conv / t_conv:.1f}x; max centre difference {dc:.2e}")
        results.append(dict(n=n, p=p, c=c, m=m, skfuzzy_ms_per_iter=t_sk * 1e3, ours_ms_per_iter=t_ours * 1e3,
                            speedup_per_iter=t_sk / t_ours, kernel_speedup_per_iter=t_sk / t_pass,
                            skfuzzy_fit_s=t_sk_conv, skfuzzy_iters=int(it_sk), ours_fit_s=t_conv,
                            ours_iters=int(f.n_iter_), whole_fit_ratio=t_sk_conv / t_conv,
                            max_centre_difference=float(dc)))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    s = sub.add_parser("speed")
    s.add_argument("--sizes", type=int, nargs="+", default=[16_384, 262_144])
    s.add_argument("--m", type=float, default=2.0)
    s.add_argument("--iters", type=int, default=40)
    s.add_argument("--json", action="store_true", help="one JSON object with the figures as the last line")
    c = sub.add_parser("choose-m")
    c.add_argument("--datasets", type=int, default=20)
    c.add_argument("--n", type=int, default=8000)
    c.add_argument("--covariance", default="euclidean", choices=["euclidean", "gk"])
    c.add_argument("--small-distance", type=float, default=5.0)
    args = ap.parse_args()
    if args.cmd == "choose-m":
        choose_m(args.datasets, args.n, args.covariance, args.small_distance)
    else:
        if args.cmd is None:
            args = ap.parse_args(["speed"])
        res = speed(args.sizes, args.m, args.iters)
        if args.json:
            print(json.dumps({
                "benchmark": "fcm",
                "fcm_speedup_vs_skfuzzy": min(r["speedup_per_iter"] for r in res),
                "fcm_whole_fit_ratio": min(r["whole_fit_ratio"] for r in res),
                "baseline": "skfuzzy.cluster.cmeans, same data and initial memberships, same process",
                "sizes": res, "numba_threads": numba.get_num_threads(), "load_average": os.getloadavg(),
            }))


if __name__ == "__main__":
    main()
