"""The lamella phantom: API, determinism, exact Poisson sampling (Numba vs NumPy twin), physics."""

from __future__ import annotations

import numpy as np
import pytest

from streamclust.simulators import diffraction as dif
from streamclust.simulators import phantom_kernels as pk
from streamclust.simulators import xray
from streamclust.simulators.phantom import COUNTER_SATURATION, LamellaPhantom


@pytest.fixture(scope="module")
def ph():
    return LamellaPhantom(scan_shape=(24, 20), seed=3)


def _film_position(ph, second: bool) -> int:
    fr = ph.truth.fractions["cfs_second"].ravel()
    m = ph.truth.fractions["cfs_matrix"].ravel()
    if second:
        return int(np.argmax(fr))
    idx = np.flatnonzero(m > 0.99)
    return int(idx[len(idx) // 2])


# ------------------------------------------------------------------------------------- API
def test_api_shapes_and_dtypes(ph):
    assert ph.scan_shape == (24, 20) and ph.n_positions == 480
    assert ph.frame_shape == (512, 512) and ph.counter_depth == 12
    assert ph.frame_dtype is np.uint16 and ph.dwell_s == pytest.approx(0.01)
    assert ph.n_channels == 2048 and ph.channel_width_kev == pytest.approx(0.01)
    assert ph.energy_axis_kev[0] == pytest.approx(ph.energy_offset_kev + 0.005)
    f = ph.frame(0)
    assert f.shape == (512, 512) and f.dtype == np.uint16
    s = ph.spectrum(0)
    assert s.shape == (2048,) and s.dtype == np.uint16
    assert ph.frames([0, 5]).shape == (2, 512, 512)
    assert ph.spectra([0, 5]).shape == (2, 2048)
    assert ph.frames([]).shape == (0, 512, 512)


@pytest.mark.parametrize("depth,dtype", [(1, np.uint8), (6, np.uint8), (12, np.uint16), (24, np.uint32)])
def test_counter_depths_saturate(depth, dtype):
    p = LamellaPhantom((4, 4), seed=0, counter_depth=depth, beam_current_pa=20.0)
    f = p.frame(5)
    assert p.frame_dtype is dtype and f.dtype == dtype
    assert int(f.max()) <= COUNTER_SATURATION[depth]
    if depth in (1, 6, 12):  # the direct beam at 20 pA on the 9x-area crossing saturates
        assert int(f.max()) == COUNTER_SATURATION[depth]


def test_bad_input_raises(ph):
    with pytest.raises(IndexError, match="480"):
        ph.frame(480)
    with pytest.raises(IndexError):
        ph.spectrum(-1)
    with pytest.raises(IndexError):
        ph.frames([0, 1000])
    with pytest.raises(ValueError, match="C-contiguous"):
        ph.frame_into(0, np.zeros((512, 512), np.uint32))
    with pytest.raises(ValueError, match="counter_depth"):
        LamellaPhantom((4, 4), counter_depth=8)
    with pytest.raises(ValueError):
        LamellaPhantom((0, 4))


# ------------------------------------------------------------------------------- determinism
def test_deterministic_and_order_independent(ph):
    a = ph.frame(77)
    ph.frame(3)
    ph.frames([10, 11, 12])
    assert np.array_equal(a, ph.frame(77))
    out = np.empty(ph.frame_shape, ph.frame_dtype)
    assert ph.frame_into(77, out) is out and np.array_equal(out, a)
    batch = ph.frames([12, 77, 3])
    assert np.array_equal(batch[1], a)
    assert np.array_equal(batch[0], ph.frame(12)) and np.array_equal(batch[2], ph.frame(3))
    assert np.array_equal(ph.spectra([77, 3])[0], ph.spectrum(77))
    # same seed, new object: same data; other seed: different data
    assert np.array_equal(LamellaPhantom((24, 20), seed=3).frame(77), a)
    assert not np.array_equal(LamellaPhantom((24, 20), seed=4).frame(77), a)
    assert not np.array_equal(ph.frame(78), a)


# ------------------------------------------------------------------------- ground truth
def test_truth_geometry(ph):
    t = ph.truth
    assert t.label_names == ("si", "cfs_matrix", "cfs_second", "carbon", "ptpd")
    total = sum(t.fractions[n] for n in t.label_names)
    np.testing.assert_allclose(total, 1.0, atol=1e-12)
    stack = np.stack([t.fractions[n] for n in t.label_names])
    assert np.array_equal(t.labels, np.argmax(stack, axis=0))
    assert np.array_equal(t.second_phase, t.fractions["cfs_second"] >= 0.5)
    assert (t.labels[0] == 0).all(), "the raster starts in the Si substrate"
    assert (t.labels[-1] == 4).all(), "and ends in the Pt/Pd cap"
    assert t.second_phase.any()
    assert not t.labels.flags.writeable
    assert 20 < t.thickness_nm.mean() < 100 and np.abs(t.tilt_mrad).max() == pytest.approx(5.0)


def test_partial_inclusions_and_single_phase():
    p = LamellaPhantom((64, 64), seed=5, inclusion_depth=(0.3, 0.6))
    fr2 = p.truth.fractions["cfs_second"]
    assert 0.29 < fr2.max() <= 0.6 + 1e-9, "inclusions only partly through the thickness"
    single = LamellaPhantom((16, 16), seed=5, inclusions=0)
    assert single.n_inclusions == 0
    assert not single.truth.second_phase.any() and single.truth.fractions["cfs_second"].max() == 0


def test_phases_and_compositions(ph):
    names = [p.name for p in ph.phases]
    m, s = ph.phases[names.index("cfs_matrix")], ph.phases[names.index("cfs_second")]
    assert m.fe_co_ratio == pytest.approx(0.5) and s.fe_co_ratio == pytest.approx(4.0)
    assert sum(m.composition.values()) == pytest.approx(1.0)
    assert m.lattice_a == pytest.approx(5.64)


# ---------------------------------------------------------------------------- diffraction
def test_reflection_table_matches_physics():
    refl = {r.hkl: r for r in dif.zone_reflections(5.64, 1.0)}
    r220 = refl[(1, 1, 0)] if (1, 1, 0) in refl else None
    assert r220 is None  # (110) is mixed parity: forbidden
    r = refl[(2, 2, 0)]
    assert r.kind == "fundamental" and r.g == pytest.approx(0.502, abs=1e-3)
    assert 1e3 * dif.WAVELENGTH_A * r.g == pytest.approx(12.58, abs=0.05)
    assert refl[(0, 0, 2)].kind == "b2" and refl[(1, 1, 1)].kind == "l21"
    assert dif.extinction_distance_a(42.9, 5.64) / 10 == pytest.approx(38, rel=0.05)
    assert refl[(2, 2, 4)].f_abs == pytest.approx(23.7, rel=0.01)


def test_second_phase_pattern_has_extra_faint_discs(ph):
    lam_m = ph.expected_frame(_film_position(ph, False))
    ps = _film_position(ph, True)
    assert ph.truth.fractions["cfs_second"].ravel()[ps] > 0.6
    lam_s = ph.expected_frame(ps)
    c = 255.5 + np.array([0.0, 0.0])
    px = dif.WAVELENGTH_A / 0.15e-3

    def disc_mean(lam, gx, gy, dy=0, dx=0):
        y, x = int(round(c[0] + gy * px)), int(round(c[1] + gx * px))
        # search +-3 px for the (drifted) centre
        return max(lam[y + a - 3:y + a + 4, x + b - 3:x + b + 4].mean()
                   for a in range(-3, 4) for b in range(-3, 4))

    g220 = (0.0, 0.502)
    g111 = (1 / 5.64, np.sqrt(2) / 5.64)
    assert disc_mean(lam_m, *g220) > 10  # 220 bright in both
    i111_s = disc_mean(lam_s, *g111)
    i111_m = disc_mean(lam_m, *g111)
    assert i111_s > 2 * i111_m, "L21 111 discs only in the second phase (faint: partial order)"
    assert 0.001 < i111_s / disc_mean(lam_s, *g220) < 0.1, "superlattice discs are faint"


def test_detector_defects_and_cross(ph):
    frames = ph.frames(np.arange(0, 480, 40))
    dead = ph._dead
    assert dead.size == round(2e-4 * 512 * 512)
    assert (frames.reshape(len(frames), -1)[:, dead] == 0).all()
    hot = frames.reshape(len(frames), -1)[:, ph._hot]
    assert hot.mean() > 500
    lam = ph.expected_frame(100)
    # cross rows carry 3x the counts of their neighbours in smooth regions (far from the centre)
    assert lam[255, 20] / lam[253, 20] == pytest.approx(3.0, rel=0.15)


def test_descan_drift_is_slow_and_bounded(ph):
    d = np.hypot(ph._dy, ph._dx)
    assert d.max() <= 2 * 1.5 + 1
    assert np.abs(np.diff(ph._dy)).max() <= 1 and np.abs(np.diff(ph._dx)).max() <= 1


# ------------------------------------------------------------------------ sampling kernels
def test_alias_table_twin_and_distribution():
    w = np.random.default_rng(0).gamma(0.5, size=200)
    w[::17] = 0.0
    p1, a1 = pk.build_alias(w)
    p2, a2 = pk.build_alias_numpy(w)
    np.testing.assert_allclose(p1, p2)
    assert np.array_equal(a1, a2)
    # the table reproduces the weights exactly: P(j) = (prob[j] + sum over i with alias i->j) / n
    n = w.size
    implied = p1.copy()
    np.add.at(implied, a1, 1.0 - p1)
    np.testing.assert_allclose(implied / n, w / w.sum(), atol=1e-12)


@pytest.mark.parametrize("lam", [0.3, 4.0, 11.9, 12.1, 350.0])
def test_poisson_kernel_moments(lam):
    from numba import njit

    @njit
    def draw(lam, n, seed):
        np.random.seed(seed)
        out = np.empty(n)
        for i in range(n):
            out[i] = pk.poisson(lam)
        return out

    n = 40000
    x = draw(lam, n, 7)
    assert abs(x.mean() - lam) < 5 * np.sqrt(lam / n)
    # sample variance of a Poisson: sd of the estimate about lam * sqrt(2 / n) (+ 1/n term)
    assert abs(x.var() - lam) < 6 * np.sqrt((2 * lam**2 + lam) / n)


def _kernel_args(p):
    return p._frame_args(), p._detector_args()


@pytest.mark.parametrize("engine", ["numba", "numpy"])
def test_sampler_mean_and_variance_match_lambda(engine):
    """Many draws of one position: per-pixel mean and variance match the expected frame."""
    p = LamellaPhantom((8, 8), seed=2, dead_fraction=0.0, n_hot_pixels=0, beam_current_pa=1.0)
    pos = 30
    lam = p.expected_frame(pos).ravel()
    n = 150 if engine == "numba" else 30
    acc = np.zeros(lam.size)
    acc2 = np.zeros(lam.size)
    out = np.empty(lam.size, p.frame_dtype)
    fargs, dargs = _kernel_args(p)
    rng = np.random.default_rng(11)
    for i in range(n):
        if engine == "numba":
            pk.render_frame(1000 + i, out, p._wa[pos], p._wb[pos], *fargs, p._dy[pos], p._dx[pos], *dargs)
        else:
            pk.render_frame_numpy(rng, out, p._wa[pos], p._wb[pos], *fargs, p._dy[pos], p._dx[pos], *dargs)
        v = out.astype(np.float64)
        acc += v
        acc2 += v * v
    mean = acc / n
    assert lam.max() < 0.8 * p.saturation  # no saturation in this test
    # aggregate z-test on regions (bright discs, dim background) and per-pixel outliers
    bright = lam > 5
    dim = (lam > 0) & (lam < 0.5)
    for m in (bright, dim, lam > 0):
        z = (mean[m].sum() - lam[m].sum()) / np.sqrt(lam[m].sum() / n)
        assert abs(z) < 5, (engine, z)
    zp = (mean[bright] - lam[bright]) / np.sqrt(lam[bright] / n)
    assert np.mean(np.abs(zp) > 4) < 0.002
    chi2 = np.sum(n * (mean[lam > 1] - lam[lam > 1]) ** 2 / lam[lam > 1])
    dof = int(np.sum(lam > 1))
    assert abs(chi2 - dof) < 6 * np.sqrt(2 * dof)
    if engine == "numba":
        var = acc2 / n - mean**2
        ratio = var[bright].sum() / mean[bright].sum()
        assert ratio == pytest.approx(1.0, abs=0.05), "Poisson: variance equals mean"
    assert (out.reshape(512, 512)[lam.reshape(512, 512) == 0] == 0).all()


def test_spectrum_sampler_matches_expectation():
    p = LamellaPhantom((8, 8), seed=2)
    pos = 30
    lam = p.expected_spectrum(pos)
    n = 3000
    out = np.empty(p.n_channels, np.uint16)
    acc = np.zeros(p.n_channels)
    acc_np = np.zeros(p.n_channels)
    rng = np.random.default_rng(0)
    for i in range(n):
        pk.render_spectrum(5000 + i, out, p._spec_w[pos], p._spec_totals, p._spec_prob, p._spec_alias, 65535)
        acc += out
        pk.render_spectrum_numpy(rng, out, p._spec_w[pos], p._spec_totals, p._spec_prob, p._spec_alias, 65535)
        acc_np += out
    for a in (acc, acc_np):
        z = (a.sum() / n - lam.sum()) / np.sqrt(lam.sum() / n)
        assert abs(z) < 5
        # coarse 0.32 keV bins: chi-square against the expectation
        e = lam.reshape(-1, 32).sum(1) * n
        o = a.reshape(-1, 32).sum(1)
        keep = e > 20
        chi2 = np.sum((o[keep] - e[keep]) ** 2 / e[keep])
        assert chi2 < keep.sum() + 6 * np.sqrt(2 * keep.sum())


# ---------------------------------------------------------------------------------- EDS
def test_fiori_newbury_and_lines():
    assert xray.fwhm_kev(5.8987) == pytest.approx(0.130)
    assert 1e3 * xray.fwhm_kev(6.9303) == pytest.approx(140, abs=2)
    assert 1e3 * xray.fwhm_kev(0.2774) == pytest.approx(53, abs=3)


def test_spectra_low_counts_and_fe_co_ratio(ph):
    s = ph.spectra(np.arange(ph.n_positions))
    total = s.sum(axis=1)
    assert 2 < total.mean() < 60, "a few to tens of counts a spectrum"
    e = ph.energy_axis_kev

    def window(spec, e0):
        w = xray.fwhm_kev(e0)
        return spec[..., (e >= e0 - w) & (e < e0 + w)].sum(-1)

    m = ph.phase_spectrum("cfs_matrix")
    sp = ph.phase_spectrum("cfs_second")
    r_m = window(m, 6.4039) / window(m, 6.9303)
    r_s = window(sp, 6.4039) / window(sp, 6.9303)
    assert r_m < 0.7 < 1.4 < r_s, "second phase: Fe K alpha above Co K alpha"
    # the peak of the matrix spectrum's K region sits at Co K alpha
    k = (e > 6.0) & (e < 7.4)
    assert e[k][np.argmax(m[k])] == pytest.approx(6.93, abs=0.02)
    si = ph.phase_spectrum("si")
    assert e[np.argmax(si)] == pytest.approx(1.74, abs=0.02)


def test_position_seeds_are_splitmix64_and_distinct():
    pos = np.arange(5000)
    s1 = pk.position_seeds(7, pos, 1)
    s2 = pk.position_seeds(7, pos, 2)
    assert s1[123] == pk.splitmix64((7 << 32) + (1 << 24) + 123) >> 32
    assert np.unique(s1).size == pos.size and not np.intersect1d(s1, s2).size
    assert s1.min() >= 0 and s1.max() < 2**32
