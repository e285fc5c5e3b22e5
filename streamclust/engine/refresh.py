"""The streaming engine's refresh: PCA read out in the current space, every stored position
re-projected, the clusters re-fitted, level 2 re-built and every membership recomputed.

A refresh is a generator of steps (:meth:`Refresh._refresh_steps`), each yielding the rows of
read-out work it did. Inline (the warm-up's end, :meth:`~streamclust.engine.streaming.StreamingEngine.refresh`,
the final one) it runs to the end at once; during a scan it is spread over the batches after the one
that triggered it, ``refresh_step_rows`` rows a batch, and committed in one step (docs/engine.md,
"Real scan sizes").
"""

from __future__ import annotations

import logging
import time

import numpy as np
from scipy.linalg import subspace_angles
from scipy.optimize import linear_sum_assignment

from streamclust.cluster import fcm_kernels
from streamclust.cluster.fcm import FuzzyCMeans, MiniBatchFuzzyCMeans
from streamclust.cluster.validity import partition_coefficient, partition_entropy, xie_beni
from streamclust.decomposition.sample_pca import one_percent_pca

from streamclust.engine.host_level import HostState

logger = logging.getLogger(__name__)

__all__ = ["Refresh", "final_seed"]


def final_seed(random_state: int | None) -> int:
    """The seed of the engine's final refresh (PCA sample, k-means++ restarts, level 2): the first
    draw of ``RandomState(random_state)``, whatever happened during the scan."""
    return int(np.random.RandomState(random_state).randint(np.iinfo(np.int32).max))


