"""The statistics behind a second-phase flag: is a candidate region different from the matrix around it?

A flag claims that a region differs from its surrounding matrix in **composition** (EDS) and in
**structure** (diffraction). Each claim is a hypothesis test with a stated error rate, and a scan
makes many looks at many candidates, so the error rate is spent across them (issue 17).

Composition (:func:`composition_test`)
    Per position, the X-ray counts in a few element-line windows (Fe, Co, Si K-alpha by default:
    :func:`line_windows`). Under the null hypothesis the region has the matrix's composition, so its
    counts are split among the windows in the matrix's proportions whatever the thickness (thickness
    scales every line and the bremsstrahlung under it alike, so it cancels in the proportions, and so
    does the beam current). The statistic is the likelihood-ratio (G) test of homogeneity of the
    region's and the matrix's pooled window counts, ``G ~ chi2(E - 1)``, divided by the matrix's
    own overdispersion ``phi`` (Pearson chi-square of the matrix positions about their pooled
    proportions per degree of freedom, at least 1): real matrices are not perfectly uniform (mixed
    positions, absorption), and a quasi-likelihood test charges that heterogeneity to the null instead
    of flagging it. A region must also differ by at least ``min_effect`` in some window's share of the
    counts (an effect size with a meaning: 0.05 is five percentage points of the line counts, e.g. the
    Fe share of Fe + Co + Si moving from 0.25 to 0.30), so a large scan does not flag trivial
    differences because it has many counts.

Structure (:func:`projection_test`)
    The diffraction features (binned CBED) of a region and of its matrix, cross-fitted: the direction
    from the matrix's mean to the region's is estimated on one fold of positions and the other fold's
    projections on it are compared with Welch's t-test, and the other way round (the two p-values
    combined by Bonferroni). A direction fitted to noise in thousands of features separates any two
    groups on the data it was fitted on; on the other fold its expected separation is zero, so the
    test keeps its level. The effect size is the standardised separation ``d`` on held-out positions.

Multiplicity (:class:`AlphaSpending`)
    A scan has one false-alarm budget ``alpha`` (the probability that a scan with no second phase
    raises any flag). It is spent in proportion to the positions acquired between looks (linear
    alpha spending: by the end of the scan the whole budget, never more), and a look's share is split
    evenly among the candidates tested at it (Bonferroni). A candidate is flagged when both of its
    tests pass at its share (an intersection-union test: no further correction is needed for
    requiring both). By the union bound, whatever the dependence between looks, the probability of
    any false flag in a scan is at most ``alpha``, provided each test's p-value is valid; they are
    approximately so (asymptotic chi-square and t distributions, quasi-likelihood dispersion), and
    ``benchmarks/flag_calibration.py`` measures the rate that results on held-out phantoms.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> matrix = rng.multinomial(30, [0.25, 0.5, 0.25], size=400)      # Fe, Co, Si window counts
>>> same = rng.multinomial(30, [0.25, 0.5, 0.25], size=60)
>>> fe_rich = rng.multinomial(30, [0.6, 0.15, 0.25], size=60)
>>> composition_test(same, matrix).p_value > 0.01
True
>>> res = composition_test(fe_rich, matrix)
>>> bool(res.p_value < 1e-12), round(res.effect, 2)
(True, 0.35)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

logger = logging.getLogger(__name__)

__all__ = [
    "LINES_KEV",
    "line_windows",
    "window_counts",
    "CompositionResult",
    "composition_test",
    "ProjectionResult",
    "projection_test",
    "AlphaSpending",
]

#: K-alpha energies (keV) of the elements a flag's composition test uses by default (physics.md)
LINES_KEV = {"Fe": 6.4039, "Co": 6.9303, "Si": 1.7397, "Ni": 7.4781, "Mn": 5.8987, "Cr": 5.4147,
             "Al": 1.4865, "Ti": 4.5109, "Cu": 8.0478, "O": 0.5249, "C": 0.2774}


def _fwhm_kev(energy_kev: float, fwhm_mnka_kev: float = 0.130) -> float:
    """Detector resolution (Fiori-Newbury), as the phantom and streamclust.engine.centres use it."""
    return math.sqrt(max(fwhm_mnka_kev ** 2 + 0.0025 * (energy_kev - 5.899), 1e-6))


def line_windows(energy_axis_kev: np.ndarray, elements=("Fe", "Co", "Si"), width_fwhm: float = 1.0) -> np.ndarray:
    """Channel masks (E, n_channels) of the elements' K-alpha windows, ``+- width_fwhm * FWHM / 2``
    around each line, clipped so no channel belongs to two windows."""
    e = np.asarray(energy_axis_kev, dtype=float)
    masks = []
    for el in elements:
        if el not in LINES_KEV:
            raise ValueError(f"no line energy known for element {el!r} (known: {sorted(LINES_KEV)})")
        c = LINES_KEV[el]
        half = width_fwhm * _fwhm_kev(c) / 2
        masks.append((e >= c - half) & (e < c + half))
    m = np.array(masks)
    overlap = m.sum(axis=0) > 1
    if overlap.any():
        m[:, overlap] = False  # shared channels belong to neither: each window stays one line's
    if not m.any(axis=1).all():
        empty = [el for el, row in zip(elements, m) if not row.any()]
        raise ValueError(f"the energy axis has no channel in the window of {empty}")
    return m


def window_counts(spectra: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Counts (n, E) of spectra (n, n_channels) in each window."""
    s = np.asarray(spectra)
    return np.stack([s[:, w].sum(axis=1) for w in windows], axis=1).astype(np.int64)


