"""Second-phase flags: decide, while the scan runs, which cluster is a candidate second phase.

Every update measures each cluster against the criteria of :mod:`streamclust.flags.criteria`
(minor; localised and coherent; distinct in each block from the matrix around it; a score), then
keeps flags over the scan.

Hysteresis: a flag is raised after ``raise_after`` consecutive passing updates; an active flag
is kept while it passes the criteria relaxed by ``hysteresis`` (thresholds multiplied by it,
``max_fraction`` and ``max_extent`` divided by it) and retracted after ``retract_after``
consecutive failing updates, or at once when its cluster disappears. Flags are matched across
updates by position overlap, not cluster index, so a model that renumbers its clusters keeps
the flag ids; among the candidates overlapping a flag by ``match_overlap``, it follows one that
passes, then one that passes relaxed, then the most overlapping.

Examples
--------
>>> import numpy as np
>>> ny, nx = 24, 24
>>> rng = np.random.default_rng(0)
>>> inc = np.zeros((ny, nx), bool); inc[8:13, 8:13] = True
>>> u = np.where(inc.ravel()[:, None], [0.1, 0.9], [0.9, 0.1])
>>> cbed = rng.normal(0, 1, (ny * nx, 8)); cbed[inc.ravel(), 0] += 4
>>> eds = rng.normal(0, 1, (ny * nx, 8)); eds[inc.ravel(), 1] += 4
>>> flagger = SecondPhaseFlagger(min_positions=5)
>>> flagger.update(u, (ny, nx), cbed, eds)  # the first passing update arms the flag (raise_after=2)
[]
>>> events = flagger.update(u, (ny, nx), cbed, eds)
>>> [(ev.kind, ev.flag_id, ev.cluster, ev.bbox) for ev in events]
[('raised', 1, 1, (8, 8, 13, 13))]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace

import numpy as np

from streamclust.flags.criteria import ClusterAssessment, ClusterCriteria
from streamclust.flags.params import FlagParams
from streamclust.flags.stats import AlphaSpending
from streamclust.cluster.separation import block_distance, shape_difference

logger = logging.getLogger(__name__)

__all__ = ["FlagEvent", "ClusterAssessment", "SecondPhaseFlagger", "block_distance", "shape_difference",
           "FLAG_EDS_WINDOW_KEV", "FLAG_EDS_REBIN", "eds_window"]

#: the flagger's EDS block: the channels of this window (keV) ...
FLAG_EDS_WINDOW_KEV = (0.2, 10.0)
#: ... summed in groups of this many channels (the live analysis, the Dask replay's flag sums and
#: their tests all take the block from here)
FLAG_EDS_REBIN = 8


def eds_window(energy_axis_kev: np.ndarray) -> slice:
    """The channels of the flagger's EDS window (:data:`FLAG_EDS_WINDOW_KEV`) on ``energy_axis_kev``."""
    return slice(*np.searchsorted(np.asarray(energy_axis_kev, dtype=float), FLAG_EDS_WINDOW_KEV))


@dataclass(frozen=True)
class FlagEvent:
    """A flag raised, updated or retracted.

    ``positions`` are flat raster indices (``y * nx + x``) of the flagged components; ``bbox`` is
    ``(y0, x0, y1, x1)`` half-open; ``components`` the bbox of each counted component;
    ``signals`` a summary of the cluster-centre signals (e.g. ``fe_co_ratio``), possibly empty.
    """

    kind: str
    flag_id: int
    cluster: int
    neighbour: int
    score: float
    coherence: float
    distance_cbed: float
    distance_eds: float
    n_positions: int
    fraction: float
    bbox: tuple
    components: tuple
    positions: np.ndarray = field(repr=False)
    scan_shape: tuple = ()
    update: int = 0
    signals: dict = field(default_factory=dict)
    reason: str = ""
    # method="test": the statistics behind the flag (docs/events.md)
    p_value_eds: float | None = None
    p_value_cbed: float | None = None
    effect_eds: float | None = None
    effect_cbed: float | None = None
    level: float | None = None
    composition: dict = field(default_factory=dict)


class _Flag:
    __slots__ = ("flag_id", "positions", "cluster", "fails", "last")

    def __init__(self, flag_id: int, a: ClusterAssessment):
        self.flag_id = flag_id
        self.positions = a.positions
        self.cluster = a.cluster
        self.fails = 0
        self.last = a


