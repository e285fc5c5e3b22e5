"""Thresholded cluster centres (the paper's Figs. 5 and 6) and the Fe/Co K-alpha measurement."""

from __future__ import annotations

import numpy as np
import pytest

from streamclust.engine.centres import ThresholdedCentres, bin_pattern, fe_co_lines, fe_co_ratio, fwhm_kev

SCAN = (64, 64)


@pytest.fixture(scope="module")
def phantom(make_phantom):
    # frames of 128 x 128 keep the fixture fast; spectra and truth do not depend on frame_shape
    return make_phantom(scan_shape=SCAN, seed=0, frame_shape=(128, 128))


def truth_memberships(ph, noise=0.03, seed=1):
    """Soft memberships from the truth's path-length fractions (rims and shallow inclusions are
    mixtures) plus noise."""
    rng = np.random.default_rng(seed)
    u = np.stack([ph.truth.fractions[n].ravel() for n in ph.truth.label_names], axis=1)
    u = np.clip(u + rng.normal(0.0, noise, u.shape), 0.0, None)
    return u / u.sum(axis=1, keepdims=True)


def direct_centres(u, thresholds, cbed, eds):
    """From-scratch reference: weighted means over positions above each threshold."""
    out_c, out_e = [], []
    for t in thresholds:
        w = np.where(u > t, u, 0.0)
        w = np.where(np.isfinite(w), w, 0.0)
        s = w.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out_c.append((w.T @ cbed.astype(np.float64)) / s[:, None])
            out_e.append((w.T @ eds.astype(np.float64)) / s[:, None])
    return np.array(out_c), np.array(out_e)


def test_raising_threshold_moves_inclusion_centre_toward_second_phase(phantom):
    ph = phantom
    e = ph.energy_axis_kev
    true_second = fe_co_ratio(ph.phase_spectrum("cfs_second"), e)
    true_matrix = fe_co_ratio(ph.phase_spectrum("cfs_matrix"), e)
    assert true_matrix < 1 < true_second
    u = truth_memberships(ph)
    tc = ThresholdedCentres(5, thresholds=(0.5, 0.75), n_positions=ph.n_positions, cbed_shape=(32, 32))
    pos = np.arange(ph.n_positions)
    for i in range(0, pos.size, 512):  # live: batches as they arrive
        p = pos[i:i + 512]
        tc.add(p, ph.frames(p), ph.spectra(p))
    c = tc.update(u)
    k = ph.truth.label_names.index("cfs_second")
    r50 = fe_co_ratio(c.spectrum(k, 0.5), e)
    r75 = fe_co_ratio(c.spectrum(k, 0.75), e)
    assert c.count[1, k] < c.count[0, k]
    assert r50 > 1.0
    assert abs(r75 - true_second) < abs(r50 - true_second)
    # the matrix centre shows the matrix's ratio at both thresholds
    m = ph.truth.label_names.index("cfs_matrix")
    for t in (0.5, 0.75):
        assert fe_co_ratio(c.spectrum(m, t), e) < 1.0
    assert c.cbed.shape == (2, 5, 32, 32) and np.isfinite(c.cbed[:, k]).all()


