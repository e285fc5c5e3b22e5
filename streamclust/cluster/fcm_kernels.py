"""Numba kernels for fuzzy C-means, each beside a NumPy reference twin.

The estimators in :mod:`streamclust.cluster.fcm` call the compiled kernels; the ``*_numpy`` twins are the
readable definition of what each kernel computes, and ``tests/test_fcm_kernels.py`` checks that the
two agree on random data (float64 and float32 inputs).

Conventions shared by every function here:

* ``X`` is ``(n, p)`` float32 or float64; arithmetic is float64 throughout, so float32 frames do not
  lose precision in the sums.
* ``centers`` is ``(c, p)`` float64 and ``norms`` is ``(c, p, p)`` float64 (the Gustafson-Kessel
  norm-inducing matrices ``A_i``; the Euclidean case is ``A_i = I`` and does not need them).
* Distances are *squared*: ``d2[k, i] = (x_k - v_i)^T A_i (x_k - v_i)``.
* Memberships use the minimum distance of the row factored out::

      q_i = dmin / d2_i  in [0, 1],   r_i = q_i ** (1 / (m - 1)),   u_i = r_i / sum_j r_j

  so nothing overflows for small ``m`` (1.1-1.5) however large the distances are: ``r_i <= 1`` and
  ``1 <= sum_j r_j <= c``. A point exactly on one or more centres (``dmin == 0``) shares membership
  1 equally among those centres and has 0 elsewhere.
* The same factoring gives cheap powers: ``u_i ** m = r_i * q_i / S ** m`` (one ``pow`` per point,
  not per point and cluster) and the per-point objective ``sum_i u_i^m d2_i = dmin * S ** (1 - m)``.
* Centre sums are accumulated about the *current* centres (``S1 = sum w u^m (x - v)``), which keeps
  the GK scatter ``S2 = sum w u^m (x - v)(x - v)^T`` free of cancellation: the updated centre is
  ``v + S1 / W`` and the updated fuzzy covariance is ``S2 / W - delta delta^T``.
"""

from __future__ import annotations

import logging

import numpy as np
from numba import get_num_threads, njit, prange

logger = logging.getLogger(__name__)

__all__ = [
    "warm_up",
    "integer_exponent",
    "sq_euclidean",
    "sq_euclidean_numpy",
    "sq_mahalanobis",
    "sq_mahalanobis_numpy",
    "memberships",
    "memberships_numpy",
    "membership_sums",
    "membership_sums_numpy",
    "objective",
    "objective_numpy",
    "fcm_pass",
    "fcm_pass_numpy",
    "predict_memberships",
    "predict_memberships_numpy",
]

# Above this many points x clusters the kernels split rows over numba.get_num_threads() chunks.
# Measured on 2 cores (benchmarks/bench_fcm.py speed, docs/fcm.md): threads gain 1.7-2x on an idle
# machine, but a parallel region waits for its slowest thread, and with the other core busy a
# 16k x 6 pass went from 0.6 ms (1 thread) to 48 ms (2 threads), while at 262k x 6 two threads still
# won (32 -> 13 ms). Live mini-batches and scans up to ~170k positions (c = 6) therefore run on
# one thread; large batch fits use all threads.
_PARALLEL_MIN_WORK = 1_000_000


def integer_exponent(m: float) -> int:
    """Return ``1 / (m - 1)`` if it is a small integer (fast path by multiplication), else 0.

    Examples
    --------
    >>> integer_exponent(2.0), integer_exponent(1.5), integer_exponent(1.25), integer_exponent(1.3)
    (1, 2, 4, 0)
    """
    e = 1.0 / (m - 1.0)
    ie = int(round(e))
    if 1 <= ie <= 16 and abs(e - ie) < 1e-12:
        return ie
    return 0


def _prep_X(X: np.ndarray) -> np.ndarray:
    """C-contiguous float32/float64 view or copy, so each kernel compiles for two layouts only."""
    X = np.asarray(X)
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    return np.ascontiguousarray(X)


