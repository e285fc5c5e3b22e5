"""streamclust.cluster_merge: clusters split by noise are merged, a phase region is kept."""

from __future__ import annotations

import numpy as np
import pytest

from streamclust.cluster_merge import merge_columns, merge_indistinct, neighbour_labels
from streamclust.spatial_pool import spatial_memberships

NY = NX = 48


def _scene(seed: int, contrast: float, n_noise: int = 4):
    """A matrix labelled at random among ``n_noise`` clusters (noise splits it position by
    position) and a disc of a second phase ``contrast`` standard deviations away along one axis."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:NY, :NX]
    disc = ((yy - 24) ** 2 + (xx - 20) ** 2 < 100).ravel()
    z = rng.normal(0.0, 1.0, (NY * NX, 4)).astype(np.float32)
    z[disc, 0] += contrast
    labels = np.where(disc, n_noise, rng.integers(0, n_noise, NY * NX))
    return z, labels, disc


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_clusters_merge_and_the_phase_stays(seed):
    z, labels, _ = _scene(seed, contrast=4.0)
    rep = merge_indistinct(z, np.arange(NY * NX), labels, (NY, NX), 5)
    assert np.unique(rep[:4]).size == 1, rep          # the matrix: one region
    assert rep[4] == 4 and rep[0] != 4, rep           # the phase: its own


def test_a_phase_below_the_separation_is_merged_too():
    # 1 standard deviation apart: a position's own data assigns it with 31 % error, below the
    # rule's 16 % (d = 2): shown as one region with the matrix
    z, labels, _ = _scene(0, contrast=1.0)
    rep = merge_indistinct(z, np.arange(NY * NX), labels, (NY, NX), 5)
    assert np.unique(rep).size == 1, rep


def test_off_and_unmeasurable_clusters_are_kept():
    z, labels, _ = _scene(0, contrast=4.0)
    assert merge_indistinct(z, np.arange(NY * NX), labels, (NY, NX), 5, min_separation=0).tolist() == [0, 1, 2, 3, 4]
    # a cluster of scattered single positions has no neighbour-labelled positions: no evidence,
    # not merged (a small inclusion must not vanish into the matrix for lack of it)
    lab = labels.copy()
    lab[::97] = 5
    rep = merge_indistinct(z, np.arange(NY * NX), lab, (NY, NX), 6)
    assert rep[5] == 5 and rep[4] == 4 and np.unique(rep[:4]).size == 1, rep


def test_partial_scan_and_shape_checks():
    z, labels, disc = _scene(1, contrast=4.0)
    done = np.arange(NY * NX // 2 + 5 * NX)              # the scan so far: the disc is crossed
    rep = merge_indistinct(z[done], done, labels[done], (NY, NX), 5)
    assert np.unique(rep[:4]).size == 1 and rep[4] == 4, rep
    with pytest.raises(ValueError, match="must agree"):
        merge_indistinct(z[:10], np.arange(11), labels[:11], (NY, NX), 5)


def test_neighbour_labels_take_the_majority_of_four():
    grid = np.array([[0, 0, 0], [0, 1, 0], [1, 1, 1]])
    nb = neighbour_labels(grid)
    assert nb[1, 1] == 0            # 3 of its 4 neighbours are 0 (itself 1: not counted)
    assert nb[2, 1] == 1            # at the edge: all 3 of its neighbours are 1
    assert nb[0, 0] == -1           # a corner has 2 neighbours: never 3 votes
    assert neighbour_labels(np.full((3, 3), -1)).max() == -1


def test_merge_columns_keeps_row_sums():
    rng = np.random.default_rng(0)
    u = rng.dirichlet(np.ones(5), 50).astype(np.float32)
    out = merge_columns(u, np.array([0, 0, 2, 0, 4]))
    np.testing.assert_allclose(out.sum(axis=1), u.sum(axis=1), rtol=5 * np.finfo(np.float32).eps)
    np.testing.assert_array_equal(out[:, [1, 3]], 0.0)
    np.testing.assert_allclose(out[:, 0], u[:, [0, 1, 3]].sum(axis=1), rtol=5 * np.finfo(np.float32).eps)
    assert merge_columns(u, None) is u


def test_spatial_step_outvotes_ambiguous_noise_and_keeps_confident_positions():
    # a 2-cluster map: left half 0, right half 1; every 7th position's own data is ambiguous and
    # leans the wrong way (0.45 / 0.55), and every 11th is confidently the other cluster (0.1 / 0.9)
    n = NY * NX
    xx = np.arange(n) % NX
    truth = (xx >= NX // 2).astype(int)
    u = np.where((xx < NX // 2)[:, None], [0.8, 0.2], [0.2, 0.8]).astype(np.float32)
    ambiguous = np.arange(n) % 7 == 3
    confident = (np.arange(n) % 11 == 5) & ~ambiguous
    u[ambiguous] = np.where(truth[ambiguous, None] == 0, [0.45, 0.55], [0.55, 0.45])
    u[confident] = np.where(truth[confident, None] == 0, [0.1, 0.9], [0.9, 0.1])
    out = spatial_memberships(u, np.arange(n), np.ones(n, bool), (NY, NX))
    inner = (xx > 1) & (xx < NX // 2 - 2)     # away from the boundary, where neighbourhoods are split
    lab = np.argmax(out, axis=1)
    assert (lab[ambiguous & inner] == truth[ambiguous & inner]).all()     # outvoted by the neighbours
    assert (lab[confident & inner] != truth[confident & inner]).all()     # its own data wins: no blur
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=5 * np.finfo(np.float32).eps)
    # positions outside the pool are not neighbours: a pool of nothing leaves every row its own
    alone = spatial_memberships(u, np.arange(n), np.zeros(n, bool), (NY, NX))
    np.testing.assert_allclose(alone, u, rtol=5 * np.finfo(np.float32).eps)
