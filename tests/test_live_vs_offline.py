"""The decisive test (LiberTEM habit): the live engine's final result equals the offline one.

A simulated lamella is streamed in raster order (substrate first) through
:class:`streamclust.engine.streaming.StreamingEngine` as raw 512 x 512 quad frames and 2048-channel spectra,
in batches of 128; the offline reference (:func:`streamclust.reference.run_reference`, the paper's
batch pipeline with :class:`~streamclust.cluster.fcm.FuzzyCMeans`) runs on the same scan. Their partitions
must agree (adjusted Rand index >= 0.95) and the second phase must be found as well as the
reference finds it.

The phantom: 48 x 48 positions, 4 inclusions of radius 8-16 positions (scaled to the scan width).
At these settings the reference partition is stable (FCM restarts from 4 seeds agree to ARI
>= 0.997), so agreement is a property of the pipelines, not of FCM's luck. With the default
phantom (small inclusions) 6 clusters split the film in several equally good ways (ARI 0.33
between reference seeds), and no live/offline comparison can be sharper than that.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from streamclust.engine.streaming import StreamingEngine
from streamclust.cluster.fcm import FuzzyCMeans
from streamclust.reference import best_f1, bin_frames, eds_window, run_reference
from streamclust.simulators.phantom import LamellaPhantom

logger = logging.getLogger(__name__)

SCAN = (48, 48)
BATCH = 128
N_CLUSTERS = 6


@pytest.fixture(scope="module")
def live_scan():
    ph = LamellaPhantom(scan_shape=SCAN, seed=5, n_inclusions=4, inclusion_radius=(8.0, 16.0))
    n = ph.n_positions
    width = ph.channel_width_kev
    eng = StreamingEngine(
        n, scan_shape=SCAN, frame_shape=ph.frame_shape, n_channels=ph.n_channels,
        energy_axis=(float(ph.energy_axis_kev[0]), width), n_clusters=N_CLUSTERS,
        warmup_positions=256, refresh_every=512, random_state=0,
        host_clusters=0,  # the paper's single level against the paper's reference; see below
    )
    cbed, spectra = [], []
    mid = {}
    early = None
    for start in range(0, n, BATCH):
        pos = np.arange(start, min(start + BATCH, n))
        frames = ph.frames(pos)
        spec = ph.spectra(pos)
        cbed.append(bin_frames(frames, 8))
        spectra.append(spec)
        eng.partial_fit(pos, frames, spec)
        if early is None and eng.warmed_up_:
            early = eng.memberships_[:64].copy()  # the first positions, right after the warm-up
        for q in (0.25, 0.5, 0.75):
            if start < q * n <= start + pos.size:
                mid[q] = eng.labels_.copy()
    eng.finalize()
    cbed = np.concatenate(cbed)
    spectra = np.concatenate(spectra)
    eds = eds_window(spectra, ph.energy_axis_kev, (0.2, 10.0), rebin=2)
    # 10 restarts: FCM at m = 1.2 has near-equal local optima, and one seed's optimum is not a
    # yardstick (on this phantom seed 0 alone stopped at a higher objective than seeds 1-3)
    ref = run_reference(cbed, eds, clusterer=FuzzyCMeans(N_CLUSTERS, n_init=10, random_state=0),
                        n_clusters=N_CLUSTERS, random_state=0)
    return dict(engine=eng, ref=ref, truth=ph.truth.second_phase.ravel(), mid=mid, early=early,
                cbed=cbed, eds=eds)


def test_live_partition_agrees_with_offline_reference(live_scan, record_property):
    eng, ref = live_scan["engine"], live_scan["ref"]
    lab = eng.labels_
    assert (lab >= 0).all()
    ari = adjusted_rand_score(ref.labels, lab)
    f1_live = best_f1(lab, live_scan["truth"]).single
    f1_ref = best_f1(ref.labels, live_scan["truth"]).single
    record_property("ari_live_vs_reference", ari)
    record_property("f1_second_phase_live", f1_live)
    record_property("f1_second_phase_reference", f1_ref)
    logger.info("ARI live vs reference %.4f; second-phase F1 live %.3f, reference %.3f; "
                "components live %d, reference %d", ari, f1_live, f1_ref, eng.n_components_,
                ref.n_components)
    assert ari >= 0.95, f"live partition disagrees with the offline reference: ARI {ari:.3f}"
    assert f1_live >= f1_ref - 0.03, f"second phase F1 live {f1_live:.3f} vs reference {f1_ref:.3f}"
    # the sketch's explained-variance ratios run a little low, so the 1 % rule may stop one early
    assert abs(eng.n_components_ - ref.n_components) <= 1


def test_mid_scan_partitions_are_reported(live_scan, record_property):
    """Report (not assert) how close the partition at 25/50/75 % of the scan is to the final one."""
    final = live_scan["engine"].labels_
    for q, lab in sorted(live_scan["mid"].items()):
        seen = lab >= 0
        ari = adjusted_rand_score(final[seen], lab[seen])
        record_property(f"ari_at_{int(q * 100)}pct_vs_final", ari)
        logger.info("partition at %d %% of the scan vs final (on positions seen then): ARI %.3f",
                    int(q * 100), ari)
    assert set(live_scan["mid"]) == {0.25, 0.5, 0.75}


def test_early_memberships_were_refreshed(live_scan):
    eng = live_scan["engine"]
    early = live_scan["early"]
    assert early is not None and np.isfinite(early).all()
    now = eng.memberships_[:64]
    assert np.isfinite(now).all()
    np.testing.assert_allclose(now.sum(axis=1), 1.0, atol=1e-5)
    # the substrate rows were clustered against a substrate-only model; the final model differs
    assert np.abs(now - early).max() > 0.05
    assert eng.stats_["refreshes"] >= 4


def test_replayed_features_give_the_same_result(live_scan):
    """partial_fit_features on the binned frames and windowed spectra equals the raw-frame path."""
    ref_eng = live_scan["engine"]
    eng = StreamingEngine(**{k: getattr(ref_eng, k) for k in (
        "n_positions", "scan_shape", "frame_shape", "n_channels", "energy_axis", "n_clusters",
        "warmup_positions", "refresh_every", "random_state", "host_clusters")})
    cbed, eds = live_scan["cbed"], live_scan["eds"]
    for start in range(0, cbed.shape[0], BATCH):
        pos = np.arange(start, min(start + BATCH, cbed.shape[0]))
        eng.partial_fit_features(pos, cbed[pos], eds[pos])
    eng.finalize()
    np.testing.assert_array_equal(eng.labels_, ref_eng.labels_)
    np.testing.assert_allclose(eng.memberships_, ref_eng.memberships_, atol=1e-5)


# ------------------------------------------------------------------ the whole lamella, two levels
# The default phantom's whole scan (substrate, film with small inclusions, caps): one level finds
# no second phase (F1 0.17, tests/test_reference.py); the host refinement (streamclust.cluster.host_refine)
# finds it live as well as offline. Measured (64 x 64, seeds 0 / 2 / 3): ARI live vs reference
# 0.988 / 0.993 / 0.993 since the final refresh reads the PCA from the stored positions
# (engine ``final_pca_sample``; with the streaming sketch's read-out 0.918 / 0.948 / 0.646) and
# level 2 uses 7 power iterations (streamclust.decomposition.sample_pca).
@pytest.fixture(scope="module")
def whole_scan():
    ph = LamellaPhantom(scan_shape=(64, 64), seed=0)
    n = ph.n_positions
    eng = StreamingEngine(
        n, scan_shape=ph.scan_shape, frame_shape=ph.frame_shape, n_channels=ph.n_channels,
        energy_axis=(float(ph.energy_axis_kev[0]), ph.channel_width_kev), n_clusters=N_CLUSTERS,
        warmup_positions=512, refresh_every=512, random_state=0,
    )
    cbed, spectra = [], []
    for start in range(0, n, 256):
        pos = np.arange(start, min(start + 256, n))
        frames, spec = ph.frames(pos), ph.spectra(pos)
        cbed.append(bin_frames(frames, 8))
        spectra.append(spec)
        eng.partial_fit(pos, frames, spec)
    eng.finalize()
    eds = eds_window(np.concatenate(spectra), ph.energy_axis_kev, (0.2, 10.0), rebin=2)
    matrix = ph.truth.labels.ravel() == list(ph.truth.label_names).index("cfs_matrix")
    return eng, np.concatenate(cbed), eds, ph.truth.second_phase.ravel(), matrix


def test_whole_lamella_second_phase_is_its_own_cluster_live(whole_scan, record_property):
    eng, cbed, eds, truth, matrix = whole_scan
    assert eng.memberships_.shape[1] == N_CLUSTERS + eng.host_clusters
    assert eng.host_cluster_ is not None
    np.testing.assert_allclose(eng.memberships_.sum(axis=1), 1.0, atol=1e-4)
    live = best_f1(eng.labels_, truth)
    ref = run_reference(cbed, eds, clusterer=FuzzyCMeans(N_CLUSTERS, n_init=10, random_state=0),
                        n_clusters=N_CLUSTERS, random_state=0, refine_host=eng.host_clusters,
                        scan_shape=eng.scan_shape, host_merge_effect=eng.host_merge_effect,
                        eds_energies_kev=eng.spectrum_reducer_.energies_kev_, host_spatial=eng.host_spatial)
    one_level = run_reference(cbed, eds, clusterer=FuzzyCMeans(N_CLUSTERS, n_init=10, random_state=0),
                              n_clusters=N_CLUSTERS, random_state=0)
    f1_ref = best_f1(ref.labels, truth).single
    f1_one = best_f1(one_level.labels, truth).single
    ari = adjusted_rand_score(ref.labels, eng.labels_)
    for k, v in (("whole_f1_live", live.single), ("whole_f1_reference", f1_ref),
                 ("whole_f1_one_level", f1_one), ("whole_ari_live_vs_reference", ari)):
        record_property(k, v)
    logger.info("whole lamella: F1 live %.3f, reference %.3f, one level %.3f; ARI %.3f",
                live.single, f1_ref, f1_one, ari)
    # one cluster (not a union) is the second phase, and it is a sub-cluster of the host
    assert live.single >= 0.6 and live.single_cluster >= N_CLUSTERS
    assert f1_one < 0.4
    assert ari >= 0.95, f"whole lamella, two levels: live partition disagrees with the reference: ARI {ari:.3f}"
    # the map a microscopist reads: the matrix is one region (streamclust.cluster.merge; without
    # the merge its largest cluster held 0.29 of it on this seed), live and in the reference
    for name, lab in (("live", eng.labels_), ("reference", ref.labels)):
        share = np.bincount(lab[matrix]).max() / matrix.sum()
        record_property(f"whole_matrix_share_{name}", share)
        assert share >= 0.9, f"{name}: the largest cluster holds {share:.2f} of the matrix"
    # the final read-out came from the stored positions, and kept the reference's component count
    assert eng.stats_["sample_pca"] == 1
    assert abs(eng.n_components_ - ref.n_components) <= 1
