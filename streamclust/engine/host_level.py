"""Level 2 inside the streaming engine: the host phase re-clustered among its own positions, as a
refresh computes it (into a :class:`HostState` committed at once) and as each batch is scored with it
(live pooling over the scan grid, composition merges). The pieces it uses are in
:mod:`streamclust.cluster.host_refine`, :mod:`streamclust.cluster.merge` and
:mod:`streamclust.cluster.spatial_pool`; docs/host-refinement.md has the design and its measurements.
"""

from __future__ import annotations

import logging

import numpy as np

from streamclust.cluster.fcm import FuzzyCMeans
from streamclust.cluster.host_refine import HostRefinement, compose_memberships, host_group, match_by_overlap
from streamclust.cluster.merge import merge_columns, merge_same_composition
from streamclust.cluster.spatial_pool import membership_mixing, neighbourhood_mean, neighbours, spatial_memberships

logger = logging.getLogger(__name__)

__all__ = ["HostLevel", "HostState"]


class HostState:
    """The level-2 state a refresh replaces, built aside and committed in one step, so a spread
    refresh never leaves the engine half-updated while batches are scored between its steps."""

    _FIELDS = {"z": "_host_z", "pool": "_host_pool", "space": "host_", "fit_size": "_host_fit_size",
               "fcm": "_host_fcm", "scorer": "_host_scorer", "merged_into": "host_merged_into_",
               "cluster": "host_cluster_", "group": "host_group_"}

    def __init__(self, **values) -> None:
        self.scores = None  # (positions, level-2 scores) of this refresh, for the composition
        self.__dict__.update(values)

    @classmethod
    def of(cls, engine) -> HostState:
        st = cls(**{k: getattr(engine, v) for k, v in cls._FIELDS.items()})
        # the pooling grid is written in place by the refresh: a copy (batches use the engine's)
        st.z = None if st.z is None else st.z.copy()
        st.pool = st.pool.copy()
        return st

    def commit(self, engine) -> None:
        for k, v in self._FIELDS.items():
            setattr(engine, v, getattr(self, k))


