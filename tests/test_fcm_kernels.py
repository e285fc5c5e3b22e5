"""Numba FCM kernels against their NumPy twins, and the edge cases of the membership rule."""

from __future__ import annotations

import numpy as np
import pytest

from streamclust.cluster import fcm_kernels as K

N_POINTS = 5003  # the data fixture's points: the longest sums the kernels form
# The kernels are compiled with fastmath (re-association, FMA contraction) for the host CPU, so any
# sum may be evaluated in another order than NumPy's: a float64 sum of n terms is then off by at most
# n * eps * sum|terms|. Here the longest sums run over the points, their terms' magnitudes are within
# 10x of the largest result (checked against, via atol = rtol * max|b|), and memberships raise
# distance ratios of ~p * eps error to 1/(m-1) <= 10, far less. A derived bound, not one
# machine's observed error (2.6e-15 at most, measured): 1.1e-11.
RTOL = 10 * N_POINTS * float(np.finfo(np.float64).eps)


def _random_spd(rng, c, p):
    A = rng.normal(size=(c, p, p))
    S = np.einsum("cij,ckj->cik", A, A) + 0.5 * np.eye(p)
    # det 1 like real GK norms
    return S / np.linalg.det(S)[:, None, None] ** (1.0 / p)


@pytest.fixture(params=[np.float64, np.float32], ids=["f64", "f32"])
def data(request):
    rng = np.random.default_rng(42)
    # 5000 x 6 clusters crosses the threshold where the kernels split rows over threads, and is
    # not a multiple of the 256-point block
    n, p, c = N_POINTS, 7, 6
    X = (rng.normal(size=(n, p)) * 3).astype(request.param)
    centers = rng.normal(size=(c, p)) * 3
    w = rng.uniform(0.1, 2.0, size=n)
    norms = _random_spd(rng, c, p)
    return X, centers, w, norms


def _close(a, b, rtol=RTOL):
    a, b = np.asarray(a), np.asarray(b)
    scale = np.max(np.abs(b)) if b.size else 1.0
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


def test_integer_exponent():
    assert K.integer_exponent(2.0) == 1
    assert K.integer_exponent(1.5) == 2
    assert K.integer_exponent(1.25) == 4
    assert K.integer_exponent(1.2) == 5
    assert K.integer_exponent(4.0 / 3.0) == 3
    assert K.integer_exponent(1.3) == 0
    assert K.integer_exponent(3.0) == 0  # 1/(m-1) = 0.5


def test_distances_match_twins(data):
    X, C, _, A = data
    _close(K.sq_euclidean(X, C), K.sq_euclidean_numpy(X, C))
    _close(K.sq_mahalanobis(X, C, A), K.sq_mahalanobis_numpy(X, C, A))
    # identity norms reduce to Euclidean
    eye = np.broadcast_to(np.eye(X.shape[1]), A.shape).copy()
    _close(K.sq_mahalanobis(X, C, eye), K.sq_euclidean_numpy(X, C))


