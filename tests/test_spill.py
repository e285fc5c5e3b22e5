"""Per-position arrays on disk (issue 16): the spilled position store gives bit-identical results,
keeps what it holds resident bounded by a chunk, and leaves no file behind."""

from __future__ import annotations

import os
import pickle

import numpy as np
import psutil
import pytest

from streamclust.engine.streaming import SPILL_MIN_BYTES, StreamingEngine
from streamclust.decomposition.position_store import PositionStore
from streamclust.decomposition.spill import release, spill_array


def _counts(n, f, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, (n, f)).astype(np.float32)
    x[:, :3] += 400  # escapes (above one byte)
    return x


@pytest.mark.parametrize("mode", ["counts", "full", "basis"])
def test_a_spilled_store_equals_the_in_memory_store(tmp_path, mode):
    n, f = 3000, 96
    x = _counts(n, f)
    c = np.linspace(0.5, 2.0, f).astype(np.float32)
    stores = [PositionStore(n, f, rank=16, mode=mode), PositionStore(n, f, rank=16, mode=mode, spill_dir=str(tmp_path))]
    B = np.linalg.qr(np.random.default_rng(1).normal(size=(f, 16)))[0]
    for st in stores:
        if mode == "counts":
            st.set_scale(c)
        if mode == "basis":
            st.set_basis(B, x.mean(axis=0))
        for s in range(0, n, 500):
            st.add(np.arange(s, s + 500), x[s:s + 500] * (c if mode == "counts" else 1))
    V = np.linalg.qr(np.random.default_rng(2).normal(size=(f, 5)))[0]
    D = np.ones(f)
    a, b = (st.project(D, V, np.zeros(f)) for st in stores)
    assert np.array_equal(a, b)
    idx = np.arange(0, n, 7)
    assert np.array_equal(stores[0].vectors(idx), stores[1].vectors(idx))
    # the file's name is gone at once: nothing to clean up, whatever happens to the process
    assert os.listdir(tmp_path) == []
    # a pickled spilled store (a checkpoint of the engine) holds the data
    back = pickle.loads(pickle.dumps(stores[1]))
    assert np.array_equal(back.vectors(idx), stores[0].vectors(idx))


def test_release_keeps_the_resident_set_bounded(tmp_path):
    proc = psutil.Process()
    a = spill_array((40000, 4096), np.uint8, tmp_path, "big", unlink=True)  # 164 MB
    base = proc.memory_info().rss
    for s in range(0, 40000, 4000):
        a[s:s + 4000] = 1
        release(a, s, s + 4000)
    grown = proc.memory_info().rss - base
    total = 0
    for s in range(0, 40000, 4000):
        total += int(a[s:s + 4000].sum(dtype=np.int64))
        release(a, s, s + 4000)
    assert total == 40000 * 4096
    # written and read in full, resident at most a few chunks (16 MB each), not the 164 MB file
    assert grown < 48 * 2**20 and proc.memory_info().rss - base < 48 * 2**20
    release(np.zeros(4), 0, 4)  # an in-memory array: nothing to do


def test_the_engine_spills_a_large_store_only(tmp_path):
    small = StreamingEngine(1024, frame_shape=(32, 32), n_channels=64, bin_factor=4, host_clusters=0)
    assert small.store_.spill_dir is None
    rows = SPILL_MIN_BYTES // (64 + 64 // 2) + 1  # features: 8 x 8 binned + 32 EDS
    big = StreamingEngine(rows, frame_shape=(32, 32), n_channels=64, bin_factor=4, host_clusters=0,
                          energy_axis=(0.0, 0.2), energy_window_kev=(0.0, 12.8))
    assert big.store_.spill_dir is not None
    forced = StreamingEngine(1024, frame_shape=(32, 32), n_channels=64, bin_factor=4, host_clusters=0,
                             spill=str(tmp_path))
    assert forced.store_.spill_dir == str(tmp_path)
    off = StreamingEngine(rows, frame_shape=(32, 32), n_channels=64, bin_factor=4, host_clusters=0,
                          energy_axis=(0.0, 0.2), energy_window_kev=(0.0, 12.8), spill="off")
    assert off.store_.spill_dir is None
    with pytest.raises(ValueError, match="spill"):
        StreamingEngine(1024, frame_shape=(32, 32), n_channels=64, bin_factor=4, host_clusters=0,
                        spill=str(tmp_path / "missing"))


def test_a_spilled_centre_store_equals_the_in_memory_one(tmp_path):
    from streamclust.engine.centres import ThresholdedCentres

    rng = np.random.default_rng(4)
    n = 900
    frames = rng.poisson(2.0, (n, 16, 16)).astype(np.uint16)
    spectra = rng.poisson(1.0, (n, 64)).astype(np.uint16)
    u = rng.dirichlet(np.ones(3), n)
    out = []
    for spill in (None, str(tmp_path)):
        tc = ThresholdedCentres(3, (0.5, 0.75), n_positions=n, cbed_shape=(8, 8), spill_dir=spill)
        for s in range(0, n, 300):
            tc.add(np.arange(s, s + 300), frames[s:s + 300], spectra[s:s + 300])
        c = tc.update(u)
        cbed, eds = tc.features(eds_rebin=4)
        tc.release()
        out.append((c.cbed.copy(), c.eds.copy(), np.array(cbed), np.array(eds), tc.recompute().eds.copy()))
    for a, b in zip(*out):
        assert np.array_equal(a, b, equal_nan=True)
    assert os.listdir(tmp_path) == []
