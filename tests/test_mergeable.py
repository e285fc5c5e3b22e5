"""merge(state(A), state(B)) == state(A + B) for every partial state a Dask replay merges."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.linalg import subspace_angles

from streamclust.features.block_balance import BlockBalancer
from streamclust.engine.centres import ThresholdedCentres
from streamclust.decomposition.incremental_pca import StreamingPCA
from streamclust.distributed.mergeable import CentreSums, FCMSums, merge, merge_all, thresholded_weights
from streamclust.features.robust_scaling import FeatureMoments, StreamingRobustScaler
from streamclust.cluster.validity import ValidityAccumulator

N = 240
_settings = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


split_points = st.lists(st.integers(min_value=1, max_value=N - 1), min_size=1, max_size=4)


def _pieces(X, cuts):
    edges = [0, *sorted(set(cuts)), X.shape[0]]
    return [X[a:b] for a, b in zip(edges[:-1], edges[1:])]


@pytest.fixture(scope="module")
def blocks():
    """Count data met in raster order: a 'substrate' first, a 'film' later (non-stationary)."""
    rng = np.random.default_rng(3)
    cbed = rng.poisson(np.r_[np.full(N // 2, 40.0), np.full(N - N // 2, 90.0)][:, None] * np.linspace(0.2, 2, 12),
                       (N, 12)).astype(np.float32)
    eds = rng.poisson(np.r_[np.full(N // 2, 0.3), np.full(N - N // 2, 2.5)][:, None] * np.ones(5), (N, 5)).astype(np.float32)
    eds[:, 0] = 0  # a dead channel: zero IQR
    return cbed, eds


@given(cuts=split_points)
@_settings
def test_scaler_histograms_merge_exactly(blocks, cuts):
    X = blocks[0]
    whole = StreamingRobustScaler().partial_fit(X)
    parts = [StreamingRobustScaler().partial_fit(p) for p in _pieces(X, cuts)]
    merged = merge_all(parts)
    np.testing.assert_array_equal(merged._counts_, whole._counts_)
    np.testing.assert_array_equal(merged.center_, whole.center_)
    np.testing.assert_array_equal(merged.scale_, whole.scale_)
    np.testing.assert_allclose(merged.var_, whole.var_, rtol=1e-12)


@given(cuts=split_points)
@_settings
def test_block_balance_merges_exactly(blocks, cuts):
    cbed, eds = blocks
    whole = BlockBalancer().partial_fit({"cbed": cbed, "eds": eds})
    parts = [BlockBalancer().partial_fit({"cbed": c, "eds": e})
             for c, e in zip(_pieces(cbed, cuts), _pieces(eds, cuts))]
    merged = merge_all(parts)
    assert merged.weights_["eds"] == pytest.approx(whole.weights_["eds"], rel=1e-12)
    np.testing.assert_allclose(merged.multiplier_, whole.multiplier_, rtol=1e-12)
    np.testing.assert_array_equal(merged.center_, whole.center_)


@given(cuts=split_points)
@_settings
def test_exact_pca_merges_exactly(blocks, cuts):
    X = np.concatenate(blocks, axis=1).astype(np.float64)
    c = np.linspace(0.5, 2.0, X.shape[1])
    whole = StreamingPCA(max_components=6, method="exact").partial_fit(X * c, warmup_multiplier=c)
    parts = [StreamingPCA(max_components=6, method="exact").partial_fit(p * c, warmup_multiplier=c)
             for p in _pieces(X, cuts)]
    merged = merge_all(parts)
    assert merged.n_samples_seen_ == N
    np.testing.assert_allclose(merged.mean_, whole.mean_, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(merged.explained_variance_all_, whole.explained_variance_all_, rtol=1e-9)
    assert merged.n_components_ == whole.n_components_
    # signs are deterministic (largest entry positive): the components themselves agree
    k = whole.n_components_
    np.testing.assert_allclose(merged.components_[:k], whole.components_[:k], atol=1e-7)


def test_sketch_merge_approximation():
    """The documented approximation: rank-24 sketches of 120 features, 8 strong directions."""
    rng = np.random.default_rng(7)
    n, f, r = 2000, 120, 8
    basis = np.linalg.qr(rng.normal(size=(f, r)))[0]
    X = (rng.normal(size=(n, r)) * np.geomspace(20, 3, r)) @ basis.T + rng.normal(size=(n, f))
    X[n // 2:] += 4 * basis[:, 0]  # the mean moves half-way (raster scan)
    whole = StreamingPCA(max_components=r, method="sketch", sketch_rank=24).partial_fit(X)
    parts = [StreamingPCA(max_components=r, method="sketch", sketch_rank=24).partial_fit(p)
             for p in np.array_split(X, 4)]
    merged = merge_all(parts)
    exact = StreamingPCA(max_components=r, method="exact").partial_fit(X)
    for est in (merged, whole):
        angle = np.degrees(subspace_angles(est.components_all_[:r].T, exact.components_all_[:r].T).max())
        assert angle < 2.0
        np.testing.assert_allclose(est.explained_variance_all_[:r], exact.explained_variance_all_[:r], rtol=0.03)
    # the total variance (the denominator of the 1 % rule) stays exact
    assert merged.total_variance_ == pytest.approx(exact.total_variance_, rel=1e-7)


@given(cuts=split_points, m=st.sampled_from([1.2, 1.5, 2.0]))
@_settings
def test_fcm_pass_sums_merge_exactly(blocks, cuts, m):
    Z = np.concatenate(blocks, axis=1).astype(np.float64)[:, :4]
    V = Z[[0, N // 2, N - 1]] + 0.5
    whole = FCMSums.from_data(Z, V, m=m)
    merged = merge_all([FCMSums.from_data(p, V, m=m) for p in _pieces(Z, cuts)])
    np.testing.assert_allclose(merged.weights, whole.weights, rtol=1e-10)
    np.testing.assert_allclose(merged.first, whole.first, rtol=1e-9, atol=1e-9 * np.abs(whole.first).max())
    assert merged.objective == pytest.approx(whole.objective, rel=1e-10)
    assert merged.n == N
    np.testing.assert_allclose(merged.step()[0], whole.step()[0], rtol=1e-10)


def test_fcm_step_is_a_batch_fcm_iteration():
    """Passes of merged sums converge where FuzzyCMeans does from the same centres."""
    from streamclust.cluster.fcm import FuzzyCMeans

    rng = np.random.default_rng(0)
    Z = np.vstack([rng.normal(0, 1, (150, 3)), rng.normal(6, 1, (150, 3))])
    V0 = Z[[0, 200]].copy()
    ref = FuzzyCMeans(2, init=V0, n_init=1, max_iter=5, tol=0, tol_objective=0).fit(Z)
    V = V0
    for _ in range(5):
        V, _ = merge(FCMSums.from_data(Z[:77], V, m=1.2), FCMSums.from_data(Z[77:], V, m=1.2)).step()
    np.testing.assert_allclose(V, ref.cluster_centers_, rtol=1e-10)


def test_fcm_sums_refuse_different_centres():
    Z = np.arange(12.0).reshape(6, 2)
    a = FCMSums.from_data(Z, Z[:2], m=1.2)
    b = FCMSums.from_data(Z, Z[:2] + 1, m=1.2)
    with pytest.raises(ValueError, match="same centres"):
        merge(a, b)


@given(cuts=split_points)
@_settings
def test_centre_sums_merge_and_match_thresholded_centres(cuts):
    rng = np.random.default_rng(11)
    n = N
    frames = rng.poisson(5.0, (n, 8, 8)).astype(np.uint16)
    spectra = rng.poisson(2.0, (n, 10)).astype(np.uint16)
    u = rng.dirichlet(np.ones(3) * 0.4, n)
    u[5] = np.nan  # a position without a membership counts nowhere
    whole = CentreSums.from_data(u, frames, spectra, cbed_shape=(4, 4))
    edges = [0, *sorted(set(cuts)), n]
    parts = [CentreSums.from_data(u[a:b], frames[a:b], spectra[a:b], cbed_shape=(4, 4))
             for a, b in zip(edges[:-1], edges[1:])]
    merged = merge_all(parts).centres()
    ref = ThresholdedCentres(3, (0.5, 0.75), n_positions=n, cbed_shape=(4, 4))
    ref.add(np.arange(n), frames, spectra)
    ref_c = ref.update(u)
    for got in (merged, whole.centres()):
        np.testing.assert_array_equal(got.count, ref_c.count)
        np.testing.assert_allclose(got.weight, ref_c.weight, rtol=1e-12)
        np.testing.assert_allclose(got.eds, ref_c.eds, rtol=1e-10)
        np.testing.assert_allclose(got.cbed, ref_c.cbed, rtol=1e-10)


def test_centre_sums_refuse_other_thresholds():
    u = np.array([[0.9, 0.1]])
    f = np.ones((1, 2, 2))
    s = np.ones((1, 3))
    with pytest.raises(ValueError, match="thresholds"):
        merge(CentreSums.from_data(u, f, s), CentreSums.from_data(u, f, s, thresholds=(0.6,)))


def test_thresholded_weights_rule():
    w = thresholded_weights(np.array([[0.8, 0.2], [0.6, 0.4]]), (0.5, 0.75))
    np.testing.assert_array_equal(w, [[0.8, 0.0, 0.8, 0.0], [0.6, 0.0, 0.0, 0.0]])


def test_validity_and_moments_merge():
    rng = np.random.default_rng(1)
    U = rng.dirichlet(np.ones(3), 50)
    D2 = rng.uniform(0.1, 4, (50, 3))
    whole = ValidityAccumulator(m=1.2)
    whole.update(U, D2)
    a, b = ValidityAccumulator(m=1.2), ValidityAccumulator(m=1.2)
    a.update(U[:20], D2[:20])
    b.update(U[20:], D2[20:])
    got = merge(a, b)
    assert got.partition_coefficient() == pytest.approx(whole.partition_coefficient(), rel=1e-12)
    assert got.objective == pytest.approx(whole.objective, rel=1e-12)
    assert a.n_samples == 20  # inputs untouched
    X = rng.normal(size=(50, 4))
    mom = merge(FeatureMoments().update(X[:7]), FeatureMoments().update(X[7:]))
    np.testing.assert_allclose(mom.var_, X.var(axis=0, ddof=1), rtol=1e-12)


def test_merge_leaves_inputs_alone_and_skips_empty(blocks):
    cbed = blocks[0]
    a = StreamingRobustScaler().partial_fit(cbed[:100])
    b = StreamingRobustScaler().partial_fit(cbed[100:])
    before = copy.deepcopy(a._counts_)
    out = merge(a, b)
    np.testing.assert_array_equal(a._counts_, before)
    assert out.n_samples_seen_ == N and a.n_samples_seen_ == 100
    assert merge(None, b).n_samples_seen_ == N - 100
    assert merge_all([None, a, None, b]).n_samples_seen_ == N
    assert merge_all([None, None]) is None
