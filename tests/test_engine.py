"""StreamingEngine and PositionStore: contract, refresh, bad input, pickling, reproducibility.

The live-versus-offline comparison on the simulated lamella is in tests/test_live_vs_offline.py;
these tests use a small synthetic raster scan (three phases met in blocks, like substrate then film)
so they run in seconds.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from streamclust.engine.streaming import StreamingEngine
from streamclust.decomposition.position_store import PositionStore

N = 900
FRAME = (32, 32)
CHANNELS = 128


def _scan(seed: int = 0):
    """Raster-ordered frames/spectra: phase 0 for the first 300 positions, then 1 and 2 mixed."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(N, dtype=int)
    truth[300:] = 1 + (rng.random(N - 300) < 0.3)
    frames = rng.poisson(4.0, (N, *FRAME)).astype(np.uint16)
    frames[truth == 0, :8, :8] += rng.poisson(20.0, (np.sum(truth == 0), 8, 8)).astype(np.uint16)
    frames[truth == 1, 8:16, 8:16] += 15
    frames[truth == 2, 16:24, :8] += 15
    spectra = rng.poisson(1.0, (N, CHANNELS)).astype(np.uint16)
    spectra[truth == 1, 20:26] += 5
    spectra[truth == 2, 60:66] += 5
    return frames, spectra, truth


@pytest.fixture(scope="module")
def scan():
    return _scan()


def _engine(**kw) -> StreamingEngine:
    params = dict(frame_shape=FRAME, n_channels=CHANNELS, energy_axis=(0.0, 0.1),
                  energy_window_kev=(0.0, 12.8), rebin=1, n_clusters=3, bin_factor=4,
                  warmup_positions=150, refresh_every=300, basis_rank=24, max_components=8,
                  random_state=0, host_clusters=0)  # single level here; tests/test_host_refine.py
    params.update(kw)
    return StreamingEngine(N, **params)


def _feed(eng: StreamingEngine, frames, spectra, start: int = 0, stop: int = N, batch: int = 100):
    for s in range(start, stop, batch):
        pos = np.arange(s, min(s + batch, stop))
        eng.partial_fit(pos, frames[pos], spectra[pos])
    return eng


@pytest.mark.parametrize("store", ["counts", "full", "basis"])
def test_engine_finds_the_phases_and_memberships_are_a_partition(scan, store):
    frames, spectra, truth = scan
    eng = _feed(_engine(scan_shape=(30, 30), store=store), frames, spectra).finalize()
    assert eng.store_.mode == store
    U = eng.memberships_
    assert U.shape == (N, 3) and U.dtype == np.float32
    assert np.isfinite(U).all()
    np.testing.assert_allclose(U.sum(axis=1), 1.0, atol=1e-5)
    assert adjusted_rand_score(truth, eng.labels_) > 0.95
    st = eng.stats_
    assert st["positions"] == N and st["positions_seen"] == N and st["batches"] == 9
    assert st["refreshes"] >= 3 and st["positions_per_s"] > 0
    assert set(st["seconds"]) >= {"reduce_frames", "pca", "refresh", "cluster"}
    v = eng.validity_
    assert 1 / 3 <= v["partition_coefficient"] <= 1 and v["partition_entropy"] >= 0 and v["xie_beni"] > 0
    assert eng.cluster_centers_.shape == (3, eng.n_components_)
    assert eng.explained_variance_ratio_.shape == (eng.n_components_,)
    assert eng.membership_maps().shape == (30, 30, 3)


def test_unseen_positions_are_nan_and_minus_one(scan):
    frames, spectra, _ = scan
    eng = _engine()
    assert np.isnan(eng.memberships_).all() and (eng.labels_ == -1).all()
    _feed(eng, frames, spectra, stop=100)  # still inside the warm-up
    assert np.isnan(eng.memberships_).all() and not eng.warmed_up_
    _feed(eng, frames, spectra, start=100, stop=400)
    assert eng.warmed_up_
    assert np.isfinite(eng.memberships_[:400]).all()
    assert np.isnan(eng.memberships_[400:]).all() and (eng.labels_[400:] == -1).all()


