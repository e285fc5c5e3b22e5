"""Frame and spectrum reduction: Numba kernels against NumPy twins, masks, crop, chip cross, windows."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from streamclust.features.reducers import FrameReducer, SpectrumReducer, quad_cross_area
from streamclust.features.kernels import (
    bin_corrected_frames,
    bin_sum_frames,
    bin_sum_frames_numpy,
    bin_weighted_frames,
    bin_weighted_frames_numpy,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.mark.parametrize("dtype,high", [(np.uint8, 255), (np.uint16, 4095), (np.uint32, 2**24)])
def test_bin_sum_kernel_matches_numpy_twin(rng, dtype, high):
    frames = rng.integers(0, high, size=(3, 512, 512), dtype=dtype)
    out = np.full((3, 64, 64), np.nan, dtype=np.float32)
    bin_sum_frames(frames, 8, out)
    np.testing.assert_array_equal(out, bin_sum_frames_numpy(frames, 8))
    # and both equal an independent integer reference
    ref = frames.astype(np.int64).reshape(3, 64, 8, 64, 8).sum(axis=(2, 4))
    np.testing.assert_array_equal(out, ref.astype(np.float32))


def test_weighted_kernel_matches_numpy_twin(rng):
    frames = rng.integers(0, 4096, size=(2, 64, 48), dtype=np.uint16)
    weights = rng.random((64, 48)).astype(np.float32)
    weights[rng.random((64, 48)) < 0.1] = 0.0
    scale = (1.0 + rng.random((8, 6))).astype(np.float32)
    out = np.empty((2, 8, 6), dtype=np.float32)
    bin_weighted_frames(frames, weights, scale, 8, out)
    np.testing.assert_allclose(out, bin_weighted_frames_numpy(frames, weights, scale, 8), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_corrected_kernel_matches_weighted_twin(rng, dtype):
    frames = rng.integers(0, 200, size=(3, 64, 48)).astype(dtype)
    weights = np.ones((64, 48), dtype=np.float32)
    pick = rng.random((64, 48)) < 0.05
    weights[pick] = rng.choice([0.0, 1 / 3, 1 / 9], size=int(pick.sum()))
    scale = (1.0 + rng.random((8, 6))).astype(np.float32)
    rows, cols = np.nonzero(weights != 1.0)
    out = np.empty((3, 8, 6), dtype=np.float32)
    bin_corrected_frames(frames, 8, rows.astype(np.int64), cols.astype(np.int64),
                         weights[rows, cols].astype(np.float64) - 1.0, scale, out)
    np.testing.assert_allclose(out, bin_weighted_frames_numpy(frames, weights, scale, 8), rtol=1e-6)


def test_dense_and_sparse_mask_paths_agree(rng):
    frames = rng.integers(0, 1000, size=(2, 512, 512), dtype=np.uint16)
    big = FrameReducer(direct_beam_radius=200)  # most pixels excluded: the dense weighted kernel
    X = big.transform(frames)
    assert big._corr_rows_.size * 8 >= 512 * 512
    np.testing.assert_allclose(X, big.transform_numpy(frames), rtol=1e-6)
    small = FrameReducer(direct_beam_radius=20)  # the sparse correction
    assert small.fit()._corr_rows_.size * 8 < 512 * 512
    np.testing.assert_allclose(small.transform(frames), small.transform_numpy(frames), rtol=1e-6)


def test_default_reducer_is_reshape_sum(rng):
    frames = rng.integers(0, 4096, size=(5, 512, 512), dtype=np.uint16)
    red = FrameReducer()
    X = red.transform(frames)
    assert X.shape == (5, 4096) and X.dtype == np.float32
    assert red.weights_ is None  # the unweighted fast path
    ref = frames.astype(np.int64).reshape(5, 64, 8, 64, 8).sum(axis=(2, 4)).reshape(5, -1)
    np.testing.assert_array_equal(X, ref)
    np.testing.assert_array_equal(X, red.transform_numpy(frames))
    # a single 2-D frame, and a preallocated output
    np.testing.assert_array_equal(red.transform(frames[0])[0], X[0])
    out = np.zeros((5, 4096), dtype=np.float32)
    assert red.transform(frames, out=out) is out
    np.testing.assert_array_equal(out, X)


def test_masked_pixels_do_not_matter_and_bins_are_rescaled(rng):
    shape = (64, 64)
    dead = np.zeros(shape, dtype=bool)
    dead[rng.integers(0, 64, 40), rng.integers(0, 64, 40)] = True
    user = np.zeros(shape, dtype=bool)
    user[:8, :5] = True  # five of eight columns of the first bin
    red = FrameReducer(bin_factor=8, mask=user, dead_pixel_mask=dead, frame_shape=shape)
    frames = rng.integers(0, 100, size=(4, *shape), dtype=np.uint16)
    X = red.transform(frames)
    np.testing.assert_allclose(X, red.transform_numpy(frames), rtol=1e-6)
    # changing excluded pixels changes nothing
    other = frames.copy()
    other[:, dead | user] = 60000
    np.testing.assert_array_equal(red.transform(other), X)
    # a uniform frame stays uniform: each bin is rescaled by its live fraction
    flat = np.full((1, *shape), 7, dtype=np.uint16)
    np.testing.assert_allclose(red.transform(flat), 7 * 64, rtol=1e-6)
    live = ~(dead | user)
    np.testing.assert_allclose(red.live_fraction_, live.reshape(8, 8, 8, 8).mean(axis=(1, 3)), rtol=1e-6)


def test_min_live_fraction_drops_bins():
    shape = (16, 16)
    m = np.zeros(shape, dtype=bool)
    m[:4, :4] = True
    m[0, 4] = True  # bin (0,1) loses 1/16 only
    red = FrameReducer(bin_factor=4, mask=m, min_live_fraction=0.5, frame_shape=shape)
    X = red.transform(np.full((1, *shape), 2, dtype=np.uint8)).reshape(4, 4)
    assert X[0, 0] == 0.0  # wholly masked: constant 0 feature
    assert X[0, 1] == pytest.approx(32.0)
    assert X[1, 1] == 32.0


def test_chip_cross_area_and_mask(rng):
    area = quad_cross_area((512, 512))
    assert area[255, 0] == 3 and area[0, 256] == 3 and area[255, 256] == 9 and area[254, 254] == 1
    # counts proportional to pixel area become uniform after area correction
    frames = (area * 5).astype(np.uint16)[np.newaxis]
    X_area = FrameReducer(chip_gap="area").transform(frames)
    np.testing.assert_allclose(X_area, 5 * 64, rtol=1e-6)
    X_keep = FrameReducer(chip_gap="keep").transform(frames)
    assert X_keep.max() > X_keep.min()
    red = FrameReducer(chip_gap="mask")
    X_mask = red.transform(frames)
    np.testing.assert_allclose(X_mask, 5 * 64, rtol=1e-6)
    assert red.live_fraction_.min() == pytest.approx(49 / 64)  # 7 of 8 rows and 7 of 8 columns live
    noisy = rng.integers(0, 50, size=(2, 512, 512), dtype=np.uint16)
    np.testing.assert_allclose(red.transform(noisy), red.transform_numpy(noisy), rtol=1e-6)


def test_direct_beam_mask_and_crop(rng):
    frames = rng.integers(0, 30, size=(2, 512, 512), dtype=np.uint16)
    red = FrameReducer(direct_beam_radius=20)
    X = red.transform(frames)
    hot = frames.copy()
    hot[:, 256, 256] = 50000  # inside the beam disc: ignored
    np.testing.assert_array_equal(red.transform(hot), X)
    assert red.live_fraction_[31, 31] < 1.0 and red.live_fraction_[0, 0] == 1.0

    crop = FrameReducer(crop=(128, 384, 64, 448))
    Xc = crop.transform(frames)
    assert crop.feature_shape_ == (32, 48) and Xc.shape == (2, 32 * 48)
    np.testing.assert_array_equal(Xc, bin_sum_frames_numpy(frames[:, 128:384, 64:448], 8).reshape(2, -1))


def test_big_endian_frames_as_sent_by_merlin(rng):
    frames = rng.integers(0, 4096, size=(2, 512, 512), dtype=np.uint16)
    big = frames.astype(">u2")
    red = FrameReducer()
    np.testing.assert_array_equal(red.transform(big), red.transform(frames))
    masked = FrameReducer(direct_beam_radius=15)
    np.testing.assert_array_equal(masked.transform(big), masked.transform(frames))


def test_bad_input_is_refused_clearly(rng):
    red = FrameReducer()
    with pytest.raises(ValueError, match="shape"):
        red.transform(np.zeros((2, 256, 256), dtype=np.uint16))
    with pytest.raises(TypeError, match="dtype"):
        red.transform(np.zeros((1, 512, 512), dtype=np.int64))
    with pytest.raises(ValueError, match="multiple of bin_factor"):
        FrameReducer(crop=(0, 100, 0, 512)).fit()
    with pytest.raises(ValueError, match="chip_gap"):
        FrameReducer(chip_gap="nope").fit()
    with pytest.raises(ValueError, match="out must be"):
        red.transform(np.zeros((2, 512, 512), dtype=np.uint16), out=np.empty((2, 10), np.float32))


def test_frame_reducer_pickles(rng):
    red = FrameReducer(direct_beam_radius=10, chip_gap="mask")
    frames = rng.integers(0, 100, size=(2, 512, 512), dtype=np.uint16)
    X = red.transform(frames)
    red2 = pickle.loads(pickle.dumps(red))
    np.testing.assert_array_equal(red2.transform(frames), X)
    assert FrameReducer().warm_up().n_features_out_ == 4096


def test_spectrum_reducer(rng):
    spectra = rng.poisson(0.3, size=(6, 2048)).astype(np.uint16)
    red = SpectrumReducer()
    X = red.transform(spectra)
    assert X.shape == (6, 490) and X.dtype == np.float32
    assert red.channel_slice_ == slice(20, 1000)
    np.testing.assert_array_equal(X, spectra[:, 20:1000].reshape(6, 490, 2).sum(axis=2))
    np.testing.assert_allclose(red.energies_kev_[[0, -1]], [0.205, 9.985])
    # an offset moves the window; rebin 3 trims to a multiple of 3
    red3 = SpectrumReducer(energy_window_kev=(1.0, 2.0), rebin=3, energy_offset_kev=-0.1)
    X3 = red3.transform(spectra)
    assert red3.channel_slice_ == slice(110, 209) and X3.shape == (6, 33)
    np.testing.assert_array_equal(X3[:, 0], spectra[:, 110:113].sum(axis=1))
    np.testing.assert_array_equal(red.transform(spectra[0]), X[:1])
    with pytest.raises(ValueError, match="2048"):
        red.transform(np.zeros((2, 1024)))
    with pytest.raises(ValueError, match="keeps no channel"):
        SpectrumReducer(energy_window_kev=(30.0, 40.0)).fit()
    assert pickle.loads(pickle.dumps(red)).transform(spectra).shape == (6, 490)
