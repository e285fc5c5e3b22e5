"""The demo: a simulated live scan, end to end, with results and pictures.

It starts the simulated microscope (phantom + Merlin TCP server + EDS publisher on one scan clock),
receives the scan over real sockets exactly as on an instrument, reduces every frame as it arrives,
feeds every batch to the live analysis (streaming engine, thresholded centres, second-phase flags
published as events), and after the scan runs the paper's offline pipeline on the same data as the
yardstick: live-versus-offline agreement (ARI), and second-phase F1 of merged signals and of each
signal alone against the phantom's ground truth.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from streamclust import __version__
from streamclust.results.writer import json_default
from streamclust.decomposition.spill import release

logger = logging.getLogger(__name__)

__all__ = ["run_demo"]


#: Positions the offline yardstick fits its statistics on (robust scales, balance, PCA, level-2 space):
#: the scan up to 8,192 positions (the paper's pipeline exactly, the whole 64 x 64 demo), a seeded
#: sample above, so its memory does not grow with the scan (issue 16). The engine's own final PCA
#: sample has the same size.
REFERENCE_SAMPLE = 8192


def run_demo(out_dir: str | Path, *, seed: int = 0, scan_shape: tuple[int, int] = (64, 64),
             n_clusters: int | None = None, dwell_s: float = 0.0, bin_factor: int | None = None,
             progress=None, config=None, liveview=None, inclusions: int | None = None,
             dose: float = 1.0, simulator: str = "process") -> dict:
    """Run the demo and write ``results.hspy``, pictures and ``summary.json`` into ``out_dir``.

    Parameters
    ----------
    out_dir : path-like
    seed : int
        The phantom's sample seed; also the engine's ``random_state`` unless the configuration sets
        ``[engine] random_state``.
    scan_shape : (ny, nx)
    n_clusters, bin_factor : int, optional
        Override ``[engine]`` of ``config`` (default there: 6 and 8).
    dwell_s : float
        Seconds a position (0: as fast as the machine goes). This paces the scan clock only: the
        counts a position holds are set by ``dose``.
    inclusions : int, optional
        Second-phase inclusions of the phantom (default: the phantom's, 8); 0 is a single-phase
        control sample, for false-alarm checks.
    dose : float
        Beam current as a multiple of the phantom's 4 pA at its 10 ms reference dwell (1.0: about 35
        X-ray counts a spectrum and 400 counts a direct-beam pixel; 2 ms at 20 pA is the same dose).
    progress : ProgressDisplay or callable, optional
        A :class:`~streamclust.app.progress.ProgressDisplay`, or ``progress(done, total)``.
    config : Config, optional
        ``[engine]``, ``[centres]``, ``[flags]``, ``[events]`` and ``[scan]`` batching apply; the
        demo binds its event socket on a free port unless ``[events] endpoint`` is set.
    liveview : LiveView, optional
    simulator : {"process", "thread"}
        Where the simulated microscope runs: in a process of its own (default; a real microscope is
        another machine, and in this process its threads competed with the analysis for the
        interpreter: :mod:`streamclust.simulators.microscope_process`), or in threads of this one.

    Returns the summary dictionary (also written as ``summary.json``).
    """
    from sklearn.metrics import adjusted_rand_score

    from streamclust.app.acquisition import acquire_scan
    from streamclust.app.config import load_config
    from streamclust.cluster.fcm import FuzzyCMeans
    from streamclust.app.progress import ProgressDisplay
    from streamclust.reference import best_f1, run_reference
    from streamclust.app.run import ScanSession
    from streamclust.engine.threads import kernel_threads
    from streamclust.simulators.microscope import MicroscopeConfig, SimulatedMicroscope
    from streamclust.simulators.microscope_process import MicroscopeProcess
    from streamclust.simulators.phantom import LamellaPhantom

    if not dose > 0:
        raise ValueError(f"dose must be > 0, got {dose!r}")
    if simulator not in ("process", "thread"):
        raise ValueError(f"simulator must be 'process' or 'thread', got {simulator!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    phantom_kwargs = {"scan_shape": [int(v) for v in scan_shape], "seed": int(seed), "n_inclusions": inclusions,
                      "beam_current_pa": 4.0 * float(dose)}
    # the sample's truth (and the follow-up server's sample) here; with simulator="process" the
    # detectors serve the same phantom, built from the same settings, in their own process
    phantom = LamellaPhantom(**{**phantom_kwargs, "scan_shape": tuple(phantom_kwargs["scan_shape"])})
    n = phantom.n_positions
    # the scan's reduced features (for the offline yardstick) and raw spectra (for the pictures) go
    # to memory-mapped scratch files beside the results, not RAM: 22 kB a position, 1.4 GB at
    # 256 x 256 (issue 16: what grows with the scan goes to disk)
    scratch = tempfile.TemporaryDirectory(prefix=".scratch-", dir=out)
    eds = _scratch(scratch.name, "spectra", (n, phantom.n_channels), np.uint16)
    eds_sum = np.zeros(phantom.n_channels, np.float64)
    have_frame = np.zeros(n, bool)
    have_spectrum = np.zeros(n, bool)
    vbf = np.zeros(n, np.float64)

    cfg = config if config is not None else load_config()
    cfg = cfg.override("engine", n_clusters=n_clusters, bin_factor=bin_factor,
                       random_state=None if "engine.random_state" in cfg.explicit else seed)
    cfg = cfg.override("scan", shape=list(phantom.scan_shape))
    n_clusters = cfg.engine.n_clusters
    seed_engine = cfg.engine.random_state
    display = progress if isinstance(progress, ProgressDisplay) else None
    session = ScanSession(cfg, scan_shape=phantom.scan_shape, frame_shape=phantom.frame_shape,
                          energy_axis_kev=phantom.energy_axis_kev, out_dir=out, scan_id=f"demo-{seed}",
                          progress=display, liveview=liveview, source=None,
                          instrument={"dwell_s": phantom.dwell_s, "mrad_per_px": phantom.options["mrad_per_px"]},
                          events_endpoint=None if "events.endpoint" in cfg.explicit else "tcp://127.0.0.1:0")
    live = session.live
    session.warm_up()  # JIT before the detector is armed, never on the first live frame
    # the offline yardstick clusters the features the engine reduced (same binning, same EDS
    # window): kept as the engine makes them, so no frame is binned twice
    engine = live.engine
    cbed = _scratch(scratch.name, "cbed", (n, engine.n_cbed_features_), np.float32)
    eds_feat = _scratch(scratch.name, "eds_features", (n, engine.n_eds_features_), np.float32)

    def keep_features(pos, cb, ed, hf, hs) -> None:
        # written rows leave the resident set (the file keeps them): 1.4 GB of scratch at 256 x 256
        if hf.any():
            cbed[pos[hf]] = cb[hf]
            release(cbed, int(pos[hf].min()), int(pos[hf].max()) + 1)
        if hs.any():
            eds_feat[pos[hs]] = ed[hs]
            release(eds_feat, int(pos[hs].min()), int(pos[hs].max()) + 1)

    engine.on_features = keep_features

    def on_batch(batch) -> None:
        session.on_batch(batch)
        p = batch.positions
        fm = batch.has_frame
        if fm.any():
            # virtual bright field: counts in the central 8x8-binned pixels around the direct beam
            # (the window first: indexing the rows first copied every whole frame, 0.5 MiB each)
            vbf[p[fm]] = batch.frames[:, 236:276, 236:276][fm].sum(axis=(1, 2))
            have_frame[p[fm]] = True
        sm = batch.has_spectrum
        if sm.any():
            eds[p[sm]] = batch.spectra[sm]
            release(eds, int(p[sm].min()), int(p[sm].max()) + 1)
            eds_sum[:] += batch.spectra[sm].sum(axis=0, dtype=np.float64)
            have_spectrum[p[sm]] = True
        if progress is not None and display is None:
            progress(int(have_frame.sum()), n)

    config = MicroscopeConfig(data_port=0, control_port=0, eds_port=0, dwell_s=dwell_s)
    view = session.live.liveview
    followup = None
    if view is not None and hasattr(view, "followup_endpoint") and view.followup_endpoint is None:
        # the live view's follow-up button acts on the simulated microscope: a follow-up server
        # re-acquires the flag's regions at a longer dwell (docs/events.md section 4)
        from streamclust.simulators.followup import FollowUpServer

        followup = FollowUpServer(phantom).start()
        followup.wait_for_listen()
        view.followup_endpoint = followup.endpoint
    if simulator == "process":
        scope_cm = MicroscopeProcess(phantom_kwargs, dataclasses.asdict(config))
    else:
        scope_cm = SimulatedMicroscope(phantom, config)
    with scope_cm as scope:
        if simulator == "process":
            address, eds_endpoint = scope.data_address, scope.eds_endpoint
        else:
            address, eds_endpoint = scope.merlin.data_address, scope.eds.endpoint
        # the scan starts when the receiver connects (a headless detector): the microscope's own
        # start-up (building the phantom, compiling its kernels) is not acquisition time
        t0 = time.perf_counter()
        report = acquire_scan(tuple(address), eds_endpoint, n, on_batch, batch_size=cfg.scan.batch_size,
                              join_timeout_s=cfg.scan.join_timeout_s, on_missing=cfg.scan.on_missing)
    elapsed = time.perf_counter() - t0  # the last position acquired *and* analysed
    t_end = time.perf_counter()
    session.end_scan()
    finalize_s = time.perf_counter() - t_end
    t_offline = time.perf_counter()

    # the yardstick's kernels with the engine's thread count: on a busy 2-core machine a parallel
    # FCM pass waited for a descheduled worker (173 s for the 128 x 128 yardstick; streamclust.engine.threads)
    with kernel_threads(cfg.engine.kernel_threads):
        both = have_frame & have_spectrum
        truth = phantom.truth.second_phase.ravel()
        rows = np.flatnonzero(both)
        scores = {}
        labels = {}
        # The offline yardstick is the paper's batch pipeline with the same second level as the engine
        # (host refinement, streamclust.cluster.host_refine), fuzzy C-means with 10 restarts; the paper's single
        # level is reported beside it (on a whole lamella it finds no second phase: docs/engine.md).
        k2 = int(live.engine.host_clusters)
        results = {}
        for name, sig in (("merged", "merged"), ("eds_only", "eds"), ("cbed_only", "cbed")):
            res = run_reference(cbed, eds_feat, rows=rows, sample_size=REFERENCE_SAMPLE, signals=sig,
                                n_clusters=n_clusters, random_state=seed_engine, refine_host=k2,
                                scan_shape=tuple(scan_shape), scan_positions=rows, host_overlap=live.engine.host_overlap,
                                host_mixing=live.engine.host_mixing or 0.0,
                                host_merge_effect=live.engine.host_merge_effect,
                                host_merge_elements=tuple(live.engine.host_merge_elements),
                                eds_energies_kev=live.engine.spectrum_reducer_.energies_kev_,
                                host_spatial=live.engine.host_spatial,
                                clusterer=FuzzyCMeans(n_clusters, n_init=10, random_state=seed_engine))
            results[name] = res
            lab = np.full(n, -1, np.int64)
            lab[both] = res.labels
            labels[name] = lab
            scores[name] = float(best_f1(res.labels, truth[both]).single)
            logger.info("%s: %d components, second-phase F1 %.3f", name, res.n_components, scores[name])
        single = run_reference(cbed, eds_feat, rows=rows, sample_size=REFERENCE_SAMPLE, signals="merged",
                               n_clusters=n_clusters, random_state=seed_engine,
                               clusterer=FuzzyCMeans(n_clusters, n_init=10, random_state=seed_engine))
        f1_single_level = float(best_f1(single.labels, truth[both]).single)

    offline_s = time.perf_counter() - t_offline
    live_labels = np.asarray(live.engine.labels_)
    labels["live"] = live_labels
    ari = float(adjusted_rand_score(results["merged"].labels, live_labels[both]))
    live_f1 = float(best_f1(live_labels[both], truth[both]).single)
    # the map a microscopist reads: the share of the matrix's positions in its largest cluster
    matrix = phantom.truth.labels.ravel() == list(phantom.truth.label_names).index("cfs_matrix")
    matrix_share = {name: largest_share(lab, matrix) for name, lab in
                    (("live", live_labels), ("offline_merged", labels["merged"]))}

    frames_received = int(report.merlin.get("frames_received", int(have_frame.sum())))
    summary = {
        "streamclust_version": __version__,
        "seed": seed,
        "scan_shape": list(phantom.scan_shape),
        "inclusions": int(phantom.n_inclusions),
        "dose": float(dose),
        "second_phase_positions": int(truth.sum()),
        "frames_received": frames_received,
        "frames_processed": int(have_frame.sum()),
        "frames_dropped": int(report.frames_dropped),
        "spectra_received": int(have_spectrum.sum()),
        "positions_joined": int(both.sum()),
        "elapsed_s": round(elapsed, 3),
        # keeping up: the scan's nominal time (positions x dwell) against the time until its last
        # position was received and analysed; the final refresh and the offline yardstick follow
        "dwell_s": float(dwell_s),
        "scan_nominal_s": round(n * float(dwell_s), 3),
        "keepup": round(n * float(dwell_s) / elapsed, 4) if dwell_s > 0 and elapsed > 0 else None,
        "lag_at_scan_end_s": round(max(0.0, elapsed - n * float(dwell_s)), 3) if dwell_s > 0 else None,
        "finalize_s": round(finalize_s, 3),
        "offline_s": round(offline_s, 3),
        "frames_per_s": round(frames_received / report.elapsed_s, 1) if report.elapsed_s else None,
        "n_clusters": n_clusters,
        "flags": live.flags_summary(),
        "second_phase_f1": scores,
        "second_phase_f1_live": live_f1,
        "second_phase_f1_single_level_merged": f1_single_level,
        "ari_live_vs_offline": ari,
        "matrix_largest_cluster_share": matrix_share,
        "engine": {k: v for k, v in live.engine.stats_.items() if not isinstance(v, np.ndarray)},
        "ingest": report.as_dict(),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "config": cfg.as_dict(),
    }
    ny, nx = phantom.scan_shape
    extra = {f"labels/{name}": lab.reshape(ny, nx) for name, lab in labels.items()}
    extra.update({
        "demo/virtual_bright_field": vbf.reshape(ny, nx),
        "demo/joined": both.reshape(ny, nx),
        "demo/eds_sum": eds_sum,
        "demo/summary_json": json.dumps(summary, default=json_default),
        "ground_truth/labels": phantom.truth.labels,
        "ground_truth/second_phase": phantom.truth.second_phase,
        "ground_truth/label_names": json.dumps(list(phantom.truth.label_names)),
    })
    if followup is not None:
        # the operator's follow-ups (the live view's actions, stored by session.finish) end
        # before the simulated microscope's endpoint goes; what the microscope was asked to do
        # is kept beside them
        view.wait_followups()
        extra["demo/followup_acquisitions"] = json.dumps(list(followup.acquisitions), default=json_default)
        followup.stop()
    session.finish(report, status="complete" if report.complete else "partial", extra=extra)
    _write_pictures(out, phantom, labels, vbf, eds, both)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=json_default))
    del cbed, eds, eds_feat
    scratch.cleanup()
    return summary


def largest_share(labels: np.ndarray, members: np.ndarray) -> float | None:
    """The fraction of ``members`` positions that the most common label among them holds (-1: none)."""
    known = members & (labels >= 0)
    return round(float(np.bincount(labels[known]).max() / members.sum()), 4) if known.any() else None


def _scratch(folder: str, name: str, shape: tuple, dtype) -> np.ndarray:
    """A zero-filled memory-mapped scratch array (sparse on disk until written)."""
    return np.lib.format.open_memmap(Path(folder) / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)


def _mean_rows(a: np.ndarray, sel: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Mean of the selected rows of a (memory-mapped) array, read a chunk at a time."""
    idx = np.flatnonzero(sel)
    total = np.zeros(a.shape[1], np.float64)
    for s in range(0, idx.size, chunk):
        rows = idx[s:s + chunk]
        total += np.asarray(a[rows]).sum(axis=0, dtype=np.float64)
        release(a, int(rows[0]), int(rows[-1]) + 1)
    return total / max(idx.size, 1)


