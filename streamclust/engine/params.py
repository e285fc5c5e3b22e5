"""The streaming engine's and the thresholded centres' parameters: :class:`EngineParams` (``[engine]``
of the configuration, plus the engine's parameters that are not in the file) and :class:`CentresParams`
(``[centres]``).

The engine (:class:`~streamclust.engine.streaming.StreamingEngine`) takes an :class:`EngineParams`
and keyword overrides of it; the configuration's ``[engine]`` table is the same object; the Dask
replay (:class:`~streamclust.distributed.dask_replay.ReplayConfig`) takes its defaults from it.

>>> p = EngineParams(n_clusters=4)
>>> s = p.for_scan(64 * 64)
>>> s.warmup_positions, s.refresh_every, s.n_clusters
(512, 256, 4)
>>> EngineParams().for_scan(16).warmup_positions  # never below the cluster count
6
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from streamclust.flags.params import element_symbols
from streamclust.params import (AUTO, Params, boolean, choice, integer, mapping, number, opt, text, thresholds,
                                window)

__all__ = ["EngineParams", "CentresParams"]


_count = integer(0)


def _host_clusters(v):
    try:
        if _count(v) != 1:
            return v
    except ValueError:
        pass
    raise ValueError("must be 0 (off) or an integer >= 2")


@dataclass(frozen=True)
class EngineParams(Params):
    """``[engine]``: the streaming engine's parameters (docs/engine.md).

    The fields declared ``toml=False`` (the last ones) are the Python API's only, not keys of the
    configuration file. Each field's default is in its declaration below; the engine's defaults
    are these (``StreamingEngine(n)`` is ``StreamingEngine(n, EngineParams())``).

    Parameters
    ----------
    energy_window_kev : (float, float)
    rebin : int
        EDS channels summed into one feature.
    n_clusters : int
    m : float
        FCM fuzzifier (docs/fcm.md: 1.2 keeps small phases apart).
    bin_factor : int
        Frame sum-binning (512 x 512 -> 64 x 64).
    frame_reducer_params : dict, optional
        Further :class:`~streamclust.features.reducers.FrameReducer` options (masks, crop, chip_gap...).
    scaler_params : dict, optional
        :class:`~streamclust.features.robust_scaling.StreamingRobustScaler` options for both blocks.
    warmup_positions : int or "auto"
        Complete positions buffered before the PCA space (``c_warm``) is fixed and clustering starts.
        ``"auto"``: ``min(512, n_positions / 4)``, at least ``n_clusters`` (:meth:`EngineParams.for_scan`).
    refresh_every : int, "auto" or None
        Fewest positions between scheduled refreshes (None: none). ``"auto"``: 256. Refreshes are
        where a new phase gets its cluster: every 256 positions early in a scan (docs/events.md:
        flag timing; 512 flagged 3 of 9 phantoms late or never), then at ``refresh_growth`` steps
        of the positions seen, whatever the scan size (a fraction of the scan, n / 16, made 22
        refreshes cost 44 s of a 256 x 256 scan's 131 s).
    refresh_growth : float
        A scheduled refresh also waits until the positions seen have grown by this fraction since
        the last one. A refresh re-reads every stored position, so its cost grows with the scan;
        with refreshes at geometric steps the total is at most ``1 / refresh_growth + 1`` passes
        over the scan, amortised O(1) a position whatever the scan size (every ``refresh_every``
        positions instead: 16 passes' worth at 256 x 256 with 4,096, 22 refreshes costing 44 s of
        a 131 s scan). New positions are clustered on arrival by the current model either way,
        and new material still refreshes early (``drift_threshold``). 0: every ``refresh_every``.
    refresh_seconds : float or None
        Also refresh when this much wall-clock time passed since the last refresh (makes the
        refresh points, hence intermediate results, depend on timing; off by default).
    max_components : int
        Cap of the 1 % rule.
    min_explained_ratio : float
        The 1 % rule.
    basis_rank : int
        Coordinates kept per position (and the PCA sketch rank).
    sketch_rank : int or None
        Rank of the PCA sketch (default ``basis_rank``). The update costs O(rank^2 F) a batch, but
        rank 64 under-estimated the explained-variance ratios enough on the phantom for the 1 %
        rule to keep 10 components instead of 12 (ARI 0.64 against the reference; 0.986 at 128).
    pca_method : {"sketch", "exact"}
        StreamingPCA accumulator. "exact" keeps the F x F scatter (170 MB at 4,586 features) and needs
        an ARPACK read-out of ``basis_rank`` vectors for every basis update (seconds).
    store : {"auto", "counts", "full", "basis"}
        Per-position representation (:class:`~streamclust.decomposition.position_store.PositionStore`): "counts"
        keeps every reduced vector exactly as one-byte counts plus escapes for the rest (about
        5 kB a position on the phantom), "full" as float32 (18 kB a position at 4,586 features;
        exact), "basis" its coordinates in a rank-``basis_rank`` basis (513 bytes at rank 128;
        lossy, see docs/engine.md). "auto" is "counts" when its dense part (one byte a feature)
        fits ``full_store_max_bytes``, else "basis".
    full_store_max_bytes : int
        Budget of the "auto" choice (2 GiB: up to about 460,000 positions, 680 x 680, in counts).
    pending_limit : int
        Positions kept as full float32 vectors until the next refresh encodes them into the store's
        basis (updated first, so it has seen them); more than this many trigger an early encoding.
    basis_new_directions : int
        Leading current-space PCA directions put first into the store's basis at every basis
        update (at most ``basis_rank // 4``); the old basis fills the remaining slots
        (docs/engine.md).
    refresh_iter : int
        FCM passes over all stored positions of a warm-started refresh.
    fcm_n_init : int
        k-means++ restarts of a full re-fit.
    final_n_init : int
        k-means++ restarts of the re-fit at :meth:`finalize` (FCM at small ``m`` has near-equal
        local optima; the end of the scan can afford more restarts).
    refit_sample : int
        Positions the k-means++ restarts of a full re-fit run on; the best is then refined on all
        positions (``refresh_iter`` passes, or to convergence at :meth:`finalize`).
    refit_angle_deg : float
        A full FCM re-fit is also tried when the largest principal angle between the previous and
        the new PCA subspace exceeds this, or the component count changed.
    final_pca_sample : int
        At :meth:`finalize` the PCA is taken again from at most this many stored complete
        positions (seeded sample), in the final scaled space, instead of the streaming sketch's
        read-out (0: keep the sketch's). The sketch is truncated in the warm-up space and lost a
        film direction of the whole lamella (1.7 % of the variance): 7 components instead of the
        reference's 10, whole-scan ARI 0.47 (:mod:`streamclust.decomposition.sample_pca`). Exact stores only
        ("counts", "full"): the "basis" store holds coordinates in a basis taken from the sketch,
        so its reconstructions carry nothing the sketch did not keep (measured: ARI 0.38 against
        0.99 on tests/test_engine.py's scan when they were re-read).
    drift_threshold : float or None
        Page-Hinkley threshold of the new-material test (:class:`~streamclust.cluster.drift.NoveltyDrift`,
        river): when the incoming positions' distances to their nearest centre rise and stay
        risen (the scan entered a layer the model has not seen), the engine refreshes at once
        instead of waiting for ``refresh_every``. None or 0: off.
    drift_min_gap : int
        Positions since the last refresh before a drift may trigger another.
    host_clusters : int
        Sub-clusters of the host phase (0: single-level, the paper's pipeline as is). At every
        refresh the largest cluster (the film matrix on a lamella) is re-scaled, re-projected and
        re-clustered among its own positions (:mod:`streamclust.cluster.host_refine`), because on a whole
        lamella the substrate and caps take the PCA and the clusters (docs/engine.md). The outputs
        then have ``n_clusters + host_clusters`` columns; the host's own column is 0 (its mass is
        in the sub-clusters, product rule).
    host_threshold : float
        Host membership a position needs to shape the level-2 space.
    host_min_positions : int
        Host positions needed before the level-2 model is built.
    host_sample_size : int
        Host positions the level-2 statistics and PCA are computed on.
    host_min_components : int
        Floor of the 1 % rule at level 2.
    host_refit_growth : float
        The level-2 space is re-fitted when the host grew by this fraction since its last fit (or
        the host cluster changed, or at :meth:`finalize`); in between only its clusters are
        refreshed.
    host_overlap : float
        Level-1 clusters sharing at least this fuzzy overlap of positions with the host join it
        (:func:`~streamclust.cluster.host_refine.host_group`: a film split by thickness is one host).
    host_mixing : float or None
        Level-1 clusters also join the host when they are spatially intermixed with it: more than
        this fraction of each one's positions has an 8-neighbour in the other
        (:func:`~streamclust.cluster.spatial_pool.spatial_mixing`; needs ``scan_shape``). One layer split
        by noise into clusters alternating position by position, with crisp memberships, has no
        fuzzy overlap (measured: 0.009 on the phantom's film at 36 X-ray counts a spectrum) and
        the host flipped between one and both halves from refresh to refresh. None or 0: off.
    host_merge_effect : float
        Level-2 clusters whose element-line shares (``host_merge_elements``) differ by less than
        this, or not significantly, are one composition: their memberships are summed into one
        column, the others left at 0 (:mod:`streamclust.cluster.merge`; each position labelled by
        its 4-neighbours, so noise clusters do not differ on their own data). ``host_clusters`` is
        then an upper bound; the count is what the data supports. 0: off.
    host_merge_elements : tuple of str
        The K-alpha lines compared (:data:`streamclust.flags.stats.LINES_KEV`).
    host_spatial : bool
        The final level-2 memberships take their neighbourhood's into account: the spatial fuzzy
        C-means membership step (:func:`~streamclust.cluster.spatial_pool.spatial_memberships`, Chuang et
        al. 2006, ``p = q = 1``) over the clear host. Needs ``scan_shape``.
    host_pooling : bool
        While the scan runs, the level-2 clustering works on each host position's level-2 scores
        averaged with those of its scanned 8-neighbours in the host
        (:mod:`streamclust.cluster.spatial_pool`); :meth:`finalize` clusters per position, as the paper
        (and the offline reference) does. A second phase is a few dozen positions when the scan
        first crosses it, too few and too noisy for a cluster of its own per position (measured
        on the phantom: best-cluster F1 0.24-0.45 with 49-63 of its positions seen; pooled,
        0.88-0.89). Needs ``scan_shape``.
    spill : str
        Where the position store's rows live (:mod:`streamclust.decomposition.spill`): ``"auto"`` in an unlinked
        file in the system's temporary folder when they would take more than 256 MiB of RAM (a
        256 x 256 scan: 300 MB; 512 x 512: 1.2 GB), else in RAM; ``"off"``: always RAM; any other
        value: a folder to spill to, whatever the size. Spilled rows are read back in chunks and
        released after each, so what the store keeps resident does not grow with the scan.
    blas_threads : int or None
        BLAS threads while processing (None: leave BLAS alone). One thread avoids BLAS spinning
        against Numba's threads (docs/streaming-statistics.md).
    kernel_threads : int or None
        Threads of the Numba kernels the engine launches (None or 0: Numba's default, one per
        core). One by default: the receiver's threads hold the other core of an acquisition PC,
        and a parallel kernel waiting for a descheduled worker cost 45.8 ms a pass instead of
        0.21 ms (:mod:`streamclust.engine.threads`).
    random_state : int or None
        Seed of every random choice: the same seed, the same result (None: a fresh one each time).
    """

    _section = "engine"

    n_clusters: int = opt(6, integer(2), "fuzzy clusters")
    m: float = opt(1.2, number(1.0, lo_open=True), "FCM fuzzifier (docs/fcm.md)")
    bin_factor: int = opt(8, integer(1), "frame sum-binning (512 x 512 -> 64 x 64 at 8)")
    energy_window_kev: tuple = opt((0.2, 10.0), window, "EDS energy window [low, high] keV")
    rebin: int = opt(2, integer(1), "EDS channels summed into one feature")
    warmup_positions: int | str = opt(AUTO, integer(2, auto=True), '"auto": min(512, positions / 4)')
    refresh_every: int | str | None = opt(AUTO, integer(1, auto=True),
                                          'fewest positions between refreshes; "auto": 256', none=True)
    refresh_growth: float = opt(0.25, number(0.0), "a refresh also waits until the positions seen grew by "
                                                   "this fraction (amortised O(1) a position; 0: off)")
    max_components: int = opt(20, integer(1), "cap of the explained-variance rule")
    min_explained_ratio: float = opt(0.01, number(0.0, 1.0, lo_open=True, hi_open=True), "the 1 % rule")
    basis_rank: int = opt(128, integer(2), "coordinates kept per position (and PCA sketch rank)")
    pca_method: str = opt("sketch", choice("sketch", "exact"), "StreamingPCA accumulator")
    store: str = opt("auto", choice("auto", "counts", "full", "basis"),
                     "per-position representation (docs/engine.md)")
    final_n_init: int = opt(10, integer(1), "k-means++ restarts of the final re-fit")
    final_pca_sample: int = opt(8192, integer(0), "stored positions the final PCA read-out is taken from "
                                                  "(0: the streaming sketch's)")
    drift_threshold: float | None = opt(20.0, number(0.0), "Page-Hinkley threshold of the new-material test "
                                                           "that refreshes early (0: off)", none=True)
    drift_min_gap: int = opt(256, integer(1), "positions after a refresh before a drift may trigger another")
    host_clusters: int = opt(6, _host_clusters,
                             "sub-clusters of the host phase (0: single level; docs/host-refinement.md)")
    host_threshold: float = opt(0.9, number(0.0, 1.0, lo_open=True, hi_open=True),
                                "host membership a position needs to shape the level-2 space")
    host_min_positions: int = opt(256, integer(1), "host positions needed before the level-2 model is built")
    host_sample_size: int = opt(4096, integer(16), "host positions the level-2 statistics and PCA use")
    host_min_components: int = opt(5, integer(1), "floor of the 1 % rule at level 2")
    host_refit_growth: float = opt(0.5, number(0.0), "host growth that re-fits the level-2 space")
    host_overlap: float = opt(0.1, number(0.0, 1.0), "level-1 clusters sharing this fuzzy overlap of positions "
                                                     "with the host join it (a film split by thickness)")
    host_mixing: float | None = opt(0.5, number(0.0, 1.0), "level-1 clusters intermixed with the host position "
                                                           "by position (this fraction of each touches the other) "
                                                           "join it; 0: off", none=True)
    host_merge_effect: float = opt(0.05, number(0.0, 0.99), "level-2 clusters whose element-line shares differ "
                                                            "by less than this (or not significantly) are one "
                                                            "composition, shown as one region; 0: off")
    host_merge_elements: tuple = opt(("Fe", "Co"), element_symbols, "the K-alpha lines the merge compares")
    host_spatial: bool = opt(True, boolean, "the final level-2 memberships weighted by their 3 x 3 "
                                            "neighbourhood's (spatial fuzzy C-means step); needs the scan shape")
    host_pooling: bool = opt(True, boolean, "live level-2 clustering on 3 x 3 neighbourhood means (the final "
                                            "one per position); needs the scan shape")
    spill: str = opt("auto", text, "where the position store lives: auto (a temporary file when larger than "
                                   "256 MiB), off (RAM), or a folder")
    kernel_threads: int | None = opt(1, integer(0), "threads of the engine's Numba kernels (0: one per core); 1 "
                                                    "leaves the other core to the receiver", none=True)
    random_state: int | None = opt(0, integer(0), "seed of every random choice (same seed, same result)",
                                   none=True)
    # the Python API's only
    frame_reducer_params: Mapping | None = opt(None, mapping, "further FrameReducer options", toml=False, none=True)
    scaler_params: Mapping | None = opt(None, mapping, "StreamingRobustScaler options", toml=False, none=True)
    refresh_seconds: float | None = opt(None, number(0.0, lo_open=True), "wall-clock refresh period",
                                        toml=False, none=True)
    sketch_rank: int | None = opt(None, integer(1), "PCA sketch rank (None: basis_rank)", toml=False, none=True)
    full_store_max_bytes: int = opt(2 * 2**30, integer(0), "budget of store='auto'", toml=False)
    pending_limit: int = opt(8192, integer(1), "positions pending a basis update", toml=False)
    basis_new_directions: int = opt(32, integer(0), "new directions of a basis update", toml=False)
    refresh_iter: int = opt(10, integer(1), "FCM passes of a warm-started refresh", toml=False)
    fcm_n_init: int = opt(3, integer(1), "k-means++ restarts of a full re-fit", toml=False)
    refit_sample: int = opt(4096, integer(1), "positions the restarts of a re-fit run on", toml=False)
    refit_angle_deg: float = opt(10.0, number(0.0), "subspace angle that tries a full re-fit", toml=False)
    blas_threads: int | None = opt(1, integer(1), "BLAS threads while processing", toml=False, none=True)

    def for_scan(self, n_positions: int) -> EngineParams:
        """These parameters with the ``"auto"`` values resolved for a scan of ``n_positions``."""
        n = int(n_positions)
        changes: dict[str, Any] = {}
        if self.warmup_positions == AUTO:
            changes["warmup_positions"] = max(int(self.n_clusters), min(512, n // 4))
        if self.refresh_every == AUTO:
            changes["refresh_every"] = 256  # why 256: the refresh_every doc above
        return self.replace(**changes)

    def resolved(self, n_positions: int) -> dict[str, Any]:
        """:meth:`for_scan` as keyword arguments of :class:`~streamclust.engine.streaming.StreamingEngine`,
        without ``n_clusters`` (:class:`~streamclust.app.live.LiveAnalysis` takes it on its own)."""
        p = self.for_scan(n_positions)
        return {f.name: getattr(p, f.name) for f in fields(p) if f.name != "n_clusters"}


@dataclass(frozen=True)
class CentresParams(Params):
    """``[centres]``: thresholded cluster-centre signals and how often flags are assessed."""

    _section = "centres"

    thresholds: tuple = opt((0.5, 0.75), thresholds, "membership thresholds of the centre signals")
    assess_every: int | str = opt(AUTO, integer(1, auto=True),
                                  'positions between flag assessments without a refresh; '
                                  '"auto": max(128, positions / 32)')

    def resolved_assess_every(self, n_positions: int) -> int:
        return max(128, int(n_positions) // 32) if self.assess_every == AUTO else int(self.assess_every)