def test_incremental_update_matches_recompute_and_direct(phantom):
    ph = phantom
    n = ph.n_positions
    rng = np.random.default_rng(2)
    pos = rng.permutation(n)
    frames_cache = {}
    tc = ThresholdedCentres(5, thresholds=(0.3, 0.5, 0.75), n_positions=n, cbed_shape=(16, 16))
    seen = np.zeros(n, bool)
    for step, i in enumerate(range(0, n, 1024)):
        p = np.sort(pos[i:i + 1024])
        f = ph.frames(p)
        frames_cache.update(zip(p.tolist(), bin_pattern(f, (16, 16))))
        tc.add(p, f, ph.spectra(p))
        seen[p] = True
        # the model refreshes every seen position's memberships, unseen ones are NaN
        u = truth_memberships(ph, noise=0.05, seed=10 + step)
        u[~seen] = np.nan
        c = tc.update(u)
        cb = np.zeros((n, 256), np.float32)
        idx = np.flatnonzero(seen)
        cb[idx] = np.array([frames_cache[j].ravel() for j in idx])
        eds = np.zeros((n, ph.n_channels))
        eds[idx] = ph.spectra(idx)
        want_c, want_e = direct_centres(np.where(seen[:, None], u, np.nan), (0.3, 0.5, 0.75), cb, eds)
        np.testing.assert_allclose(c.eds, want_e, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(c.cbed.reshape(3, 5, -1), want_c, rtol=1e-6, atol=1e-6)
    r = tc.recompute()
    np.testing.assert_allclose(r.eds, c.eds, rtol=1e-9, atol=1e-9)
    # an unchanged refresh multiplies nothing
    before = tc.stats["rows_changed"]
    tc.update(u)
    assert tc.stats["rows_changed"] == before


def test_full_resolution_centres_accumulate_arrival_memberships(phantom):
    ph = phantom
    p = np.arange(0, 600)
    f = ph.frames(p)
    u = truth_memberships(ph)[p]
    u_all = np.full((ph.n_positions, 5), np.nan)
    u_all[p] = u
    tc = ThresholdedCentres(5, n_positions=ph.n_positions, cbed_shape=(32, 32), full_resolution=True)
    tc.add(p, f, ph.spectra(p), memberships=u)
    c = tc.update(u_all)
    # memberships unchanged since arrival: binning the live full-resolution centre gives the exact one
    for t in range(2):
        for k in range(5):
            if c.count[t, k]:
                binned = bin_pattern(c.full[t, k][None], (32, 32))[0]
                np.testing.assert_allclose(binned, c.cbed[t, k], rtol=1e-5)
            else:
                assert np.isnan(c.full[t, k]).all() and np.isnan(c.cbed[t, k]).all()


def test_store_rejects_bad_input_and_counts_duplicates():
    tc = ThresholdedCentres(2, n_positions=10, cbed_shape=(2, 2))
    sp = np.ones((2, 8), np.uint16)
    tc.add([0, 1], np.ones((2, 4, 4)), sp)
    tc.add([1, 2, 2], np.full((3, 4, 4), 7.0), np.ones((3, 8)))
    assert tc.stats == {"added": 3, "duplicates": 2, "updates": 0, "rows_changed": 0}
    with pytest.raises(IndexError, match="position 10"):
        tc.add([10], np.ones((1, 4, 4)), np.ones((1, 8)))
    bad = np.ones((2, 8))
    bad[1, 3] = 70000
    with pytest.raises(ValueError, match="position 4"):
        tc.add([3, 4], np.ones((2, 4, 4)), bad)
    with pytest.raises(ValueError, match="multiple"):
        tc.add([5], np.ones((1, 5, 5)), np.ones((1, 8)))
    with pytest.raises(ValueError, match="channels"):
        tc.add([6], np.ones((1, 4, 4)), np.ones((1, 9)))
    with pytest.raises(ValueError, match="memberships"):
        tc.update(np.ones((9, 2)))
    u = np.full((10, 2), np.nan)
    u[:3] = [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]
    c = tc.update(u)
    np.testing.assert_allclose(c.cbed[0, 0], np.full((2, 2), (0.9 * 4 + 0.6 * 28) / 1.5))
    assert c.count.tolist() == [[2, 1], [1, 1]]


def test_features_for_the_flagger():
    tc = ThresholdedCentres(2, n_positions=5, cbed_shape=(2, 2))
    tc.add([1, 3], np.full((2, 4, 4), 4.0), np.arange(2 * 10, dtype=np.uint16).reshape(2, 10))
    cbed, eds = tc.features(eds_rebin=4, eds_channels=slice(1, 10))
    assert cbed.shape == (5, 4) and eds.shape == (5, 2)
    assert np.isnan(cbed[[0, 2, 4]]).all() and np.isnan(eds[[0, 2, 4]]).all()
    np.testing.assert_array_equal(cbed[1], np.full(4, 4.0))  # sqrt of the sum of a 2 x 2 block of 4s
    np.testing.assert_array_equal(eds[3], [11 + 12 + 13 + 14, 15 + 16 + 17 + 18])


def test_features_with_zero_rows_where_nothing_is_stored():
    """``missing=0.0``: the same stored rows, zeros instead of NaN elsewhere (a separate cache)."""
    tc = ThresholdedCentres(2, n_positions=5, cbed_shape=(2, 2))
    tc.add([1, 3], np.full((2, 4, 4), 4.0), np.arange(2 * 10, dtype=np.uint16).reshape(2, 10))
    nan_c, nan_e = (a.copy() for a in tc.features(eds_rebin=4, eds_channels=slice(1, 10)))
    cbed, eds = tc.features(eds_rebin=4, eds_channels=slice(1, 10), missing=0.0)
    assert tc.stored.tolist() == [False, True, False, True, False]
    for a, b in ((cbed, nan_c), (eds, nan_e)):
        np.testing.assert_array_equal(a[tc.stored], b[tc.stored])
        assert (a[~tc.stored] == 0).all()
    tc.add([0], np.full((1, 4, 4), 1.0), np.ones((1, 10), np.uint16))
    cbed, _ = tc.features(eds_rebin=4, eds_channels=slice(1, 10), missing=0.0)
    np.testing.assert_array_equal(cbed[0], np.full(4, 2.0))
    assert (cbed[[2, 4]] == 0).all()


def test_features_are_computed_once_per_position_and_stay_exact():
    """Later calls only compute the positions added since: the result equals a fresh store's, for
    each channel selection, and the arrays handed out are read-only."""
    rng = np.random.default_rng(0)
    frames = rng.poisson(3.0, (12, 4, 4)).astype(np.float32)
    spectra = rng.poisson(2.0, (12, 16)).astype(np.uint16)
    tc = ThresholdedCentres(2, n_positions=12, cbed_shape=(2, 2))
    for part in (np.array([3, 0, 7]), np.array([1, 2]), np.array([11, 4, 5, 6, 8, 9, 10])):
        tc.add(part, frames[part], spectra[part])
        for rebin, window in ((4, slice(1, 14)), (2, None)):
            cbed, eds = tc.features(eds_rebin=rebin, eds_channels=window)
            fresh = ThresholdedCentres(2, n_positions=12, cbed_shape=(2, 2))
            seen = np.flatnonzero(tc._stored)
            fresh.add(seen, frames[seen], spectra[seen])
            want_c, want_e = fresh.features(eds_rebin=rebin, eds_channels=window)
            np.testing.assert_array_equal(cbed, want_c)
            np.testing.assert_array_equal(eds, want_e)
    assert not cbed.flags.writeable and not eds.flags.writeable
    # a pickled store goes on where it was (the cache itself stays writable inside)
    import pickle

    half = ThresholdedCentres(2, n_positions=12, cbed_shape=(2, 2))
    half.add(np.arange(6), frames[:6], spectra[:6])
    half.features(eds_rebin=2)
    again = pickle.loads(pickle.dumps(half))
    again.add(np.arange(6, 12), frames[6:], spectra[6:])
    np.testing.assert_array_equal(again.features(eds_rebin=2)[1], tc.features(eds_rebin=2)[1])
    # and an index array selects channels as a slice does
    np.testing.assert_array_equal(tc.features(eds_rebin=4, eds_channels=np.arange(1, 14))[1],
                                  tc.features(eds_rebin=4, eds_channels=slice(1, 14))[1])


def test_state_bytes():
    s128 = ThresholdedCentres.state_bytes(128 * 128)
    s512 = ThresholdedCentres.state_bytes(512 * 512)
    assert s128["features"] == 4 * 1024 + 4 * 256  # square-rooted patterns, spectra rebinned by 8
    assert s128["per_position"] == 4 * 1024 + 2 * 2048 + 8 * 2 * 6 + 1 + s128["features"]
    assert s512["total"] == s512["per_position"] * 512 * 512
    small = ThresholdedCentres.state_bytes(512 * 512, cbed_shape=(16, 16), n_channels=980)
    assert small["total"] < 1.25e9


def test_fe_co_lines_recovers_known_peaks():
    e = (np.arange(2048) + 0.5) * 0.01
    rng = np.random.default_rng(0)

    def peak(centre, area):
        s = fwhm_kev(centre) / 2.3548
        return area * 0.01 * np.exp(-0.5 * ((e - centre) / s) ** 2) / (s * np.sqrt(2 * np.pi))

    background = 50.0 - 2.0 * e  # a sloping continuum, counts a channel
    fe, co = 20000.0, 10000.0
    expected = background + peak(6.4039, fe) + peak(7.058, 0.127 * fe) + peak(6.9303, co)
    li = fe_co_lines(expected, e)
    win = 0.981  # a Gaussian's area within +- 1 FWHM
    assert li.fe_net == pytest.approx(win * fe, rel=0.01)
    assert li.co_net == pytest.approx(win * co, rel=0.02)
    assert li.ratio == pytest.approx(2.0, rel=0.02)
    # without stripping Fe K-beta the Co count is too high
    assert fe_co_lines(expected, e, strip_fe_kb=False).co_net > 1.1 * co
    # Poisson noise: the SNR grows as sqrt(dose)
    lo = fe_co_lines(rng.poisson(expected), e).snr_fe
    hi = fe_co_lines(rng.poisson(10 * expected), e).snr_fe
    assert 2.5 < hi / lo < 3.8
    # batches give the same as one at a time
    batch = np.stack([expected, 2 * expected])
    np.testing.assert_allclose(fe_co_lines(batch, e).fe_net, [li.fe_net, 2 * li.fe_net])
    with pytest.raises(ValueError, match="channels"):
        fe_co_lines(expected[:-1], e)