def _prep(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64)


def _n_chunks(n: int, c: int) -> int:
    if n * c < _PARALLEL_MIN_WORK:
        return 1
    return max(1, min(get_num_threads(), n))


# ---------------------------------------------------------------------------------------------
# per-row helpers (inlined into the kernels)
# ---------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy")
def _ipow(x, k):
    y = x
    for _ in range(k - 1):
        y *= x
    return y


@njit(cache=True, nogil=True, error_model="numpy")
def _row_memberships(d2, m, e, ie, r, um):
    """Fill ``r`` with memberships and ``um`` with ``u ** m`` for one row; return its objective."""
    c = d2.shape[0]
    dmin = np.inf
    for i in range(c):
        if d2[i] < dmin:
            dmin = d2[i]
    if dmin <= 0.0:
        # On a centre: memberships shared among the centres at distance 0. Negative values can only
        # come from rounding in the Mahalanobis form, and mean "on the centre" too.
        nz = 0
        for i in range(c):
            if d2[i] <= 0.0:
                nz += 1
        ui = 1.0 / nz
        umi = ui**m
        for i in range(c):
            if d2[i] <= 0.0:
                r[i] = ui
                um[i] = umi
            else:
                r[i] = 0.0
                um[i] = 0.0
        return 0.0
    if dmin == np.inf:
        # Every distance overflowed: nothing distinguishes the clusters.
        for i in range(c):
            r[i] = 1.0 / c
            um[i] = (1.0 / c) ** m
        return np.inf
    s = 0.0
    for i in range(c):
        q = dmin / d2[i]
        if ie > 0:
            ri = _ipow(q, ie)
        else:
            ri = q**e
        r[i] = ri
        um[i] = ri * q  # completed below by 1 / S**m
        s += ri
    inv_s = 1.0 / s
    inv_sm = s ** (-m)
    for i in range(c):
        r[i] *= inv_s
        um[i] *= inv_sm
    return dmin * s * inv_sm


@njit(cache=True, nogil=True, error_model="numpy")
def _row_sq_euclidean(x, centers, out):
    c, p = centers.shape
    for i in range(c):
        acc = 0.0
        for j in range(p):
            t = np.float64(x[j]) - centers[i, j]
            acc += t * t
        out[i] = acc


@njit(cache=True, nogil=True, error_model="numpy")
def _row_sq_mahalanobis(x, centers, norms, diff, out):
    c, p = centers.shape
    for i in range(c):
        for j in range(p):
            diff[j] = np.float64(x[j]) - centers[i, j]
        acc = 0.0
        for j in range(p):
            t = 0.0
            for l in range(p):
                t += norms[i, j, l] * diff[l]
            acc += diff[j] * t
        out[i] = acc


# ---------------------------------------------------------------------------------------------
# distances
# ---------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _sq_euclidean(X, centers, n_chunks):
    n = X.shape[0]
    c = centers.shape[0]
    out = np.empty((n, c), dtype=np.float64)
    step = (n + n_chunks - 1) // n_chunks
    for t in prange(n_chunks):
        for k in range(t * step, min(n, (t + 1) * step)):
            _row_sq_euclidean(X[k], centers, out[k])
    return out


