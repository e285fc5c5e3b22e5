"""The centre store's public read accessor, which the live view reads it through (issue 20)."""

from __future__ import annotations

import numpy as np
import pytest

from streamclust.engine.centres import ThresholdedCentres


def test_stored_and_signals_read_copies_and_refuse_bad_positions():
    store = ThresholdedCentres(2, n_positions=6, cbed_shape=(4, 4))
    assert store.stored is None
    with pytest.raises(RuntimeError, match="add"):
        store.signals([0])
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 50, (2, 8, 8)).astype(np.float32)
    spectra = rng.integers(0, 9, (2, 16)).astype(np.uint16)
    store.add([4, 1], frames, spectra)
    assert store.stored.tolist() == [False, True, False, False, True, False]
    with pytest.raises(ValueError):
        store.stored[0] = True  # read-only: a reader cannot mark a position stored
    patterns, spec = store.signals([1, 4, 0])
    assert patterns.shape == (3, 4, 4) and spec.shape == (3, 16)
    # frames are block-summed 2 x 2 to the stored shape; spectra kept exactly; unstored reads 0
    np.testing.assert_array_equal(patterns[0], frames[1].reshape(4, 2, 4, 2).sum(axis=(1, 3)))
    np.testing.assert_array_equal(spec[:2], spectra[[1, 0]])
    assert not patterns[2].any() and not spec[2].any()
    patterns[0] = -1  # a copy: the store is untouched
    assert (store.signals([1])[0] >= 0).all()
    with pytest.raises(IndexError):
        store.signals([6])
    with pytest.raises(IndexError):
        store.signals([-1])
