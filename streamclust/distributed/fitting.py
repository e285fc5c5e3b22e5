"""The model fitted on the workers' scores, as the engine's final refresh fits it: the FCM re-fit
(:func:`fit_fcm`: k-means++ restarts on a sample, refined by merged passes), the PCA of a seeded
sample (:func:`sample_pca`) and the host's level 2 (:func:`refine_host`). The client decides; the
per-position work is tasks of :mod:`streamclust.distributed.passes`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from streamclust.cluster.fcm import FuzzyCMeans
from streamclust.cluster.fcm_kernels import predict_memberships
from streamclust.cluster.host_refine import host_group
from streamclust.cluster.merge import line_count_map, merge_columns, merge_same_composition
from streamclust.cluster.spatial_pool import membership_mixing, spatial_memberships
from streamclust.distributed.backends import tree_reduce
from streamclust.distributed.passes import (ChunkScores, chunk_affine_scores, chunk_vectors, complete_moments,
                                            concat_scores, fcm_sums, fit_host_space, fit_sample_pca, score_moments,
                                            score_rows, select_positions)
from streamclust.distributed.recording import ChunkSpec
from streamclust.distributed.replay_config import ReplayConfig
from streamclust.features.robust_scaling import FeatureMoments

logger = logging.getLogger(__name__)

__all__ = ["fit_fcm", "refine_host", "sample_pca"]


def fit_fcm(backend, scores: Sequence, sizes: np.ndarray, n_clusters: int, cfg: ReplayConfig,
             rs: np.random.RandomState, *, moments: FeatureMoments | None, extra_pass: bool) -> dict[str, Any]:
    """The engine's final re-fit on distributed scores: ``final_n_init`` k-means++ restarts on all
    scores (at most ``refit_sample``) or a seeded sample of them, then merged FCM passes over all
    positions to convergence; ``extra_pass``: the one pass the engine's mini-batch model makes from
    the refreshed centres."""
    k = len(scores)
    m = float(cfg.m)
    # an FCM pass is a round trip: one task per group of chunks (n x k floats, cheap to move)
    n_groups = min(k, max(1, 2 * int(backend.n_workers)))
    grouped = [backend.submit(concat_scores, [scores[i] for i in g]) for g in np.array_split(np.arange(k), n_groups)]
    kg = len(grouped)
    n_total = int(sizes.sum())
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if n_total <= int(cfg.refit_sample):
        sample = np.concatenate(backend.gather(backend.map(score_rows, grouped)))
        whole = True
    else:
        idx = np.sort(rs.choice(n_total, int(cfg.refit_sample), replace=False))
        chunk_of = np.searchsorted(offsets, idx, side="right") - 1
        parts = [backend.submit(score_rows, scores[c], idx[chunk_of == c] - offsets[c]) for c in np.unique(chunk_of)]
        sample = np.concatenate(backend.gather(parts))
        whole = False
    seeded = FuzzyCMeans(n_clusters, m=m, n_init=int(cfg.final_n_init), max_iter=int(cfg.max_iter),
                         tol=float(cfg.tol), tol_objective=float(cfg.tol_objective), random_state=rs).fit(sample)
    V = seeded.cluster_centers_
    n_iter, converged, J = (int(seeded.n_iter_) if whole else 0), True, float(seeded.objective_)

    def one_pass(V):
        return backend.gather([tree_reduce(backend, backend.map(fcm_sums, grouped, [V] * kg, [m] * kg),
                                            int(cfg.fan_in))])[0]

    if not whole:
        if moments is None:
            moments = backend.gather([tree_reduce(backend, backend.map(score_moments, grouped), int(cfg.fan_in))])[0]
        tol_shift = float(cfg.tol) * float(np.mean(moments.m2_ / moments.n_))
        J_prev = np.inf
        converged = False
        for n_iter in range(1, int(cfg.max_iter) + 1):
            sums = one_pass(V)
            V, shift = sums.step()
            J = sums.objective
            if shift <= tol_shift or (cfg.tol_objective > 0 and abs(J_prev - J) <= float(cfg.tol_objective) * abs(J)):
                converged = True
                break
            J_prev = J
        if not converged:
            logger.info("FCM refinement stopped at max_iter=%d before reaching tol", cfg.max_iter)
    if extra_pass:
        sums = one_pass(V)
        J = float(sums.objective)
        V, _ = sums.step()
    return {"centres": V, "objective": J, "n_iter": n_iter, "converged": converged}


def refine_host(backend, U1: np.ndarray, src: Sequence, specs: Sequence[ChunkSpec], info_h, cfg: ReplayConfig,
                 cfg_h, scaling_h, n_cbed: int, seed: int, scan_shape=None,
                 eds_energies_kev: np.ndarray | None = None) -> dict[str, Any] | None:
    """Level 2 as :meth:`StreamingEngine._refine_host_steps` does it at ``finalize``: the host (largest
    total membership) re-scaled, projected and clustered among its clear positions."""
    k2 = int(cfg.host_clusters)
    mixing = None
    if scan_shape is not None and cfg.host_mixing:
        mixing = membership_mixing(U1, tuple(scan_shape))
    host, group = host_group(U1, overlap=float(cfg.host_overlap), mixing=mixing,
                             min_mixing=float(cfg.host_mixing or 0.0))  # as the engine
    inside = np.flatnonzero(np.nan_to_num(U1[:, list(group)]).sum(axis=1) > float(cfg.host_threshold))
    if inside.size < max(int(cfg.host_min_positions), 4 * k2):
        logger.info("host cluster %d has %d clear positions: no level-2 refinement", host, inside.size)
        return None
    rs = np.random.RandomState(seed)
    sample = inside
    if inside.size > int(cfg.host_sample_size):
        sample = np.sort(rs.choice(inside, int(cfg.host_sample_size), replace=False))
    starts = np.array([sp.start for sp in specs])
    stops = np.array([sp.stop for sp in specs])
    chunk_of = np.searchsorted(starts, sample, side="right") - 1
    k = len(specs)
    parts = [backend.submit(chunk_vectors, src[c], info_h, cfg_h, scaling_h, sample[chunk_of == c])
             for c in np.unique(chunk_of)]
    params = dict(n_clusters=k2, threshold=float(cfg.host_threshold), min_components=int(cfg.host_min_components),
                  max_components=int(cfg.max_components), min_explained_ratio=float(cfg.min_explained_ratio),
                  sample_size=int(cfg.host_sample_size), m=float(cfg.m), random_state=seed)
    space = backend.gather([backend.submit(fit_host_space, parts, n_cbed, params)])[0]
    A, b = space.affine()
    A_h, b_h = backend.share(A), backend.share(b)
    all_scores = backend.map(chunk_affine_scores, src, [info_h] * k, [cfg_h] * k, [scaling_h] * k, [A_h] * k,
                             [b_h] * k)
    chunk_in = [inside[(inside >= a) & (inside < z)] for a, z in zip(starts, stops)]
    keep = [i for i in range(k) if chunk_in[i].size]
    inside_scores = [backend.submit(select_positions, all_scores[i], chunk_in[i]) for i in keep]
    sizes = np.array([chunk_in[i].size for i in keep], dtype=np.int64)
    fit = fit_fcm(backend, inside_scores, sizes, k2, cfg, rs, moments=None, extra_pass=False)
    # the level-2 memberships of every position on the driver: a few floats a position, and the
    # merge and the spatial step need the scan's grid (the engine decides on the same scores)
    every = backend.gather(all_scores)
    lines = None
    W = line_count_map(n_cbed, eds_energies_kev, tuple(cfg.host_merge_elements)) if (
        scan_shape is not None and eds_energies_kev is not None and float(cfg.host_merge_effect) > 0) else None
    if W is not None:
        # the clear host's element-line counts (a few integers a position), as the engine reads
        # them from its store: raw features times the line map
        W_h, zero_h = backend.share(W), backend.share(np.zeros(W.shape[1], np.float32))
        counted = [backend.submit(select_positions, backend.submit(chunk_affine_scores, src[i], info_h, cfg_h,
                                                                   scaling_h, W_h, zero_h), chunk_in[i])
                   for i in keep]
        lines = np.clip(np.rint(np.concatenate([c.scores for c in backend.gather(counted)])), 0, None).astype(np.int64)
    merged_into, u2 = _level2_memberships(every, inside, fit["centres"], cfg, k2, scan_shape, lines)
    logger.info("host %s refined: %d positions, %d components", group, inside.size, space.n_components_)
    return {"host": host, "group": tuple(int(h) for h in group), "n_inside": int(inside.size), "space": space,
            "centres": fit["centres"], "merged_into": merged_into, "u2": u2, "objective": fit["objective"], "n_iter": fit["n_iter"]}


def _level2_memberships(chunks: Sequence[ChunkScores], inside: np.ndarray, centres: np.ndarray, cfg: ReplayConfig,
                        k2: int, scan_shape, lines: np.ndarray | None) -> tuple[np.ndarray, list[ChunkScores]]:
    """The final level-2 memberships per chunk, as the engine's final refresh makes them: predicted
    from the centres, sub-clusters that are one region summed (:mod:`streamclust.cluster.merge`),
    then the spatial step (:func:`streamclust.cluster.spatial_pool.spatial_memberships`)."""
    positions = np.concatenate([c.positions for c in chunks])
    U2, _ = predict_memberships(np.ascontiguousarray(np.concatenate([c.scores for c in chunks])), centres,
                                float(cfg.m))
    clear = np.isin(positions, inside)
    merged_into = np.arange(k2)
    if lines is not None:
        # lines: the clear host's, in position order, as positions[clear]
        merged_into = merge_same_composition(lines, positions[clear], np.argmax(U2[clear], axis=1),
                                             tuple(scan_shape), k2, float(cfg.host_merge_effect))
    U2 = merge_columns(U2, merged_into)
    if scan_shape is not None and cfg.host_spatial:
        U2 = spatial_memberships(U2, positions, clear, tuple(scan_shape))
    out, s0 = [], 0
    for c in chunks:
        out.append(ChunkScores(c.positions, U2[s0:s0 + c.positions.size]))
        s0 += c.positions.size
    return merged_into, out


def sample_pca(backend, src: Sequence, specs: Sequence[ChunkSpec], info_h, cfg_h, scaling_h, complete: np.ndarray,
                cfg: ReplayConfig, seed: int) -> dict | None:
    """The PCA as the engine's final refresh takes it (``final_pca_sample``): a randomized PCA of at
    most ``final_pca_sample`` complete positions (the same seeded sample as the engine draws) at
    the final scales, gathered on one worker; None with fewer than two complete positions."""
    pool = np.flatnonzero(complete)
    size = int(cfg.final_pca_sample)
    if pool.size < 2:
        return None
    sample = pool if pool.size <= size else np.sort(np.random.RandomState(seed).choice(pool, size, replace=False))
    moments = backend.gather([tree_reduce(backend, backend.map(complete_moments, src, [info_h] * len(src),
                                                                [cfg_h] * len(src), [scaling_h] * len(src)),
                                           int(cfg.fan_in))])[0]
    starts = np.array([sp.start for sp in specs])
    chunk_of = np.searchsorted(starts, sample, side="right") - 1
    parts = [backend.submit(chunk_vectors, src[c], info_h, cfg_h, scaling_h, sample[chunk_of == c])
             for c in np.unique(chunk_of)]
    return backend.gather([backend.submit(fit_sample_pca, parts, moments.mean_, cfg_h, seed)])[0]