def _write_pictures(out: Path, phantom, labels: dict, vbf, eds, joined) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ny, nx = phantom.scan_shape
    fig, axes = plt.subplots(1, 6, figsize=(24, 4.2))
    axes[0].imshow(vbf.reshape(ny, nx), cmap="gray")
    axes[0].set_title("virtual bright field")
    axes[1].imshow(phantom.truth.labels, cmap="tab10", interpolation="nearest")
    axes[1].set_title("ground truth (phantom)")
    for ax, name in zip(axes[2:], ("live", "merged", "eds_only", "cbed_only")):
        lab = np.ma.masked_less(labels[name].reshape(ny, nx), 0)
        ax.imshow(lab, cmap="tab10", interpolation="nearest")
        ax.set_title("live engine (final)" if name == "live" else f"offline: {name}")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "cluster_maps.png", dpi=100)
    plt.close(fig)

    e = phantom.energy_axis_kev
    lab = labels["merged"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for c in np.unique(lab[lab >= 0]):
        sel = lab == c
        ax.plot(e, _mean_rows(eds, sel), lw=0.8, label=f"cluster {c} ({int(sel.sum())} positions)")
    for name, kev in (("Fe Ka", 6.4039), ("Co Ka", 6.9303), ("Si Ka", 1.7397)):
        ax.axvline(kev, color="k", ls=":", lw=0.7)
        ax.text(kev, ax.get_ylim()[1] * 0.95, name, rotation=90, va="top", ha="right", fontsize=8)
    ax.set_xlim(0, 10)
    ax.set_xlabel("energy (keV)")
    ax.set_ylabel("mean counts a position")
    ax.set_title("mean EDS spectrum per cluster (merged signals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cluster_spectra.png", dpi=100)
    plt.close(fig)
