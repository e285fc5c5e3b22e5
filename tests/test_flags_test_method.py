"""[flags] method = "test": a flag is raised by hypothesis tests (streamclust.flags.stats), not by
distance thresholds, and its events carry the statistics (issue 17)."""

from __future__ import annotations

import numpy as np
import pytest

from streamclust.flags.events import event_header
from streamclust.flags.flagger import SecondPhaseFlagger

NY = NX = 40


def _scene(seed: int, fe_share_inside: float, thickness_inside: float = 1.0, pattern_inside: float = 3.0):
    rng = np.random.default_rng(seed)
    n = NY * NX
    inside = np.zeros((NY, NX), bool)
    inside[14:22, 14:22] = True
    inside = inside.ravel()
    u = np.where(inside[:, None], [0.05, 0.95], [0.95, 0.05])
    cbed = rng.normal(0, 1, (n, 64))
    cbed[inside, :4] += pattern_inside
    lines = np.empty((n, 3), np.int64)
    counts = rng.poisson(30, n)
    counts[inside] = rng.poisson(30 * thickness_inside, int(inside.sum()))
    for i in range(n):
        fe = fe_share_inside if inside[i] else 0.25
        lines[i] = rng.multinomial(counts[i], [fe, 0.75 - fe, 0.25])
    return u, cbed, lines, inside


def test_an_fe_rich_inclusion_with_its_own_pattern_is_raised_with_its_statistics():
    u, cbed, lines, inside = _scene(0, fe_share_inside=0.55)
    fl = SecondPhaseFlagger(method="test", alpha=0.01, min_positions=5, elements=("Fe", "Co", "Si"))
    events = fl.update(u, (NY, NX), cbed, None, line_counts=lines, matrix_clusters=[0])
    assert [e.kind for e in events] == ["raised"]
    ev = events[0]
    assert ev.cluster == 1 and ev.p_value_eds < ev.level and ev.p_value_cbed < ev.level
    assert ev.effect_eds == pytest.approx(0.30, abs=0.05)
    # the whole budget was spent at this one look: the scan is complete
    assert ev.level == pytest.approx(0.01)
    head = event_header(ev, scan_id="t", sequence=1)
    assert head["statistics"]["p_value_eds"] == ev.p_value_eds
    assert head["statistics"]["composition"]["region_share"][0] > 0.5


def test_a_thicker_region_of_the_matrix_is_not_a_second_phase():
    """Twice the counts (thickness) and a different pattern (bending), the matrix's composition."""
    u, cbed, lines, _ = _scene(1, fe_share_inside=0.25, thickness_inside=2.0)
    fl = SecondPhaseFlagger(method="test", alpha=0.01, min_positions=5, elements=("Fe", "Co", "Si"))
    assert fl.update(u, (NY, NX), cbed, None, line_counts=lines, matrix_clusters=[0]) == []
    a = [a for a in fl.assessments_ if a.cluster == 1][0]
    assert a.tested and a.reason in ("composition_effect_too_small", "not_significant")


def test_same_composition_and_pattern_is_never_flagged_across_many_scenes():
    """Type-I error of the whole decision: 60 scenes with nothing to find, alpha 0.05: the chance of
    more than 9 flags is below 0.1 % (binomial)."""
    raised = 0
    for seed in range(60):
        u, cbed, lines, _ = _scene(100 + seed, fe_share_inside=0.25, pattern_inside=0.0)
        fl = SecondPhaseFlagger(method="test", alpha=0.05, min_positions=5, min_effect=0.0,
                                elements=("Fe", "Co", "Si"))
        raised += bool(fl.update(u, (NY, NX), cbed, None, line_counts=lines, matrix_clusters=[0]))
    assert raised <= 9


def test_the_budget_is_spent_over_the_looks():
    u, cbed, lines, inside = _scene(2, fe_share_inside=0.55)
    fl = SecondPhaseFlagger(method="test", alpha=0.01, min_positions=5, elements=("Fe", "Co", "Si"))
    half = np.arange(NY * NX) < NY * NX // 2 + 22 * NX // 2  # the scan has passed the inclusion
    fl.update(u, (NY, NX), cbed, None, line_counts=lines, scanned_mask=half, matrix_clusters=[0])
    spent = fl._spending.spent_
    assert 0 < spent < 0.01
    fl.update(u, (NY, NX), cbed, None, line_counts=lines, matrix_clusters=[0])
    assert fl._spending.spent_ == pytest.approx(0.01)


def test_method_test_needs_line_counts():
    u, cbed, _, _ = _scene(3, fe_share_inside=0.55)
    with pytest.raises(ValueError, match="line_counts"):
        SecondPhaseFlagger(method="test").update(u, (NY, NX), cbed, None)
    with pytest.raises(ValueError, match="method"):
        SecondPhaseFlagger(method="vote")
    # one column per element
    u, cbed, lines, _ = _scene(3, fe_share_inside=0.55)
    with pytest.raises(ValueError, match="a column per element"):
        SecondPhaseFlagger(method="test").update(u, (NY, NX), cbed, None, line_counts=lines)
    with pytest.raises(ValueError, match="at least two"):
        SecondPhaseFlagger(method="test", elements=("Fe",))


def test_dilution_by_another_layer_leaves_the_fe_co_proportions_alone():
    """An interface patch: Si from the substrate raises the Si share and dilutes Fe and Co alike.
    Tested on Fe and Co (the default), it is not a second phase; on Fe, Co and Si it would be."""
    rng = np.random.default_rng(5)
    u, cbed, _, inside = _scene(5, fe_share_inside=0.25)
    n = NY * NX
    lines = np.empty((n, 3), np.int64)
    for i in range(n):
        p = [0.18, 0.36, 0.46] if inside[i] else [0.25, 0.5, 0.25]  # Fe/Co 0.5 in both
        lines[i] = rng.multinomial(rng.poisson(30), p)
    fl = SecondPhaseFlagger(method="test", alpha=0.01, min_positions=5)
    assert fl.update(u, (NY, NX), cbed, None, line_counts=lines[:, :2], matrix_clusters=[0]) == []
    three = SecondPhaseFlagger(method="test", alpha=0.01, min_positions=5, elements=("Fe", "Co", "Si"))
    assert [e.kind for e in three.update(u, (NY, NX), cbed, None, line_counts=lines, matrix_clusters=[0])] == ["raised"]