def test_refresh_recomputes_early_memberships(scan):
    frames, spectra, _ = scan
    # no refresh of any kind until asked (the new-material test would refresh at phase 1: test_drift.py)
    eng = _feed(_engine(refresh_every=None, drift_threshold=None), frames, spectra, stop=200)
    early = eng.memberships_[:150].copy()  # clustered on phase 0 only: 3 clusters split it
    _feed(eng, frames, spectra, start=200)
    np.testing.assert_array_equal(eng.memberships_[:150], early)  # no refresh scheduled yet
    eng.refresh()
    assert np.abs(eng.memberships_[:150] - early).max() > 0.5
    # after the refresh the whole first phase is one cluster
    assert np.unique(eng.labels_[:300]).size == 1


def test_short_scan_finalize_ends_the_warm_up(scan):
    frames, spectra, _ = scan
    eng = _feed(_engine(warmup_positions=500), frames, spectra, stop=120)
    assert not eng.warmed_up_
    eng.finalize()
    assert eng.warmed_up_ and np.isfinite(eng.memberships_[:120]).all()
    assert np.isnan(eng.memberships_[120:]).all()


def test_too_few_positions_to_cluster_is_refused(scan):
    frames, spectra, _ = scan
    eng = _feed(_engine(), frames, spectra, stop=2, batch=2)
    with pytest.raises(ValueError, match="at least 3"):
        eng.finalize()


@pytest.mark.parametrize("store", ["counts", "full", "basis"])
def test_pickle_mid_scan_continues_identically(scan, store):
    frames, spectra, _ = scan
    a = _feed(_engine(store=store), frames, spectra, stop=550)
    b = pickle.loads(pickle.dumps(a))
    assert b.stats_["pending"] > 0  # positions not yet encoded travel with the pickle
    _feed(a, frames, spectra, start=550).finalize()
    _feed(b, frames, spectra, start=550).finalize()
    np.testing.assert_array_equal(a.memberships_, b.memberships_)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)


def test_random_state_makes_runs_reproducible(scan):
    frames, spectra, _ = scan
    a = _feed(_engine(random_state=7, store="basis"), frames, spectra).finalize()
    b = _feed(_engine(random_state=7, store="basis"), frames, spectra).finalize()
    np.testing.assert_array_equal(a.memberships_, b.memberships_)


def test_missing_signals_and_duplicates_are_counted(scan):
    frames, spectra, truth = scan
    eng = _engine()
    has_spec = np.ones(N, dtype=bool)
    has_spec[350:360] = False
    has_frame = np.ones(N, dtype=bool)
    has_frame[400:405] = False
    has_frame[410] = has_spec[410] = False
    for s in range(0, N, 100):
        pos = np.arange(s, s + 100)
        eng.partial_fit(pos, frames[pos], spectra[pos], has_frame=has_frame[pos], has_spectrum=has_spec[pos])
    eng.partial_fit(np.arange(0, 10), frames[:10], spectra[:10])  # re-sent positions
    eng.partial_fit(np.arange(10, 12), None, spectra[10:12])  # spectra only
    eng.finalize()
    st = eng.stats_
    assert st["skipped"] == 1 and st["incomplete"] == 17 and st["duplicates"] == 12
    assert np.isnan(eng.memberships_[410]).all()
    ok = np.ones(N, dtype=bool)
    ok[410] = False
    assert np.isfinite(eng.memberships_[ok]).all()
    # a position with one signal is still clustered by the one it has
    assert adjusted_rand_score(truth[ok], eng.labels_[ok]) > 0.9


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda e, f, s: e.partial_fit(np.array([0, N]), f[:2], s[:2]), f"position {N} is outside"),
        (lambda e, f, s: e.partial_fit(np.array([-1, 0]), f[:2], s[:2]), "position -1 is outside"),
        (lambda e, f, s: e.partial_fit(np.array([0.0, 1.0]), f[:2], s[:2]), "integer"),
        (lambda e, f, s: e.partial_fit(np.arange(3), f[:2], s[:3]), r"frames must have shape \(3"),
        (lambda e, f, s: e.partial_fit(np.arange(2), f[:2], s[:2, :10]), "spectra must have shape"),
        (lambda e, f, s: e.partial_fit(np.arange(2), f[:2], s[:2], has_frame=[True]), "has_frame"),
        (lambda e, f, s: e.partial_fit_features(np.arange(2), np.zeros((2, 5)), np.zeros((2, 128))),
         "features must have shapes"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(scan, call, match):
    frames, spectra, _ = scan
    eng = _engine()
    with pytest.raises(ValueError, match=match):
        call(eng, frames, spectra)
    # the engine survives: a good batch still goes in
    eng.partial_fit(np.arange(5), frames[:5], spectra[:5])
    assert eng.stats_["positions"] == 5


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="scan_shape"):
        StreamingEngine(10, scan_shape=(3, 4))
    with pytest.raises(ValueError, match="pca_method"):
        StreamingEngine(10, pca_method="svd")
    with pytest.raises(ValueError, match="warmup_positions"):
        StreamingEngine(10, warmup_positions=2)
    with pytest.raises(ValueError, match="store"):
        StreamingEngine(10, store="disk")


