"""The paper's offline batch pipeline in plain scikit-learn: the yardstick for the live engine.

Duran et al. 2023 cluster a recorded scan as follows, and so does :func:`run_reference`:

1. features: each diffraction frame binned (512 x 512 -> 64 x 64 by summing 8 x 8 blocks); each
   EDS spectrum energy-windowed and optionally rebinned;
2. :class:`sklearn.preprocessing.RobustScaler` per block (median / inter-quartile range; features
   with zero IQR get scale 1, as scikit-learn does);
3. block balancing: the EDS block is multiplied so that both blocks carry the same total variance.
   The paper multiplies the EDS block by the *ratio of block variances*; multiplying data by ``c``
   multiplies its variance by ``c**2``, so equal variance needs the *square root* of that ratio.
   ``balance="sqrt"`` (default) does the latter; ``balance="ratio"`` reproduces the paper
   literally (the EDS block then carries ``ratio`` times the frames' variance, i.e. it
   over-corrects); ``balance=None`` skips the step;
4. PCA keeping components until the next one adds less than 1 % of the explained variance;
5. clustering with any estimator passed as ``clusterer`` (default k-means with k = 6); an
   estimator with ``fit_predict`` or ``fit`` + ``predict``, or one exposing fuzzy memberships
   (``u_`` / ``memberships_`` of shape (n, k) or (k, n)) whose arg-max is taken.

:func:`best_f1` scores a partition against a boolean truth mask: the best F1 of one cluster, and
of the best union of clusters.

Examples
--------
>>> import numpy as np
>>> from streamclust.reference import run_reference, best_f1
>>> rng = np.random.default_rng(0)
>>> truth = np.zeros(400, bool); truth[:100] = True
>>> cbed = rng.poisson(5.0, (400, 32)).astype(float); cbed[truth, :4] += 20
>>> eds = rng.poisson(1.0, (400, 16)).astype(float)
>>> res = run_reference(cbed, eds, signals="merged", n_clusters=3, random_state=0)
>>> res.labels.shape, res.n_components >= 1
((400,), True)
>>> best_f1(res.labels, truth).single > 0.95
True
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from sklearn.base import clone
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.preprocessing import RobustScaler

logger = logging.getLogger(__name__)

__all__ = [
    "bin_frames",
    "eds_window",
    "phantom_features",
    "scale_block",
    "balance_factor",
    "n_components_one_percent",
    "ReferenceResult",
    "run_reference",
    "F1Score",
    "best_f1",
]


def bin_frames(frames: np.ndarray, factor: int = 8) -> np.ndarray:
    """Sum ``factor x factor`` blocks: (n, H, W) -> (n, H/factor * W/factor) float32."""
    f = np.asarray(frames)
    n, h, w = f.shape
    if h % factor or w % factor:
        raise ValueError(f"frame shape {(h, w)} is not divisible by the bin factor {factor}")
    return (
        f.reshape(n, h // factor, factor, w // factor, factor)
        .sum(axis=(2, 4), dtype=np.float64)
        .reshape(n, -1)
        .astype(np.float32)
    )


def eds_window(
    spectra: np.ndarray,
    energy_axis_kev: np.ndarray | None = None,
    window_kev: tuple | None = (0.2, 10.0),
    rebin: int = 1,
) -> np.ndarray:
    """Keep channels whose centre lies in ``window_kev`` and sum groups of ``rebin`` channels."""
    s = np.asarray(spectra, dtype=np.float32)
    if energy_axis_kev is not None and window_kev is not None:
        e = np.asarray(energy_axis_kev)
        s = s[:, (e >= window_kev[0]) & (e < window_kev[1])]
    if rebin > 1:
        m = s.shape[1] // rebin * rebin
        s = s[:, :m].reshape(s.shape[0], -1, rebin).sum(axis=2)
    return s


def phantom_features(
    phantom, positions=None, bin_factor: int = 8, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Binned frames and raw spectra of a phantom (anything with ``frames``/``spectra``), in
    chunks so a full scan of quad frames never sits in memory at once."""
    pos = np.arange(phantom.n_positions) if positions is None else np.asarray(positions)
    cbed, eds = [], []
    for i in range(0, pos.size, chunk):
        p = pos[i:i + chunk]
        cbed.append(bin_frames(phantom.frames(p), bin_factor))
        eds.append(phantom.spectra(p))
    return np.concatenate(cbed), np.concatenate(eds)


