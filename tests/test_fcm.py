"""FuzzyCMeans and MiniBatchFuzzyCMeans: agreement with scikit-fuzzy, estimator contract, GK."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import skfuzzy
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import adjusted_rand_score

from streamclust.cluster.fcm import (
    DEFAULT_M,
    FuzzyCMeans,
    MiniBatchFuzzyCMeans,
    gk_norm_matrices,
    kmeans_plusplus,
)


def _blobs(rng, centres, n_each, std):
    X = np.vstack([rng.normal(c, std, size=(n_each, len(c))) for c in centres])
    y = np.repeat(np.arange(len(centres)), n_each)
    order = rng.permutation(len(y))
    return X[order], y[order]


@pytest.fixture
def three_blobs():
    rng = np.random.default_rng(7)
    centres = np.array([[0.0, 0, 0, 0], [4, 4, 0, 0], [0, 4, 4, 4]])
    return _blobs(rng, centres, 200, 1.0)


@pytest.fixture
def separated_blobs():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 5)) * 10
    return _blobs(rng, centres, 1500, 1.0)


def _centres_from_memberships(X, u0, m):
    um = u0**m
    return um @ X / um.sum(axis=1)[:, None]


# ---------------------------------------------------------------------------------------------
# scikit-fuzzy reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [2.0, 1.5, 1.3])
def test_matches_skfuzzy_after_fixed_iterations(three_blobs, m):
    X, _ = three_blobs
    c, p = 3, 25
    rng = np.random.default_rng(1)
    u0 = rng.random((c, len(X)))
    u0 /= u0.sum(axis=0)
    cntr, u, _, _, _, it, _ = skfuzzy.cluster.cmeans(X.T, c, m, error=0.0, maxiter=p, init=u0.copy())
    assert it == p
    # skfuzzy's first step computes centres from u0; our init is exactly those centres, and each
    # of our passes is one of its later steps, so p - 1 passes land on its p-th iterate
    f = FuzzyCMeans(c, m=m, init=_centres_from_memberships(X, u0, m), max_iter=p - 1, tol=0.0,
                    tol_objective=0.0).fit(X)
    assert f.n_iter_ == p - 1
    np.testing.assert_allclose(f.cluster_centers_, cntr, atol=1e-6, rtol=0)
    np.testing.assert_allclose(f.memberships_, u.T, atol=1e-6, rtol=0)


def test_matches_skfuzzy_at_convergence(three_blobs):
    X, _ = three_blobs
    m, c = 1.5, 3
    rng = np.random.default_rng(2)
    u0 = rng.random((c, len(X)))
    u0 /= u0.sum(axis=0)
    cntr, u, *_ = skfuzzy.cluster.cmeans(X.T, c, m, error=1e-12, maxiter=2000, init=u0.copy())
    f = FuzzyCMeans(c, m=m, init=_centres_from_memberships(X, u0, m), max_iter=2000, tol=1e-16,
                    tol_objective=0.0).fit(X)
    np.testing.assert_allclose(f.cluster_centers_, cntr, atol=1e-6, rtol=0)
    np.testing.assert_allclose(f.memberships_, u.T, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# memberships and numerics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance", ["euclidean", "gk"])
def test_memberships_rows_sum_to_one(three_blobs, covariance):
    X, _ = three_blobs
    f = FuzzyCMeans(3, covariance=covariance, random_state=0).fit(X)
    np.testing.assert_allclose(f.memberships_.sum(axis=1), 1.0, rtol=1e-12)
    U = f.predict_memberships(X[:50])
    np.testing.assert_allclose(U, f.memberships_[:50], rtol=1e-12)
    np.testing.assert_allclose(U.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(f.transform(X[:50]), U)
    np.testing.assert_array_equal(f.predict(X), f.labels_)
    np.testing.assert_array_equal(f.fit_predict(X), f.labels_)


def test_small_m_with_huge_distances_stays_finite(three_blobs):
    X, y = three_blobs
    # distances ~1e200 between clusters: (d_ik/d_jk)^(2/(m-1)) at m = 1.1 would overflow
    Xh = X * 1e100
    f = FuzzyCMeans(3, m=1.1, random_state=0).fit(Xh)
    assert np.all(np.isfinite(f.memberships_))
    assert np.all(np.isfinite(f.cluster_centers_))
    np.testing.assert_allclose(f.memberships_.sum(axis=1), 1.0, rtol=1e-12)
    assert adjusted_rand_score(y, f.labels_) > 0.9


def test_point_exactly_on_a_centre_gets_membership_one(three_blobs):
    X, _ = three_blobs
    f = FuzzyCMeans(3, m=1.1, random_state=0).fit(X)
    U = f.predict_memberships(np.vstack([f.cluster_centers_, X[:5]]))
    np.testing.assert_array_equal(U[:3], np.eye(3))
    assert np.all(np.isfinite(U))


def test_sample_weight_equals_repetition(three_blobs):
    X, _ = three_blobs
    init = X[[0, 1, 2]]
    w = np.ones(len(X))
    w[:100] = 2.0
    a = FuzzyCMeans(3, init=init, tol=0, tol_objective=0, max_iter=20).fit(X, sample_weight=w)
    b = FuzzyCMeans(3, init=init, tol=0, tol_objective=0, max_iter=20).fit(np.vstack([X, X[:100]]))
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, rtol=1e-10)
    assert a.objective_ == pytest.approx(b.objective_, rel=1e-10)


def test_float32_input_close_to_float64(three_blobs):
    X, _ = three_blobs
    a = FuzzyCMeans(3, random_state=0).fit(X)
    b = FuzzyCMeans(3, random_state=0).fit(X.astype(np.float32))
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# initialisation, restarts, stopping
# ---------------------------------------------------------------------------------------------


def test_kmeans_plusplus_deterministic_for_a_seed(separated_blobs):
    X, y = separated_blobs
    c1, i1 = kmeans_plusplus(X, 4, random_state=5)
    c2, i2 = kmeans_plusplus(X, 4, random_state=5)
    c3, i3 = kmeans_plusplus(X, 4, random_state=6)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(c1, c2)
    assert not np.array_equal(i1, i3)
    # well-separated blobs: one seed in each
    assert sorted(y[i1]) == [0, 1, 2, 3]
    np.testing.assert_array_equal(c1, X[i1])


def test_kmeans_plusplus_respects_zero_weights(separated_blobs):
    X, y = separated_blobs
    w = (y != 0).astype(float)
    for seed in range(5):
        _, idx = kmeans_plusplus(X, 3, sample_weight=w, random_state=seed)
        assert np.all(y[idx] != 0)


def test_fit_is_deterministic_for_a_seed(three_blobs):
    X, _ = three_blobs
    a = FuzzyCMeans(3, random_state=11).fit(X)
    b = FuzzyCMeans(3, random_state=11).fit(X)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)


def test_restarts_keep_lowest_objective(three_blobs, caplog):
    X, _ = three_blobs
    # overlapping clusters and too many centres: restarts end in different local minima
    with caplog.at_level(logging.DEBUG, logger="streamclust.cluster.fcm"):
        f = FuzzyCMeans(7, n_init=5, random_state=0).fit(X)
    objectives = [float(r.args[1]) for r in caplog.records if r.msg.startswith("FCM restart")]
    assert len(objectives) == 5
    assert len({round(o, 6) for o in objectives}) > 1
    assert f.objective_ == min(objectives)
    # the kept restart's objective is the objective of the stored centres
    assert -f.score(X) == pytest.approx(f.objective_, rel=1e-10)


def test_stops_on_tolerance_before_max_iter(three_blobs):
    X, _ = three_blobs
    f = FuzzyCMeans(3, random_state=0, max_iter=300).fit(X)
    assert f.n_iter_ < 300
    g = FuzzyCMeans(3, random_state=0, max_iter=300, tol=0.0, tol_objective=0.0).fit(X)
    assert g.n_iter_ == 300


def test_default_m_is_the_measured_one():
    assert FuzzyCMeans().m == DEFAULT_M
    assert MiniBatchFuzzyCMeans().m == DEFAULT_M


# ---------------------------------------------------------------------------------------------
# estimator contract
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [FuzzyCMeans, MiniBatchFuzzyCMeans])
def test_clone_and_get_params(cls):
    est = cls(n_clusters=4, m=1.3, covariance="gk", random_state=3)
    params = est.get_params()
    assert params["n_clusters"] == 4 and params["m"] == 1.3 and params["covariance"] == "gk"
    c = clone(est)
    assert c.get_params() == params
    assert c is not est
    c.set_params(m=1.7)
    assert c.m == 1.7 and est.m == 1.3
    # __init__ stores parameters only: nothing learned exists before fit
    assert not [k for k in vars(cls()) if k.endswith("_")]


@pytest.mark.parametrize("cls", [FuzzyCMeans, MiniBatchFuzzyCMeans])
def test_unfitted_predict_raises(cls):
    with pytest.raises(NotFittedError):
        cls(n_clusters=2).predict(np.zeros((3, 2)))


def test_bad_input_is_refused_with_a_clear_message(three_blobs):
    X, _ = three_blobs
    with pytest.raises(ValueError, match="m must be"):
        FuzzyCMeans(3, m=1.0).fit(X)
    with pytest.raises(ValueError, match="covariance"):
        FuzzyCMeans(3, covariance="mahalanobis").fit(X)
    with pytest.raises(ValueError, match="init array has shape"):
        FuzzyCMeans(3, init=np.zeros((2, 4))).fit(X)
    Xn = X.copy()
    Xn[5, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        FuzzyCMeans(3).fit(Xn)
    with pytest.raises(ValueError, match="sample_weight"):
        FuzzyCMeans(3).fit(X, sample_weight=-np.ones(len(X)))
    f = FuzzyCMeans(3, random_state=0).fit(X)
    with pytest.raises(ValueError, match="4 features"):
        f.predict(X[:, :3])


def test_pickle_round_trip(three_blobs):
    X, _ = three_blobs
    f = FuzzyCMeans(3, covariance="gk", random_state=0).fit(X)
    g = pickle.loads(pickle.dumps(f))
    np.testing.assert_array_equal(g.cluster_centers_, f.cluster_centers_)
    np.testing.assert_array_equal(g.predict_memberships(X), f.predict_memberships(X))

    mb = MiniBatchFuzzyCMeans(3, batch_size=100, random_state=0)
    for s in range(0, 300, 100):
        mb.partial_fit(X[s:s + 100])
    mb2 = pickle.loads(pickle.dumps(mb))
    # the restored model continues exactly where the original would have
    mb.partial_fit(X[300:400])
    mb2.partial_fit(X[300:400])
    np.testing.assert_array_equal(mb.cluster_centers_, mb2.cluster_centers_)
    np.testing.assert_array_equal(mb.cluster_weights_, mb2.cluster_weights_)
    assert mb2.n_steps_ == mb.n_steps_


# ---------------------------------------------------------------------------------------------
# mini-batch
# ---------------------------------------------------------------------------------------------


def test_partial_fit_reaches_batch_partition(separated_blobs):
    X, y = separated_blobs
    batch = FuzzyCMeans(4, random_state=0).fit(X)
    mb = MiniBatchFuzzyCMeans(4, batch_size=256, random_state=0)
    for s in range(0, len(X), 256):
        mb.partial_fit(X[s:s + 256])
    assert adjusted_rand_score(batch.labels_, mb.predict(X)) >= 0.95
    assert adjusted_rand_score(y, mb.predict(X)) >= 0.95
    assert mb.n_samples_seen_ == len(X)
    # the first batch (init_size defaults to batch_size) initialises, every later one is a step
    assert mb.n_steps_ == len(range(0, len(X), 256))


def test_minibatch_fit_matches_batch(separated_blobs):
    X, y = separated_blobs
    mb = MiniBatchFuzzyCMeans(4, batch_size=512, random_state=1).fit(X)
    assert adjusted_rand_score(y, mb.predict(X)) >= 0.95
    assert mb.n_iter_ >= 1


def test_partial_fit_buffers_until_init_size(three_blobs):
    X, _ = three_blobs
    mb = MiniBatchFuzzyCMeans(3, init_size=150, random_state=0)
    mb.partial_fit(X[:100])
    with pytest.raises(NotFittedError, match="100 of 150"):
        mb.predict(X)
    mb.partial_fit(X[100:160])
    assert mb.cluster_centers_.shape == (3, 4)
    assert mb.n_steps_ == 1
    with pytest.raises(ValueError, match="4 features"):
        mb.partial_fit(X[:10, :3])
    mb.partial_fit(X[160:170])
    assert mb.n_steps_ == 2 and mb.n_samples_seen_ == 170


def test_decay_follows_a_drifting_scan():
    rng = np.random.default_rng(5)
    start = np.array([[0.0, 0.0], [10.0, 0.0]])
    shift = np.array([0.0, 4.0])
    Xa, _ = _blobs(rng, start, 2000, 0.5)
    Xb, _ = _blobs(rng, start + shift, 2000, 0.5)
    errors = {}
    for decay in (1.0, 0.999):
        mb = MiniBatchFuzzyCMeans(2, batch_size=200, decay=decay, random_state=0)
        for X in (Xa, Xb):
            for s in range(0, len(X), 200):
                mb.partial_fit(X[s:s + 200])
        V = mb.cluster_centers_[np.argsort(mb.cluster_centers_[:, 0])]
        errors[decay] = np.abs(V - (start + shift)).max()
    assert errors[0.999] < 0.2  # forgets the first half of the scan
    assert errors[1.0] > 1.0  # the stationary running mean sits between the two halves


@pytest.mark.parametrize("covariance", ["euclidean", "gk"])
def test_minibatch_memberships(three_blobs, covariance):
    X, y = three_blobs
    mb = MiniBatchFuzzyCMeans(3, covariance=covariance, batch_size=100, random_state=0).fit(X)
    U = mb.predict_memberships(X)
    np.testing.assert_allclose(U.sum(axis=1), 1.0, rtol=1e-12)
    assert adjusted_rand_score(y, mb.predict(X)) > 0.8


# ---------------------------------------------------------------------------------------------
# Gustafson-Kessel
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def parallel_lines():
    rng = np.random.default_rng(0)
    n = 400
    a = np.c_[rng.normal(0, 3, n), rng.normal(0, 0.15, n)]
    b = np.c_[rng.normal(0, 3, n), rng.normal(1.5, 0.15, n)]
    return np.vstack([a, b]), np.repeat([0, 1], n)


def test_gk_recovers_elongated_clusters_that_euclidean_splits(parallel_lines):
    X, y = parallel_lines
    euclid = FuzzyCMeans(2, m=2.0, random_state=0).fit(X)
    gk = FuzzyCMeans(2, m=2.0, covariance="gk", random_state=0).fit(X)
    assert adjusted_rand_score(y, euclid.labels_) < 0.1  # left / right split
    assert adjusted_rand_score(y, gk.labels_) > 0.95
    # long axes of the GK covariances along x, and norms of determinant 1
    for F in gk.covariances_:
        lam, vec = np.linalg.eigh(F)
        assert abs(vec[0, -1]) > 0.99
    np.testing.assert_allclose(np.linalg.det(gk.norms_), 1.0, rtol=1e-8)
    mb = MiniBatchFuzzyCMeans(2, m=2.0, covariance="gk", batch_size=200, random_state=0).fit(X)
    assert adjusted_rand_score(y, mb.predict(X)) > 0.95


def test_gk_finite_on_degenerate_data():
    rng = np.random.default_rng(1)
    # cluster 0 lies in a plane (z == 0 exactly), cluster 1 on a line, cluster 2 is one point
    a = np.c_[rng.normal(0, 1, (300, 2)), np.zeros(300)]
    b = np.c_[np.linspace(5, 9, 300), np.full(300, 5.0), np.full(300, 5.0)]
    c = np.tile([[-6.0, 6.0, -6.0]], (100, 1))
    X = np.vstack([a, b, c])
    for gamma in (0.0, 0.01):
        f = FuzzyCMeans(3, m=1.5, covariance="gk", gk_gamma=gamma, gk_max_condition=1e8,
                        random_state=0).fit(X)
        assert np.all(np.isfinite(f.cluster_centers_))
        assert np.all(np.isfinite(f.memberships_))
        assert np.all(np.isfinite(f.norms_))
        np.testing.assert_allclose(f.memberships_.sum(axis=1), 1.0, rtol=1e-12)
        assert np.all(np.linalg.cond(f.covariances_) <= 1e8 * (1 + 1e-6))
        truth = np.repeat([0, 1, 2], [300, 300, 100])
        assert adjusted_rand_score(truth, f.labels_) > 0.95
    # all points identical: zero data covariance still gives finite norms
    same = np.ones((50, 3))
    g = FuzzyCMeans(2, covariance="gk", random_state=0).fit(same)
    assert np.all(np.isfinite(g.norms_)) and np.all(np.isfinite(g.memberships_))


def test_gk_norm_matrices_regularisation():
    F = np.array([np.diag([1e6, 1.0, 0.0])])
    A, Fr = gk_norm_matrices(F, scale0=1.0, gamma=0.0, max_condition=1e4)
    lam = np.linalg.eigvalsh(Fr[0])
    assert lam[-1] / lam[0] == pytest.approx(1e4)
    assert np.linalg.det(A[0]) == pytest.approx(1.0)
    A2, Fr2 = gk_norm_matrices(F, scale0=2.0, gamma=0.5, max_condition=1e15)
    np.testing.assert_allclose(np.diag(Fr2[0]), [0.5e6 + 1.0, 1.5, 1.0])
