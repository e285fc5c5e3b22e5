"""streamclust.cluster.merge: clusters that split one composition by noise are merged, a phase of
another composition is kept; and the spatial membership step (streamclust.cluster.spatial_pool)."""

from __future__ import annotations

import numpy as np
import pytest

from streamclust.cluster.merge import line_count_map, merge_columns, merge_same_composition, neighbour_labels
from streamclust.flags.stats import LINES_KEV
from streamclust.cluster.spatial_pool import spatial_memberships

NY = NX = 48
N_LINES = 12  # Fe + Co K-alpha counts a position: the phantom's film has about 11 at 36 counts a spectrum


def _scene(seed: int, fe_phase: float, n_noise: int = 4, fe_matrix: float = 1 / 3):
    """Fe / Co line counts of a matrix labelled at random among ``n_noise`` clusters (noise splits
    it position by position) and a disc of a second phase whose Fe share of the lines is ``fe_phase``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:NY, :NX]
    disc = ((yy - 24) ** 2 + (xx - 20) ** 2 < 100).ravel()
    fe = rng.binomial(N_LINES, np.where(disc, fe_phase, fe_matrix))
    counts = np.stack([fe, N_LINES - fe], axis=1)
    labels = np.where(disc, n_noise, rng.integers(0, n_noise, NY * NX))
    return counts, labels, disc


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_clusters_merge_and_the_phase_stays(seed):
    counts, labels, _ = _scene(seed, fe_phase=0.6)
    rep = merge_same_composition(counts, np.arange(NY * NX), labels, (NY, NX), 5)
    assert np.unique(rep[:4]).size == 1, rep          # the matrix: one composition
    assert rep[4] == 4 and rep[0] != 4, rep           # the phase: its own


def test_a_phase_of_the_same_composition_is_merged():
    # a region that differs only in thickness has the matrix's line shares: one composition
    counts, labels, disc = _scene(0, fe_phase=1 / 3)
    counts[disc] *= 2
    rep = merge_same_composition(counts, np.arange(NY * NX), labels, (NY, NX), 5)
    assert np.unique(rep).size == 1, rep


def test_a_difference_below_the_minimum_effect_is_merged_above_it_kept():
    counts, labels, _ = _scene(0, fe_phase=1 / 3 + 0.03)     # 3 points of the line shares
    assert np.unique(merge_same_composition(counts, np.arange(NY * NX), labels, (NY, NX), 5)).size == 1
    counts, labels, _ = _scene(0, fe_phase=1 / 3 + 0.15)
    assert np.unique(merge_same_composition(counts, np.arange(NY * NX), labels, (NY, NX), 5)).size == 2


def test_off_and_untestable_clusters_are_kept():
    counts, labels, _ = _scene(0, fe_phase=0.6)
    rep = merge_same_composition(counts, np.arange(NY * NX), labels, (NY, NX), 5, min_effect=0)
    assert rep.tolist() == [0, 1, 2, 3, 4]
    # a cluster of scattered single positions has no neighbour-labelled positions: no evidence,
    # not merged (a small inclusion must not vanish into the matrix for lack of it)
    lab = labels.copy()
    lab[::97] = 5
    rep = merge_same_composition(counts, np.arange(NY * NX), lab, (NY, NX), 6)
    assert rep[5] == 5 and rep[4] == 4 and np.unique(rep[:4]).size == 1, rep


def test_partial_scan_and_shape_checks():
    counts, labels, _ = _scene(1, fe_phase=0.6)
    done = np.arange(NY * NX // 2 + 5 * NX)              # the scan so far: the disc is crossed
    rep = merge_same_composition(counts[done], done, labels[done], (NY, NX), 5)
    assert np.unique(rep[:4]).size == 1 and rep[4] == 4, rep
    with pytest.raises(ValueError, match="must agree"):
        merge_same_composition(counts[:10], np.arange(11), labels[:11], (NY, NX), 5)


def test_line_count_map_counts_the_windows_of_the_eds_block():
    energies = np.arange(0.2, 10.0, 0.02)
    W = line_count_map(3, energies, ("Fe", "Co"))
    x = np.zeros((2, 3 + energies.size), np.float32)
    x[0, 3 + np.argmin(np.abs(energies - LINES_KEV["Fe"]))] = 5      # 5 counts on the Fe line
    x[1, 3 + np.argmin(np.abs(energies - LINES_KEV["Co"]))] = 7
    x[:, :3] = 100                                                  # CBED features do not count
    np.testing.assert_array_equal(x @ W, [[5, 0], [0, 7]])
    assert line_count_map(3, np.arange(0.2, 5.0, 0.02), ("Fe", "Co")) is None   # lines outside the window


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
    # a position with no neighbour in the pool has no spatial information: it keeps its own
    alone = spatial_memberships(u, np.arange(n), np.zeros(n, bool), (NY, NX))
    np.testing.assert_allclose(alone, u, rtol=5 * np.finfo(np.float32).eps)
