"""Second-level clustering of the host phase (streamclust.cluster.host_refine) and its use in the engine."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.preprocessing import RobustScaler

from streamclust.cluster.host_refine import HostRefinement, compose_memberships, match_by_overlap


def _data(seed=0, n=800, f=60, nc=40):
    rng = np.random.default_rng(seed)
    x = rng.poisson(30.0, (n, f)).astype(np.float32)
    x[: n // 10, :4] += 15
    x[: n // 10, nc:nc + 3] += 10
    return x


def test_projection_is_robust_scaling_balance_and_pca():
    x = _data()
    nc = 40
    ref = HostRefinement(nc, 3, min_components=4, random_state=0).fit_space(x)
    s = RobustScaler().fit_transform(x.astype(np.float64))
    f = np.sqrt(s[:, :nc].var(axis=0).sum() / s[:, nc:].var(axis=0).sum())
    s[:, nc:] *= f
    assert ref.eds_factor_ == pytest.approx(f, rel=1e-5)
    pca = PCA(ref.n_components_, svd_solver="full").fit(s)
    z_ref = pca.transform(s)
    z = ref.project(x)
    # same subspace and scores up to the sign of each component
    for i in range(ref.n_components_):
        a, b = z[:, i], z_ref[:, i]
        sign = np.sign(np.dot(a, b))
        np.testing.assert_allclose(a * sign, b, rtol=1e-3, atol=1e-3 * np.abs(b).max())


def test_invariant_to_positive_feature_scaling():
    # the engine stores x * c_warm: without zero-IQR features the level-2 scores are the same
    x = _data(1)
    c = np.random.default_rng(2).uniform(0.1, 10.0, x.shape[1]).astype(np.float32)
    a = HostRefinement(40, 3, random_state=0).fit_space(x)
    b = HostRefinement(40, 3, random_state=0).fit_space(x * c)
    za, zb = a.project(x), b.project(x * c)
    assert a.n_components_ == b.n_components_
    for i in range(a.n_components_):
        sign = np.sign(np.dot(za[:, i], zb[:, i]))
        np.testing.assert_allclose(za[:, i], sign * zb[:, i], atol=1e-2 * np.abs(za[:, i]).max())


def test_one_block_is_not_balanced_and_few_positions_are_refused():
    x = _data()
    assert HostRefinement(x.shape[1], 3, random_state=0).fit_space(x).eds_factor_ == 1.0
    with pytest.raises(ValueError, match="too few"):
        HostRefinement(40, 6).fit_space(x[:10])
    with pytest.raises(ValueError, match="n_cbed"):
        HostRefinement(100, 3).fit_space(x)


def test_min_components_floor_and_cap():
    x = _data()
    r = HostRefinement(40, 3, min_components=7, max_components=9, random_state=0).fit_space(x)
    assert 7 <= r.n_components_ <= 9


def test_composed_memberships_are_a_partition():
    rng = np.random.default_rng(0)
    u1 = rng.dirichlet(np.ones(4), 50).astype(np.float32)
    u2 = rng.dirichlet(np.ones(3), 50).astype(np.float32)
    u = compose_memberships(u1, u2, 2, 3)
    assert u.shape == (50, 7)
    np.testing.assert_allclose(u.sum(axis=1), 1.0, atol=1e-5)
    assert (u[:, 2] == 0).all()
    np.testing.assert_allclose(u[:, 4:].sum(axis=1), u1[:, 2], atol=1e-6)
    np.testing.assert_array_equal(compose_memberships(u1, None, None, 3)[:, :4], u1)


def test_match_by_overlap_recovers_a_permutation():
    rng = np.random.default_rng(3)
    old = rng.integers(0, 5, 300)
    perm = rng.permutation(5)
    new = perm[old]  # new cluster perm[j] is old cluster j
    col = match_by_overlap(old, new, 5)
    np.testing.assert_array_equal(col, perm)


def test_host_group_joins_a_layer_split_by_noise_with_crisp_memberships():
    """Fuzzy overlap misses two clusters that alternate position by position with crisp
    memberships (one film split by discrete X-ray counts); their spatial mixing does not, and a
    layer beside the film stays out."""
    from streamclust.cluster.host_refine import host_group
    from streamclust.cluster.spatial_pool import spatial_mixing

    rng = np.random.default_rng(1)
    ny, nx = 40, 40
    yy, _ = np.mgrid[:ny, :nx]
    lab = np.where(yy < 12, 2, np.where(rng.random((ny, nx)) < 0.55, 0, 1)).ravel()  # substrate 2
    u = np.eye(3)[lab] * 0.98 + 0.02 / 3
    assert host_group(u) == (0, (0,))  # crisp: no fuzzy overlap between the film's halves
    mixing = spatial_mixing(lab, (ny, nx), 3)
    assert host_group(u, mixing=mixing) == (0, (0, 1))
    assert host_group(u, mixing=mixing, min_mixing=0.99) == (0, (0,))