def sq_euclidean(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``(n, c)`` from each row of ``X`` to each centre."""
    X, centers = _prep_X(X), _prep(centers)
    return _sq_euclidean(X, centers, _n_chunks(X.shape[0], centers.shape[0]))


def sq_euclidean_numpy(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`sq_euclidean`."""
    diff = X.astype(np.float64)[:, None, :] - centers[None, :, :]
    return np.einsum("kij,kij->ki", diff, diff)


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _sq_mahalanobis(X, centers, norms, n_chunks):
    n = X.shape[0]
    c, p = centers.shape
    out = np.empty((n, c), dtype=np.float64)
    step = (n + n_chunks - 1) // n_chunks
    for t in prange(n_chunks):
        diff = np.empty(p, dtype=np.float64)
        for k in range(t * step, min(n, (t + 1) * step)):
            _row_sq_mahalanobis(X[k], centers, norms, diff, out[k])
    return out


def sq_mahalanobis(X: np.ndarray, centers: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Squared distances ``(x - v_i)^T A_i (x - v_i)`` as an ``(n, c)`` array (GK norms)."""
    X, centers, norms = _prep_X(X), _prep(centers), _prep(norms)
    return _sq_mahalanobis(X, centers, norms, _n_chunks(X.shape[0], centers.shape[0]))


def sq_mahalanobis_numpy(X: np.ndarray, centers: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`sq_mahalanobis`."""
    diff = X.astype(np.float64)[:, None, :] - centers[None, :, :]
    return np.einsum("kij,ijl,kil->ki", diff, norms, diff)


# ---------------------------------------------------------------------------------------------
# memberships and objective from given distances
# ---------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _memberships(D2, m, e, ie, n_chunks):
    n, c = D2.shape
    U = np.empty((n, c), dtype=np.float64)
    step = (n + n_chunks - 1) // n_chunks
    for t in prange(n_chunks):
        um = np.empty(c, dtype=np.float64)
        for k in range(t * step, min(n, (t + 1) * step)):
            _row_memberships(D2[k], m, e, ie, U[k], um)
    return U


def memberships(D2: np.ndarray, m: float) -> np.ndarray:
    """Probabilistic FCM memberships ``(n, c)`` from squared distances, rows summing to 1.

    Examples
    --------
    >>> import numpy as np
    >>> memberships(np.array([[1.0, 1.0], [0.0, 4.0], [1e-300, 1e300]]), 1.1).round(6)
    array([[0.5, 0.5],
           [1. , 0. ],
           [1. , 0. ]])
    """
    D2 = np.ascontiguousarray(D2, dtype=np.float64)
    return _memberships(D2, float(m), 1.0 / (m - 1.0), integer_exponent(m),
                        _n_chunks(D2.shape[0], D2.shape[1]))


def memberships_numpy(D2: np.ndarray, m: float) -> np.ndarray:
    """NumPy twin of :func:`memberships`."""
    D2 = np.asarray(D2, dtype=np.float64)
    c = D2.shape[1]
    dmin = D2.min(axis=1, keepdims=True)
    on_centre = dmin <= 0.0
    all_inf = np.isinf(dmin)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (dmin / D2) ** (1.0 / (m - 1.0))
    r = np.where(on_centre | all_inf, 0.0, r)
    U = r / np.where(on_centre | all_inf, 1.0, r.sum(axis=1, keepdims=True))
    zero = D2 <= 0.0
    U = np.where(on_centre, zero / np.maximum(zero.sum(axis=1, keepdims=True), 1), U)
    return np.where(all_inf, 1.0 / c, U)


@njit(cache=True, nogil=True, error_model="numpy")
def _objective(D2, U, w, m):
    n, c = D2.shape
    acc = 0.0
    for k in range(n):
        for i in range(c):
            if U[k, i] > 0.0:
                acc += w[k] * U[k, i] ** m * D2[k, i]
    return acc


def objective(D2: np.ndarray, U: np.ndarray, w: np.ndarray, m: float) -> float:
    """FCM objective ``J = sum_k w_k sum_i u_ki^m d2_ki`` for given memberships."""
    return float(_objective(_prep(D2), _prep(U), _prep(w), float(m)))


def objective_numpy(D2: np.ndarray, U: np.ndarray, w: np.ndarray, m: float) -> float:
    """NumPy twin of :func:`objective`."""
    return float(np.sum(w[:, None] * U**m * np.where(U > 0, D2, 0.0)))


# ---------------------------------------------------------------------------------------------
# centre update sums and GK scatter from given memberships
# ---------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, error_model="numpy")
def _membership_sums(X, U, w, m, centers, with_scatter):
    n, p = X.shape
    c = centers.shape[0]
    W = np.zeros(c, dtype=np.float64)
    S1 = np.zeros((c, p), dtype=np.float64)
    S2 = np.zeros((c, p, p) if with_scatter else (c, 0, 0), dtype=np.float64)
    diff = np.empty(p, dtype=np.float64)
    for k in range(n):
        for i in range(c):
            if U[k, i] <= 0.0:
                continue
            g = w[k] * U[k, i] ** m
            W[i] += g
            for j in range(p):
                diff[j] = np.float64(X[k, j]) - centers[i, j]
                S1[i, j] += g * diff[j]
            if with_scatter:
                for j in range(p):
                    gd = g * diff[j]
                    for l in range(j + 1):
                        S2[i, j, l] += gd * diff[l]
    if with_scatter:
        for i in range(c):
            for j in range(p):
                for l in range(j):
                    S2[i, l, j] = S2[i, j, l]
    return W, S1, S2


def membership_sums(X, U, w, m, centers, with_scatter=False):
    """Centre-update sums from given memberships.

    Returns ``W = sum_k w_k u_ki^m`` (c,), ``S1 = sum_k w_k u_ki^m (x_k - v_i)`` (c, p) and, with
    ``with_scatter``, the GK scatter ``S2 = sum_k w_k u_ki^m (x_k - v_i)(x_k - v_i)^T`` (c, p, p);
    ``v_i`` are the given ``centers``.
    """
    return _membership_sums(_prep_X(X), _prep(U), _prep(w), float(m), _prep(centers),
                            bool(with_scatter))


def membership_sums_numpy(X, U, w, m, centers, with_scatter=False):
    """NumPy twin of :func:`membership_sums`."""
    g = w[:, None] * U**m
    diff = X.astype(np.float64)[:, None, :] - centers[None, :, :]
    W = g.sum(axis=0)
    S1 = np.einsum("ki,kij->ij", g, diff)
    if with_scatter:
        S2 = np.einsum("ki,kij,kil->ijl", g, diff, diff)
    else:
        S2 = np.zeros((centers.shape[0], 0, 0))
    return W, S1, S2


# ---------------------------------------------------------------------------------------------
# one fused pass: distances -> memberships -> sums -> objective (the hot loop)
# ---------------------------------------------------------------------------------------------


# The hot loop works on blocks of points held feature-major (``XT[j, k]``), so every inner loop
# runs over contiguous points and compiles to SIMD; per-row loops over p = 10 features did not
# (measured: benchmarks/bench_fcm.py speed). ``_FM`` allows re-association and FMA contraction but
# keeps IEEE inf/nan semantics, which the on-centre and overflow handling rely on.
_FM = {"reassoc", "contract", "arcp", "nsz"}
# points a block: 128 keeps a block's working arrays (XT, D2, U, G: about 30 kB at p = 10, c = 6)
# in L1; measured against 256 / 64 at 262,144 points on one thread: 6.3 ms against 7.4 / 7.3 a pass
_BLOCK = 128


@njit(cache=True, nogil=True, fastmath=_FM, error_model="numpy")
def _block_distances(X, k0, bl, centers, norms, use_gk, XT, D2, DIFF, Y):
    """Fill XT (p, bl) with the block's points and D2 (c, bl) with squared distances."""
    c, p = centers.shape
    for k in range(bl):
        for j in range(p):
            XT[j, k] = np.float64(X[k0 + k, j])
    for i in range(c):
        d = D2[i]
        for k in range(bl):
            d[k] = 0.0
        if use_gk:
            for j in range(p):
                vij = centers[i, j]
                for k in range(bl):
                    DIFF[i, j, k] = XT[j, k] - vij
            for j in range(p):
                for k in range(bl):
                    Y[k] = 0.0
                for l in range(p):
                    a = norms[i, j, l]
                    for k in range(bl):
                        Y[k] += a * DIFF[i, l, k]
                for k in range(bl):
                    d[k] += DIFF[i, j, k] * Y[k]
        else:
            for j in range(p):
                vij = centers[i, j]
                for k in range(bl):
                    t = XT[j, k] - vij
                    d[k] += t * t


@njit(cache=True, nogil=True, fastmath=_FM, error_model="numpy")
def _block_memberships(D2, bl, w, k0, m, e, ie, U, G, DMIN, SS, SM, row_d, row_u, row_um):
    """Memberships U (c, bl) and weighted powers G = w u^m (c, bl) of a block; return its objective."""
    c = D2.shape[0]
    for k in range(bl):
        DMIN[k] = D2[0, k]
        SS[k] = 0.0
    for i in range(1, c):
        for k in range(bl):
            DMIN[k] = min(DMIN[k], D2[i, k])
    # branch on the exponent outside the point loop so each variant vectorises
    for i in range(c):
        if ie == 1:
            for k in range(bl):
                q = DMIN[k] / D2[i, k]
                U[i, k] = q
                G[i, k] = q * q
                SS[k] += q
        elif ie == 2:
            for k in range(bl):
                q = DMIN[k] / D2[i, k]
                r = q * q
                U[i, k] = r
                G[i, k] = r * q
                SS[k] += r
        elif ie == 3:
            for k in range(bl):
                q = DMIN[k] / D2[i, k]
                r = q * q * q
                U[i, k] = r
                G[i, k] = r * q
                SS[k] += r
        elif ie == 4:
            for k in range(bl):
                q = DMIN[k] / D2[i, k]
                r = q * q
                r = r * r
                U[i, k] = r
                G[i, k] = r * q
                SS[k] += r
        elif ie == 5:
            for k in range(bl):
                q = DMIN[k] / D2[i, k]
                r = q * q
                r = r * r * q
                U[i, k] = r
                G[i, k] = r * q
                SS[k] += r
        else:
            for k in range(bl):
                q = DMIN[k] / D2[i, k]
                r = q**e
                U[i, k] = r
                G[i, k] = r * q
                SS[k] += r
    J = 0.0
    for k in range(bl):
        s = SS[k]
        inv_s = 1.0 / s
        if m == 2.0:
            inv_sm = inv_s * inv_s
        elif m == 1.5:
            inv_sm = inv_s * np.sqrt(inv_s)
        else:
            inv_sm = s ** (-m)
        SS[k] = inv_s
        SM[k] = inv_sm * w[k0 + k]
        # per point: sum_i u^m d2 = dmin * S^(1 - m)
        J += SM[k] * DMIN[k] * s
    for i in range(c):
        for k in range(bl):
            U[i, k] *= SS[k]
            G[i, k] *= SM[k]
    # Points on a centre (dmin == 0) or with every distance overflowed (dmin == inf) produced
    # nan above: redo them with the scalar rule (rare, so a second cheap sweep is fine).
    bad = False
    for k in range(bl):
        if not (DMIN[k] > 0.0 and DMIN[k] < np.inf):
            bad = True
    if bad:
        J = 0.0
        for k in range(bl):
            dmin = DMIN[k]
            if dmin > 0.0 and dmin < np.inf:
                J += SM[k] * dmin / SS[k]
            else:
                for i in range(c):
                    row_d[i] = D2[i, k]
                J += w[k0 + k] * _row_memberships(row_d, m, e, ie, row_u, row_um)
                for i in range(c):
                    U[i, k] = row_u[i]
                    G[i, k] = w[k0 + k] * row_um[i]
    return J


@njit(cache=True, nogil=True, parallel=True, fastmath=_FM, error_model="numpy")
def _fcm_pass(X, w, centers, norms, m, e, ie, use_gk, with_scatter, n_chunks):
    n, p = X.shape
    c = centers.shape[0]
    pp = p if with_scatter else 0
    Wc = np.zeros((n_chunks, c), dtype=np.float64)
    S1c = np.zeros((n_chunks, c, p), dtype=np.float64)
    S2c = np.zeros((n_chunks, c, pp, pp), dtype=np.float64)
    Jc = np.zeros(n_chunks, dtype=np.float64)
    step = (n + n_chunks - 1) // n_chunks
    B = _BLOCK
    for t in prange(n_chunks):
        XT = np.empty((p, B), dtype=np.float64)
        D2 = np.empty((c, B), dtype=np.float64)
        DIFF = np.empty((c, p if (use_gk or with_scatter) else 0, B), dtype=np.float64)
        Y = np.empty(B, dtype=np.float64)
        U = np.empty((c, B), dtype=np.float64)
        G = np.empty((c, B), dtype=np.float64)
        DMIN = np.empty(B, dtype=np.float64)
        SS = np.empty(B, dtype=np.float64)
        SM = np.empty(B, dtype=np.float64)
        row_d = np.empty(c, dtype=np.float64)
        row_u = np.empty(c, dtype=np.float64)
        row_um = np.empty(c, dtype=np.float64)
        Wt = Wc[t]
        S1t = S1c[t]
        S2t = S2c[t]
        jt = 0.0
        lo = t * step
        hi = min(n, (t + 1) * step)
        for k0 in range(lo, hi, B):
            bl = min(B, hi - k0)
            _block_distances(X, k0, bl, centers, norms, use_gk, XT, D2, DIFF, Y)
            jt += _block_memberships(D2, bl, w, k0, m, e, ie, U, G, DMIN, SS, SM, row_d, row_u,
                                     row_um)
            for i in range(c):
                g = G[i]
                acc = 0.0
                for k in range(bl):
                    acc += g[k]
                Wt[i] += acc
                if with_scatter:
                    if not use_gk:
                        for j in range(p):
                            vij = centers[i, j]
                            for k in range(bl):
                                DIFF[i, j, k] = XT[j, k] - vij
                    for j in range(p):
                        acc = 0.0
                        for k in range(bl):
                            acc += g[k] * DIFF[i, j, k]
                        S1t[i, j] += acc
                        for l in range(j + 1):
                            acc = 0.0
                            for k in range(bl):
                                acc += g[k] * DIFF[i, j, k] * DIFF[i, l, k]
                            S2t[i, j, l] += acc
                else:
                    # raw first moments; shifted to the centres once at the end
                    for j in range(p):
                        acc = 0.0
                        for k in range(bl):
                            acc += g[k] * XT[j, k]
                        S1t[i, j] += acc
        Jc[t] = jt
    W = Wc.sum(axis=0)
    S1 = S1c.sum(axis=0)
    S2 = S2c.sum(axis=0)
    if not with_scatter:
        for i in range(c):
            for j in range(p):
                S1[i, j] -= W[i] * centers[i, j]
    else:
        for i in range(c):
            for j in range(p):
                for l in range(j):
                    S2[i, l, j] = S2[i, j, l]
    return W, S1, S2, Jc.sum()


_EMPTY_NORMS = np.zeros((0, 0, 0), dtype=np.float64)


def fcm_pass(X, w, centers, m, norms=None, with_scatter=False):
    """One FCM pass over ``X`` with fixed centres (and GK norms if given).

    Computes the memberships of every row from the current centres and accumulates, without
    storing them, ``W`` (c,), ``S1`` (c, p), optionally ``S2`` (c, p, p) as in
    :func:`membership_sums`, and the objective ``J = sum_k w_k sum_i u_ki^m d2_ki``.
    """
    use_gk = norms is not None
    nrm = _prep(norms) if use_gk else _EMPTY_NORMS
    X, w, centers = _prep_X(X), _prep(w), _prep(centers)
    W, S1, S2, J = _fcm_pass(X, w, centers, nrm, float(m), 1.0 / (m - 1.0), integer_exponent(m),
                             use_gk, bool(with_scatter), _n_chunks(X.shape[0], centers.shape[0]))
    return W, S1, S2, float(J)


def fcm_pass_numpy(X, w, centers, m, norms=None, with_scatter=False):
    """NumPy twin of :func:`fcm_pass` (composition of the other twins)."""
    D2 = sq_euclidean_numpy(X, centers) if norms is None else sq_mahalanobis_numpy(X, centers, norms)
    U = memberships_numpy(D2, m)
    W, S1, S2 = membership_sums_numpy(X, U, w, m, centers, with_scatter)
    return W, S1, S2, objective_numpy(D2, U, w, m)


@njit(cache=True, nogil=True, parallel=True, fastmath=_FM, error_model="numpy")
def _predict_memberships(X, centers, norms, m, e, ie, use_gk, n_chunks):
    n, p = X.shape
    c = centers.shape[0]
    Uout = np.empty((n, c), dtype=np.float64)
    Dout = np.empty((n, c), dtype=np.float64)
    w = np.ones(n, dtype=np.float64)
    step = (n + n_chunks - 1) // n_chunks
    B = _BLOCK
    for t in prange(n_chunks):
        XT = np.empty((p, B), dtype=np.float64)
        D2 = np.empty((c, B), dtype=np.float64)
        DIFF = np.empty((c, p if use_gk else 0, B), dtype=np.float64)
        Y = np.empty(B, dtype=np.float64)
        U = np.empty((c, B), dtype=np.float64)
        G = np.empty((c, B), dtype=np.float64)
        DMIN = np.empty(B, dtype=np.float64)
        SS = np.empty(B, dtype=np.float64)
        SM = np.empty(B, dtype=np.float64)
        row_d = np.empty(c, dtype=np.float64)
        row_u = np.empty(c, dtype=np.float64)
        row_um = np.empty(c, dtype=np.float64)
        lo = t * step
        hi = min(n, (t + 1) * step)
        for k0 in range(lo, hi, B):
            bl = min(B, hi - k0)
            _block_distances(X, k0, bl, centers, norms, use_gk, XT, D2, DIFF, Y)
            _block_memberships(D2, bl, w, k0, m, e, ie, U, G, DMIN, SS, SM, row_d, row_u, row_um)
            for k in range(bl):
                for i in range(c):
                    Uout[k0 + k, i] = U[i, k]
                    Dout[k0 + k, i] = D2[i, k]
    return Uout, Dout


def predict_memberships(X, centers, m, norms=None):
    """Memberships ``(n, c)`` and squared distances ``(n, c)`` of ``X`` for fixed centres."""
    use_gk = norms is not None
    nrm = _prep(norms) if use_gk else _EMPTY_NORMS
    X, centers = _prep_X(X), _prep(centers)
    return _predict_memberships(X, centers, nrm, float(m), 1.0 / (m - 1.0), integer_exponent(m),
                                use_gk, _n_chunks(X.shape[0], centers.shape[0]))


def predict_memberships_numpy(X, centers, m, norms=None):
    """NumPy twin of :func:`predict_memberships`."""
    D2 = sq_euclidean_numpy(X, centers) if norms is None else sq_mahalanobis_numpy(X, centers, norms)
    return memberships_numpy(D2, m), D2


def warm_up() -> None:
    """Compile (or load from Numba's cache) every kernel for float32 and float64 input.

    Call before a detector is armed, so the first live batch does not pay for compilation.

    Examples
    --------
    >>> warm_up()
    """
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        X = rng.normal(size=(8, 2)).astype(dtype)
        w = np.ones(8)
        C = np.array([[0.0, 0.0], [1.0, 1.0]])
        A = np.broadcast_to(np.eye(2), (2, 2, 2)).copy()
        D2 = sq_euclidean(X, C)
        sq_mahalanobis(X, C, A)
        U = memberships(D2, 2.0)
        objective(D2, U, w, 2.0)
        membership_sums(X, U, w, 2.0, C, True)
        for norms in (None, A):
            for scatter in (False, True):
                fcm_pass(X, w, C, 2.0, norms, scatter)
            predict_memberships(X, C, 2.0, norms)
    logger.debug("FCM kernels compiled")