def scale_block(x: np.ndarray) -> np.ndarray:
    """RobustScaler (median / IQR, zero-IQR scale 1) on one feature block."""
    return RobustScaler().fit_transform(np.asarray(x, dtype=np.float64))


def balance_factor(cbed_scaled: np.ndarray, eds_scaled: np.ndarray, balance: str | None = "sqrt") -> float:
    """The factor the EDS block is multiplied by (see the module docstring)."""
    if balance is None:
        return 1.0
    v_c = float(np.var(cbed_scaled, axis=0).sum())
    v_e = float(np.var(eds_scaled, axis=0).sum())
    if v_e <= 0:
        return 1.0
    ratio = v_c / v_e
    if balance == "sqrt":
        return float(np.sqrt(ratio))
    if balance == "ratio":
        return float(ratio)
    raise ValueError(f"balance must be 'sqrt', 'ratio' or None, got {balance!r}")


def n_components_one_percent(explained_variance_ratio: np.ndarray, threshold: float = 0.01) -> int:
    """Components kept until the next adds less than ``threshold`` of the variance (at least 1)."""
    evr = np.asarray(explained_variance_ratio)
    below = np.nonzero(evr < threshold)[0]
    k = int(below[0]) if below.size else int(evr.size)
    return max(k, 1)


@dataclass
class ReferenceResult:
    """Output of :func:`run_reference`."""

    labels: np.ndarray
    scores: np.ndarray
    n_components: int
    explained_variance_ratio: np.ndarray
    eds_factor: float
    clusterer: object


def _labels_of(est, z: np.ndarray) -> np.ndarray:
    if hasattr(est, "fit_predict"):
        return np.asarray(est.fit_predict(z))
    est.fit(z)
    if hasattr(est, "predict"):
        return np.asarray(est.predict(z))
    for attr in ("u_", "memberships_"):
        u = getattr(est, attr, None)
        if u is not None:
            u = np.asarray(u)
            return np.argmax(u, axis=1) if u.shape[0] == z.shape[0] else np.argmax(u, axis=0)
    raise TypeError("clusterer needs fit_predict, fit + predict, or fuzzy memberships u_")


