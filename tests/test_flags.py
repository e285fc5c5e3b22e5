"""Second-phase flags on the lamella phantom: raised on inclusions, silent on a single-phase film."""

from __future__ import annotations

import numpy as np
import pytest

from streamclust.flags.flagger import ClusterAssessment, SecondPhaseFlagger, block_distance
from streamclust.reference import bin_frames, eds_window
from streamclust.simulators.phantom import LamellaPhantom

SCAN = (64, 64)
SECOND = 2  # column of cfs_second in the truth-derived memberships
DECOY = 5   # an extra cluster: matrix positions in discs, coherent but not a different material


def clustering(ph: LamellaPhantom, *, noise: float = 0.05, seed: int = 1) -> np.ndarray:
    """The clustering procedure of these tests, the same for every phantom.

    Soft memberships from the truth's path-length fractions (mixed rim positions get intermediate
    memberships) plus noise, and a sixth *decoy* cluster: the matrix inside four discs that hold
    no inclusion. The decoy is what a clusterer fitting thickness or bending produces: minor,
    spatially coherent, localised, but made of the matrix - the flagger must not raise it.
    """
    rng = np.random.default_rng(seed)
    fr = ph.truth.fractions
    u = np.stack([fr[name].ravel() for name in ph.truth.label_names], axis=1)
    ny, nx = ph.scan_shape
    yy, xx = np.mgrid[:ny, :nx]
    film = fr["cfs_matrix"] > 0.9
    decoy = np.zeros((ny, nx), bool)
    placed = 0
    while placed < 4:
        cy, cx = rng.integers(0, ny), rng.integers(0, nx)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 9
        if film[disc].all() and not (disc & decoy).any():
            decoy |= disc
            placed += 1
    d = np.where(decoy.ravel(), 0.8 * u[:, 1], 0.0)
    u = np.column_stack([u, d])
    u[:, 1] -= d
    u = np.clip(u + rng.normal(0.0, noise, u.shape), 0.0, None)
    return u / u.sum(axis=1, keepdims=True)


def features(ph: LamellaPhantom) -> tuple[np.ndarray, np.ndarray]:
    """Per-position block signals: square-rooted 8 x 8-binned frames, windowed spectra."""
    pos = np.arange(ph.n_positions)
    cbed = np.concatenate([bin_frames(ph.frames(pos[i:i + 512]), 8) for i in range(0, pos.size, 512)])
    eds = eds_window(ph.spectra(pos), ph.energy_axis_kev, (0.2, 10.0), 8)
    return np.sqrt(cbed), eds


@pytest.fixture(scope="module")
def with_inclusions():
    ph = LamellaPhantom(scan_shape=SCAN, seed=0)
    return ph, clustering(ph), *features(ph)


@pytest.fixture(scope="module")
def single_phase():
    ph = LamellaPhantom(scan_shape=SCAN, seed=0, n_inclusions=0)
    return ph, clustering(ph), *features(ph)


