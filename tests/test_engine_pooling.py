"""Live level-2 pooling (``host_pooling``) changes the live memberships only: the final partition
is per position, as the paper's (and as the offline reference's)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from streamclust.engine.streaming import StreamingEngine
from streamclust.reference import phantom_features

SCAN = (32, 32)


@pytest.fixture(scope="module")
def features(make_phantom):
    ph = make_phantom(scan_shape=SCAN, seed=0)
    cbed, spectra = phantom_features(ph)
    return ph, cbed, spectra


def _run(ph, cbed, spectra, pooling: bool, stop: int | None = None) -> StreamingEngine:
    eng = StreamingEngine(ph.n_positions, scan_shape=SCAN, frame_shape=ph.frame_shape, n_channels=ph.n_channels,
                          energy_axis=(float(ph.energy_axis_kev[0]), ph.channel_width_kev),
                          warmup_positions=256, refresh_every=128, host_min_positions=64,
                          host_pooling=pooling, random_state=0)
    red = eng.spectrum_reducer_
    eds = red.transform(spectra)
    n = ph.n_positions if stop is None else stop
    for s in range(0, n, 64):
        pos = np.arange(s, min(s + 64, n))
        eng.partial_fit_features(pos, cbed[pos], eds[pos])
    return eng


def test_pooling_changes_the_live_map_not_the_final_partition(features):
    ph, cbed, spectra = features
    pooled_mid = _run(ph, cbed, spectra, True, stop=640)
    plain_mid = _run(ph, cbed, spectra, False, stop=640)
    assert pooled_mid._host_z is not None and plain_mid._host_z is None
    assert pooled_mid.host_columns_ == tuple(range(6, 12))
    seen = pooled_mid.labels_ >= 0
    # the live maps differ (pooling is on) ...
    assert (pooled_mid.labels_[seen] != plain_mid.labels_[seen]).any()
    # ... and the final partitions agree (level 2 per position at finalize, fresh restarts)
    pooled = _run(ph, cbed, spectra, True).finalize()
    plain = _run(ph, cbed, spectra, False).finalize()
    assert pooled._host_z is None
    assert adjusted_rand_score(plain.labels_, pooled.labels_) == pytest.approx(1.0)