def run_reference(
    cbed: np.ndarray | None,
    eds: np.ndarray | None,
    *,
    signals: str = "merged",
    balance: str | None = "sqrt",
    variance_threshold: float = 0.01,
    max_components: int = 50,
    clusterer=None,
    n_clusters: int = 6,
    random_state: int | None = 0,
    refine_host: int = 0,
    host_threshold: float = 0.9,
    host_min_components: int = 5,
    scan_shape: tuple[int, int] | None = None,
    scan_positions: np.ndarray | None = None,
    host_overlap: float = 0.1,
    host_mixing: float = 0.5,
    host_merge_effect: float = 0.0,
    host_merge_elements: tuple = ("Fe", "Co"),
    eds_energies_kev: np.ndarray | None = None,
    host_spatial: bool = False,
    rows: np.ndarray | None = None,
    sample_size: int | None = None,
    chunk_rows: int = 4096,
) -> ReferenceResult:
    """Run the batch pipeline on feature matrices (rows = scan positions).

    Parameters
    ----------
    cbed, eds : ndarray (n, d) or None
        Binned frames and windowed spectra (see :func:`bin_frames`, :func:`eds_window`).
    signals : {"merged", "cbed", "eds"}
        Which blocks to use.
    balance : {"sqrt", "ratio", None}
        EDS block weighting for ``merged`` (module docstring).
    clusterer : estimator, optional
        Cloned before use; default ``KMeans(n_clusters, n_init=10)``.
    refine_host : int, default=0
        Sub-clusters of the host cluster (0: off). The engine's second level
        (:mod:`streamclust.cluster.host_refine`) in batch form: the cluster with the largest total
        membership is re-scaled, re-projected (1 % rule, at least ``host_min_components``) and
        clustered with fuzzy C-means among its positions of membership > ``host_threshold``;
        labels are the arg-max of the product-rule memberships (``labels`` then number
        ``n_clusters + refine_host`` clusters, the host's own number unused).
    scan_shape : (ny, nx), optional
        The scan grid. With it the host group also takes the clusters intermixed with it position
        by position (``host_mixing``), as the engine's does (:func:`streamclust.cluster.host_refine.host_group`,
        fuzzy overlap ``host_overlap``); without it, by fuzzy overlap only.
    host_merge_effect : float, default=0.0
        With ``scan_shape`` and ``eds_energies_kev``: level-2 clusters whose element-line shares
        (``host_merge_elements``) differ by less than this, or not significantly, are one
        composition (their memberships summed, as the engine's ``host_merge_effect``,
        :mod:`streamclust.cluster.merge`). 0, the default: the sub-clusters as fitted.
    host_merge_elements : tuple of str, default=("Fe", "Co")
    eds_energies_kev : (d_eds,) float, optional
        The centre energy of each column of ``eds`` (after windowing and rebinning), for the
        element-line windows of the merge.
    host_spatial : bool, default=False
        With ``scan_shape``: the engine's final spatial membership step at level 2
        (:func:`streamclust.cluster.spatial_pool.spatial_memberships`). Off by default: the paper's
        pipeline is per position.
    scan_positions : (n,) int, optional
        The flat scan position of each row (positions without a row count as unscanned); default:
        the rows are the whole scan in raster order.
    rows : (n,) int, optional
        Use only these rows of ``cbed`` / ``eds`` (which may then be larger arrays or
        memory-mapped files: the rows are read in chunks, never copied whole).
    sample_size : int, optional
        Bounded memory for scans of any size: the robust scales, the balance factor, the PCA and the
        level-2 space are fitted on at most this many rows (a seeded uniform sample), and every row
        is then scaled and projected in chunks of ``chunk_rows``. Memory is O(sample_size x
        features) plus O(rows x components), whatever the scan size. ``None`` (default), or a
        sample at least as large as the scan: every row, which is the paper's pipeline exactly.
    """
    if host_mixing is not None and not 0.0 <= float(host_mixing) <= 1.0:
        raise ValueError(f"host_mixing must be in [0, 1], got {host_mixing!r}")
    if not 0.0 <= float(host_merge_effect) < 1.0:
        raise ValueError(f"host_merge_effect must be in [0, 1), got {host_merge_effect!r}")
    if signals not in ("merged", "cbed", "eds"):
        raise ValueError(f"signals must be 'merged', 'cbed' or 'eds', got {signals!r}")
    use_cbed = signals in ("merged", "cbed")
    use_eds = signals in ("merged", "eds")
    if use_cbed and cbed is None:
        raise ValueError(f"signals={signals!r} needs cbed features")
    if use_eds and eds is None:
        raise ValueError(f"signals={signals!r} needs eds features")
    n_all = (cbed if use_cbed else eds).shape[0]
    rows = np.arange(n_all) if rows is None else np.asarray(rows, dtype=np.intp)
    n = rows.size
    fit_rows = _fit_rows(rows, sample_size, random_state)
    exact = fit_rows.size == n
    # float64 on the whole scan (the paper's pipeline exactly, as scikit-learn computes it); a
    # bounded sample in float32, which halves its memory
    raw_fit = _read_rows(cbed if use_cbed else None, eds if use_eds else None, fit_rows,
                         np.float64 if exact else np.float32)
    scalers = [RobustScaler().fit(b) for b in raw_fit]
    scaled_fit = [sc.transform(b) for sc, b in zip(scalers, raw_fit)]
    del raw_fit
    factor = 1.0
    if signals == "merged":
        factor = balance_factor(scaled_fit[0], scaled_fit[1], balance)
        scaled_fit[1] *= factor
    x = np.hstack(scaled_fit) if len(scaled_fit) > 1 else scaled_fit[0]
    del scaled_fit
    n_max = int(min(max_components, x.shape[0], x.shape[1]))
    pca = PCA(n_components=n_max, svd_solver="randomized" if n_max < min(x.shape) // 2 else "full",
              random_state=random_state)
    fit_scores = pca.fit_transform(x)
    del x
    k = n_components_one_percent(pca.explained_variance_ratio_, variance_threshold)
    if exact:
        z = fit_scores[:, :k]
    else:
        # every row, scaled with the sample's statistics and projected, a chunk at a time
        z = np.empty((n, k), dtype=np.float64)
        V = pca.components_[:k].T
        for s0 in range(0, n, int(chunk_rows)):
            part = _read_rows(cbed if use_cbed else None, eds if use_eds else None, rows[s0:s0 + int(chunk_rows)])
            blocks = [sc.transform(b) for sc, b in zip(scalers, part)]
            if signals == "merged":
                blocks[1] *= factor
            xc = np.hstack(blocks) if len(blocks) > 1 else blocks[0]
            z[s0:s0 + xc.shape[0]] = (xc - pca.mean_) @ V
    del fit_scores
    est = KMeans(n_clusters=n_clusters, n_init=10, random_state=random_state) if clusterer is None else clone(clusterer)
    labels = _labels_of(est, z)
    logger.info("reference %s: %d PCA components, EDS factor %.3g, fitted on %d of %d rows", signals, k, factor,
                fit_rows.size, n)
    if scan_shape is not None:
        n_scan = int(np.prod(scan_shape))
        if scan_positions is None and n_scan != n:
            raise ValueError(f"scan_shape {tuple(scan_shape)} has {n_scan} positions, the features {n} "
                             "rows (give scan_positions for a partial scan)")
        if scan_positions is not None:
            sp = np.asarray(scan_positions)
            if sp.shape != (n,) or (sp.size and (sp.min() < 0 or sp.max() >= n_scan)):
                raise ValueError(f"scan_positions must be {n} positions in [0, {n_scan})")
    if refine_host:
        labels = _refine_host(cbed if use_cbed else None, eds if use_eds else None, rows, labels, est, n_clusters,
                              int(refine_host), host_threshold, host_min_components, variance_threshold,
                              random_state, scan_shape=scan_shape, scan_positions=scan_positions,
                              host_overlap=host_overlap, host_mixing=host_mixing,
                              merge_effect=host_merge_effect, merge_elements=host_merge_elements,
                              eds_energies_kev=eds_energies_kev, spatial=host_spatial, sample_size=sample_size,
                              chunk_rows=chunk_rows)
    return ReferenceResult(labels, z, k, pca.explained_variance_ratio_, factor, est)