def test_flag_raised_for_second_phase(with_inclusions):
    ph, u, cbed, eds = with_inclusions
    # distances_for_all: the layers' distances are measured too (below), though they fail earlier
    flagger = SecondPhaseFlagger(distances_for_all=True)
    # raise_after=2: the first passing update only arms the flag (a transient pass is not a flag)
    assert flagger.update(u, SCAN, cbed, eds) == []
    assert [a.passes for a in flagger.assessments_].count(True) == 1
    events = flagger.update(u, SCAN, cbed, eds)
    assert [ev.kind for ev in events] == ["raised"]
    ev = events[0]
    assert ev.cluster == SECOND and ev.neighbour == 1
    y0, x0, y1, x1 = ev.bbox
    truth = ph.truth.second_phase
    assert truth[y0:y1, x0:x1].any()
    # every component box holds a true inclusion, and the flagged positions are second phase
    for cy0, cx0, cy1, cx1 in ev.components:
        assert truth[cy0:cy1, cx0:cx1].any()
    precision = truth.ravel()[ev.positions].mean()
    recall = truth.ravel()[ev.positions].sum() / truth.sum()
    assert precision > 0.8 and recall > 0.8
    assert 0.5 < ev.score <= 1.0
    assert [f.flag_id for f in flagger.active_flags] == [ev.flag_id]
    by_cluster = {a.cluster: a for a in flagger.assessments_}
    # the decoy is coherent and localised, so only its signals can reject it: EDS shows matrix
    assert by_cluster[DECOY].coherence >= flagger.coherence  # passes on shape alone
    assert by_cluster[DECOY].reason == "not_distinct_eds"
    # substrate, carbon and Pt/Pd are minor, coherent and distinct - but layers, not inclusions
    for layer in (0, 3, 4):
        assert by_cluster[layer].reason == "no_localised_component"
        assert min(by_cluster[layer].distance_cbed, by_cluster[layer].distance_eds) > 1.0
    # by default only what passes every other test is measured: the same decisions, cheaper
    fast = SecondPhaseFlagger()
    fast.update(u, SCAN, cbed, eds)
    fast_by = {a.cluster: a for a in fast.assessments_}
    assert [a.passes for a in fast.assessments_] == [a.passes for a in flagger.assessments_]
    assert [a.reason for a in fast.assessments_] == [a.reason for a in flagger.assessments_]
    assert fast_by[SECOND].distance_eds == by_cluster[SECOND].distance_eds > 0
    assert all(fast_by[layer].distance_cbed == 0.0 for layer in (0, 3, 4))