class Refresh:
    """The engine's refresh methods (a base of :class:`~streamclust.engine.streaming.StreamingEngine`)."""

    def _refresh(self, final: bool) -> None:
        """A whole refresh now: the warm-up's end, the final one, :meth:`refresh`. A spread
        refresh still running is completed first."""
        self._complete_refresh_job()
        for _ in self._refresh_steps(final):
            pass

    def _complete_refresh_job(self) -> None:
        job, self._refresh_job = self._refresh_job, None
        if job is not None:
            for _ in job:
                pass

    def _advance_refresh_job(self) -> None:
        """Run the spread refresh for this batch's share: steps until ``refresh_step_rows`` rows of
        read-out work are done, or it has committed. The share is counted in rows, not seconds, so
        the same batches give the same result on any machine (a replay equals the live run)."""
        done = 0
        while self._refresh_job is not None and done < self.refresh_step_rows:
            try:
                done += next(self._refresh_job)
            except StopIteration:
                self._refresh_job = None

    def _refresh_steps(self, final: bool):
        """A refresh as a generator of steps, each yielding the rows of read-out work it did.

        Everything it computes is held aside and committed at the end in one step, so batches
        that arrive while a spread refresh runs are scored with the committed model (and are
        re-scored with the new one at the commit). Why spread: at 256 x 256 a refresh reads every
        stored position twice (level 1 and level 2, 0.29 s a read-out at 40,000 positions) and
        stalled the batch that triggered it by 1-2 s, which the flags waited for.
        """
        self._since_refresh = 0
        self._seen_at_refresh = self.store_.n_seen
        self._last_refresh_time = time.monotonic()
        recent = self._recent_vectors(2048) if self.drift_ is not None and not final else None
        self._flush_pending()
        c_now = self.balancer_.multiplier_
        self.pca_.set_current_multiplier(c_now)
        D = c_now / self._c_warm
        mean_now = self.pca_.mean_.copy()
        idx = self.store_.seen_positions
        nc = int(self.n_clusters)
        seed = int(self._rng.randint(np.iinfo(np.int32).max))
        if final:
            # the final result must not depend on the history (batch sizes, drift refreshes): a
            # replay of the recording, in one process or on Dask, derives the same seed
            seed = final_seed(self.random_state)
            self.final_seed_ = seed
        k = int(min(self.pca_.n_components_, int(self.max_components)))
        V = self.pca_.components_all_[:k].T.copy()
        evr = self.pca_.explained_variance_ratio_all_[:k].copy()
        if final and int(self.final_pca_sample) > 0 and self.store_.mode != "basis":
            # the end of the scan can afford the exact read-out the sketch approximates
            V, evr = self._sample_pca(D, seed, int(self.final_pca_sample))
            k = V.shape[1]
        Z = yield from self._apply_steps(D[:, np.newaxis] * V, (mean_now @ V).astype(np.float32), idx)

        prev = self._readout
        U_prev = self.level1_memberships_[idx]
        have_prev = self._fcm is not None and not np.isnan(U_prev).any()
        warm_centres = None
        if have_prev:
            Wm = np.power(U_prev.astype(np.float64), float(self.m))
            wsum = Wm.sum(axis=0)
            if np.all(wsum > 0):
                warm_centres = (Wm.T @ Z.astype(np.float64)) / wsum[:, np.newaxis]
        angle = 90.0
        if prev is not None and prev["V"].shape[1] == k:
            angle = float(np.degrees(np.max(subspace_angles(prev["V"], V))))
        full = warm_centres is None or final or angle > float(self.refit_angle_deg)

        candidates = []
        if warm_centres is not None:
            warm = FuzzyCMeans(nc, m=self.m, init=warm_centres, n_init=1,
                               max_iter=300 if final else int(self.refresh_iter), random_state=seed).fit(Z)
            candidates.append(("warm", warm))
        if full:
            # restarts on a subsample find the basin, a warm-started run on all positions settles
            # it: the refresh stays bounded however large the scan (measured: full restarts on
            # 16k positions were half of the engine's time)
            n_init = int(self.final_n_init) if final else int(self.fcm_n_init)
            rs = np.random.RandomState(seed)
            sub = Z if Z.shape[0] <= int(self.refit_sample) else Z[
                np.sort(rs.choice(Z.shape[0], int(self.refit_sample), replace=False))]
            seeded = FuzzyCMeans(nc, m=self.m, n_init=n_init, random_state=rs).fit(sub)
            fresh = seeded if sub is Z else FuzzyCMeans(
                nc, m=self.m, init=seeded.cluster_centers_, n_init=1,
                max_iter=300 if final else int(self.refresh_iter), random_state=seed).fit(Z)
            candidates.append(("full", fresh))
            self._counts["full_refits"] += 1
        name, best = min(candidates, key=lambda c: c[1].objective_)
        centres = best.cluster_centers_
        if warm_centres is not None and name == "full":
            # keep cluster numbers stable for a live view: match the new centres to the old ones
            cost = ((warm_centres[:, np.newaxis, :] - centres[np.newaxis]) ** 2).sum(axis=2)
            _, col = linear_sum_assignment(cost)
            centres = centres[col]
        logger.info("refresh %d: %d positions, %d components, subspace moved %.1f deg, kept %s fit",
                    self._counts["refreshes"] + 1, idx.size, k, angle, name)
        # the mini-batch model continues from the refreshed centres, weighted by all positions seen
        mb = MiniBatchFuzzyCMeans(nc, m=self.m, init=centres, init_size=max(idx.size, nc),
                                  init_max_iter=1, n_init=1, random_state=seed)
        mb.partial_fit(Z)
        U = mb.predict_memberships(Z)
        # the steps that are not read-outs count too, as the rows whose read-out costs as much
        # (counting read-outs only left batches of 1.0-1.45 s at 256 x 256): the level-1 fits
        # are passes over every position
        yield idx.size
        host = HostState.of(self)
        if int(self.host_clusters):
            yield from self._timed(self._refine_host_steps(idx, U, final, seed, host), "host")
        composed = yield from self._compose_stored_steps(U, idx, final, host)
        # the level-2 composition, pooling and merge were passes over every position
        yield idx.size
        # ---- commit: from here on nothing yields, so a batch never sees half of a refresh
        host.commit(self)
        self.level1_memberships_[idx] = U
        self.memberships_[idx] = composed
        self._fcm = mb
        self._readout = {"D": D, "V": V, "mean": mean_now}
        A = D[:, np.newaxis] * V
        self._scorer = (A.astype(np.float32), (mean_now @ V).astype(np.float32))
        self.cluster_centers_ = mb.cluster_centers_.copy()
        self.n_components_ = k
        self.explained_variance_ratio_ = evr
        if recent is not None and recent.shape[0]:
            # the reference: the new model's distance to the latest positions it was fitted on, as
            # whole vectors (not the store's: the basis store keeps no residual, and its baseline
            # would make every new position look novel)
            A32, b32 = self._scorer
            reference = self._novelty(recent, recent @ A32 - b32, mb.cluster_centers_)
            if np.median(reference) > 0:
                self.drift_.reset(reference)
        self._drift_due = False
        self.validity_ = {
            "partition_coefficient": partition_coefficient(U),
            "partition_entropy": partition_entropy(U),
            "xie_beni": xie_beni(Z, mb.cluster_centers_, U, m=float(self.m)),
        }
        self._counts["refreshes"] += 1
        # positions that arrived while a spread refresh ran were scored with the model it replaces
        self._rescore_pending()


    def _timed(self, steps, stage: str):
        """Drive the generator ``steps``, adding the time of each of its steps to ``stage``."""
        it = iter(steps)
        while True:
            t = time.perf_counter()
            try:
                work = next(it)
            except StopIteration as stop:
                self._times[stage] += time.perf_counter() - t
                return stop.value
            self._times[stage] += time.perf_counter() - t
            yield work

    def _apply_steps(self, A: np.ndarray, b: np.ndarray, idx: np.ndarray):
        """``stored_vectors(idx) @ A - b`` (float32), read in steps of half ``refresh_step_rows``."""
        out = np.empty((idx.size, A.shape[1]), dtype=np.float32)
        step = max(1, int(self.refresh_step_rows) // 2)
        for s in range(0, idx.size, step):
            sel = idx[s:s + step]
            out[s:s + sel.size] = self.store_.apply(A, sel)
            yield sel.size
        out -= b
        return out

    def _rescore_pending(self) -> None:
        """Memberships of the positions not yet encoded, with the model just committed: those a
        spread refresh left behind (they arrived while it ran; inline, there are none)."""
        if not self._pending or self._scorer is None:
            return
        A, b = self._scorer
        for pos, x_warm in self._pending:
            Z = x_warm @ A
            Z -= b
            self._learn_and_score(pos, x_warm, Z)

    def _recent_vectors(self, limit: int) -> np.ndarray:
        """The whole warm-space vectors of the latest (at most ``limit``) complete positions not yet
        encoded into the store."""
        parts, have = [], 0
        for pos, x in reversed(self._pending):
            keep = x[self._complete[pos]]
            parts.append(keep[-(limit - have):])
            have += parts[-1].shape[0]
            if have >= limit:
                break
        if not parts:
            return np.zeros((0, self.n_features_), np.float32)
        return np.concatenate(parts[::-1]).astype(np.float32, copy=False)

    def _novelty(self, x_warm: np.ndarray, Z: np.ndarray, centres: np.ndarray) -> np.ndarray:
        """Squared distance of positions to the model in the full current space: the distance of
        their scores ``Z`` to the nearest centre plus what the PCA subspace does not hold (a layer
        the model never saw lies mostly outside it: measured, the film under a substrate-only model
        was not farther than the substrate *within* the subspace)."""
        r = self._readout
        y = x_warm * r["D"].astype(np.float32)
        y -= r["mean"].astype(np.float32)
        z = np.asarray(Z, dtype=np.float32)
        outside = np.maximum(np.einsum("ij,ij->i", y, y) - np.einsum("ij,ij->i", z, z), 0.0)
        return outside + fcm_kernels.sq_euclidean(z, centres).min(axis=1)

    def _sample_pca(self, D: np.ndarray, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Components (F, k) and their explained-variance ratios from a seeded sample of the stored
        complete positions, in the current space ``x_warm * D`` (:mod:`streamclust.decomposition.sample_pca`)."""
        t = time.perf_counter()
        pool = np.nonzero(self._complete)[0]
        if pool.size < 2:
            pool = self.store_.seen_positions
        sample = pool if pool.size <= size else np.sort(
            np.random.RandomState(seed).choice(pool, size, replace=False))
        X = self._stored_vectors(sample) * D.astype(np.float32)
        res = one_percent_pca(X, max_components=int(self.max_components),
                              min_explained_ratio=float(self.min_explained_ratio), random_state=seed)
        self._counts["sample_pca"] += 1
        logger.info("PCA from %d stored positions: %d components (streaming sketch: %d), %.1f s",
                    sample.size, res.n_components, min(self.pca_.n_components_, int(self.max_components)),
                    time.perf_counter() - t)
        return res.components, res.explained_variance_ratio[:res.n_components].copy()
