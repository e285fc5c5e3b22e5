"""The live analysis's cadence does not depend on the transport's batch size.

The joiner hands over batches of ``[scan] batch_size`` positions; :meth:`LiveAnalysis.process`
analyses a batch larger than ``assess_every`` in pieces of at most ``assess_every``, so the engine's
refreshes and the flag assessments come at the same positions whatever the batch size.
"""

from __future__ import annotations

import numpy as np
import pytest

from streamclust.adapters.join import Batch
from streamclust.app.live import LiveAnalysis

SCAN = (32, 32)


@pytest.fixture(scope="module")
def phantom(make_phantom):
    ph = make_phantom(scan_shape=SCAN, seed=0)
    pos = np.arange(ph.n_positions)
    return ph, ph.frames(pos), ph.spectra(pos)


def _run(phantom, batch: int) -> tuple[LiveAnalysis, list[int]]:
    ph, frames, spectra = phantom
    live = LiveAnalysis(ph.scan_shape, ph.frame_shape, ph.energy_axis_kev, random_state=0, assess_every=64,
                        engine_params={"warmup_positions": 256, "refresh_every": 128})
    assessed_at = []
    assess = live._assess

    def record():
        assessed_at.append(live.n_seen)
        return assess()

    live._assess = record
    for s in range(0, ph.n_positions, batch):
        pos = np.arange(s, min(s + batch, ph.n_positions))
        ones = np.ones(pos.size, bool)
        live.process(Batch(pos, frames[pos], spectra[pos], ones, ones))
    return live, assessed_at


def test_large_batches_are_analysed_in_assessment_sized_pieces(phantom):
    small, at_small = _run(phantom, 64)
    large, at_large = _run(phantom, 512)
    # every 64 positions, as with 64-position batches (512-position batches alone: every 512)
    assert at_large == at_small
    assert at_large == list(range(64, SCAN[0] * SCAN[1] + 1, 64))
    assert large.engine.stats_["refreshes"] == small.engine.stats_["refreshes"] >= 5
    np.testing.assert_allclose(large.engine.memberships_, small.engine.memberships_, atol=1e-5)
    # the three before warm-up's end find no memberships to assess
    assert large.flagger.n_updates_ == small.flagger.n_updates_ == len(at_small) - 3


def test_a_batch_not_larger_than_the_cadence_is_one_piece(phantom):
    live, at = _run(phantom, 48)
    # assessed at batch ends (multiples of 48, and the scan's last, short, batch), every second
    # batch once 64 positions have passed
    n = SCAN[0] * SCAN[1]
    inner = [a for a in at if a != n]
    assert inner and all(a % 48 == 0 for a in inner)
    assert set(np.diff(inner)) <= {48, 96}


def test_pieces_are_cut_at_multiples_of_the_cadence_over_the_scan(phantom):
    """384-position batches with a cadence of 256: the pieces end at 256, 512, 768 ... positions
    into the scan (not 256, 384, 640 ...)."""
    ph, frames, spectra = phantom
    live = LiveAnalysis(ph.scan_shape, ph.frame_shape, ph.energy_axis_kev, random_state=0, assess_every=256,
                        engine_params={"warmup_positions": 256, "refresh_every": 10_000})
    ends = []
    fit = live.engine.partial_fit

    def record(positions, *args, **kwargs):
        ends.append(int(positions[-1]) + 1)
        return fit(positions, *args, **kwargs)

    live.engine.partial_fit = record
    for s in range(0, ph.n_positions, 384):
        pos = np.arange(s, min(s + 384, ph.n_positions))
        ones = np.ones(pos.size, bool)
        live.process(Batch(pos, frames[pos], spectra[pos], ones, ones))
    assert ends == [256, 384, 512, 768, 1024]


def test_centre_patterns_from_the_engine_features_equal_binning_the_frames(phantom):
    # the centres' 32 x 32 patterns are block sums of the engine's 64 x 64 features (a frame is
    # binned once); they must equal binning the raw frames directly, bit for bit, including
    # positions whose spectrum is missing (rows the engine fills with imputed values)
    from streamclust.features.reducers import FrameReducer

    ph, frames, spectra = phantom
    live = LiveAnalysis(ph.scan_shape, ph.frame_shape, ph.energy_axis_kev, random_state=0)
    pos = np.arange(40)
    hf = np.ones(40, bool)
    hs = np.ones(40, bool)
    hs[::7] = False
    hf[3] = False
    live.process(Batch(pos, frames[pos], spectra[pos], hf, hs))
    rows = hf & hs
    got = live._centre_patterns(frames[pos], rows)
    direct = FrameReducer(bin_factor=live._centre_bin, frame_shape=ph.frame_shape).fit().transform(frames[pos][rows])
    assert got.dtype == np.float32 and got.shape == (rows.sum(), *live._centre_shape)
    assert np.array_equal(got, direct.reshape(got.shape))
    assert live.engine.frame_reducer_.bin_factor < live._centre_bin  # the shortcut was taken
