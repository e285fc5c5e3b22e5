"""The replay's second-phase flags: the live analysis' end-of-scan assessment on the replay's
memberships, with the block distances from mergeable per-fold sums (:mod:`streamclust.flags.sums`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from streamclust.distributed.backends import tree_reduce
from streamclust.distributed.passes import chunk_flag_moments
from streamclust.distributed.recording import ChunkSpec, RecordingInfo
from streamclust.distributed.replay_config import ReplayConfig
from streamclust.engine.centres import centre_signals
from streamclust.flags.flagger import SecondPhaseFlagger
from streamclust.flags.sums import DistancePlan, FoldSums, pair_distances

logger = logging.getLogger(__name__)

__all__ = ["assess_flags"]


def assess_flags(backend, info: RecordingInfo, cfg: ReplayConfig, cfg_h, info_h, U: np.ndarray,
                  scanned: np.ndarray, folds: FoldSums, centre_set, outputs: Sequence, specs: Sequence[ChunkSpec], *,
                  n_seen: int, t_start: float, matrix_clusters: tuple = ()) -> tuple[list[dict], list]:
    """The live analysis' end-of-scan assessment (:meth:`LiveAnalysis._assess` after ``finish``) on
    the replay's memberships, with the block distances from mergeable sums.

    The flagger runs twice on the client: once to learn which ``(k, j)`` pairs it measures (their
    distances are the only per-position work: one pass of projections on the workers), once with
    those distances, which gives the events. Returns the flag log records (as
    ``LiveAnalysis.flag_log``) and the assessments.
    """
    # one assessment with no history: what passes now is flagged (raise_after debounces a live
    # sequence of updates; here there is one)
    params = cfg.flag_params.replace(raise_after=1)
    shape = tuple(info.scan_shape)
    pairs: list[tuple[int, int]] = []

    def record(k, j, in_k, in_j, fold):
        pairs.append((int(k), int(j)))
        return 0.0, 0.0

    SecondPhaseFlagger(params).assess(U, shape, None, None, scanned, block_distances=record,
                                        matrix_clusters=matrix_clusters)
    distances: dict = {}
    plan = None
    if pairs:
        plan = DistancePlan.fit(folds, pairs, eds_shape_only=params.eds_shape_only)
        plan_h = backend.share(plan)
        k = len(specs)
        moments = tree_reduce(backend, backend.map(chunk_flag_moments, outputs, [info_h] * k, [cfg_h] * k, specs,
                                                    [plan_h] * k), int(cfg.fan_in))
        mom = backend.gather([moments])[0]
        if mom is not None:
            distances = pair_distances(plan, mom.cbed, mom.eds)

    def lookup(k, j, in_k, in_j, fold):
        p = plan.pairs.index((int(k), int(j)))
        got = (int(np.count_nonzero(in_k & fold)), int(np.count_nonzero(in_j & fold)),
               int(np.count_nonzero(in_k & ~fold)), int(np.count_nonzero(in_j & ~fold)))
        if got != tuple(int(v) for v in plan.counts[p]):
            # the workers thresholded other memberships than the flagger sees: a bug, not data
            raise RuntimeError(f"flag sums of clusters {(k, j)} count {tuple(plan.counts[p])} positions per "
                               f"fold, the memberships {got}")
        return distances.get((int(k), int(j)), (0.0, 0.0))

    signals = centre_signals(centre_set, np.asarray(info.energy_axis_kev)) if centre_set is not None else {}
    flagger = SecondPhaseFlagger(params)
    events = flagger.update(U, shape, None, None, scanned_mask=scanned, signals=signals, block_distances=lookup,
                            matrix_clusters=matrix_clusters)
    fraction = n_seen / info.n_positions
    log = []
    for ev in events:
        rec = {key: v for key, v in asdict(ev).items() if key != "positions"}
        rec.update(scan_fraction=fraction, elapsed_s=time.perf_counter() - t_start)
        log.append(rec)
        logger.info("flag %s #%d (cluster %d, score %.2f) at the end of the replay", ev.kind, ev.flag_id,
                    ev.cluster, ev.score)
    return log, flagger.assessments_