def test_auto_store_follows_the_memory_budget():
    small = StreamingEngine(1000, full_store_max_bytes=2**30)
    assert small.store_.mode == "counts"
    big = StreamingEngine(512 * 512, full_store_max_bytes=2**30)
    assert big.store_.mode == "basis" and big.stats_["bytes_per_position"] == 513


# -- PositionStore ------------------------------------------------------------------------------

def test_store_rebase_is_exact_within_the_old_span():
    rng = np.random.default_rng(1)
    F, R = 40, 6
    X = rng.normal(size=(30, 4)) @ rng.normal(size=(4, F)) + 3.0
    Q, _ = np.linalg.qr(rng.normal(size=(F, R)))
    Q[:, :4] = np.linalg.qr(np.linalg.svd(X - X.mean(0), full_matrices=False)[2][:4].T)[0]
    Q, _ = np.linalg.qr(Q)
    store = PositionStore(50, F, rank=R)
    store.set_basis(Q[:, :4], X.mean(0))
    store.add(np.arange(30), X)
    V = np.linalg.qr(rng.normal(size=(F, 3)))[0]
    D = rng.uniform(0.5, 2.0, F)
    mean_now = rng.normal(size=F)
    direct = (X * D - mean_now) @ V
    np.testing.assert_allclose(store.project(D, V, mean_now), direct, rtol=1e-4, atol=1e-3)
    # a rotated, larger basis holding the old span, about another centre: still exact
    rot = np.linalg.qr(rng.normal(size=(R, R)))[0]
    store.set_basis(Q @ rot, X.mean(0) + Q[:, 0])
    np.testing.assert_allclose(store.project(D, V, mean_now), direct, rtol=1e-4, atol=1e-3)
    assert store.n_rebases_ == 1 and store.n_seen == 30
    assert np.allclose(store.residual(X), 0.0, atol=1e-8)


def test_store_full_mode_and_sizes():
    X = np.arange(12, dtype=np.float32).reshape(3, 4)
    full = PositionStore(10, 4, mode="full")
    assert full.add(np.array([0, 1, 2]), X) == 0
    assert full.add(np.array([2]), X[2:]) == 1
    np.testing.assert_array_equal(full.project(np.ones(4), np.eye(4), np.zeros(4)), X)
    assert full.nbytes_per_position == 4 * 4 + 1
    compact = PositionStore(4, 4586, rank=128)
    assert compact.nbytes_per_position == 513
    with pytest.raises(ValueError, match="position 10 is outside"):
        full.add(np.array([10]), X[:1])
    with pytest.raises(RuntimeError, match="no basis"):
        PositionStore(10, 4).add(np.array([0]), X[:1])