@dataclass(frozen=True)
class CompositionResult:
    statistic: float  # G / phi
    df: int
    p_value: float
    effect: float  # largest difference of a window's share of the counts
    dispersion: float  # phi
    region_share: tuple
    matrix_share: tuple
    region_counts: int
    matrix_counts: int


def _g_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Likelihood-ratio statistic of homogeneity of two count vectors."""
    tot = a + b
    keep = tot > 0
    a, b, tot = a[keep].astype(float), b[keep].astype(float), tot[keep].astype(float)
    na, nb = a.sum(), b.sum()
    ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(a > 0, a * np.log(a / ea), 0.0).sum() + np.where(b > 0, b * np.log(b / eb), 0.0).sum()
    return float(max(2.0 * g, 0.0))


def _dispersion(counts: np.ndarray) -> float:
    """Pearson chi-square per degree of freedom of positions about their pooled proportions (>= 1)."""
    c = np.asarray(counts, dtype=float)
    n_i = c.sum(axis=1)
    c = c[n_i > 0]
    n_i = n_i[n_i > 0]
    tot = c.sum(axis=0)
    keep = tot > 0
    if c.shape[0] < 2 or keep.sum() < 2:
        return 1.0
    p = tot[keep] / tot[keep].sum()
    exp = n_i[:, None] * p[None, :]
    x2 = float(((c[:, keep] - exp) ** 2 / exp).sum())
    df = (c.shape[0] - 1) * (int(keep.sum()) - 1)
    return max(1.0, x2 / df) if df > 0 else 1.0


def composition_test(region: np.ndarray, matrix: np.ndarray) -> CompositionResult:
    """Quasi-likelihood G test: does the region's window composition differ from the matrix's?

    ``region`` (n_r, E) and ``matrix`` (n_m, E) are window counts per position.
    """
    r = np.asarray(region, dtype=np.int64)
    m = np.asarray(matrix, dtype=np.int64)
    if r.ndim != 2 or m.ndim != 2 or r.shape[1] != m.shape[1]:
        raise ValueError(f"region and matrix must be (n, E) with the same E; got {r.shape} and {m.shape}")
    a, b = r.sum(axis=0), m.sum(axis=0)
    E = r.shape[1]
    if a.sum() == 0 or b.sum() == 0:
        return CompositionResult(0.0, E - 1, 1.0, 0.0, 1.0, tuple([0.0] * E), tuple([0.0] * E), int(a.sum()),
                                 int(b.sum()))
    phi = _dispersion(m)
    g = _g_statistic(a, b) / phi
    df = max(int(np.count_nonzero(a + b)) - 1, 1)
    p = float(stats.chi2.sf(g, df))
    pa, pb = a / a.sum(), b / b.sum()
    return CompositionResult(g, df, p, float(np.abs(pa - pb).max()), phi, tuple(np.round(pa, 4)),
                             tuple(np.round(pb, 4)), int(a.sum()), int(b.sum()))


@dataclass(frozen=True)
class ProjectionResult:
    p_value: float
    effect: float  # standardised separation on held-out positions (mean of the two folds)
    t: tuple  # Welch t of each fold


def projection_test(region: np.ndarray, matrix: np.ndarray, region_fold: np.ndarray,
                    matrix_fold: np.ndarray) -> ProjectionResult:
    """Cross-fitted test of a mean difference in many features (rows = positions).

    ``region_fold`` / ``matrix_fold`` (bool per row) split each group into two folds (e.g. the
    scan's checkerboard ``(y + x) % 2``). For each fold the direction between the groups' means is
    estimated on the *other* fold, and this fold's projections are compared with a one-sided Welch
    t-test (the region lies further along the direction than the matrix). The p-value is twice the
    smaller fold's (Bonferroni), at most 1.
    """
    R = np.asarray(region, dtype=np.float64)
    M = np.asarray(matrix, dtype=np.float64)
    rf = np.asarray(region_fold, dtype=bool)
    mf = np.asarray(matrix_fold, dtype=bool)
    ps, ds, ts = [], [], []
    for fold in (True, False):
        fit_r, fit_m = R[rf != fold], M[mf != fold]
        test_r, test_m = R[rf == fold], M[mf == fold]
        if min(fit_r.shape[0], fit_m.shape[0]) < 1 or min(test_r.shape[0], test_m.shape[0]) < 2:
            continue
        e = fit_r.mean(axis=0) - fit_m.mean(axis=0)
        norm = np.linalg.norm(e)
        if not norm > 0:
            continue
        e /= norm
        xr, xm = test_r @ e, test_m @ e
        vr, vm = xr.var(ddof=1), xm.var(ddof=1)
        se = math.sqrt(vr / xr.size + vm / xm.size)
        if not se > 0:
            continue
        t = (xr.mean() - xm.mean()) / se
        # Welch-Satterthwaite degrees of freedom
        num = (vr / xr.size + vm / xm.size) ** 2
        den = (vr / xr.size) ** 2 / (xr.size - 1) + (vm / xm.size) ** 2 / (xm.size - 1)
        dof = num / den if den > 0 else xr.size + xm.size - 2
        ps.append(float(stats.t.sf(t, dof)))
        ds.append(float((xr.mean() - xm.mean()) / math.sqrt((vr + vm) / 2)) if vr + vm > 0 else 0.0)
        ts.append(round(float(t), 3))
    if not ps:
        return ProjectionResult(1.0, 0.0, ())
    return ProjectionResult(min(1.0, len(ps) * min(ps)), float(np.mean(ds)), tuple(ts))


class AlphaSpending:
    """One false-alarm budget per scan, spent in proportion to the positions acquired.

    Parameters
    ----------
    alpha : float
        Probability that a scan with no second phase raises any flag (by the union bound).
    n_positions : int
        Positions in the scan (the spending clock: ``alpha * n_seen / n_positions`` is spent by the
        time ``n_seen`` positions have arrived).

    Examples
    --------
    >>> s = AlphaSpending(0.01, 1000)
    >>> round(s.spend(250), 6), round(s.spend(250), 6), round(s.spend(1000), 6)
    (0.0025, 0.0, 0.0075)
    >>> round(s.spent_, 6)
    0.01
    """

    def __init__(self, alpha: float = 0.01, n_positions: int = 1) -> None:
        if not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if int(n_positions) < 1:
            raise ValueError(f"n_positions must be >= 1, got {n_positions!r}")
        self.alpha = float(alpha)
        self.n_positions = int(n_positions)
        self.spent_ = 0.0
        self._seen = 0

    def spend(self, n_seen: int) -> float:
        """The budget of a look made when ``n_seen`` positions have arrived (0 if none arrived since
        the last look)."""
        n_seen = min(max(int(n_seen), self._seen), self.n_positions)
        share = self.alpha * (n_seen - self._seen) / self.n_positions
        self._seen = n_seen
        self.spent_ += share
        return share