@pytest.mark.parametrize("m", [1.1, 1.3, 1.5, 2.0, 2.5])
def test_memberships_match_twin(data, m):
    X, C, _, _ = data
    D2 = K.sq_euclidean_numpy(X, C)
    U = K.memberships(D2, m)
    _close(U, K.memberships_numpy(D2, m))
    np.testing.assert_allclose(U.sum(axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("m", [1.3, 1.5, 2.0])
def test_objective_and_sums_match_twins(data, m):
    X, C, w, _ = data
    D2 = K.sq_euclidean_numpy(X, C)
    U = K.memberships_numpy(D2, m)
    assert K.objective(D2, U, w, m) == pytest.approx(K.objective_numpy(D2, U, w, m), rel=RTOL)
    for scatter in (False, True):
        got = K.membership_sums(X, U, w, m, C, scatter)
        want = K.membership_sums_numpy(X, U, w, m, C, scatter)
        for g, e in zip(got, want):
            _close(g, e)


@pytest.mark.parametrize("m", [1.2, 1.3, 1.5, 2.0])
@pytest.mark.parametrize("gk", [False, True], ids=["euclid", "gk"])
@pytest.mark.parametrize("scatter", [False, True], ids=["sums", "scatter"])
def test_fused_pass_matches_twin(data, m, gk, scatter):
    X, C, w, A = data
    norms = A if gk else None
    got = K.fcm_pass(X, w, C, m, norms, with_scatter=scatter)
    want = K.fcm_pass_numpy(X, w, C, m, norms, with_scatter=scatter)
    for g, e in zip(got[:3], want[:3]):
        _close(g, e)
    assert got[3] == pytest.approx(want[3], rel=RTOL)


# every exponent branch of the block kernel: 1/(m-1) = 1, 2, 3, 4, 5 and non-integer
@pytest.mark.parametrize("m", [2.0, 1.5, 4.0 / 3.0, 1.25, 1.2, 1.3])
@pytest.mark.parametrize("gk", [False, True], ids=["euclid", "gk"])
def test_predict_memberships_matches_twin(data, gk, m):
    X, C, _, A = data
    norms = A if gk else None
    U, D2 = K.predict_memberships(X, C, m, norms)
    U2, D22 = K.predict_memberships_numpy(X, C, m, norms)
    _close(U, U2)
    _close(D2, D22)


def test_small_m_huge_and_tiny_distances_stay_finite():
    # (d_ik / d_jk)^(2/(m-1)) with m = 1.1 is (1e600)^10 without the factoring: overflow
    D2 = np.array([[1e-300, 1e300, 1e300], [1e300, 1e299, 1e300], [5e307, 1e308, 1.7e308]])
    for fn in (K.memberships, K.memberships_numpy):
        U = fn(D2, 1.1)
        assert np.all(np.isfinite(U))
        np.testing.assert_allclose(U.sum(axis=1), 1.0, rtol=1e-12)
        assert U[0, 0] == 1.0
        assert U[1, 1] > 0.999999
    # all distances overflowed to inf: uniform, not nan
    U = K.memberships(np.array([[np.inf, np.inf]]), 1.1)
    np.testing.assert_array_equal(U, [[0.5, 0.5]])


def test_point_exactly_on_a_centre():
    rng = np.random.default_rng(0)
    C = rng.normal(size=(4, 3))
    X = np.vstack([rng.normal(size=(300, 3)), C[2:3], C[0:1]])
    # a duplicate centre: a point on both shares membership equally between them
    C2 = np.vstack([C, C[0:1]])
    for m in (1.1, 1.5, 2.0):
        U, D2 = K.predict_memberships(X, C, m)
        np.testing.assert_array_equal(U[300], [0.0, 0.0, 1.0, 0.0])
        np.testing.assert_array_equal(U[301], [1.0, 0.0, 0.0, 0.0])
        U2, _ = K.predict_memberships(X, C2, m)
        np.testing.assert_array_equal(U2[301], [0.5, 0.0, 0.0, 0.0, 0.5])
        assert np.all(np.isfinite(U)) and np.all(np.isfinite(U2))
        w = np.ones(len(X))
        got = K.fcm_pass(X, w, C, m, with_scatter=True)
        want = K.fcm_pass_numpy(X, w, C, m, with_scatter=True)
        for g, e in zip(got[:3], want[:3]):
            _close(g, e)
        assert got[3] == pytest.approx(want[3], rel=RTOL)


def test_fused_objective_equals_explicit_objective(data):
    X, C, w, _ = data
    for m in (1.3, 2.0):
        U, D2 = K.predict_memberships(X, C, m)
        _, _, _, J = K.fcm_pass(X, w, C, m)
        assert J == pytest.approx(K.objective(D2, U, w, m), rel=1e-11)


def test_zero_weights_contribute_nothing(data):
    X, C, w, _ = data
    w0 = w.copy()
    w0[::2] = 0.0
    W, S1, _, J = K.fcm_pass(X, w0, C, 1.5)
    W2, S12, _, J2 = K.fcm_pass(np.ascontiguousarray(X[1::2]), w[1::2], C, 1.5)
    _close(W, W2)
    _close(S1, S12)
    assert J == pytest.approx(J2, rel=RTOL)