class SecondPhaseFlagger(ClusterCriteria):
    """Raise, update and retract second-phase flags from live memberships.

    Parameters
    ----------
    params : FlagParams, optional
        The parameters below as one object (:class:`~streamclust.flags.params.FlagParams`, the
        configuration's ``[flags]``, where their defaults are); default ``FlagParams()``.
    **overrides
        Parameters to change (``SecondPhaseFlagger(min_positions=5)``), checked as the
        configuration's values are.
    min_fraction, max_fraction : float
        Range of the cluster's share of the scanned positions (thresholded).
    min_positions : int
        Fewest thresholded positions of a candidate.
    membership_threshold : float
        ``u > threshold`` makes a position a member.
    min_component_size : int
        Smallest connected component that counts.
    coherence : float
        Least fraction of the cluster's positions in counted components.
    max_extent : float
        A component spanning this fraction of the scan (rows or columns) or more is a layer.
    max_open : float
        A component whose one-position ring is more than this fraction unscanned is still open
        (on the scan front) and does not count yet.
    min_block_distance : float
        Least cross-fitted discriminability in the CBED block (and in the EDS block when
        ``min_eds_distance`` is None).
    min_eds_distance : float or None
        Least cross-fitted discriminability in the EDS block.
    raise_after, retract_after : int
        Consecutive passing (failing) updates before raising (retracting).
    hysteresis : float
        Relaxation factor (0-1] of the criteria for an active flag.
    match_overlap : float
        Least overlap (intersection / smaller set) that makes a candidate the same flag.
    max_listed_positions : int
        Events list positions only up to this many (the bbox and components are always given).
    embedded_only : bool
        Components touching the scan frame (first or last row or column) do not count: strata
        enter the scan from its edges; the price is that an inclusion cut by the frame is not
        flagged (criterion 2).
    max_band_rows : int
        Components that together lie within this many rows but span at least ``max_extent`` of
        the scan width are one band (an interface), not inclusions (0: off).
    neighbour_size_ratio : float
        A neighbour (the matrix a candidate is compared with) has at least this many times the
        candidate's positions when such a cluster touches it (criterion 3).
    min_contiguity : float
        Least fraction of the scanned 8-neighbours of the flagged positions that are in the
        cluster (criterion 2).
    min_ring_share : float
        Every other cluster at least as large as the candidate and holding this share of the ring
        must be distinct from it too (criterion 3).
    min_matrix_share : float
        Least share of the ring membership in the matrix clusters, when the caller says which
        they are (``matrix_clusters`` of :meth:`update`; criterion 3).
    eds_shape_only : bool
        The EDS distance ignores a difference in overall intensity (``shape_only`` of
        :func:`block_distance`).
    distances_for_all : bool
        Measure the block distances of every cluster that could pass on size, not only of those
        that pass every other test (diagnostics: ``assessments_`` then says how distinct a layer
        is; the distances are most of an assessment's cost).
    method : {"rules", "test"}
        How a localised, embedded candidate is judged distinct from its matrix. ``"rules"``: the
        cross-fitted block distances against ``min_block_distance`` / ``min_eds_distance`` and
        ``raise_after`` passing updates. ``"test"`` (:mod:`streamclust.flags.stats`): a
        quasi-likelihood composition test of the element-line counts (``line_counts`` of
        :meth:`update`) and a cross-fitted projection test of the CBED features, both at the
        candidate's share of a false-alarm budget ``alpha`` per scan spent over the looks; a
        candidate passing both is raised at once.
    alpha : float
        ``method="test"``: probability that a scan with no second phase raises any flag.
    min_effect : float
        ``method="test"``: least difference of an element line's share of the line counts between
        a candidate and its matrix (0.05: five percentage points).
    matrix_radius : int
        ``method="test"``: the matrix a candidate is tested against lies within this many positions
        of it.
    elements : tuple of str
        ``method="test"``: the elements whose K-alpha line counts make the composition tested (their
        proportions among themselves). Default Fe and Co, the metals whose ratio defines the phases
        of the Co2FeSi film: another layer in the beam path at an interface (Si substrate, carbon
        cap) dilutes all the named lines alike and leaves their proportions unchanged, while Si,
        shared by the film and the substrate, changed its share at the film/substrate interface of
        a single-phase phantom enough to raise a false flag (held-out seed 1000: Si 0.33 against
        0.27, Fe/Co unchanged). Name the elements that tell your phases apart.
    """

    def __init__(self, params: FlagParams | None = None, **overrides) -> None:
        #: the parameters (:class:`~streamclust.flags.params.FlagParams`, ``[flags]``), checked there;
        #: each is also an attribute, which the criteria read
        self.params = (params or FlagParams()).replace(**overrides)
        for f in fields(self.params):
            setattr(self, f.name, getattr(self.params, f.name))
        self._spending = None  # AlphaSpending of the scan, made at the first update (method="test")
        self._flags: dict[int, _Flag] = {}
        self._pending: dict[int, tuple[np.ndarray, int]] = {}  # cluster -> (positions, passes)
        self._next_id = 1
        self.n_updates_ = 0
        self.assessments_: list[ClusterAssessment] = []

    @property
    def active_flags(self) -> list[FlagEvent]:
        """The active flags, as their latest state (kind ``"active"``)."""
        return [self._event("active", f, f.last) for f in sorted(self._flags.values(), key=lambda f: f.flag_id)]


    # ------------------------------------------------------------------ state machine
    def update(self, memberships, scan_shape, cbed_features, eds_features, *, scanned_mask=None,
               signals: dict | None = None, block_distances=None, matrix_clusters=None,
               line_counts=None, check_finite: bool = True) -> list[FlagEvent]:
        """Re-assess all clusters and return the flag events of this update.

        Parameters
        ----------
        memberships : (n_positions, c)
            NaN rows are unseen positions.
        scan_shape : (ny, nx)
        cbed_features, eds_features : (n_positions, d_cbed), (n_positions, d_eds)
            Per-position signals of each block (e.g. binned, variance-stabilised patterns and
            windowed spectra, or per-block PCA scores); NaN rows are unseen.
        scanned_mask : (n_positions,) bool, optional
            Restricts the positions considered (default: rows with finite memberships).
        signals : dict, optional
            ``{cluster: {name: value}}`` summaries of the cluster-centre signals carried by the
            events (see :func:`streamclust.engine.centres.fe_co_lines`).
        block_distances : callable, optional
            ``(k, j, in_k, in_j, fold) -> (d_cbed, d_eds)`` instead of the feature arrays
            (see :meth:`assess`).
        matrix_clusters : sequence of int, optional
            The clusters that make up the matrix (the engine's host sub-clusters): a candidate
            must then have ``min_matrix_share`` of its ring in them (see :meth:`assess`).
        line_counts : (n_positions, E) int, optional
            Element-line window counts per position (``method="test"``).
        check_finite : bool, default=True
            False: the feature rows are finite inside ``scanned_mask`` and zero outside, so the
            blocks are not scanned for NaN rows (see :meth:`assess`).

        Returns
        -------
        list of FlagEvent
            ``raised``, ``updated`` and ``retracted`` events, in flag-id order.
        """
        self.n_updates_ += 1
        self._shape = tuple(int(v) for v in scan_shape)
        self._signals = signals or {}
        assessments = self.assess(memberships, scan_shape, cbed_features, eds_features, scanned_mask,
                                  block_distances=block_distances, matrix_clusters=matrix_clusters,
                                  line_counts=line_counts, check_finite=check_finite)
        if self.method == "test":
            assessments = self._decide(assessments, memberships, scan_shape, scanned_mask)
        self.assessments_ = assessments
        events: list[FlagEvent] = []
        claimed: set[int] = set()
        # active flags first, each following one candidate it overlaps by match_overlap. The pairs
        # are assigned together, best first: a candidate that passes outright, then one that
        # passes relaxed, then the most overlapping. Why the order: after a refresh moved an
        # inclusion's positions between clusters, the most overlapping cluster was a matrix-like
        # one still passing relaxed (Fe/Co 1.1, 45 % second phase), and the second phase's own
        # cluster raised a second flag for the same region (seed 4, row 36). Why together: one
        # flag at a time, in id order, a flag could take a passing cluster that is another flag's
        # own and leave that flag retracted as "cluster_gone"
        pairs = []
        for flag in self._flags.values():
            for a in assessments:
                if a.positions.size == 0:
                    continue
                ov = _overlap(flag.positions, a.positions)
                if ov >= self.match_overlap:
                    rank = 2 if a.passes else 1 if a.passes_relaxed else 0
                    pairs.append((rank, ov, -flag.flag_id, a.cluster, flag, a))
        pairs.sort(key=lambda t: t[:4], reverse=True)
        follows: dict[int, ClusterAssessment] = {}
        for *_, flag, a in pairs:
            if flag.flag_id not in follows and a.cluster not in claimed:
                follows[flag.flag_id] = a
                claimed.add(a.cluster)
        for flag in sorted(self._flags.values(), key=lambda f: f.flag_id):
            best = follows.get(flag.flag_id)
            if best is not None:
                if best.passes_relaxed:
                    flag.fails = 0
                    flag.positions, flag.cluster, flag.last = best.positions, best.cluster, best
                    events.append(self._event("updated", flag, best))
                    continue
                flag.fails += 1
                reason = best.reason
            else:
                # the cluster vanished or moved away entirely: the model changed its mind
                flag.fails = self.retract_after
                reason = "cluster_gone"
            if flag.fails >= self.retract_after:
                del self._flags[flag.flag_id]
                events.append(self._event("retracted", flag, flag.last, reason=reason))
                logger.info("flag %d retracted (%s)", flag.flag_id, reason)
        # new candidates
        pending = {}
        for a in assessments:
            if a.cluster in claimed or not a.passes:
                continue
            prev = self._pending.get(a.cluster)
            count = prev[1] + 1 if prev is not None and _overlap(prev[0], a.positions) >= self.match_overlap else 1
            # method="test": the alpha spending is the sequential rule, a passing test raises at once
            if count >= (1 if self.method == "test" else self.raise_after):
                flag = _Flag(self._next_id, a)
                self._next_id += 1
                self._flags[flag.flag_id] = flag
                events.append(self._event("raised", flag, a))
                logger.info("flag %d raised: cluster %d, score %.2f, bbox %s", flag.flag_id, a.cluster,
                            a.score, a.bbox)
            else:
                pending[a.cluster] = (a.positions, count)
        self._pending = pending
        events.sort(key=lambda ev: ev.flag_id)
        return events

    def _decide(self, assessments: list, memberships, scan_shape, scanned_mask) -> list:
        """method="test": spend this look's share of ``alpha``, split it among the tested candidates
        (Bonferroni) and pass those whose two tests reject at their share, with the composition
        differing by at least ``min_effect``. An active flag is kept while its candidate passes
        the geometric criteria relaxed and still differs by ``min_effect`` (keeping is not a new
        claim: the claim was tested when the flag was raised)."""
        ny, nx = (int(v) for v in scan_shape)
        if self._spending is None or self._spending.n_positions != ny * nx:
            self._spending = AlphaSpending(self.alpha, ny * nx)
        u = np.asarray(memberships)
        seen = np.isfinite(u).all(axis=1)
        if scanned_mask is not None:
            seen &= np.asarray(scanned_mask, bool).reshape(-1)
        budget = self._spending.spend(int(seen.sum()))
        tested = [a for a in assessments if a.tested]
        level = budget / len(tested) if tested else 0.0
        out = []
        for a in assessments:
            if not a.tested:
                if a.passes or a.passes_relaxed:  # geometric pass without a test: not a candidate
                    a = replace(a, passes=False, passes_relaxed=False, reason=a.reason or "not_tested")
                out.append(a)
                continue
            distinct = a.effect_eds >= self.min_effect
            significant = a.p_value_eds <= level and a.p_value_cbed <= level
            reason = a.reason
            if not distinct:
                reason = reason or "composition_effect_too_small"
            elif not significant:
                reason = reason or "not_significant"
            out.append(replace(a, level=level, passes=a.passes and distinct and significant,
                               passes_relaxed=a.passes_relaxed and a.effect_eds >= self.min_effect * self.hysteresis,
                               reason=reason))
        return out

    def retract_all(self, reason: str = "scan_ended") -> list[FlagEvent]:
        """Retract every active flag (e.g. when the scan is aborted or restarted)."""
        events = [self._event("retracted", f, f.last, reason=reason)
                  for f in sorted(self._flags.values(), key=lambda f: f.flag_id)]
        self._flags.clear()
        self._pending = {}
        return events

    def _event(self, kind: str, flag: _Flag, a: ClusterAssessment, reason: str = "") -> FlagEvent:
        sig = getattr(self, "_signals", {}).get(a.cluster, {})
        return FlagEvent(
            kind=kind, flag_id=flag.flag_id, cluster=a.cluster, neighbour=a.neighbour, score=a.score,
            coherence=a.coherence, distance_cbed=a.distance_cbed, distance_eds=a.distance_eds,
            n_positions=int(a.positions.size), fraction=a.fraction, bbox=a.bbox, components=a.components,
            positions=a.positions, scan_shape=getattr(self, "_shape", ()), update=self.n_updates_,
            signals=dict(sig), reason=reason,
            **({"p_value_eds": a.p_value_eds, "p_value_cbed": a.p_value_cbed, "effect_eds": a.effect_eds,
                "effect_cbed": a.effect_cbed, "level": a.level, "composition": dict(a.composition)}
               if a.tested else {}),
        )


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0 or b.size == 0:
        return 0.0
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / min(a.size, b.size)