def _fit_rows(rows: np.ndarray, sample_size: int | None, random_state) -> np.ndarray:
    """The rows statistics are fitted on: all, or a seeded uniform sample of ``sample_size``."""
    if sample_size is None or rows.size <= int(sample_size):
        return rows
    return np.sort(np.random.RandomState(random_state).choice(rows, int(sample_size), replace=False))


def _read_rows(cbed, eds, rows: np.ndarray, dtype=np.float32) -> list[np.ndarray]:
    """The used blocks' rows as arrays (a memory-mapped file is read, not copied whole, and the
    pages read are dropped from the resident set again: without that, the 256 x 256 demo's
    yardstick held its 1.4 GB of scratch features resident once it had read them all)."""
    from streamclust.decomposition.spill import release

    out = []
    for b in (cbed, eds):
        if b is not None:
            # reading sorted rows from a memory map touches each page once
            out.append(np.asarray(b[rows], dtype=dtype))
            if rows.size:
                release(b, int(np.min(rows)), int(np.max(rows)) + 1)
    return out


def _refine_host(cbed, eds, rows, labels, est, n_clusters, k2, threshold, min_components, variance_threshold,
                 random_state, scan_shape=None, scan_positions=None, host_overlap=0.1,
                 host_mixing=0.5, merge_effect=0.0, merge_elements=("Fe", "Co"), eds_energies_kev=None,
                 spatial=False, sample_size=None, chunk_rows=4096) -> np.ndarray:
    """Second level on the host cluster (see ``refine_host`` of :func:`run_reference`)."""
    from streamclust.cluster.fcm import FuzzyCMeans
    from streamclust.cluster.merge import line_count_map, merge_columns, merge_same_composition
    from streamclust.cluster.host_refine import HostRefinement, compose_memberships, host_group
    from streamclust.cluster.spatial_pool import spatial_memberships

    u1 = getattr(est, "memberships_", None)
    if u1 is None or np.asarray(u1).shape != (labels.size, n_clusters):
        u1 = np.eye(n_clusters, dtype=np.float32)[labels]  # a hard partition's memberships
    u1 = np.asarray(u1, dtype=np.float32)
    mixing = None
    if scan_shape is not None and host_mixing:
        from streamclust.cluster.spatial_pool import membership_mixing

        mixing = membership_mixing(u1, tuple(scan_shape), scan_positions)
    # the engine's host: the largest cluster with those sharing or intermixed with it
    host, group = host_group(u1, overlap=float(host_overlap), mixing=mixing, min_mixing=float(host_mixing or 0.0))
    inside = u1[:, list(group)].sum(axis=1) > threshold
    if inside.sum() < max(4 * k2, 8):
        # as the engine: no clear host, no second level (a noisy single-signal clustering)
        logger.info("host cluster %d has %d clear positions: not refined", host, int(inside.sum()))
        return labels
    n_cbed = cbed.shape[1] if cbed is not None else (eds.shape[1] if eds is not None else 0)
    # one block alone: n_cbed = all features, no balancing

    def vectors(r: np.ndarray) -> np.ndarray:
        blocks = _read_rows(cbed, eds, r)
        return np.hstack(blocks) if len(blocks) > 1 else blocks[0]

    ref = HostRefinement(n_cbed, k2, threshold=threshold, min_components=min_components,
                         min_explained_ratio=variance_threshold, random_state=random_state)
    ref.fit_space(vectors(_fit_rows(rows[inside], sample_size, random_state)))
    z2 = np.concatenate([ref.project(vectors(rows[s0:s0 + int(chunk_rows)]))
                         for s0 in range(0, rows.size, int(chunk_rows))])
    fcm = FuzzyCMeans(k2, n_init=10, random_state=random_state).fit(z2[inside])
    merged_into = None
    W = None
    if scan_shape is not None and eds is not None and eds_energies_kev is not None and float(merge_effect) > 0:
        W = line_count_map(0, eds_energies_kev, tuple(merge_elements))
    if W is not None:
        # sub-clusters of one composition are shown as one, as in the engine (streamclust.cluster.merge)
        where = np.flatnonzero(inside) if scan_positions is None else np.asarray(scan_positions)[inside]
        clear_rows = rows[inside]
        lines = np.concatenate([_read_rows(None, eds, clear_rows[s0:s0 + int(chunk_rows)])[0] @ W
                                for s0 in range(0, clear_rows.size, int(chunk_rows))])
        merged_into = merge_same_composition(np.rint(lines).astype(np.int64), where, fcm.labels_, tuple(scan_shape),
                                             k2, float(merge_effect))
    u2 = merge_columns(fcm.predict_memberships(z2), merged_into)
    if scan_shape is not None and spatial:
        # the engine's final spatial step (streamclust.cluster.spatial_pool.spatial_memberships)
        where = np.arange(u2.shape[0]) if scan_positions is None else np.asarray(scan_positions)
        u2 = spatial_memberships(u2, where, inside, tuple(scan_shape))
    u = compose_memberships(u1, u2, group, k2)
    return np.argmax(u, axis=1)