class HostLevel:
    """The engine's level-2 methods (a base of :class:`~streamclust.engine.streaming.StreamingEngine`,
    whose state they read: ``host_*`` parameters, the position store, the warm multiplier)."""

    # ------------------------------------------------------------------------------------------
    # host refinement (level 2)
    # ------------------------------------------------------------------------------------------
    def _inv_c_warm(self) -> np.ndarray:
        c = np.asarray(self._c_warm, dtype=np.float64)
        return np.where(c > 0, 1.0 / np.where(c > 0, c, 1.0), 0.0).astype(np.float32)

    def _stored_vectors(self, idx: np.ndarray) -> np.ndarray:
        """Warm-space vectors of stored positions (exact in the full store, the basis
        reconstruction in the compact one)."""
        store = self.store_
        if hasattr(store, "vectors"):
            return np.asarray(store.vectors(idx), dtype=np.float32)
        if store.mode == "full":
            return np.asarray(store.data[idx], dtype=np.float32)
        B = store.basis_
        return (np.asarray(store.data[idx][:, : B.shape[1]], dtype=np.float32) @ B.T.astype(np.float32)
                + store.center_.astype(np.float32))

    def _refine_host_steps(self, idx: np.ndarray, U: np.ndarray, final: bool, seed: int, st: HostState):
        """Level 2: re-cluster the host cluster among its own positions (module host_refine), in
        steps (a generator), into ``st``: the engine's own level-2 state is not touched."""
        k2 = int(self.host_clusters)
        if final:
            # the final partition is per position, even when the host is too small to refine
            # below (the live pooling grid would otherwise still pool the final composition)
            st.z = None
        # the host: the largest level-1 cluster with those sharing its positions (a film split by
        # thickness); the primary only changes for a clearly larger cluster, or the sub-clusters
        # would be renumbered (and flags flicker) at every refresh (host_refine.host_group)
        mixing = None
        if self.scan_shape is not None and self.host_mixing:
            mixing = membership_mixing(U, self.scan_shape, idx)
        # the final host is chosen without the live history (previous primary), as the Dask replay
        # and the offline reference choose it: the final partition must not depend on how the scan
        # went; the sub-cluster numbers stay stable anyway (matched by position below)
        host, group = host_group(U, overlap=float(self.host_overlap),
                                 previous=None if final else st.cluster,
                                 mixing=mixing, min_mixing=float(self.host_mixing or 0.0))
        clear = self._clear_in(U, group)
        inside = idx[clear]
        if inside.size < max(int(self.host_min_positions), 4 * k2):
            logger.debug("host %s has %d clear positions: no refinement yet", group, inside.size)
            return
        changed = host != st.cluster or group != st.group
        grew = inside.size > (1.0 + float(self.host_refit_growth)) * max(st.fit_size, 1)
        refit_space = st.space is None or changed or grew or final
        rs = np.random.RandomState(seed)
        if refit_space:
            # live spaces from half the sample: the randomized SVD is the host stage's main cost
            # (0.37 s a fit at 4,096 x 4,586, one BLAS thread) and a live space is replaced as the
            # host grows; the final space uses the whole sample
            size = int(self.host_sample_size) if final else max(int(self.host_sample_size) // 2, 4 * k2)
            sample = inside
            if inside.size > size:
                sample = np.sort(rs.choice(inside, size, replace=False))
            st.space = HostRefinement(
                self.n_cbed_features_, k2, threshold=float(self.host_threshold),
                min_components=int(self.host_min_components), max_components=int(self.max_components),
                min_explained_ratio=float(self.min_explained_ratio), sample_size=int(self.host_sample_size),
                m=float(self.m), random_state=seed,
                # the final space needs the converged spectrum (the 1 % rule sits on a flat part
                # of it: streamclust.decomposition.sample_pca); live spaces are re-fitted as the host grows and
                # 4 power iterations cost 0.6x of 7 (benchmarks/bench_engine.py: host stage)
                iterated_power=7 if final else 4,
            ).fit_space(self._stored_vectors(sample) * self._inv_c_warm())
            st.fit_size = inside.size
            self._counts["host_space_fits"] += 1
            # the space's robust scaling and randomized SVD cost as much as reading about 12 rows
            # a sample row (0.37 s at 4,096 x 4,586 against 7 us a row read, 256 x 256)
            yield 12 * sample.size
        A, b = st.space.affine()
        # the level-2 space is defined on raw features (its zero-IQR floor of 1 is in raw counts,
        # so it is not invariant to the warm multiplier): fold 1 / c_warm into the map
        A = (A * self._inv_c_warm()[:, np.newaxis]).astype(np.float32)
        # every stored position's level-2 scores, once: the host's fit uses its clear rows, and
        # _compose_stored_steps the whole of it right after (it used to decode the store twice); with
        # the element-line counts when the merge needs them: one affine map, one pass
        W = self._line_map
        if W is None:
            Z2_all = Z2_own = yield from self._apply_steps(A, b, idx)
            lines = None
        else:
            both = yield from self._apply_steps(np.hstack([A, W * self._inv_c_warm()[:, np.newaxis]]),
                                                np.concatenate([b, np.zeros(W.shape[1], b.dtype)]), idx)
            Z2_all = Z2_own = np.ascontiguousarray(both[:, :A.shape[1]])
            lines = np.clip(np.rint(both[:, A.shape[1]:]), 0, None).astype(np.int64)
            del both
        if self._pooling(final):
            # live: cluster neighbourhood means (module spatial_pool); the final partition is per
            # position, as the paper's
            st.z = np.full((int(self.n_positions), Z2_all.shape[1]), np.nan, dtype=np.float32)
            st.z[idx] = Z2_all
            st.pool = np.zeros(int(self.n_positions), dtype=bool)
            st.pool[inside] = True
            Z2_all = neighbourhood_mean(st.z, st.pool, self.scan_shape, idx)
        else:
            st.z = None
        st.scores = (idx, Z2_all)
        Z2 = Z2_all[clear]
        prev_labels = None
        # the sub-clusters keep their numbers across a change of host group or space too: they
        # are matched by the positions they hold; only positions clearly inside the previous host
        # count (for the others the sub-columns hold a sliver of membership, and their arg-max
        # is noise)
        if st.cluster is not None:
            prev = self.memberships_[inside, int(self.n_clusters):]
            known = np.isfinite(prev).all(axis=1) & (np.nan_to_num(prev).sum(axis=1) > float(self.host_threshold))
            prev_labels = np.where(known, np.argmax(np.nan_to_num(prev), axis=1), -1)
        if refit_space or st.fcm is None:
            n_init = int(self.final_n_init) if final else int(self.fcm_n_init)
            sub = Z2 if Z2.shape[0] <= int(self.refit_sample) else Z2[
                np.sort(rs.choice(Z2.shape[0], int(self.refit_sample), replace=False))]
            fcm = FuzzyCMeans(k2, m=self.m, n_init=n_init, random_state=rs).fit(sub)
            if sub is not Z2:
                fcm = FuzzyCMeans(k2, m=self.m, init=fcm.cluster_centers_, n_init=1,
                                  max_iter=300 if final else int(self.refresh_iter), random_state=seed).fit(Z2)
        else:
            fcm = FuzzyCMeans(k2, m=self.m, init=st.fcm.cluster_centers_, n_init=1,
                              max_iter=300 if final else int(self.refresh_iter), random_state=seed).fit(Z2)
        if prev_labels is not None and (prev_labels >= 0).any():
            # keep sub-cluster numbers stable for a live view (a new space has new coordinates,
            # so match by which positions they hold, not by centres)
            perm = match_by_overlap(prev_labels, fcm.labels_, k2)
            fcm.cluster_centers_ = fcm.cluster_centers_[perm]
            fcm.memberships_ = fcm.memberships_[:, perm]
            fcm.labels_ = np.argmax(fcm.memberships_, axis=1)
        st.fcm = fcm
        st.scorer = (A, b)
        if lines is not None:
            # which sub-clusters are one composition: each position labelled by its own scores (not
            # the live neighbourhood means, which already carry the neighbours' data)
            own_labels = np.argmax(fcm.predict_memberships(Z2_own[clear]), axis=1)
            st.merged_into = merge_same_composition(lines[clear], inside, own_labels, self.scan_shape, k2,
                                                            float(self.host_merge_effect))
        st.cluster = host
        st.group = group
        logger.info("host %s refined: %d positions, %d components, %s", group, inside.size,
                    st.space.n_components_, "new space" if refit_space else "same space")

    def _compose_stored_steps(self, U: np.ndarray, idx: np.ndarray, final: bool, st: HostState):
        """The memberships of the stored positions ``idx`` from level-1 ``U`` and the level-2 state
        ``st`` (a generator of steps; ``st``'s pooling grid is updated, not the engine's)."""
        if st.scorer is None:
            return compose_memberships(U, None, None, int(self.host_clusters))
        A, b = st.scorer
        cached, st.scores = st.scores, None
        if cached is not None and cached[0] is idx:
            Z2 = cached[1]
        else:
            Z2 = yield from self._apply_steps(A, b, idx)
            if st.z is not None:
                # the host was not refined at this refresh: pool in the space it has
                st.z[idx] = Z2
                st.pool[idx] = self._clear_in(U, st.group)
                Z2 = neighbourhood_mean(st.z, st.pool, self.scan_shape, idx)
        U2 = merge_columns(st.fcm.predict_memberships(Z2), st.merged_into)
        if final and self.host_spatial and self.scan_shape is not None:
            U2 = spatial_memberships(U2, idx, self._clear_in(U, st.group), self.scan_shape)
        return compose_memberships(U, U2, st.group, int(self.host_clusters))

    def _merged(self, U2: np.ndarray) -> np.ndarray:
        """Level-2 memberships with the sub-clusters that are one region summed (cluster_merge)."""
        return merge_columns(U2, self.host_merged_into_)

    def _clear_in(self, U: np.ndarray, group) -> np.ndarray:
        """Positions clearly inside the host group: summed level-1 membership > ``host_threshold``
        (they shape the level-2 space and are the pooling's neighbours)."""
        return U[:, list(group)].sum(axis=1) > float(self.host_threshold)

    def _pooling(self, final: bool) -> bool:
        return bool(self.host_pooling) and self.scan_shape is not None and not final

    def _compose_pooled(self, pos: np.ndarray, U1: np.ndarray, x_warm: np.ndarray) -> None:
        """New positions' memberships with live pooling: their level-2 scores join the grid, and
        they and their already scanned neighbours (whose neighbourhoods they complete) are
        re-predicted from neighbourhood means."""
        A, b = self._host_scorer
        self._host_z[pos] = x_warm @ A - b
        self._host_pool[pos] = self._clear_in(U1, self.host_group_)
        near = neighbours(pos, self.scan_shape)
        near = near[np.isfinite(self._host_z[near, 0]) & np.isfinite(self.level1_memberships_[near, 0])]
        U2 = self._merged(self._host_fcm.predict_memberships(
            neighbourhood_mean(self._host_z, self._host_pool, self.scan_shape, near)))
        self.memberships_[near] = compose_memberships(self.level1_memberships_[near], U2, self.host_group_,
                                                      int(self.host_clusters))

    def _compose(self, U: np.ndarray, x_warm: np.ndarray) -> np.ndarray:
        if not int(self.host_clusters):
            return U
        if self._host_scorer is None:
            return compose_memberships(U, None, None, int(self.host_clusters))
        A, b = self._host_scorer
        U2 = self._merged(self._host_fcm.predict_memberships(x_warm @ A - b))
        return compose_memberships(U, U2, self.host_group_, int(self.host_clusters))