def test_unchecked_zero_filled_features_decide_as_nan_rows_do(with_inclusions):
    """The live path's shortcut (zeros outside the stored positions, ``scanned_mask`` = stored,
    ``check_finite=False``) measures every cluster as the checked NaN-row path does, mid-scan."""
    ph, u, cbed, eds = with_inclusions
    n = ph.n_positions
    stored = np.zeros(n, bool)
    stored[: n * 3 // 5] = True
    stored[7] = False  # a position with a membership but no stored signals
    um = u.copy()
    um[n * 3 // 5:] = np.nan
    nan_c, nan_e = np.where(stored[:, None], cbed, np.nan), np.where(stored[:, None], eds, np.nan)
    zero_c, zero_e = np.where(stored[:, None], cbed, 0.0), np.where(stored[:, None], eds, 0.0)
    checked = SecondPhaseFlagger(distances_for_all=True).assess(um, SCAN, nan_c, nan_e)
    unchecked = SecondPhaseFlagger(distances_for_all=True).assess(um, SCAN, zero_c, zero_e, stored,
                                                                  check_finite=False)
    assert [a.n_positions for a in unchecked] == [a.n_positions for a in checked]
    assert [a.reason for a in unchecked] == [a.reason for a in checked]
    for a, b in zip(unchecked, checked):
        assert a.distance_cbed == pytest.approx(b.distance_cbed, rel=1e-5, abs=1e-6)
        assert a.distance_eds == pytest.approx(b.distance_eds, rel=1e-5, abs=1e-6)
    # the shortcut's contract matters: NaN rows left in make the whole-block distances NaN-free
    # only because they are zero; with NaN rows and no check, a candidate's distance is lost
    broken = SecondPhaseFlagger(distances_for_all=True).assess(um, SCAN, nan_c, nan_e, stored,
                                                               check_finite=False)
    assert any(a.distance_eds != b.distance_eds for a, b in zip(broken, checked))


def test_single_phase_raises_no_flag(single_phase):
    ph, u, cbed, eds = single_phase
    assert not ph.truth.second_phase.any()
    flagger = SecondPhaseFlagger()
    for _ in range(3):
        assert flagger.update(u, SCAN, cbed, eds) == []
    assert flagger.active_flags == []
    assert not any(a.passes for a in flagger.assessments_)


def test_flag_raised_mid_scan_then_followed(with_inclusions):
    ph, u, cbed, eds = with_inclusions
    ny, nx = SCAN
    flagger = SecondPhaseFlagger()
    raised_at = None
    for rows in range(8, ny + 1, 8):
        part = np.full_like(u, np.nan)
        part[: rows * nx] = u[: rows * nx]
        # the engine has no signals for unscanned positions either
        cb, ed = cbed.copy(), eds.copy()
        cb[rows * nx:] = np.nan
        ed[rows * nx:] = np.nan
        events = flagger.update(part, SCAN, cb, ed)
        for ev in events:
            if ev.kind == "raised":
                raised_at = raised_at or rows
                flag_id = ev.flag_id
            assert ev.kind != "retracted"
    assert raised_at is not None and raised_at < ny  # before the scan ended
    assert [f.flag_id for f in flagger.active_flags] == [flag_id]
    final = flagger.active_flags[0]
    assert final.bbox[2] > raised_at - 8  # it grew with the scan


def test_retraction_with_hysteresis(with_inclusions):
    ph, u, cbed, eds = with_inclusions
    flagger = SecondPhaseFlagger(retract_after=2, raise_after=1)
    (raised,) = flagger.update(u, SCAN, cbed, eds)
    # the EDS block stops separating (e.g. the model's EDS scaling changed): one failing update
    # is tolerated, the second retracts
    rng = np.random.default_rng(5)
    flat_eds = rng.poisson(3.0, eds.shape).astype(np.float32)
    assert flagger.update(u, SCAN, cbed, flat_eds) == []
    assert len(flagger.active_flags) == 1
    (retracted,) = flagger.update(u, SCAN, cbed, flat_eds)
    assert retracted.kind == "retracted" and retracted.flag_id == raised.flag_id
    assert retracted.reason == "not_distinct_eds"
    assert flagger.active_flags == []
    # raised again, with a new id, once the model separates it again
    (again,) = flagger.update(u, SCAN, cbed, eds)
    assert again.kind == "raised" and again.flag_id == raised.flag_id + 1
    # the model merges the second phase into the matrix: retracted at once
    merged = u.copy()
    merged[:, 1] += merged[:, SECOND]
    merged[:, SECOND] = 0.0
    (gone,) = flagger.update(merged, SCAN, cbed, eds)
    assert gone.kind == "retracted" and gone.reason == "cluster_gone"


def test_flag_id_survives_relabelled_clusters(with_inclusions):
    ph, u, cbed, eds = with_inclusions
    flagger = SecondPhaseFlagger(raise_after=1)
    (raised,) = flagger.update(u, SCAN, cbed, eds)
    perm = np.array([5, 2, 0, 4, 1, 3])  # new cluster i is old cluster perm[i]
    (ev,) = flagger.update(u[:, perm], SCAN, cbed, eds)
    assert ev.kind == "updated" and ev.flag_id == raised.flag_id
    assert ev.cluster == int(np.flatnonzero(perm == SECOND)[0])
    # slightly different memberships keep the same flag, no flicker
    noisy = clustering(ph, seed=7)
    (ev2,) = flagger.update(noisy[:, perm], SCAN, cbed, eds)
    assert ev2.kind == "updated" and ev2.flag_id == raised.flag_id


def test_a_flag_follows_the_passing_cluster_not_the_most_overlapping():
    """After a refresh moved part of a flagged inclusion into a cluster that is not distinct (a
    piece of the matrix), the flag stays with the second phase's cluster, which still holds most
    of it and passes, rather than following the failing piece and leaving the second phase to
    raise a new flag for the same region."""
    rng = np.random.default_rng(8)
    ny, nx = 40, 40
    n = ny * nx
    yy, xx = np.mgrid[:ny, :nx]
    a = ((yy >= 10) & (yy < 15) & (xx >= 10) & (xx < 15)).ravel()   # inclusion A, 25 positions
    b = ((yy >= 25) & (yy < 30) & (xx >= 22) & (xx < 27)).ravel()   # inclusion B, 25 positions
    piece = a & (yy.ravel() < 12)                                    # A's top 10 positions
    cbed = rng.normal(0, 1, (n, 8))
    eds = rng.normal(0, 1, (n, 8))
    second = (a & ~piece) | b
    cbed[second, 0] += 4
    eds[second, 1] += 4
    before = np.where(a, 1, 0)
    after = np.where(second, 1, np.where(piece, 2, 0))
    u_before = np.eye(3)[before] * 0.9 + 0.1 / 3
    u_after = np.eye(3)[after] * 0.9 + 0.1 / 3
    cbed_before = cbed.copy()
    cbed_before[piece, 0] += 4  # before the refresh A was whole and distinct
    eds_before = eds.copy()
    eds_before[piece, 1] += 4
    flagger = SecondPhaseFlagger(min_positions=5)
    flagger.update(u_before, (ny, nx), cbed_before, eds_before)
    (raised,) = flagger.update(u_before, (ny, nx), cbed_before, eds_before)
    assert raised.kind == "raised" and raised.flag_id == 1
    # the piece overlaps the flag fully (10 of 10) and fails; cluster 1 holds 15 of A's 25 and B
    kinds = []
    for _ in range(3):
        for ev in flagger.update(u_after, (ny, nx), cbed, eds):
            kinds.append((ev.kind, ev.flag_id, ev.cluster))
    assert kinds == [("updated", 1, 1)] * 3
    assert [f.flag_id for f in flagger.active_flags] == [1]


def test_a_flag_does_not_take_another_flags_passing_cluster():
    """Flags are matched to candidates together: flag 1, whose own cluster now passes relaxed only,
    does not take the passing cluster of flag 2 (which holds 3 of flag 1's 10 positions) and leave
    flag 2 retracted as gone."""
    def cand(k, pos, passes, relaxed):
        return ClusterAssessment(
            cluster=k, n_positions=len(pos), fraction=0.01, coherence=1.0, neighbour=9, distance_cbed=3.0,
            distance_eds=3.0, score=1.0, positions=np.array(list(pos)), components=((0, 0, 1, 1),),
            passes=passes, passes_relaxed=relaxed, reason="" if passes else "not_distinct_eds")

    flagger = SecondPhaseFlagger()
    now = [[cand(1, range(10), True, True), cand(2, range(100, 120), True, True)]]
    flagger.assess = lambda *args, **kwargs: now[0]
    flagger.update(np.zeros((1, 3)), (1, 1), None, None)
    raised = flagger.update(np.zeros((1, 3)), (1, 1), None, None)
    assert [(ev.kind, ev.flag_id, ev.cluster) for ev in raised] == [("raised", 1, 1), ("raised", 2, 2)]
    now[0] = [cand(1, range(10), False, True), cand(2, list(range(7, 10)) + list(range(100, 120)), True, True)]
    events = flagger.update(np.zeros((1, 3)), (1, 1), None, None)
    assert [(ev.kind, ev.flag_id, ev.cluster) for ev in events] == [("updated", 1, 1), ("updated", 2, 2)]


def test_raise_after_needs_consecutive_updates():
    ny, nx = 24, 24
    rng = np.random.default_rng(0)
    inc = np.zeros((ny, nx), bool)
    inc[8:13, 8:13] = True
    u = np.where(inc.ravel()[:, None], [0.1, 0.9], [0.9, 0.1])
    cbed = rng.normal(0, 1, (ny * nx, 8))
    cbed[inc.ravel(), 0] += 4
    eds = rng.normal(0, 1, (ny * nx, 8))
    eds[inc.ravel(), 1] += 4
    flagger = SecondPhaseFlagger(min_positions=5, raise_after=2)
    assert flagger.update(u, (ny, nx), cbed, eds) == []
    (ev,) = flagger.update(u, (ny, nx), cbed, eds, signals={1: {"fe_co_ratio": 2.0}})
    assert ev.kind == "raised" and ev.bbox == (8, 8, 13, 13) and ev.signals == {"fe_co_ratio": 2.0}
    # a cluster that is distinct in CBED only is not flagged
    flagger = SecondPhaseFlagger(min_positions=5)
    eds_null = rng.normal(0, 1, (ny * nx, 8))
    assert flagger.update(u, (ny, nx), cbed, eds_null) == []
    assert flagger.assessments_[1].reason == "not_distinct_eds"


def test_block_distance_is_unbiased_under_the_null():
    # a direction fitted to noise separates the groups it was fitted on; cross-fitting must not
    rng = np.random.default_rng(3)
    n, d = 2000, 200
    x = rng.normal(size=(n, d))
    k = rng.random(n) < 0.1
    fold = np.arange(n) % 2 == 0
    assert block_distance(x, k, ~k, fold) < 0.3
    x[k, :5] += 1.0  # a real difference of norm sqrt(5)
    assert block_distance(x, k, ~k, fold) > 1.5


def test_bad_input_is_named():
    flagger = SecondPhaseFlagger()
    with pytest.raises(ValueError, match="memberships"):
        flagger.update(np.ones((10, 2)), (4, 4), np.ones((16, 2)), np.ones((16, 2)))
    with pytest.raises(ValueError, match="eds_features"):
        flagger.update(np.ones((16, 2)), (4, 4), np.ones((16, 2)), np.ones((15, 2)))
    with pytest.raises(ValueError, match="hysteresis"):
        SecondPhaseFlagger(hysteresis=0.0)


def _blobs_and_noise(rng, ny=40, nx=40):
    """A host (cluster 0) holding one compact inclusion (cluster 1) and a salt-and-pepper cluster (2)
    of the same size, each made distinct in both blocks (so only the map can tell them apart)."""
    n = ny * nx
    yy, xx = np.mgrid[:ny, :nx]
    inc = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 16).ravel()
    free = np.flatnonzero(~inc & (yy.ravel() > 1) & (yy.ravel() < ny - 2) & (xx.ravel() > 1) & (xx.ravel() < nx - 2))
    noise = np.zeros(n, bool)
    noise[rng.choice(free, int(0.3 * free.size), replace=False)] = True
    lab = np.where(inc, 1, np.where(noise, 2, 0))
    u = np.eye(3)[lab] * 0.9 + 0.1 / 3
    cbed = rng.normal(0, 1, (n, 16))
    eds = rng.normal(0, 1, (n, 16))
    for k, col in ((1, 0), (2, 1)):
        cbed[lab == k, col] += 4
        eds[lab == k, col] += 4
    return u, cbed, eds, lab


def test_contiguity_separates_an_inclusion_from_salt_and_pepper():
    """A scattered cluster percolates into components that pass size and extent, and is distinct
    in both blocks: only contiguity rejects it (contiguity about its density, 0.3 here)."""
    u, cbed, eds, lab = _blobs_and_noise(np.random.default_rng(0))
    by = {a.cluster: a for a in SecondPhaseFlagger(max_fraction=0.5).assess(u, (40, 40), cbed, eds)}
    assert by[1].passes and by[1].contiguity > 0.7
    assert not by[2].passes and by[2].reason == "not_contiguous"
    assert by[2].contiguity < 0.45 and by[2].coherence >= 0.5
    # without the criterion the scattered cluster would have passed: the test can fail
    off = SecondPhaseFlagger(max_fraction=0.5, min_contiguity=0.0).assess(u, (40, 40), cbed, eds)
    assert off[2].passes


def test_patch_on_an_interface_must_be_distinct_from_both_sides():
    """A patch of layer A sitting on the A/B interface is distinct from B (its largest neighbour)
    but not from A, which holds a sizeable share of its ring: no flag. An inclusion in B is."""
    rng = np.random.default_rng(1)
    ny, nx = 40, 40
    n = ny * nx
    yy, xx = np.mgrid[:ny, :nx]
    lab = np.where(yy < 12, 0, 1).ravel()                     # layer A (rows 0-11), layer B below
    patch = ((yy >= 10) & (yy < 16) & (xx >= 10) & (xx < 18)).ravel()
    lab[patch] = 2                                            # A's material reaching into B: a third of its ring is A
    inc = ((yy - 28) ** 2 + (xx - 25) ** 2 <= 9).ravel()
    lab[inc] = 3                                              # a real inclusion in B
    u = np.eye(4)[lab] * 0.9 + 0.1 / 4
    cbed = rng.normal(0, 1, (n, 16))
    eds = rng.normal(0, 1, (n, 16))
    for block in (cbed, eds):
        block[np.isin(lab, (0, 2)), 0] += 4                   # A and the patch: one material
        block[lab == 3, 1] += 4
    flagger = SecondPhaseFlagger(max_fraction=0.5, neighbour_size_ratio=2.0)
    by = {a.cluster: a for a in flagger.assess(u, (ny, nx), cbed, eds)}
    assert by[3].passes and by[3].neighbour == 1
    patch_a = by[2]
    assert patch_a.neighbour == 1 and 0 in patch_a.ring_clusters
    assert not patch_a.passes and patch_a.reason.startswith("not_distinct")
    # measured against its largest neighbour only, the patch would have passed
    alone = {a.cluster: a for a in SecondPhaseFlagger(max_fraction=0.5, min_ring_share=1.01).assess(
        u, (ny, nx), cbed, eds)}
    assert alone[2].passes


def _host_with_patch_and_inclusion(rng, ny=40, nx=40):
    """Layer A (rows 0-11, cluster 0) over the matrix B (clusters 1 and 2: the host's two
    sub-clusters); a patch of A material inside A near the interface (cluster 3, surrounded by A),
    and an inclusion in B (cluster 4). Both are distinct in both blocks from what surrounds them."""
    yy, xx = np.mgrid[:ny, :nx]
    lab = np.where(yy < 12, 0, np.where(xx < nx // 2, 1, 2)).ravel()
    patch = ((yy >= 3) & (yy < 8) & (xx >= 10) & (xx < 16)).ravel()
    inc = ((yy - 27) ** 2 + (xx - 10) ** 2 <= 9).ravel()
    lab[patch], lab[inc] = 3, 4
    return _labelled(rng, lab, 16)


def _labelled(rng, lab, dim):
    """Memberships 0.9 in each position's label, and both blocks shifted by 4 along the label's
    own axis (every cluster distinct from every other in both blocks)."""
    k = int(lab.max()) + 1
    u = np.eye(k)[lab] * 0.9 + 0.1 / k
    cbed = rng.normal(0, 1, (lab.size, dim))
    eds = rng.normal(0, 1, (lab.size, dim))
    for c in range(k):
        cbed[lab == c, c] += 4
        eds[lab == c, c] += 4
    return u, cbed, eds


def test_matrix_share_keeps_patches_of_other_layers_out():
    """Told which clusters are the matrix (the engine's host sub-clusters), the flagger needs an
    inclusion's ring in them: a patch inside another layer is not embedded in the matrix."""
    u, cbed, eds = _host_with_patch_and_inclusion(np.random.default_rng(2))
    flagger = SecondPhaseFlagger(max_fraction=0.5)
    blind = {a.cluster: a for a in flagger.assess(u, (40, 40), cbed, eds)}
    assert blind[3].passes and blind[4].passes  # without the matrix, both look like inclusions
    told = {a.cluster: a for a in flagger.assess(u, (40, 40), cbed, eds, matrix_clusters=(1, 2))}
    assert told[4].passes and told[4].matrix_share == pytest.approx(1.0, abs=0.05)
    assert not told[3].passes and told[3].reason == "not_in_matrix" and told[3].matrix_share < 0.2
    with pytest.raises(ValueError, match="matrix_clusters"):
        flagger.assess(u, (40, 40), cbed, eds, matrix_clusters=(1, 7))


def test_minor_means_minor_in_the_matrix_too():
    """Told the matrix clusters, a candidate must also be at most ``max_fraction`` of the matrix:
    a sub-cluster holding a third of a film that is a small part of the scan is a part of the film
    (the engine's largest level-2 sub-cluster passed every other test on seed 7)."""
    rng = np.random.default_rng(5)
    ny, nx = 40, 40
    n = ny * nx
    yy, xx = np.mgrid[:ny, :nx]
    # layer A (cluster 0) over a thin matrix (rows 28-39: clusters 1 and 2); cluster 1 a compact
    # region of 152 of the matrix's 480 positions (9.5 % of the scan, 32 % of the matrix)
    lab = np.where(yy < 28, 0, 2).ravel()
    blob = ((yy >= 30) & (yy < 38) & (xx >= 5) & (xx < 24)).ravel()
    lab[blob] = 1
    u, cbed, eds = _labelled(rng, lab, 8)
    flagger = SecondPhaseFlagger()
    blind = {a.cluster: a for a in flagger.assess(u, (ny, nx), cbed, eds)}
    assert blind[1].passes and blind[1].fraction == pytest.approx(152 / n)
    told = {a.cluster: a for a in flagger.assess(u, (ny, nx), cbed, eds, matrix_clusters=(1, 2))}
    assert not told[1].passes and told[1].reason == "too_large"
    assert told[1].fraction == pytest.approx(152 / n)  # the reported fraction stays the scan's
    # with a limit above its share of the matrix it passes again
    small = SecondPhaseFlagger(max_fraction=0.33)
    assert {a.cluster: a for a in small.assess(u, (ny, nx), cbed, eds, matrix_clusters=(1, 2))}[1].passes


def test_an_inclusion_cut_by_the_frame_counts_as_coherent():
    """Positions of the candidate in a compact component at the scan frame are not flagged (a layer
    may enter there) but are coherent: they must not hold back the flag of an embedded inclusion."""
    rng = np.random.default_rng(4)
    ny, nx = 40, 40
    n = ny * nx
    yy, xx = np.mgrid[:ny, :nx]
    inc = ((yy - 20) ** 2 + (xx - 12) ** 2 <= 6).ravel()
    edge = ((yy - 15) ** 2 + (xx - 39) ** 2 <= 30).ravel()  # a bigger one cut by the right edge
    lab = np.where(inc | edge, 1, 0)
    u = np.eye(2)[lab] * 0.9 + 0.05
    cbed = rng.normal(0, 1, (n, 8))
    eds = rng.normal(0, 1, (n, 8))
    cbed[lab == 1, 0] += 4
    eds[lab == 1, 0] += 4
    (a,) = [a for a in SecondPhaseFlagger().assess(u, (ny, nx), cbed, eds) if a.cluster == 1]
    assert a.passes and a.coherence > 0.95
    assert set(np.unique(np.divmod(a.positions, nx)[1])) <= set(range(5, 20))  # the flag is the embedded one
    assert np.count_nonzero(edge) > np.count_nonzero(inc)  # without the credit, coherence < 0.5


def test_eds_needs_its_own_threshold_and_shape_only_ignores_intensity():
    """The EDS block needs ``min_eds_distance``; ``eds_shape_only`` does not count a spectrum that
    is only scaled (a thicker region), and counts a change of line ratios."""
    rng = np.random.default_rng(6)
    n = 4000
    fold = np.arange(n) % 2 == 0
    k = rng.random(n) < 0.1
    lines = np.array([40.0, 20.0, 10.0, 5.0])
    thick = rng.poisson(np.where(k[:, None], 1.4, 1.0) * lines).astype(np.float64)
    assert block_distance(thick, k, ~k, fold) > 2.0
    assert block_distance(thick, k, ~k, fold, shape_only=True) < 0.5
    ratio = lines * np.where(k[:, None], [1.0, 1.0, 2.5, 1.0], 1.0)
    other = rng.poisson(ratio).astype(np.float64)
    assert block_distance(other, k, ~k, fold, shape_only=True) > 1.5
    # an inclusion whose EDS differs by d ~ 0.8: enough under the CBED threshold, not the EDS one
    ny, nx = 40, 40
    yy, xx = np.mgrid[:ny, :nx]
    inc = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 12).ravel()
    u = np.eye(2)[inc.astype(int)] * 0.9 + 0.05
    cbed = rng.normal(0, 1, (ny * nx, 8))
    eds = rng.normal(0, 1, (ny * nx, 8))
    cbed[inc, 0] += 4
    eds[inc, 0] += 0.8
    (a,) = [a for a in SecondPhaseFlagger().assess(u, (ny, nx), cbed, eds) if a.cluster == 1]
    assert 0.6 < a.distance_eds < 1.0 and a.reason == "not_distinct_eds"
    (b,) = [b for b in SecondPhaseFlagger(min_eds_distance=0.6).assess(u, (ny, nx), cbed, eds) if b.cluster == 1]
    assert b.passes
