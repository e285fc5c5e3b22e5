"""Second-phase flag criteria: measure, at one moment, whether each cluster is a candidate second phase.

The measuring half of :class:`streamclust.flags.flagger.SecondPhaseFlagger` (the other half, in
:mod:`streamclust.flags.flagger`, keeps flags over the scan: raising, matching, hysteresis, retraction).
:class:`ClusterCriteria` reads the flagger's parameters (documented there) and returns one
:class:`ClusterAssessment` per cluster; it changes no state.

A cluster ``k`` is a candidate when, among the scanned positions,

1. **minor**: the positions with ``u[:, k] > membership_threshold`` are between ``min_fraction``
   and ``max_fraction`` of the scanned positions, and at least ``min_positions``; told the matrix
   clusters, at most ``max_fraction`` of the matrix's positions as well;
2. **localised and coherent**: the thresholded membership map is split into connected components
   (:func:`scipy.ndimage.label`, 8-connected). A component counts when it has at least
   ``min_component_size`` positions, does not touch the scan frame (``embedded_only``: a
   substrate or cap layer enters from an edge, and split into pieces each piece is small), and its
   bounding box spans less than ``max_extent`` of the scan in both directions: a layer crossing the whole scan (substrate, cap) is a stratum, not an
   embedded phase; and when at most ``max_open`` of its one-position ring is unscanned (a component
   on the scan front may be the first row of a layer: it counts once the scan has passed it). ``coherence`` = fraction of the cluster's positions inside counted components;
   it must reach ``coherence``. **Contiguity**: of the scanned 8-neighbours of the positions in
   counted components, the fraction in the same cluster must reach ``min_contiguity``. A cluster
   scattered like salt and pepper over the matrix (a level-2 split of the matrix by noise)
   percolates into 8-connected components that pass the size and extent tests; its contiguity is
   about its density (measured 0.32-0.43 on the phantom, where it raised a flag that stayed to the
   end of the scan), while inclusions have 0.56-0.76 (seeds 0, 2, 3, 64 x 64);
3. **distinct in each block**: the neighbouring cluster ``j`` is the one with the largest summed
   membership on the one-position ring around the counted components, among the clusters with at
   least ``neighbour_size_ratio`` times as many positions as ``k`` (the matrix is larger than what it
   embeds; without the rule the two halves of one phase split in two clusters were each other's
   neighbour), or among all when none is that large. Every other cluster at least as large as
   ``k`` holding ``min_ring_share`` of the ring membership must be distinct as well (the smallest
   distance counts): an inclusion differs from all that surrounds it, while a patch of one layer
   at an interface is half surrounded by its own layer (measured: a substrate patch on the film
   interface of the single-phase phantom, seed 2, was distinct from the film and raised a flag).
   In each block separately
   (CBED features, EDS features) the separation of ``k`` from ``j`` is a cross-fitted
   discriminability: the positions are split into two interleaved folds (``(y + x) % 2``); the
   direction ``e`` from ``j``'s to ``k``'s mean is taken in one fold, and the other fold's
   projections give ``d = (mean_k - mean_j) / sqrt((var_k + var_j) / 2)``; the two folds' ``d``
   are averaged. Cross-fitting keeps noise from inflating ``d`` (a direction fitted to noise in
   hundreds of channels separates any two groups on the same data; on fresh data its expected
   ``d`` is 0). The CBED ``d`` must reach ``min_block_distance``, the EDS ``d``
   ``min_eds_distance``: a second phase differs in composition, and a region of the matrix that
   is only thicker or thinner differs in counts a little (measured on the phantom: EDS ``d``
   0.63-0.86 for thickness and bending domains of the film that the live clustering made a
   cluster of, 1.2-3.5 for the Fe-rich second phase).

Score (documented in ``docs/events.md``): ``score = sqrt(coherence * min(1, r_min / 2))`` with
``r_min`` the smaller of ``d_cbed / min_block_distance`` and ``d_eds / min_eds_distance``: 1 for a
fully coherent cluster twice as distinct as required, about 0.7 at the distinctness threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from streamclust.flags.stats import composition_test, projection_test
from streamclust.cluster.separation import block_distance

__all__ = ["ClusterAssessment", "ClusterCriteria"]

_EIGHT = np.ones((3, 3), bool)


@dataclass(frozen=True)
class ClusterAssessment:
    """What the flagger measured for one cluster at one update."""

    cluster: int
    n_positions: int
    fraction: float
    coherence: float
    neighbour: int
    distance_cbed: float
    distance_eds: float
    score: float
    positions: np.ndarray = field(repr=False)
    components: tuple = ()
    passes: bool = False
    passes_relaxed: bool = False
    reason: str = ""
    contiguity: float = 0.0
    ring_clusters: tuple = ()
    matrix_share: float = 1.0
    # method="test" (streamclust.flags.stats): the candidate's hypothesis tests against its matrix
    tested: bool = False
    p_value_eds: float = 1.0
    p_value_cbed: float = 1.0
    effect_eds: float = 0.0
    effect_cbed: float = 0.0
    level: float = 0.0  # the false-alarm budget this candidate was tested at (alpha spending)
    composition: dict = field(default_factory=dict)

    @property
    def bbox(self) -> tuple:
        """(y0, x0, y1, x1), half-open, around the counted components."""
        if not self.components:
            return (0, 0, 0, 0)
        b = np.array(self.components)
        return (int(b[:, 0].min()), int(b[:, 1].min()), int(b[:, 2].max()), int(b[:, 3].max()))



class ClusterCriteria:
    """The criteria 1-3 and the score, measured on every cluster (no state).

    A base of :class:`~streamclust.flags.flagger.SecondPhaseFlagger`, whose constructor sets and checks
    the parameters read here (``min_fraction`` ... ``elements``; see its docstring).
    """

    # ------------------------------------------------------------------ measuring
    def assess(self, memberships, scan_shape, cbed_features, eds_features,
               scanned_mask=None, *, block_distances=None, matrix_clusters=None,
               line_counts=None, check_finite: bool = True) -> list[ClusterAssessment]:
        """Measure every cluster (no state change).

        ``block_distances``, optional: a callable ``(k, j, in_k, in_j, fold) -> (d_cbed, d_eds)``
        used instead of :func:`block_distance` on the feature arrays (which may then be None), for
        features that are not held in one place (the Dask replay computes the same cross-fitted
        distances from per-fold sums, :mod:`streamclust.flags.sums`). Rows it must leave out
        (no features) are excluded with ``scanned_mask``.

        ``matrix_clusters``, optional: the cluster numbers that make up the matrix (with the
        engine's two levels, the host's sub-clusters). A candidate must then hold at least
        ``min_matrix_share`` of its ring membership in them: a second phase is embedded in the
        matrix, while a patch of another layer (a substrate column split off by bending) is
        surrounded by its own layer. None or empty: no such test (a single-level model does not
        say which cluster is the matrix).

        ``line_counts``, optional (n_positions, E) integer: X-ray counts of each position in the
        element-line windows (:func:`streamclust.flags.stats.window_counts`); ``method="test"``
        needs them (and the CBED features).

        ``check_finite`` (as in :func:`scipy.linalg.solve`): rows of the feature blocks holding
        NaN or infinity are left out, which reads both blocks whole at every look. ``False``: the
        caller guarantees finite rows wherever ``scanned_mask`` is true and zeros elsewhere (the
        whole-block products below must stay finite): the live analysis passes the centre
        store's ``stored`` mask and its ``features(missing=0.0)``.
        """
        u = np.asarray(memberships, dtype=np.float64)
        ny, nx = (int(v) for v in scan_shape)
        n = ny * nx
        if u.ndim != 2 or u.shape[0] != n:
            raise ValueError(f"memberships must be ({n}, c) for scan_shape {scan_shape}, got {u.shape}")
        blocks = []
        for name, f in (("cbed", cbed_features), ("eds", eds_features)):
            if f is None:
                if block_distances is None and not (name == "eds" and self.method == "test"):
                    # (method="test" judges composition on the line counts, not the EDS features)
                    raise ValueError(f"{name}_features are needed unless block_distances is given")
                blocks.append(None)
                continue
            f = np.asarray(f)
            if not np.issubdtype(f.dtype, np.floating):
                f = f.astype(np.float32)  # integer products would be slow and could overflow
            if f.ndim != 2 or f.shape[0] != n:
                raise ValueError(f"{name}_features must be ({n}, d), got {f.shape}")
            blocks.append(f)
        seen = np.isfinite(u).all(axis=1)
        if scanned_mask is not None:
            m = np.asarray(scanned_mask, bool).reshape(-1)
            if m.size != n:
                raise ValueError(f"scanned_mask has {m.size} positions, the scan {n}")
            seen &= m
        # rows whose features are missing (NaN) cannot be compared; they are zeroed so the
        # whole-block products in block_distance stay finite (their weight is 0 anyway)
        for i, f in enumerate(blocks):
            if f is None or not check_finite:
                continue
            finite = np.isfinite(f)
            if not finite.all():
                seen &= finite.all(axis=1)
                blocks[i] = np.where(finite, f, 0).astype(f.dtype, copy=False)
        n_seen = int(seen.sum())
        c = u.shape[1]
        if n_seen == 0:
            return []
        matrix = None
        if matrix_clusters is not None and len(matrix_clusters):
            matrix = np.zeros(c, bool)
            idx = np.asarray(list(matrix_clusters), dtype=np.intp)
            if idx.min() < 0 or idx.max() >= c:
                raise ValueError(f"matrix_clusters {list(matrix_clusters)} are not all among the {c} clusters")
            matrix[idx] = True
        uz = np.where(seen[:, None], np.nan_to_num(u, nan=0.0), 0.0)
        member = uz > self.membership_threshold
        yy, xx = np.divmod(np.arange(n), nx)
        fold = (yy + xx) % 2 == 0
        lines = None
        if self.method == "test":
            if line_counts is None or blocks[0] is None:
                raise ValueError("method='test' needs line_counts and cbed_features")
            lines = np.asarray(line_counts)
            if lines.ndim != 2 or lines.shape != (n, len(self.elements)):
                raise ValueError(f"line_counts must be ({n}, {len(self.elements)}): a column per element of "
                                 f"{self.elements}; got {lines.shape}")
        out = []
        for k in range(c):
            out.append(self._assess_one(k, uz, member, seen, n_seen, (ny, nx), blocks, fold, block_distances,
                                        matrix, lines))
        return out

    def _assess_one(self, k, uz, member, seen, n_seen, shape, blocks, fold,
                    block_distances=None, matrix=None, lines=None) -> ClusterAssessment:
        ny, nx = shape
        mk = member[:, k]
        n_k = int(mk.sum())
        frac = n_k / n_seen
        # minor in the matrix as well: a level-2 sub-cluster holding a third of the film is a part
        # of the film, however small the film is in the scan (measured on seed 7, row 30: the
        # largest matrix sub-cluster, 497 positions, 26 % of the scan and 33 % of the film, passed
        # every other test against the second phase it surrounds, its ring neighbour)
        matrix_fraction = frac
        if matrix is not None:
            in_matrix = member[:, matrix].any(axis=1) | mk
            matrix_fraction = max(frac, n_k / max(int(in_matrix.sum()), 1))
        lab, n_comp = ndimage.label(mk.reshape(ny, nx), structure=_EIGHT)
        unseen2d = None if seen.all() else ~seen.reshape(ny, nx)
        comps = []
        edge = []  # compact, closed components cut by the scan frame: coherent, not flaggable
        n_open = 0
        kept = np.zeros((ny, nx), bool)
        if n_comp:
            sizes = np.bincount(lab.ravel(), minlength=n_comp + 1)
            for i, sl in enumerate(ndimage.find_objects(lab), start=1):
                if sl is None or sizes[i] < self.min_component_size:
                    continue
                h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
                if min(h, w) <= 2 and max(h, w) >= 4 * min(h, w):
                    # a line one or two positions thick: a piece of an interface, not an
                    # inclusion (inclusions are compact: a few to 20 positions across)
                    continue
                if unseen2d is not None and self._is_open(lab, i, sl, unseen2d):
                    # on the scan front: undecided, neither coherent nor scattered yet
                    n_open += int(sizes[i])
                    continue
                cpt = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop, h / ny, w / nx, i)
                if self.embedded_only and (sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == ny
                                           or sl[1].stop == nx):
                    # touches the scan frame: a layer entering the scan (substrate, cap), or a
                    # piece of one, is not an embedded phase (measured: substrate strips split by
                    # bending into 3-5 clusters raised flags against the film). It still counts
                    # as coherent: an inclusion cut by the frame is a compact blob of the phase
                    # (measured: on seed 3, 70 of the second-phase cluster's 126 positions were one
                    # inclusion at the frame, and its coherence 0.25 held the flag back 16 rows)
                    edge.append(cpt)
                    continue
                comps.append(cpt)
        def localised(limit: float) -> list:
            return [cpt for cpt in comps if cpt[4] < limit and cpt[5] < limit]

        strict = localised(self.max_extent)
        relaxed = localised(min(1.0 + 1e-9, self.max_extent / self.hysteresis))
        if relaxed and self.max_band_rows:
            # pieces of one thin band across the scan (an interface between layers, split into
            # short runs) each look localised; together they are a stratum (measured: the
            # substrate/film interface row raised flags on the single-phase phantom)
            rows = (min(c[0] for c in relaxed), max(c[2] for c in relaxed))
            cols = (min(c[1] for c in relaxed), max(c[3] for c in relaxed))
            if rows[1] - rows[0] <= self.max_band_rows and (cols[1] - cols[0]) / nx >= self.max_extent:
                strict, relaxed = [], []
        ids = [cpt[6] for cpt in relaxed]
        kept = np.isin(lab, ids) & (lab > 0) if ids else kept
        # coherent = in a counted component, or in a localised one the frame cuts
        edge_strict = [cpt[6] for cpt in edge if cpt[4] < self.max_extent and cpt[5] < self.max_extent]
        edge_relaxed = [cpt[6] for cpt in edge if max(cpt[4], cpt[5]) < self.max_extent / self.hysteresis]
        n_strict = int(np.isin(lab, [cpt[6] for cpt in strict] + edge_strict).sum()) if strict else 0
        # positions in open components are left out of the count: a second inclusion half
        # scanned is not evidence against the first (measured: on seed 3 it held the flag back
        # 4 rows, 70 of 138 positions in an open inclusion)
        n_decided = n_k - n_open
        coh_strict = n_strict / n_decided if n_decided > 0 else 0.0
        n_coh = int(kept.sum()) + (int(np.isin(lab, edge_relaxed).sum()) if ids and edge_relaxed else 0)
        coh = n_coh / n_decided if n_decided > 0 else 0.0
        # neighbour: most membership on the ring around the kept components (else around all)
        base = kept if kept.any() else mk.reshape(ny, nx)
        ring = (ndimage.binary_dilation(base, structure=_EIGHT) & ~base).ravel() & seen
        weights = uz[ring].sum(axis=0) if ring.any() else uz[seen].sum(axis=0)
        ring_weights = weights.copy()
        weights[k] = -np.inf
        # the matrix around an inclusion holds more positions than the inclusion: a cluster of
        # similar size on the ring is more likely the other half of the same phase split in two
        # (measured: a host refined into 6 sub-clusters put the second phase into two of them,
        # each the other's ring neighbour, and neither was then distinct from its "matrix")
        sizes_all = member.sum(axis=0)
        big = sizes_all >= self.neighbour_size_ratio * max(n_k, 1)
        big[k] = False
        if big.any() and np.isfinite(weights[big]).any() and weights[big].max() > 0:
            weights = np.where(big, weights, -np.inf)
        j = int(np.argmax(weights)) if uz.shape[1] > 1 else k
        # every large cluster holding a sizeable share of the ring must be distinct, not only the
        # largest: an inclusion differs from all that surrounds it, while a patch of one layer at
        # an interface is half surrounded by its own layer (measured: a substrate patch on the
        # film interface of the single-phase phantom, seed 2, was distinct from the film and
        # raised a flag; it is not distinct from the substrate above it)
        others = float(ring_weights.sum() - ring_weights[k])
        matrix_share = 1.0
        if matrix is not None:
            in_matrix = matrix.copy()
            in_matrix[k] = False
            matrix_share = float(ring_weights[in_matrix].sum()) / others if others > 0 else 0.0
        holders = [j]
        if j != k and others > 0:
            # at least as large as the candidate: of two halves of one phase split in two, the
            # larger is still measured against the matrix only
            share = ring_weights / others
            wide = (sizes_all >= max(n_k, 1)) & (share >= self.min_ring_share)
            holders += [int(c) for c in np.flatnonzero(wide) if c not in (j, k)]
        t_cbed = float(self.min_block_distance)
        t_eds = t_cbed if self.min_eds_distance is None else float(self.min_eds_distance)

        def check(relax: float, coherence_value: float, n_comps: int) -> str:
            if n_k < self.min_positions * relax:
                return "too_few_positions"
            if frac < self.min_fraction * relax:
                return "too_small"
            if matrix_fraction > self.max_fraction / relax:
                return "too_large"
            if n_comps == 0:
                return "no_localised_component"
            if coherence_value < self.coherence * relax:
                return "not_coherent"
            if matrix_share < self.min_matrix_share * relax:
                return "not_in_matrix"
            if contiguity < self.min_contiguity * relax:
                return "not_contiguous"
            if lines is not None:
                # method="test": the statistics decide, in update() (they need the look's budget)
                return ""
            if d_cbed < t_cbed * relax:
                return "not_distinct_cbed"
            if d_eds < t_eds * relax:
                return "not_distinct_eds"
            return ""

        contiguity = _contiguity(kept, mk.reshape(ny, nx), seen.reshape(ny, nx))
        # the distances are the costly part (two blocks, every ring holder, all positions): they
        # are measured only for a cluster that passes every other test, relaxed; the others report
        # 0 (measured: 34 block distances were 0.27 s of a 0.53 s assessment at 8,192 positions)
        d_cbed = d_eds = math.inf
        measurable = (j != k and n_k >= self.min_positions * self.hysteresis
                      and self.min_fraction * self.hysteresis <= frac
                      and matrix_fraction <= self.max_fraction / self.hysteresis)
        tests = {}
        if lines is not None:
            d_cbed = d_eds = 0.0
            if measurable and not check(self.hysteresis, coh, len(relaxed)):
                tests = self._tests(kept, member, holders if matrix is None else np.flatnonzero(matrix),
                                    k, seen, shape, blocks[0], lines, fold)
                d_cbed, d_eds = tests["effect_cbed"], tests["effect_eds"]
        elif measurable and (self.distances_for_all or not check(self.hysteresis, coh, len(relaxed))):
            pairs = []
            for h in holders:
                mh = member[:, h]
                if block_distances is not None:
                    pairs.append(tuple(float(v) for v in block_distances(k, h, mk, mh, fold)))
                else:
                    pairs.append((block_distance(blocks[0], mk, mh, fold),
                                  block_distance(blocks[1], mk, mh, fold, shape_only=self.eds_shape_only)))
            d_cbed = min(p[0] for p in pairs)
            d_eds = min(p[1] for p in pairs)
        else:
            d_cbed = d_eds = 0.0
        if lines is not None:
            # the test's own effect sizes against their minimum (EDS) and a distinct pattern (d 1)
            r_min = min(d_eds / self.min_effect if self.min_effect > 0 else 1.0, d_cbed)
        else:
            r_min = min(d_cbed / t_cbed if t_cbed > 0 else 1.0, d_eds / t_eds if t_eds > 0 else 1.0)
        score = math.sqrt(max(0.0, coh) * min(1.0, max(r_min, 0.0) / 2.0))
        reason_strict = check(1.0, coh_strict, len(strict))
        reason_relaxed = check(self.hysteresis, coh, len(relaxed))
        positions = np.flatnonzero(kept.ravel())
        return ClusterAssessment(
            cluster=k, n_positions=n_k, fraction=frac, coherence=coh, neighbour=j,
            distance_cbed=d_cbed, distance_eds=d_eds, score=score, positions=positions,
            components=tuple(cpt[:4] for cpt in relaxed), passes=not reason_strict,
            passes_relaxed=not reason_relaxed, reason=reason_strict or reason_relaxed,
            contiguity=contiguity, ring_clusters=tuple(holders) if j != k else (),
            matrix_share=matrix_share, **tests,
        )

    def _tests(self, kept, member, matrix_clusters, k, seen, shape, cbed, lines, fold) -> dict:
        """Composition and structure tests of a candidate against its matrix, cross-fitted by the
        scan's checkerboard: a position is in the tested region when most of its scanned
        4-neighbours (all of the other fold) are in the candidate's kept components, and in the
        tested matrix when all of them are matrix members within ``matrix_radius`` of the
        candidate. Its own counts never decided which set it is in, so a cluster that noise cut out
        of a uniform film is not different in its held-out positions (selection would otherwise
        make any noise cluster 'significant')."""
        ny, nx = shape
        seen2 = seen.reshape(ny, nx)
        cand = kept & seen2
        mat = member[:, list(matrix_clusters)].any(axis=1).reshape(ny, nx) & seen2 & ~member[:, k].reshape(ny, nx)
        four = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], np.int32)
        n_seen4 = ndimage.convolve(seen2.astype(np.int32), four, mode="constant")
        n_cand4 = ndimage.convolve(cand.astype(np.int32), four, mode="constant")
        n_mat4 = ndimage.convolve(mat.astype(np.int32), four, mode="constant")
        near = ndimage.binary_dilation(cand, structure=_EIGHT, iterations=int(self.matrix_radius))
        region = seen2 & (n_seen4 > 0) & (2 * n_cand4 > n_seen4)
        around = seen2 & near & (n_seen4 > 0) & (n_mat4 == n_seen4) & ~region
        r, m = region.ravel(), around.ravel()
        out = {"tested": True}
        if r.sum() < 2 or m.sum() < 2:
            return {**out, "p_value_eds": 1.0, "p_value_cbed": 1.0, "effect_eds": 0.0, "effect_cbed": 0.0}
        comp = composition_test(lines[r], lines[m])
        proj = projection_test(cbed[r], cbed[m], fold[r], fold[m])
        return {**out, "p_value_eds": comp.p_value, "p_value_cbed": proj.p_value, "effect_eds": comp.effect,
                "effect_cbed": proj.effect,
                "composition": {"region_share": comp.region_share, "matrix_share": comp.matrix_share,
                                "dispersion": round(comp.dispersion, 3), "statistic": round(comp.statistic, 2),
                                "region_positions": int(r.sum()), "matrix_positions": int(m.sum())}}

    def _is_open(self, lab: np.ndarray, i: int, sl: tuple, unseen: np.ndarray) -> bool:
        """True when more than ``max_open`` of the component's ring is not scanned yet: its extent
        is unknown (a layer entering the scan looks like a thin strip on the scan front)."""
        y0, y1 = max(sl[0].start - 1, 0), sl[0].stop + 1
        x0, x1 = max(sl[1].start - 1, 0), sl[1].stop + 1
        comp = lab[y0:y1, x0:x1] == i
        ring = ndimage.binary_dilation(comp, structure=_EIGHT) & ~comp
        n_ring = int(ring.sum())
        return n_ring > 0 and int((ring & unseen[y0:y1, x0:x1]).sum()) > self.max_open * n_ring


_NEIGHBOURS = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], np.int32)


def _contiguity(where: np.ndarray, member: np.ndarray, seen: np.ndarray) -> float:
    """Of the scanned 8-neighbours of the positions ``where`` (2-D bool), the fraction in ``member``."""
    if not where.any():
        return 0.0
    n_member = ndimage.convolve(member.astype(np.int32), _NEIGHBOURS, mode="constant")
    n_seen = ndimage.convolve(seen.astype(np.int32), _NEIGHBOURS, mode="constant")
    total = int(n_seen[where].sum())
    return int(n_member[where].sum()) / total if total else 0.0

