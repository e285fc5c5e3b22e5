"""One analysed scan as a value: what the live analysis, the replay and the Dask replay produce.

:class:`ScanResult` is the hand-over between the analysis and its outputs. The live analysis
(:meth:`streamclust.app.live.LiveAnalysis.scan_result`, also what the single-process replay runs) and the
Dask replay (:func:`streamclust.distributed.dask_replay.replay_dask`) each build one; the results file
(:class:`streamclust.results.writer.ResultsWriter`) is written from it and from nothing else. A producer
hands over copies: the value does not change when the analysis goes on (the live analysis builds
one per checkpoint while the scan runs), and its arrays are read-only.

Examples
--------
>>> import numpy as np
>>> u = np.array([[0.9, 0.1], [np.nan, np.nan], [0.2, 0.8], [0.6, 0.4]], np.float32)
>>> r = ScanResult(scan_shape=(2, 2), memberships=u, seen=np.array([True, False, True, True]))
>>> r.labels.tolist(), r.n_seen, r.n_clustered
([0, -1, 1, 0], 3, 3)
>>> log = [{"kind": "raised", "flag_id": 1, "cluster": 1, "score": 0.9, "bbox": (0, 0, 1, 1),
...         "n_positions": 4, "scan_fraction": 0.5, "elapsed_s": 1.0}]
>>> [(s["flag_id"], s["scan_fraction_at_first_flag"], s["last_kind"]) for s in summarise_flags(log)]
[(1, 0.5, 'raised')]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # typing only: the value holds what the centre store made
    from streamclust.engine.centres import CentreSet

__all__ = ["ScanResult", "summarise_flags"]

#: the statistics a flag raised by ``[flags] method = "test"`` carries into its summary
_TEST_KEYS = ("p_value_eds", "p_value_cbed", "effect_eds", "effect_cbed", "level")


def summarise_flags(flag_log: Iterable[Mapping[str, Any]]) -> list[dict]:
    """One entry per flag id of a flag log: first raised (with its scan fraction) and its last state.

    A log entry is a flag event's fields (:class:`streamclust.flags.flagger.FlagEvent` without
    ``positions``) with ``scan_fraction`` and ``elapsed_s`` (when it was decided). A flag whose
    first entry is not ``raised`` (a log that starts mid-scan) is left out.
    """
    out: dict[int, dict] = {}
    for rec in flag_log:
        fid = rec["flag_id"]
        if fid not in out:
            if rec["kind"] != "raised":
                continue
            out[fid] = {"flag_id": fid, "scan_fraction_at_first_flag": rec["scan_fraction"],
                        "seconds_at_first_flag": rec["elapsed_s"]}
        out[fid].update(cluster=rec["cluster"], score=rec["score"], bbox=list(rec["bbox"]),
                        n_positions=rec["n_positions"], last_kind=rec["kind"],
                        fe_co_ratio=rec.get("signals", {}).get("fe_co_ratio"))
        if rec["kind"] == "raised" and rec.get("p_value_eds") is not None:
            # the statistics at the moment the flag was raised ([flags] method = "test")
            out[fid].update({k: rec[k] for k in _TEST_KEYS})
    return list(out.values())


def _frozen(a, dtype) -> np.ndarray:
    out = np.array(a, dtype=dtype, copy=True)
    out.flags.writeable = False
    return out


@dataclass(frozen=True, eq=False)
class ScanResult:
    """The state of one analysed scan at one moment (a checkpoint, or the end of the scan).

    Parameters
    ----------
    scan_shape : (ny, nx)
    memberships : ndarray (ny * nx, k)
        Fuzzy memberships of every position (raster order); NaN rows: not clustered (yet). With
        host refinement the last ``host_clusters`` columns are the host's sub-clusters.
    seen : ndarray (ny * nx,) bool
        Positions that delivered a frame or a spectrum.
    level1_memberships : ndarray (ny * nx, n_clusters), optional
        The memberships before host refinement (the level-1 model), when there is one.
    n_components : int
        PCA components of the clustering space.
    explained_variance_ratio : ndarray
    cluster_centers : ndarray (k, n_components), optional
        Level-1 centres in PCA space.
    validity : mapping
        Cluster validity indices (partition coefficient, entropy, Xie-Beni).
    host_cluster : int
        The level-1 cluster refined into the host sub-clusters (-1: none).
    host_clusters : int
        Host sub-clusters asked for (0: no refinement).
    host_group : tuple of int
        The level-1 clusters merged into the host.
    centres : CentreSet, optional
        The thresholded centres (None: no position with both signals yet).
    centre_stats : mapping
        The centre store's counters.
    flag_log : sequence of dict
        Every flag event with the scan fraction and time it was decided (see
        :func:`summarise_flags`).
    engine_stats : mapping
        The model's counters and timings (``seconds`` per stage), written under ``engine.``.
    counters : mapping
        The acquisition's or the replay's counters (frames received, dropped by reason, chunks),
        nested allowed.
    """

    scan_shape: tuple[int, int]
    memberships: np.ndarray
    seen: np.ndarray
    level1_memberships: np.ndarray | None = None
    n_components: int = 0
    explained_variance_ratio: np.ndarray = field(default_factory=lambda: np.zeros(0))
    cluster_centers: np.ndarray | None = None
    validity: Mapping[str, Any] = field(default_factory=dict)
    host_cluster: int = -1
    host_clusters: int = 0
    host_group: tuple[int, ...] = ()
    centres: CentreSet | None = None
    centre_stats: Mapping[str, Any] = field(default_factory=dict)
    flag_log: tuple[dict, ...] = ()
    engine_stats: Mapping[str, Any] = field(default_factory=dict)
    counters: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: the normalised copies are set once, here
        shape = tuple(int(v) for v in self.scan_shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"scan_shape must be (ny, nx) >= 1, got {self.scan_shape!r}")
        n = shape[0] * shape[1]
        put(self, "scan_shape", shape)
        u = _frozen(self.memberships, np.float32)
        if u.ndim != 2 or u.shape[0] != n or u.shape[1] < 1:
            raise ValueError(f"memberships of shape {u.shape} do not cover the {n} positions of scan {shape}")
        put(self, "memberships", u)
        seen = _frozen(self.seen, bool).reshape(-1)
        if seen.size != n:
            raise ValueError(f"seen has {seen.size} positions, the scan {n}")
        put(self, "seen", seen)
        if self.level1_memberships is not None:
            u1 = _frozen(self.level1_memberships, np.float32)
            if u1.ndim != 2 or u1.shape[0] != n:
                raise ValueError(f"level1_memberships of shape {u1.shape} do not cover {n} positions")
            put(self, "level1_memberships", u1)
        put(self, "n_components", int(self.n_components))
        put(self, "explained_variance_ratio", _frozen(self.explained_variance_ratio, np.float64))
        if self.cluster_centers is not None:
            put(self, "cluster_centers", _frozen(self.cluster_centers, np.float64))
        put(self, "host_cluster", int(self.host_cluster))
        put(self, "host_clusters", int(self.host_clusters))
        put(self, "host_group", tuple(int(h) for h in self.host_group))
        put(self, "validity", dict(self.validity))
        put(self, "centre_stats", dict(self.centre_stats))
        put(self, "flag_log", tuple(dict(r) for r in self.flag_log))
        put(self, "engine_stats", dict(self.engine_stats))
        put(self, "counters", dict(self.counters))

    @property
    def n_positions(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    @property
    def clustered(self) -> np.ndarray:
        """Positions with finite memberships (n_positions,) bool."""
        return np.isfinite(self.memberships).all(axis=1)

    @property
    def n_seen(self) -> int:
        return int(np.count_nonzero(self.seen))

    @property
    def n_clustered(self) -> int:
        return int(np.count_nonzero(self.clustered))

    @property
    def labels(self) -> np.ndarray:
        """Arg-max cluster of every position, int16; -1 where not clustered."""
        known = self.clustered
        labels = np.full(self.n_positions, -1, np.int16)
        labels[known] = np.argmax(self.memberships[known], axis=1)
        return labels

    @property
    def flags_summary(self) -> list[dict]:
        """:func:`summarise_flags` of :attr:`flag_log`."""
        return summarise_flags(self.flag_log)
