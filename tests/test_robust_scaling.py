"""Streaming robust scaling: histogram kernels vs twins, quantiles vs numpy.percentile, merging."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from sklearn.preprocessing import RobustScaler

from streamclust.features.histogram_kernels import (
    histogram_update,
    histogram_update_numpy,
    log_edges,
    new_state,
    quantiles,
    quantiles_numpy,
)
from streamclust.features.robust_scaling import FeatureMoments, StreamingRobustScaler


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(2024)


def _mixed_data(rng: np.random.Generator, n: int = 400, f: int = 150) -> np.ndarray:
    """Integer counts of very different sizes, some non-integer columns, some huge values."""
    lam = rng.gamma(0.7, 60.0, size=f)
    X = rng.poisson(lam, size=(n, f)).astype(np.float32)
    X[:, :20] *= 50  # into the log bins
    X[:, 20:40] *= np.float32(64 / 57)  # live-fraction rescaled: not integers
    X[:, 40:45] = 0  # zero IQR
    X[::7, 45:50] = 3e6  # beyond max_value: the overflow bin
    return X


def test_histogram_kernels_match_numpy_twins(rng):
    X = _mixed_data(rng)
    n_log, ratio = 1389, 1.005
    inv = 1.0 / math.log(ratio)
    a = new_state(X.shape[1], n_log)
    b = new_state(X.shape[1], n_log)
    ma, m2a, mb, m2b = (np.empty(X.shape[1]) for _ in range(4))
    for chunk in (X[:150], X[150:]):
        histogram_update(chunk, *a, inv, n_log, ma, m2a)
        histogram_update_numpy(chunk, *b, inv, n_log, mb, m2b)
        np.testing.assert_allclose(ma, mb, rtol=1e-12)
        np.testing.assert_allclose(m2a, m2b, rtol=1e-9)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    qs = np.array([75.0, 10.0, 50.0, 90.0, 25.0])  # any order
    edges = log_edges(n_log, ratio)
    q = np.empty((qs.size, X.shape[1]))
    quantiles(*a, X.shape[0], qs, edges, q)
    np.testing.assert_allclose(q, quantiles_numpy(*b, X.shape[0], qs, edges), rtol=1e-12, atol=1e-9)


def test_quantiles_exact_on_integer_counts(rng):
    X = rng.poisson(rng.gamma(1.0, 40.0, size=300), size=(333, 300)).astype(np.float32)
    X[:, :30] = 0
    X[:, 30:60] = (rng.random((333, 30)) < 0.1).astype(np.float32)  # sparse EDS-like channels
    for qr in [(25.0, 75.0), (10.0, 90.0), (0.0, 100.0)]:
        sc = StreamingRobustScaler(quantile_range=qr).partial_fit(X)
        lo, med, hi = np.percentile(X.astype(np.float64), [qr[0], 50.0, qr[1]], axis=0)
        np.testing.assert_array_equal(sc.median_, med)
        np.testing.assert_allclose(sc.iqr_, hi - lo, rtol=0, atol=1e-12)
    assert np.all(sc.scale_[:30] == 1.0)


def test_quantiles_within_bin_resolution_elsewhere(rng):
    X = _mixed_data(rng)
    sc = StreamingRobustScaler().partial_fit(X)
    q25, med, q75 = np.percentile(X.astype(np.float64), [25, 50, 75], axis=0)
    # log bins (values > 1023): about 0.5 % relative
    big = slice(0, 20)
    np.testing.assert_allclose(sc.median_[big], med[big], rtol=0.006)
    # non-integer values in the integer range: within one bin width (1 count)
    nonint = slice(20, 40)
    assert np.abs(sc.median_[nonint] - med[nonint]).max() <= 1.0
    assert np.abs(sc.iqr_[nonint] - (q75 - q25)[nonint]).max() <= 2.0
    # the overflow bin never reports past the observed maximum, the others exact
    assert np.all(sc.median_[45:50] <= X[:, 45:50].max(axis=0))
    np.testing.assert_array_equal(sc.median_[50:], med[50:])
    assert np.all(sc.iqr_[40:45] == 0) and np.all(sc.scale_[40:45] == 1.0)


def test_order_independent_and_mergeable(rng):
    X = _mixed_data(rng)
    whole = StreamingRobustScaler().partial_fit(X)
    perm = rng.permutation(X.shape[0])
    shuffled = StreamingRobustScaler()
    for start in range(0, X.shape[0], 37):
        shuffled.partial_fit(X[perm[start : start + 37]])
    np.testing.assert_array_equal(shuffled.median_, whole.median_)
    np.testing.assert_array_equal(shuffled.iqr_, whole.iqr_)
    np.testing.assert_allclose(shuffled.var_, whole.var_, rtol=1e-9)

    a = StreamingRobustScaler().partial_fit(X[:123])
    b = StreamingRobustScaler().partial_fit(X[123:])
    a += b
    assert a.n_samples_seen_ == X.shape[0]
    np.testing.assert_array_equal(a.median_, whole.median_)
    np.testing.assert_array_equal(a.scale_, whole.scale_)
    np.testing.assert_allclose(a.mean_, X.mean(axis=0, dtype=np.float64), rtol=1e-12)
    np.testing.assert_allclose(a.var_, X.var(axis=0, ddof=1, dtype=np.float64), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(a.max_, X.max(axis=0))
    # merging into an unfitted scaler copies; mismatched features are refused
    c = StreamingRobustScaler().merge(whole)
    np.testing.assert_array_equal(c.median_, whole.median_)
    with pytest.raises(ValueError, match="features"):
        c.merge(StreamingRobustScaler().partial_fit(X[:, :10]))
    with pytest.raises(ValueError, match="bins"):
        StreamingRobustScaler(max_value=2**16).partial_fit(X).merge(whole)


def test_transform_matches_sklearn_robust_scaler(rng):
    X = rng.poisson(rng.gamma(1.0, 20.0, size=64), size=(500, 64)).astype(np.float32)
    X[:, :8] = (rng.random((500, 8)) < 0.05) * 2.0
    sc = StreamingRobustScaler().partial_fit(X[:250]).partial_fit(X[250:])
    ref = RobustScaler().fit(X.astype(np.float64))
    np.testing.assert_array_equal(sc.scale_, ref.scale_)
    np.testing.assert_array_equal(sc.center_, ref.center_)
    np.testing.assert_allclose(sc.transform(X), ref.transform(X.astype(np.float64)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sc.inverse_transform(sc.transform(X)), X, rtol=1e-5, atol=1e-4)
    no_centre = StreamingRobustScaler(with_centering=False).partial_fit(X)
    np.testing.assert_allclose(no_centre.transform(X), X / ref.scale_, rtol=1e-6)


def test_zero_iqr_std_floor(rng):
    X = np.zeros((400, 3), dtype=np.float32)
    X[::20, 0] = 1.0  # sparse: IQR 0, std > 0
    X[:, 2] = rng.poisson(30.0, 400)
    sc = StreamingRobustScaler(zero_iqr="std").partial_fit(X)
    std = X.astype(np.float64).std(axis=0, ddof=1)
    assert sc.iqr_[0] == 0.0
    assert sc.scale_[0] == pytest.approx(1.3489795003921634 * std[0])
    assert sc.scale_[1] == 1.0  # constant: falls back to 1
    assert sc.scale_[2] == sc.iqr_[2] > 0
    with pytest.raises(ValueError, match="zero_iqr"):
        StreamingRobustScaler(zero_iqr="bogus").partial_fit(X)


def test_feature_moments_merge(rng):
    X = rng.normal(1e4, 3.0, size=(1000, 5))
    m = FeatureMoments()
    for start in range(0, 1000, 97):
        m.update(X[start : start + 97])
    np.testing.assert_allclose(m.mean_, X.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(m.var_, X.var(axis=0, ddof=1), rtol=1e-9)
    a, b = FeatureMoments().update(X[:10]), FeatureMoments().update(X[10:])
    a += b
    np.testing.assert_allclose(a.var_, m.var_, rtol=1e-9)
    a += FeatureMoments()  # empty is neutral
    assert a.n_ == 1000


def test_bad_input_and_pickling(rng):
    X = rng.poisson(4.0, size=(50, 6)).astype(np.float32)
    sc = StreamingRobustScaler()
    with pytest.raises(AttributeError):
        sc.transform(X)
    sc.partial_fit(X)
    with pytest.raises(ValueError, match="6"):
        sc.partial_fit(X[:, :5])
    bad = X.copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match="row 7, feature 3"):
        sc.partial_fit(bad)
    with pytest.raises(ValueError, match="2-D"):
        sc.partial_fit(X[0])
    assert sc.n_samples_seen_ == 50  # the refused batches changed nothing
    neg = X.copy()
    neg[0, 0] = -2.0
    sc.partial_fit(neg)
    assert sc.n_negative_ == 1 and sc.min_[0] == -2.0
    sc2 = pickle.loads(pickle.dumps(sc))
    np.testing.assert_array_equal(sc2.median_, sc.median_)
    sc2.partial_fit(X)
    assert sc2.n_samples_seen_ == 150 and sc.n_samples_seen_ == 100
    # fit resets
    assert StreamingRobustScaler().partial_fit(X).fit(X[:10]).n_samples_seen_ == 10


def test_sklearn_estimator_contract(rng):
    from sklearn.base import clone

    X = rng.poisson(3.0, size=(30, 4)).astype(np.float32)
    sc = StreamingRobustScaler(zero_iqr="std", quantile_range=(10.0, 90.0))
    c = clone(sc)
    assert c.get_params() == sc.get_params() and not hasattr(c, "n_features_in_")
    other = StreamingRobustScaler(zero_iqr="std", quantile_range=(10.0, 90.0)).fit(X)
    np.testing.assert_allclose(sc.fit_transform(X), other.transform(X))


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(
    X=arrays(np.int32, st.tuples(st.integers(1, 40), st.integers(1, 4)), elements=st.integers(0, 1023)),
    split=st.integers(0, 40),
    q=st.tuples(st.floats(0, 100), st.floats(0, 100)).map(sorted),
)
def test_property_exact_on_any_integer_counts(X, split, q):
    Xf = X.astype(np.float32)
    sc = StreamingRobustScaler(quantile_range=tuple(q))
    sc.partial_fit(Xf[:split]).partial_fit(Xf[split:])
    lo, med, hi = np.percentile(X.astype(np.float64), [q[0], 50.0, q[1]], axis=0)
    np.testing.assert_allclose(sc.median_, med, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(sc.iqr_, hi - lo, rtol=1e-9, atol=1e-9)
