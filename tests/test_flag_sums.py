"""Second-phase flag distances from mergeable sums (streamclust.flags.sums) against the flagger's own
block_distance on the full features, the flagger's block_distances hook, and the engine's final
seed that the Dask replay reproduces (engine.final_seed)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamclust.engine.centres import ThresholdedCentres
from streamclust.engine.streaming import StreamingEngine, final_seed
from streamclust.flags.sums import (FLAG_EDS_REBIN, DistancePlan, FoldSums, ProjectionMoments, eds_window, flag_features,
                                   pair_distances, scan_fold)
from streamclust.flags.flagger import SecondPhaseFlagger, block_distance
from streamclust.distributed.mergeable import merge_all


def _blocks(n=900, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    cbed = rng.normal(10.0, 1.0, (n, 40)).astype(np.float32)  # an offset: projections far from 0
    eds = rng.poisson(3.0, (n, 12)).astype(np.float32)
    cbed[labels == 1, :3] += 1.5
    eds[labels == 1, 4] += 2.0
    cbed[labels == 2, 5] += 0.3
    member = labels[:, None] == np.arange(4)
    return member, cbed, eds


def _chunks(n, cuts):
    edges = [0, *sorted(set(int(c) for c in cuts if 0 < c < n)), n]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


PAIRS = [(1, 0), (2, 0), (3, 1), (0, 2)]


def _distributed(member, fold, cbed, eds, cuts, shape_only=False):
    parts = _chunks(member.shape[0], cuts)
    sums = merge_all([FoldSums.from_data(member[s], fold[s], cbed[s], eds[s]) for s in parts])
    plan = DistancePlan.fit(sums, PAIRS, eds_shape_only=shape_only)
    mc = merge_all([plan.moments(member[s], fold[s], cbed[s], eds[s])[0] for s in parts])
    me = merge_all([plan.moments(member[s], fold[s], cbed[s], eds[s])[1] for s in parts])
    return pair_distances(plan, mc, me)


def _float32_distance_error(x, in_k, in_j, fold):
    """Worst-case difference between two float32 evaluations of block_distance's arithmetic.

    block_distance sums the set means in float32 (gemv over n_set rows) where the merged sums use
    float64, and both project in float32 (d terms, in different orders). A float32 sum of n terms is
    off by at most n * eps32 * sum|terms|, so, per fold half:

    * a mean is off by e_m <= n_set * eps32 * mean|x| per feature; the unit direction turns by
      delta <= 2 * |e_m| / |diff|, which moves the other half's gap by delta * |diff_other|;
    * a projection is off by e_p <= d * eps32 * max_i |x_i| (Cauchy-Schwarz, unit direction),
      the gap by 2 e_p and the pooled sd by about e_p;

    all divided by the pooled sd. No machine's observed error enters.
    """
    eps = float(np.finfo(np.float32).eps)
    x = np.asarray(x, np.float64)
    n, d = x.shape
    row_norm = float(np.linalg.norm(x, axis=1).max())
    halves = []
    for a in (fold, ~fold):
        sets = [in_k & a, in_j & a, in_k & ~a, in_j & ~a]
        if min(int(s.sum()) for s in sets) < 2:
            return 1e-12  # block_distance returns 0.0 exactly on both sides
        means = [x[s].mean(axis=0) for s in sets]
        e_m = [np.linalg.norm(s.sum() * eps * np.abs(x[s]).mean(axis=0)) for s in sets[:2]]
        diff, other = means[0] - means[1], means[2] - means[3]
        delta = 2 * (e_m[0] + e_m[1]) / max(float(np.linalg.norm(diff)), 1e-300)
        u = diff / np.linalg.norm(diff)
        pk, pj = x[sets[2]] @ u, x[sets[3]] @ u
        pooled = np.sqrt(0.5 * (pk.var() + pj.var()))
        e_p = d * eps * row_norm
        dist = abs(pk.mean() - pj.mean()) / pooled
        halves.append((delta * np.linalg.norm(other) + 2 * e_p + dist * e_p) / pooled)
    return float(np.mean(halves)) + 1e-12


_SHAPE_ONLY = "shape_only" in inspect.signature(block_distance).parameters


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 899), min_size=0, max_size=4),
       st.booleans() if _SHAPE_ONLY else st.just(False))
def test_merged_sums_give_block_distance(cuts, shape_only):
    member, cbed, eds = _blocks()
    fold = scan_fold(np.arange(member.shape[0]), 30)
    got = _distributed(member, fold, cbed, eds, cuts, shape_only)
    kw = {"shape_only": True} if shape_only else {}
    for k, j in PAIRS:
        want = (block_distance(cbed, member[:, k], member[:, j], fold),
                block_distance(eds, member[:, k], member[:, j], fold, **kw))
        tol = (_float32_distance_error(cbed, member[:, k], member[:, j], fold),
               _float32_distance_error(eds, member[:, k], member[:, j], fold))
        np.testing.assert_array_less(np.abs(np.subtract(got[(k, j)], want)), tol)
    assert got[(1, 0)][0] > 1.0 and got[(1, 0)][1] > 0.5  # the separated pair is measured as such


def test_fold_sums_and_moments_merge_exactly():
    member, cbed, eds = _blocks(300, seed=1)
    fold = scan_fold(np.arange(300), 20)
    whole = FoldSums.from_data(member, fold, cbed, eds)
    parts = merge_all([FoldSums.from_data(member[s], fold[s], cbed[s], eds[s]) for s in _chunks(300, [7, 150])])
    np.testing.assert_array_equal(parts.count, whole.count)
    np.testing.assert_allclose(parts.cbed, whole.cbed, rtol=1e-12)
    rng = np.random.default_rng(2)
    proj = rng.normal(1e3, 1.0, (300, 3))  # a large mean: the merge must not lose the variance
    mask = rng.random((300, 3)) < 0.5
    mask[:, 2] = False  # an empty set
    w = ProjectionMoments.from_data(proj, mask)
    m = merge_all([ProjectionMoments.from_data(proj[s], mask[s]) for s in _chunks(300, [1, 90, 299])])
    np.testing.assert_allclose(m.mean, w.mean, rtol=1e-12)
    np.testing.assert_allclose(m.var, w.var, rtol=1e-9)
    np.testing.assert_allclose(m.var[:2], [proj[mask[:, i], i].var() for i in range(2)], rtol=1e-9)
    assert m.n[2] == 0 and m.var[2] == 0.0


def test_degenerate_pairs_are_zero_as_in_block_distance():
    member, cbed, eds = _blocks(200, seed=3)
    fold = scan_fold(np.arange(200), 20)
    member[:, 3] = False
    member[:3, 3] = True  # positions 0, 1, 2: one of them in one fold
    cbed[:] = 1.0  # no direction in the CBED block: coinciding means
    got = _distributed(member, fold, cbed, eds, [50])
    assert got[(3, 1)] == (0.0, 0.0) == (block_distance(cbed, member[:, 3], member[:, 1], fold),
                                         block_distance(eds, member[:, 3], member[:, 1], fold))
    assert got[(1, 0)][0] == 0.0 == block_distance(cbed, member[:, 1], member[:, 0], fold)
    assert got[(1, 0)][1] == pytest.approx(block_distance(eds, member[:, 1], member[:, 0], fold), rel=2e-6)


def test_flagger_hook_gives_the_same_events():
    """SecondPhaseFlagger.update with the distances from sums equals the update on the features."""
    ny, nx = 24, 24
    rng = np.random.default_rng(0)
    inc = np.zeros((ny, nx), bool)
    inc[8:13, 8:13] = True
    u = np.where(inc.ravel()[:, None], [0.1, 0.9], [0.9, 0.1])
    cbed = rng.normal(0, 1, (ny * nx, 8)).astype(np.float32)
    cbed[inc.ravel(), 0] += 4
    eds = rng.poisson(3.0, (ny * nx, 8)).astype(np.float32)
    eds[inc.ravel(), 1] += 4  # a change of the spectrum's shape (composition)
    member = u > 0.5
    fold = scan_fold(np.arange(ny * nx), nx)
    sums = FoldSums.from_data(member, fold, cbed, eds)
    calls = []

    def distances(k, j, in_k, in_j, f):
        np.testing.assert_array_equal(f, fold)
        np.testing.assert_array_equal(in_k, member[:, k])
        plan = DistancePlan.fit(sums, [(k, j)], eds_shape_only=getattr(ref_flagger, "eds_shape_only", False))
        calls.append((k, j))
        return pair_distances(plan, *plan.moments(member, fold, cbed, eds))[(k, j)]

    ref_flagger = SecondPhaseFlagger(min_positions=5, raise_after=1)
    ref = ref_flagger.update(u, (ny, nx), cbed, eds)
    got = SecondPhaseFlagger(min_positions=5, raise_after=1).update(u, (ny, nx), None, None, block_distances=distances)
    assert calls == [(1, 0)]  # only the minor cluster is measured
    # the flags.py docstring's example: the inclusion is raised
    assert [(e.kind, e.cluster, e.bbox) for e in got] == [(e.kind, e.cluster, e.bbox) for e in ref]
    assert [e.cluster for e in ref] == [1]
    assert got[0].distance_cbed == pytest.approx(ref[0].distance_cbed, rel=1e-6)
    assert got[0].score == pytest.approx(ref[0].score, rel=1e-6)
    with pytest.raises(ValueError, match="cbed_features"):
        SecondPhaseFlagger().update(u, (ny, nx), None, None)  # no features and no hook


def test_flag_features_are_the_live_stores():
    rng = np.random.default_rng(4)
    axis = 0.01 * np.arange(1200) + 0.005
    frames = rng.poisson(2.0, (5, 64, 64)).astype(np.uint16)
    spectra = rng.poisson(1.0, (5, 1200)).astype(np.uint16)
    tc = ThresholdedCentres(2, (0.5,), n_positions=5, cbed_shape=(32, 32))
    binned = frames.reshape(5, 32, 2, 32, 2).sum(axis=(2, 4))
    tc.add(np.arange(5), binned, spectra)
    want = tc.features(eds_rebin=FLAG_EDS_REBIN, eds_channels=eds_window(axis))
    got = flag_features(binned, spectra, eds_window(axis))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    with pytest.raises(ValueError, match="65535"):
        flag_features(binned, spectra.astype(np.int64) + 70000, eds_window(axis))


@pytest.mark.parametrize("batch, warmup, every, holes", [(64, 100, 150, False), (50, 120, 100, True),
                                                          (128, 1000, 150, False), (64, 100, None, True)])
def test_final_seed_does_not_depend_on_the_scans_history(batch, warmup, every, holes):
    """The engine's final refresh uses final_seed(random_state) whatever the batches, the schedule
    and the holes were (the Dask replay cannot know them), and its final partition follows from
    it: the same final memberships with the same seed."""
    rng = np.random.default_rng(0)
    n = 600
    frames = rng.poisson(3.0, (n, 16, 16)).astype(np.uint16)
    frames[300:, :4, :4] += 6
    spectra = rng.poisson(1.0, (n, 64)).astype(np.uint16)
    hf = np.ones(n, bool)
    hs = np.ones(n, bool)
    if holes:
        hf[rng.choice(n, 40, replace=False)] = False
        hs[rng.choice(n, 40, replace=False)] = False
    eng = StreamingEngine(n, frame_shape=(16, 16), n_channels=64, energy_axis=(0.0, 0.25),
                          energy_window_kev=(0.0, 16.0), rebin=1, n_clusters=2, bin_factor=4,
                          warmup_positions=warmup, refresh_every=every, basis_rank=16, max_components=5,
                          random_state=0, host_clusters=0)
    stream = np.concatenate([np.flatnonzero(hf), np.flatnonzero(hs & ~hf)])
    for s in range(0, stream.size, batch):
        p = stream[s:s + batch]
        eng.partial_fit(p, frames[p], spectra[p], has_frame=hf[p], has_spectrum=hs[p])
    eng.finalize()
    assert eng.final_seed_ == final_seed(0)
    assert final_seed(0) != final_seed(1)
