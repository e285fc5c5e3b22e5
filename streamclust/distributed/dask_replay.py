"""Replay a recorded scan on Dask distributed: chunks read on the workers, merged statistics, passes.

A recorded scan (Merlin ``.mib`` + ``.hdr`` and the EDS recording, ``docs/wire-formats.md``) too
large for one machine is re-analysed in chunks of scan positions. Every task opens the files itself
(the ``.mib`` memory-mapped with :class:`~streamclust.adapters.mib.MibFile`, the spectra as an HDF5
row slice) and returns a *partial state*; states are merged in a tree (:mod:`streamclust.distributed.mergeable`)
and the client only ever holds merged, small results. The passes compute what the single-process
engine holds after :meth:`~streamclust.engine.streaming.StreamingEngine.finalize`:

1. **scaling**: per-block robust scalers and Welford variances (``BlockBalancer``) on the complete
   positions -> the final multiplier ``c`` and centre (block medians);
2. **PCA** of ``x * c`` (exact scatter, or the sketch) -> the 1 % rule read-out. The engine
   accumulates in its warm-up space and reads out with ``D = c_now / c_warm``; with the exact
   accumulator both are the PCA of the data at the final scales, which is what is computed here;
3. **scores** ``x c V - mean V`` of every position, kept on the workers (``n x k`` floats);
4. **fuzzy C-means**: ``final_n_init`` k-means++ restarts on at most ``refit_sample`` positions
   (gathered, as the engine's final re-fit does), refined on all positions by distributed passes
   (:class:`~streamclust.distributed.mergeable.FCMSums`) with the engine's stopping rule, then the one extra
   pass the engine's mini-batch model makes from the refreshed centres;
5. **level 2** (``host_clusters`` > 0, as the engine's :mod:`~streamclust.cluster.host_refine`): the host
   (largest total membership) is re-scaled and projected on a sample of its clear positions
   (``HostRefinement.fit_space`` on a worker), its positions are clustered as in 4, and every
   position's memberships are composed by the product rule;
6. **memberships, validity and thresholded centres** per chunk (frames re-read and binned to
   32 x 32, as the live analysis stores them), merged;
7. **second-phase flags** (``cfg.flags``): the live analysis' end-of-scan assessment, with the block
   distances from mergeable per-fold sums (:mod:`streamclust.flags.sums`; the sums share pass 6,
   the projections on the fitted directions are one more pass) and the map-level criteria on the
   client (:class:`~streamclust.flags.flagger.SecondPhaseFlagger` through its ``block_distances`` hook).

Reduced features are cached on the workers between passes when they fit ``cache_features_bytes``;
otherwise each pass re-reads its chunk. Results go to ``out_dir/results.hspy``.

This module runs the passes in order (:func:`replay_dask`, :func:`replay_local`, :func:`replay_flags`);
the parts live beside it: :mod:`~streamclust.distributed.replay_config` (:class:`ReplayConfig`),
:mod:`~streamclust.distributed.recording` (probing the files, reading a chunk),
:mod:`~streamclust.distributed.passes` (the per-chunk tasks), :mod:`~streamclust.distributed.backends`
(Dask or in-process, tree reductions), :mod:`~streamclust.distributed.fitting` (the FCM re-fit, the
sample PCA, level 2), :mod:`~streamclust.distributed.flagging` (the end-of-scan flags) and
:mod:`~streamclust.distributed.assembly` (the results file and the summary).

The seed is the engine's final one, :func:`streamclust.engine.streaming.final_seed` (the first draw of
``RandomState(random_state)``, independent of the scan's history: batches, scheduled and drift
refreshes). Level 2 on a small host has near-equal FCM optima, so another seed is another split
of the host (ARI 0.96 against the single-process replay when the two seeds differed). What still differs from the
streaming engine (``docs/dask.md``): its final refresh also runs a warm start from its live
memberships and keeps the lower objective; its host choice prefers the previous refresh's host
(``host_group(previous=...)``); the flags have no history (a flag raised earlier in the scan and
retracted is not in the replay's log; a flag kept only by hysteresis is not raised).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from streamclust.distributed.assembly import summary, write_results
from streamclust.distributed.backends import DaskBackend, LocalBackend, grouped, tree_reduce
from streamclust.distributed.fitting import fit_fcm, refine_host, sample_pca
from streamclust.distributed.flagging import assess_flags
from streamclust.distributed.passes import (ChunkResult, chunk_compose, chunk_features, chunk_final,
                                            chunk_memberships, chunk_scores, n_rows, pca_partial, pca_readout,
                                            reducers, scaling_partial)
from streamclust.distributed.recording import RecordingInfo, chunk_specs, probe_recording
from streamclust.distributed.replay_config import ReplayConfig
from streamclust.engine.streaming import final_seed
from streamclust.results.scan_result import summarise_flags
from streamclust.results.writer import RESULTS_NAME

logger = logging.getLogger(__name__)

__all__ = ["ReplayConfig", "RecordingInfo", "probe_recording", "replay_dask", "replay_flags",
           "replay_local"]


def _signal_masks(masks: Sequence, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole-scan ``has_frame`` and ``has_spectrum`` from the chunks' (positions, masks)."""
    has_frame = np.zeros(n, bool)
    has_spectrum = np.zeros(n, bool)
    for pos, hf, hs in masks:
        has_frame[pos] = hf
        has_spectrum[pos] = hs
    return has_frame, has_spectrum