@dataclass(frozen=True)
class F1Score:
    """Best F1 of one cluster (``single``) and of the best union of clusters (``union``)."""

    single: float
    single_cluster: int
    union: float
    union_clusters: tuple


def _f1(pred: np.ndarray, truth: np.ndarray) -> float:
    tp = float(np.sum(pred & truth))
    denom = float(pred.sum() + truth.sum())
    return 2 * tp / denom if denom else 0.0


def best_f1(labels: np.ndarray, truth: np.ndarray, max_exhaustive: int = 12) -> F1Score:
    """Score a partition against a boolean mask: best single cluster and best union of clusters.

    The union search is exhaustive up to ``max_exhaustive`` clusters, greedy (clusters by
    decreasing precision, best prefix) above.
    """
    lab = np.asarray(labels).ravel()
    tr = np.asarray(truth, dtype=bool).ravel()
    ids = np.unique(lab)
    single = [(_f1(lab == c, tr), int(c)) for c in ids]
    s_best = max(single)
    if ids.size <= max_exhaustive:
        best = (0.0, ())
        for r in range(1, ids.size + 1):
            for sub in combinations(ids.tolist(), r):
                f = _f1(np.isin(lab, sub), tr)
                if f > best[0]:
                    best = (f, tuple(int(c) for c in sub))
    else:
        prec = sorted(ids.tolist(), key=lambda c: -np.mean(tr[lab == c]))
        best = (0.0, ())
        for i in range(1, len(prec) + 1):
            f = _f1(np.isin(lab, prec[:i]), tr)
            if f > best[0]:
                best = (f, tuple(int(c) for c in prec[:i]))
    return F1Score(s_best[0], s_best[1], best[0], best[1])
