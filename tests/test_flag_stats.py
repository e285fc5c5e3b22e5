"""The flag's hypothesis tests keep their stated level under the null and find real differences.

Each level check simulates many null data sets and bounds the number of rejections by the binomial
quantile at a one-in-a-thousand chance of a false failure (so the test itself has a stated error rate).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from streamclust.flags.stats import (
    AlphaSpending,
    composition_test,
    line_windows,
    projection_test,
    window_counts,
)

TRIALS = 400
LEVEL = 0.05
# rejections allowed at the nominal level: the 99.9 % binomial quantile
MAX_REJECT = int(stats.binom.ppf(0.999, TRIALS, LEVEL))


def test_composition_test_keeps_its_level_whatever_the_thickness():
    rng = np.random.default_rng(0)
    p = [0.25, 0.5, 0.25]
    rejected = 0
    for _ in range(TRIALS):
        # thickness varies position by position (counts 5-40): proportions do not
        thick_m = rng.integers(5, 40, 300)
        thick_r = rng.integers(5, 40, 40) * 2  # the region is twice as thick: still the null
        m = np.array([rng.multinomial(t, p) for t in thick_m])
        r = np.array([rng.multinomial(t, p) for t in thick_r])
        rejected += composition_test(r, m).p_value < LEVEL
    assert rejected <= MAX_REJECT


def test_overdispersed_matrix_is_charged_to_the_null():
    """A matrix whose positions vary in composition (mixed positions): a plain multinomial G test
    rejects a region drawn from the same matrix far too often; the quasi-likelihood test does not."""
    rng = np.random.default_rng(1)
    rejected_quasi = rejected_plain = 0
    for _ in range(TRIALS // 2):
        def draw(k):
            fe = rng.beta(8, 24, k)  # Fe share varies between positions around 0.25
            return np.array([rng.multinomial(40, [f, 0.75 - f, 0.25]) for f in fe])
        m, r = draw(300), draw(60)
        res = composition_test(r, m)
        rejected_quasi += res.p_value < LEVEL
        rejected_plain += stats.chi2.sf(res.statistic * res.dispersion, res.df) < LEVEL
        assert res.dispersion > 1.2
    assert rejected_quasi <= int(stats.binom.ppf(0.999, TRIALS // 2, LEVEL))
    assert rejected_plain > 2 * rejected_quasi


def test_composition_test_finds_an_fe_rich_region_and_reports_its_shares():
    rng = np.random.default_rng(2)
    m = rng.multinomial(20, [0.25, 0.5, 0.25], size=500)
    r = rng.multinomial(20, [0.45, 0.3, 0.25], size=20)  # 400 counts
    res = composition_test(r, m)
    assert res.p_value < 1e-6
    assert res.effect == pytest.approx(0.2, abs=0.05)
    assert res.region_share[0] > res.matrix_share[0]
    # no counts at all: no evidence
    assert composition_test(np.zeros((3, 3), int), m).p_value == 1.0
    with pytest.raises(ValueError, match="same E"):
        composition_test(r[:, :2], m)


def test_projection_test_is_cross_fitted():
    """Same distribution, 300 features, 40 vs 400 positions: in-sample the mean difference always
    'separates' the groups; the held-out fold keeps the level."""
    rng = np.random.default_rng(3)
    rejected = 0
    for i in range(TRIALS // 2):
        R = rng.normal(size=(40, 300))
        M = rng.normal(size=(400, 300))
        res = projection_test(R, M, np.arange(40) % 2 == 0, np.arange(400) % 2 == 0)
        rejected += res.p_value < LEVEL
    assert rejected <= int(stats.binom.ppf(0.999, TRIALS // 2, LEVEL))
    R = rng.normal(size=(40, 300))
    R[:, :10] += 0.8  # a few faint extra reflections
    res = projection_test(R, rng.normal(size=(400, 300)), np.arange(40) % 2 == 0, np.arange(400) % 2 == 0)
    assert res.p_value < 1e-4 and res.effect > 1.0


def test_alpha_spending_never_spends_more_than_the_budget():
    s = AlphaSpending(0.05, 4096)
    total = sum(s.spend(n) for n in (100, 100, 50, 2000, 4096, 5000, 4096))
    assert total == pytest.approx(0.05)
    assert s.spend(4096) == 0.0
    with pytest.raises(ValueError):
        AlphaSpending(0.0, 10)
    with pytest.raises(ValueError):
        AlphaSpending(0.1, 0)


def test_line_windows_on_the_phantom_axis():
    e = np.arange(2048) * 0.01 + 0.005
    w = line_windows(e)
    assert w.shape == (3, 2048)
    assert not (w.sum(axis=0) > 1).any()
    fe = e[w[0]]
    assert fe.min() > 6.3 and fe.max() < 6.5
    spectra = np.zeros((2, 2048), np.uint16)
    spectra[0, np.searchsorted(e, 6.40)] = 3
    spectra[1, np.searchsorted(e, 1.74)] = 2
    assert window_counts(spectra, w).tolist() == [[3, 0, 0], [0, 0, 2]]
    with pytest.raises(ValueError, match="Unobtainium"):
        line_windows(e, ("Unobtainium",))
    with pytest.raises(ValueError, match="no channel"):
        line_windows(np.linspace(0, 1, 100), ("Fe",))