def _run(backend, info: RecordingInfo, cfg: ReplayConfig, chunk_positions: int) -> dict[str, Any]:
    cfg.validate()
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    n = info.n_positions
    specs = chunk_specs(n, chunk_positions)
    fr, sr = reducers(info, cfg)
    n_cbed, n_eds = int(fr.n_features_out_), int(sr.n_features_out_)
    n_features = n_cbed + n_eds
    cache = n * n_features * 4 <= int(cfg.cache_features_bytes)
    info_h, cfg_h = backend.share(info), backend.share(cfg)
    # in-process this reads and reduces every chunk now; on Dask it only submits (time in "scaling")
    t = time.perf_counter()
    src = backend.map(chunk_features, [info_h] * len(specs), [cfg_h] * len(specs), specs) if cache else specs
    seconds["read"] = time.perf_counter() - t
    k = len(specs)

    # 1. scaling
    t = time.perf_counter()
    scal = backend.gather([tree_reduce(backend, grouped(backend, scaling_partial, src, info_h, cfg_h),
                                        int(cfg.fan_in))])[0]
    counters = dict(scal.counters)
    if scal.balancer is None or scal.balancer.n_samples_seen_ < int(cfg.n_clusters):
        raise ValueError(f"{info.mib_path}: at least {cfg.n_clusters} positions with both a frame and a spectrum "
                         f"are needed to cluster")
    bal = scal.balancer
    has_frame, has_spectrum = _signal_masks(scal.masks, n)
    scaling = {"multiplier": bal.multiplier_, "centre": bal.center_, "n_cbed": n_cbed}
    scaling_h = backend.share(scaling)
    seconds["scaling"] = time.perf_counter() - t

    # the engine's final refresh seed (its PCA sample, FCM restarts and level 2 derive from it)
    seed = final_seed(cfg.random_state)

    # 2. PCA at the final scales
    t = time.perf_counter()
    readout = None
    if int(cfg.final_pca_sample) > 0:
        readout = sample_pca(backend, src, specs, info_h, cfg_h, scaling_h, has_frame & has_spectrum, cfg, seed)
    if readout is None:
        pca_state = tree_reduce(backend, grouped(backend, pca_partial, src, info_h, cfg_h, scaling_h),
                                 int(cfg.fan_in))
        readout = backend.gather([backend.submit(pca_readout, pca_state, cfg_h)])[0]
        del pca_state
    V = readout["components"].T
    projection = {"P": V.astype(np.float32), "p0": (-(readout["mean"] @ V)).astype(np.float32)}
    seconds["pca"] = time.perf_counter() - t

    # 3. scores, kept on the workers (the cached features stay until level 2 has used them)
    t = time.perf_counter()
    proj_h = backend.share(projection)
    scores = backend.map(chunk_scores, src, [info_h] * k, [cfg_h] * k, [scaling_h] * k, [proj_h] * k)
    sizes = np.asarray(backend.gather(backend.map(n_rows, scores)), dtype=np.int64)
    seconds["scores"] = time.perf_counter() - t

    # 4. fuzzy C-means: restarts on (a sample of) the scores, refined on all by distributed passes
    t = time.perf_counter()
    nc, m = int(cfg.n_clusters), float(cfg.m)
    fit = fit_fcm(backend, scores, sizes, nc, cfg, np.random.RandomState(seed), moments=None, extra_pass=True)
    centres = fit["centres"]
    seconds["fcm"] = time.perf_counter() - t

    # 5. memberships (level 1) and the host's level 2
    t = time.perf_counter()
    level1 = backend.map(chunk_memberships, scores, [centres] * k, [m] * k)
    U1 = np.full((n, nc), np.nan, dtype=np.float32)
    for res in backend.gather(level1):
        U1[res.positions] = res.memberships
    host_info = None
    k2 = int(cfg.host_clusters)
    outputs = level1
    if k2:
        # level 2 is defined on raw features, as the engine's (x_warm / c_warm): its zero-IQR
        # floor of 1 is in raw counts, so the whole-scan multiplier must not be applied first
        raw_h = backend.share({**scaling, "multiplier": np.ones_like(scaling["multiplier"])})
        host_info = refine_host(backend, U1, src, specs, info_h, cfg, cfg_h, raw_h, n_cbed, seed,
                                 scan_shape=info.scan_shape, eds_energies_kev=sr.energies_kev_)
        if host_info is None:
            outputs = backend.map(chunk_compose, level1, [None] * k, [None] * k, [k2] * k)
        else:
            outputs = backend.map(chunk_compose, level1, host_info.pop("u2"), [host_info["group"]] * k, [k2] * k)
    del src
    seconds["host"] = time.perf_counter() - t

    # 6. output memberships, validity, thresholded centres
    t = time.perf_counter()
    final = tree_reduce(backend, backend.map(chunk_final, outputs, level1, scores, [info_h] * k, [cfg_h] * k,
                                              [centres] * k, specs), int(cfg.fan_in))
    U = np.full((n, nc + k2), np.nan, dtype=np.float32)
    for res in backend.gather(outputs):
        U[res.positions] = res.memberships
    final = backend.gather([final])[0]
    seconds["final"] = time.perf_counter() - t

    # second-phase flags: the live analysis' end-of-scan assessment
    t = time.perf_counter()
    flag_log: list[dict] = []
    assessments: list = []
    centre_set = final.centres.centres() if final.centres is not None else None
    if cfg.flags and final.folds is not None:
        # the host's sub-clusters are the matrix, as the live analysis tells its flagger
        matrix = tuple(range(nc, nc + k2)) if host_info is not None else ()
        flag_log, assessments = assess_flags(backend, info, cfg, cfg_h, info_h, U, has_frame & has_spectrum,
                                              final.folds, centre_set, outputs, specs,
                                              n_seen=int(np.count_nonzero(has_frame | has_spectrum)), t_start=t_start,
                                              matrix_clusters=matrix)
    seconds["flags"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_start
    acc = final.validity
    validity = {
        "partition_coefficient": acc.partition_coefficient(),
        "partition_entropy": acc.partition_entropy(),
        "xie_beni": acc.xie_beni(centres),
    }
    counters.update(chunks=len(specs), fcm_passes=fit["n_iter"] + 1, workers=backend.n_workers)
    return {
        "memberships": U,
        "level1_memberships": U1 if k2 else None,
        "cluster_centers": centres,
        "objective": fit["objective"],
        "n_iter": fit["n_iter"],
        "converged": fit["converged"],
        "host": host_info,
        "pca": readout,
        "scaling": {"multiplier": scaling["multiplier"], "centre": scaling["centre"],
                    "weights": dict(bal.weights_)},
        "centre_set": centre_set,
        "flag_log": flag_log,
        "assessments": assessments,
        "validity": validity,
        "counters": dict(counters),
        "seconds": seconds,
        "features_cached": cache,
    }


def replay_flags(mib_path, eds_path, memberships: np.ndarray, *, client=None, chunk_positions: int = 4096,
                 config: ReplayConfig | Mapping | None = None) -> dict[str, Any]:
    """The live analysis' end-of-scan second-phase assessment of given memberships, on the recording.

    What :func:`replay_dask` does after clustering, for memberships from elsewhere (another run,
    another engine): per-fold sums with the thresholded centres, then the projections of the
    measured pairs, both per chunk; the flagger on the client.

    Parameters
    ----------
    mib_path, eds_path : path-like
    memberships : ndarray (n_positions, c)
        NaN rows: positions without a result.
    client : distributed.Client, optional
        Where the chunk tasks run; by default in this process.
    chunk_positions : int
    config : ReplayConfig or mapping, optional
        ``flag_params``, ``thresholds``, ``fan_in`` are used.

    Returns
    -------
    dict
        ``flag_log`` (the records of ``LiveAnalysis.flag_log``), ``flags`` (its summary),
        ``assessments`` (:class:`~streamclust.flags.flagger.ClusterAssessment` per cluster).
    """
    cfg = ReplayConfig.from_any(config)
    cfg.validate()
    cfg = replace(cfg, flags=True)
    info = probe_recording(mib_path, eds_path)
    U = np.asarray(memberships, dtype=np.float32)
    n = info.n_positions
    if U.ndim != 2 or U.shape[0] != n:
        raise ValueError(f"memberships must be ({n}, c) for {info.mib_path}, got {U.shape}")
    t_start = time.perf_counter()
    backend = LocalBackend() if client is None else DaskBackend(client)
    specs = chunk_specs(n, chunk_positions)
    k = len(specs)
    finite = np.isfinite(U).all(axis=1)
    results = []
    for sp in specs:
        pos = np.arange(sp.start, sp.stop)[finite[sp.start:sp.stop]]
        results.append(ChunkResult(pos, U[pos]))
    info_h, cfg_h = backend.share(info), backend.share(cfg)
    # each chunk's memberships go to one worker (not broadcast)
    outputs = client.scatter(results, hash=False) if client is not None else results
    with threadpool_limits(1, user_api="blas"):
        final = backend.gather([tree_reduce(backend, backend.map(chunk_final, outputs, [None] * k, [None] * k,
                                                                   [info_h] * k, [cfg_h] * k, [None] * k, specs),
                                             int(cfg.fan_in))])[0]
        both = np.zeros(n, bool)
        for pos, b in final.both:
            both[pos] = b
        log, assessments = [], []
        if final.folds is not None:
            # level-2 columns holding membership: the host was refined, its sub-clusters are the matrix
            nc = int(cfg.n_clusters)
            matrix = (tuple(range(nc, U.shape[1])) if U.shape[1] > nc and np.nansum(U[:, nc:]) > 0 else ())
            log, assessments = assess_flags(backend, info, cfg, cfg_h, info_h, U, both & finite, final.folds,
                                             final.centres.centres(), outputs, specs,
                                             n_seen=int(np.count_nonzero(finite)), t_start=t_start,
                                             matrix_clusters=matrix)
    return {"flag_log": log, "flags": summarise_flags(log),
            "assessments": assessments}


def replay_local(mib_path, eds_path, out_dir, *, chunk_positions: int | None = None,
                 config: ReplayConfig | Mapping | None = None) -> dict[str, Any]:
    """The same passes in this process, without Dask (``chunk_positions=None``: one chunk).

    Returns the same summary as :func:`replay_dask` and writes the same results file.
    """
    cfg = ReplayConfig.from_any(config)
    info = probe_recording(mib_path, eds_path)
    with threadpool_limits(1, user_api="blas"):
        res = _run(LocalBackend(), info, cfg, chunk_positions or info.n_positions)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_NAME
    write_results(path, info, cfg, res)
    return summary(path, res, info.n_positions)


def replay_dask(mib_path, eds_path, out_dir, *, scheduler=None, n_workers: int = 2,
                chunk_positions: int = 4096, config: ReplayConfig | Mapping | None = None) -> dict[str, Any]:
    """Replay a recorded scan on Dask distributed and write ``out_dir/results.hspy``.

    Parameters
    ----------
    mib_path, eds_path : path-like
        The Merlin recording (``.hdr`` beside it) and the EDS recording. With a remote scheduler the
        workers must see the same paths (shared file system).
    out_dir : path-like
    scheduler : str or distributed.Client, optional
        A scheduler address (``"tcp://host:8786"``) or a client; by default a
        ``LocalCluster(n_workers, threads_per_worker=1, processes=True)`` for the call.
    n_workers : int, default=2
        Workers of the local cluster (ignored with ``scheduler``).
    chunk_positions : int, default=4096
        Positions per task.
    config : ReplayConfig or mapping, optional

    Returns
    -------
    dict
        ``results_path``, ``n_components``, ``explained_variance_ratio``, ``objective``,
        ``fcm_iterations``, ``validity``, ``counters`` (positions, incomplete, skipped, missing or
        bad frames and spectra, chunks, passes, workers), ``seconds`` per pass (``total`` excludes
        the cluster's start-up, given as ``startup``), ``positions_per_s``.
    """
    # not our module: Dask is the optional [dask] extra, needed only here (replay_local and
    # replay_flags without a client run without it)
    from dask.distributed import Client, LocalCluster

    cfg = ReplayConfig.from_any(config)
    cfg.validate()
    info = probe_recording(mib_path, eds_path)
    t0 = time.perf_counter()
    cluster = client = None
    own = not hasattr(scheduler, "submit")
    try:
        if scheduler is None:
            cluster = LocalCluster(n_workers=int(n_workers), threads_per_worker=1, processes=True,
                                   dashboard_address=":0", silence_logs=logging.WARNING)
            client = Client(cluster)
        elif own:
            client = Client(scheduler)
        else:
            client = scheduler
        startup = time.perf_counter() - t0
        logger.info("replaying %d positions of %s on %s", info.n_positions, info.mib_path, client)
        res = _run(DaskBackend(client), info, cfg, chunk_positions)
    finally:
        if own and client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    res["seconds"]["startup"] = startup
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_NAME
    write_results(path, info, cfg, res)
    return summary(path, res, info.n_positions)
