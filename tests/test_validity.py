"""Validity indices: known values, incremental accumulation equals batch, choosing n_clusters."""

from __future__ import annotations

import numpy as np
import pytest

from streamclust.cluster import fcm_kernels as K
from streamclust.cluster.fcm import FuzzyCMeans
from streamclust.cluster.validity import (
    ValidityAccumulator,
    choose_n_clusters,
    min_centre_separation,
    partition_coefficient,
    partition_entropy,
    xie_beni,
    xie_beni_from_sums,
)


@pytest.fixture
def blobs4():
    rng = np.random.default_rng(4)
    centres = np.array([[0.0, 0.0, 0.0], [6, 0, 0], [0, 6, 0], [0, 0, 6]])
    X = np.vstack([rng.normal(c, 0.7, size=(120, 3)) for c in centres])
    return X[rng.permutation(len(X))]


def test_pc_pe_bounds_and_known_values():
    c = 4
    crisp = np.eye(c)[[0, 1, 2, 3, 1]]
    uniform = np.full((5, c), 1.0 / c)
    assert partition_coefficient(crisp) == 1.0
    assert partition_entropy(crisp) == 0.0
    assert partition_coefficient(uniform) == pytest.approx(1.0 / c)
    assert partition_entropy(uniform) == pytest.approx(np.log(c))
    rng = np.random.default_rng(0)
    U = rng.random((50, c))
    U /= U.sum(axis=1, keepdims=True)
    assert 1.0 / c < partition_coefficient(U) < 1.0
    assert 0.0 < partition_entropy(U) < np.log(c)


def test_weights_act_like_repetition():
    rng = np.random.default_rng(1)
    U = rng.random((20, 3))
    U /= U.sum(axis=1, keepdims=True)
    w = rng.integers(1, 4, size=20).astype(float)
    rep = np.repeat(U, w.astype(int), axis=0)
    assert partition_coefficient(U, w) == pytest.approx(partition_coefficient(rep))
    assert partition_entropy(U, w) == pytest.approx(partition_entropy(rep))


def test_xie_beni_matches_definition(blobs4):
    X = blobs4
    f = FuzzyCMeans(4, m=2.0, random_state=0).fit(X)
    V, U = f.cluster_centers_, f.memberships_
    d2 = ((X[:, None, :] - V[None]) ** 2).sum(axis=-1)
    sep = min(((V[i] - V[j]) ** 2).sum() for i in range(4) for j in range(4) if i != j)
    want = (U**2 * d2).sum() / (len(X) * sep)
    assert xie_beni(X, V, U, m=2.0) == pytest.approx(want, rel=1e-10)
    # without U the memberships come from the centres: the same as FCM's own at m = 2
    assert xie_beni(X, V, m=2.0) == pytest.approx(want, rel=1e-8)
    assert xie_beni_from_sums(f.objective_, len(X), V) == pytest.approx(want, rel=1e-8)


def test_coincident_centres_are_infinitely_bad():
    assert min_centre_separation([[1.0, 2.0], [1.0, 2.0]]) == 0.0
    assert xie_beni_from_sums(3.0, 10.0, [[1.0, 2.0], [1.0, 2.0]]) == np.inf
    assert min_centre_separation([[0.0]]) == np.inf


def test_accumulator_equals_batch_and_merges(blobs4):
    X = blobs4
    f = FuzzyCMeans(4, m=1.5, random_state=0).fit(X)
    U, D2 = K.predict_memberships(X, f.cluster_centers_, 1.5)
    full = ValidityAccumulator(m=1.5)
    full.update(U, D2)
    parts = [ValidityAccumulator(m=1.5) for _ in range(3)]
    for acc, sl in zip(parts, np.array_split(np.arange(len(X)), 3)):
        acc.update(U[sl], D2[sl])
    merged = parts[0]
    merged += parts[1]
    merged += parts[2]
    assert merged.n_samples == full.n_samples == len(X)
    assert merged.partition_coefficient() == pytest.approx(partition_coefficient(U))
    assert merged.partition_entropy() == pytest.approx(partition_entropy(U))
    assert merged.xie_beni(f.cluster_centers_) == pytest.approx(
        xie_beni(X, f.cluster_centers_, m=1.5), rel=1e-10)
    with pytest.raises(ValueError, match="merge"):
        merged += ValidityAccumulator(m=2.0)
    with pytest.raises(ValueError, match="no samples"):
        ValidityAccumulator().partition_coefficient()
    with pytest.raises(ValueError, match="shape"):
        full.update(U, D2[:, :2])


@pytest.mark.parametrize("criterion", ["xie_beni", "partition_coefficient", "partition_entropy"])
def test_choose_n_clusters_finds_four(blobs4, criterion):
    best, scores = choose_n_clusters(blobs4, range(2, 7), criterion=criterion, random_state=0)
    assert sorted(scores) == [2, 3, 4, 5, 6]
    if criterion == "xie_beni":
        assert best == 4
    else:
        # PC / PE favour few clusters on any data; still, 4 must beat its neighbours 3 and 5
        better = (lambda a, b: a > b) if criterion == "partition_coefficient" else (
            lambda a, b: a < b)
        assert better(scores[4], scores[3]) and better(scores[4], scores[5])


def test_choose_n_clusters_rejects_unknown_criterion(blobs4):
    with pytest.raises(ValueError, match="criterion"):
        choose_n_clusters(blobs4, [2, 3], criterion="silhouette")
