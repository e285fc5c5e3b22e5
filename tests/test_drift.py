"""NoveltyDrift (river Page-Hinkley on log novelty) and the engine's early refresh on new material."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from streamclust.cluster.drift import NoveltyDrift
from streamclust.engine.streaming import StreamingEngine


def test_stationary_stream_never_fires_and_a_rise_does():
    rng = np.random.default_rng(0)
    det = NoveltyDrift().reset(rng.exponential(1.0, 2048))
    assert det.update_many(rng.exponential(1.0, 200_000)) is None
    at = det.update_many(rng.exponential(1.0, 500) * 5.0)
    assert at is not None and at < 60
    assert det.n_detections_ == 1
    # spent until reset: nothing more is reported
    assert det.update_many(rng.exponential(1.0, 500) * 5.0) is None


def test_a_layer_arriving_right_after_a_reset_is_still_detected():
    """The reference distances are the test's history: a test whose first values are already
    the new layer's must compare them with the model's own positions, not with themselves."""
    rng = np.random.default_rng(1)
    det = NoveltyDrift().reset(rng.exponential(1.0, 2048))
    assert det.update_many(rng.exponential(1.0, 300) * 50.0) is not None


def test_a_drop_is_not_new_material():
    rng = np.random.default_rng(2)
    det = NoveltyDrift().reset(rng.exponential(1.0, 2048))
    assert det.update_many(rng.exponential(1.0, 5000) * 0.1) is None


@pytest.mark.parametrize("bad", [np.zeros(10), np.array([np.nan, np.inf]), np.array([])])
def test_a_reference_without_a_positive_median_is_refused(bad):
    with pytest.raises(ValueError, match="positive finite median"):
        NoveltyDrift().reset(bad)


N, FRAME, CHANNELS = 1200, (32, 32), 128


def _layers(seed: int = 0):
    """Raster scan of three layers met in turn (rows of the same material, like substrate, film, cap)."""
    rng = np.random.default_rng(seed)
    truth = np.repeat([0, 1, 2], N // 3)
    frames = rng.poisson(4.0, (N, *FRAME)).astype(np.uint16)
    spectra = rng.poisson(1.0, (N, CHANNELS)).astype(np.uint16)
    for k, (sl, ch) in enumerate(((slice(0, 8), slice(10, 16)), (slice(8, 16), slice(40, 46)),
                                  (slice(16, 24), slice(80, 86)))):
        frames[truth == k, sl, :8] += 12
        spectra[truth == k, ch] += 4
    return frames, spectra, truth


def _run(frames, spectra, **kw):
    eng = StreamingEngine(N, frame_shape=FRAME, n_channels=CHANNELS, energy_axis=(0.0, 0.1),
                          energy_window_kev=(0.0, 12.8), rebin=1, n_clusters=3, bin_factor=4,
                          warmup_positions=200, refresh_every=100_000, basis_rank=24, max_components=8,
                          host_clusters=0, drift_min_gap=64, random_state=0, **kw)
    starts = []
    for s in range(0, N, 50):
        before = eng.stats_["refreshes"]
        eng.partial_fit(np.arange(s, s + 50), frames[s:s + 50], spectra[s:s + 50])
        if eng.stats_["refreshes"] != before:
            starts.append(s + 50)
    return eng, starts


@pytest.mark.parametrize("store", ["counts", "basis"])
def test_engine_refreshes_when_the_scan_enters_a_new_layer(store):
    frames, spectra, truth = _layers()
    eng, refreshed_at = _run(frames, spectra, store=store)
    # the warm-up refresh, then one early refresh shortly into each new layer (400 and 800)
    assert eng.stats_["drift_refreshes"] == 2, refreshed_at
    assert any(400 < p <= 550 for p in refreshed_at) and any(800 < p <= 950 for p in refreshed_at)
    live = adjusted_rand_score(truth, eng.labels_)     # before finalize: what the operator sees
    off, _ = _run(frames, spectra, store=store, drift_threshold=None)
    assert off.stats_["drift_refreshes"] == 0 and off.stats_["refreshes"] == 1
    # without the test the model of the first layer labels the whole scan until the end
    assert live > 0.95 > adjusted_rand_score(truth, off.labels_)


@pytest.mark.parametrize("store", ["counts", "basis"])
def test_no_early_refresh_within_one_material(store):
    """Also with the basis store, whose stored vectors keep no residual: the reference distances
    come from whole vectors, or every new position would look novel."""
    frames, spectra, _ = _layers()
    one = np.arange(N) % 400  # first layer's positions only, repeated
    eng, _ = _run(frames[one], spectra[one], store=store)
    assert eng.stats_["drift_refreshes"] == 0
