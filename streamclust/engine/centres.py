"""Thresholded cluster centres: membership-weighted mean raw patterns and spectra per cluster.

The paper's Figs. 5 and 6 show, for each cluster and membership threshold ``t``, the mean raw CBED
pattern and raw EDS spectrum over the positions whose membership exceeds ``t``, each weighted by
its membership. Raising ``t`` from 0.5 to 0.75 drops mixed positions (an inclusion's rim, a shallow
inclusion under matrix) and moves the centre toward the pure phase.

Memberships of earlier positions change while the scan runs (the model keeps learning), so the
centres cannot be accumulated once at arrival time. :class:`ThresholdedCentres` keeps a compact
raw copy of every position instead and keeps the weighted sums exactly consistent with the latest
memberships:

* the store holds, per position, the CBED frame binned to ``cbed_shape`` (float32; summing
  blocks of raw counts keeps it a raw pattern, just coarser) and the raw EDS spectrum (uint16);
* :meth:`ThresholdedCentres.update` takes the refreshed memberships, forms the thresholded weights
  ``W[p, t, k] = u[p, k] if u[p, k] > t else 0`` and adds ``(W_new - W_old)[changed].T @ store[changed]``
  to float64 sums: only positions whose weights changed cost anything, and the sums equal the
  from-scratch product (up to float64 rounding; :meth:`ThresholdedCentres.recompute` redoes it);
* optionally (``full_resolution=True``) the full-resolution frames are accumulated live with the
  memberships known *at arrival time*. Those patterns cannot be corrected later (the frames are
  gone): they are an approximation that lags the model; the binned centres are exact.

State per position with the defaults (32 x 32 float32 CBED, 2048 uint16 channels, one weight row of
``len(thresholds) * n_clusters`` float64 and a stored flag): ``4096 + 4096 + 8 * T * c + 1`` bytes,
and the flagger's features once asked for (:meth:`ThresholdedCentres.features`: ``4096 + 1024``),
about 13.4 kB with 2 thresholds and 6 clusters: 220 MB for a 128 x 128 scan and 3.5 GB for
512 x 512 (:meth:`ThresholdedCentres.state_bytes`). For 512 x 512 scans use ``cbed_shape=(16, 16)``
and an energy window (``channels=slice(20, 1000)``): 4.6 kB a position, 1.2 GB.

The module also measures what the centre spectra are for: the Fe and Co K-alpha net intensities and
their ratio (:func:`fe_co_lines`, :func:`fe_co_ratio`).

Examples
--------
>>> import numpy as np
>>> tc = ThresholdedCentres(2, thresholds=(0.5, 0.75), n_positions=4, cbed_shape=(2, 2))
>>> cbed = np.arange(4 * 4 * 4, dtype=np.uint16).reshape(4, 4, 4)   # binned 2 x 2 on arrival
>>> spectra = np.array([[1, 0], [2, 0], [0, 3], [0, 4]], np.uint16)
>>> tc.add([0, 1, 2, 3], cbed, spectra)
>>> u = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.1, 0.9]])
>>> c = tc.update(u)
>>> c.eds[0, 0].round(3).tolist(), c.eds[1, 0].tolist(), c.count[:, 0].tolist()
([1.4, 0.0], [1.0, 0.0], [2, 1])
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from streamclust.decomposition.spill import release, spill_array

logger = logging.getLogger(__name__)

__all__ = [
    "FE_KA_KEV",
    "CO_KA_KEV",
    "FE_KB_KEV",
    "fwhm_kev",
    "LineIntensities",
    "fe_co_lines",
    "fe_co_ratio",
    "CentreSet",
    "ThresholdedCentres",
    "bin_pattern",
    "centre_signals",
]

FE_KA_KEV = 6.4039
CO_KA_KEV = 6.9303
FE_KB_KEV = 7.058
#: Fe K-beta / K-alpha intensity ratio (physics.md)
KB_KA = 0.127
#: background windows (keV) free of lines: below Fe Ka, and between Fe Kb / Co Ka and Co Kb
BACKGROUND_WINDOWS_KEV = ((5.70, 6.10), (7.25, 7.45))


def fwhm_kev(energy_kev, fwhm_mnka_kev: float = 0.130):
    """Detector resolution (Fiori-Newbury): FWHM^2 = FWHM_MnKa^2 + 2.5 eV * (E - 5.899 keV)."""
    e = np.asarray(energy_kev, dtype=np.float64)
    return np.sqrt(np.maximum(fwhm_mnka_kev ** 2 + 2.5e-3 * (e - 5.8987), 1e-6))


def _gauss_fraction(lo: float, hi: float, centre: float, fwhm: float) -> float:
    s = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    return 0.5 * (math.erf((hi - centre) / (s * math.sqrt(2))) - math.erf((lo - centre) / (s * math.sqrt(2))))


@dataclass(frozen=True)
class LineIntensities:
    """Net K-alpha intensities of Fe and Co in one spectrum (or arrays for a batch).

    ``fe_net``/``co_net``: window counts minus the interpolated background (Co corrected for the
    Fe K-beta tail in its window); ``*_background``: the background under each window;
    ``*_sigma``: Poisson standard deviation of each net count (window counts plus the variance of
    the background estimate); ``ratio = fe_net / co_net`` (NaN where ``co_net <= 0``);
    ``snr_fe = fe_net / fe_sigma``.
    """

    fe_net: np.ndarray
    co_net: np.ndarray
    fe_background: np.ndarray
    co_background: np.ndarray
    fe_sigma: np.ndarray
    co_sigma: np.ndarray

    @property
    def ratio(self):
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(self.co_net > 0, self.fe_net / np.where(self.co_net > 0, self.co_net, 1), np.nan)
        return r[()] if np.ndim(r) == 0 else r

    @property
    def snr_fe(self):
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(self.fe_sigma > 0, self.fe_net / np.where(self.fe_sigma > 0, self.fe_sigma, 1), 0.0)
        return r[()] if np.ndim(r) == 0 else r


def fe_co_lines(spectrum, energy_axis_kev, *, width_fwhm: float = 1.0, fwhm_mnka_kev: float = 0.130,
                strip_fe_kb: bool = True) -> LineIntensities:
    """Fe K-alpha (6.404 keV) and Co K-alpha (6.930 keV) net counts of ``spectrum`` (..., channels).

    Each peak window is ``line +- width_fwhm * FWHM(line)`` (channel centres inside it). The
    background is a straight line (counts per channel versus energy) through the mean of two
    line-free side windows, 5.70-6.10 keV and 7.25-7.45 keV, integrated under each peak window.
    Fe K-beta (7.058 keV, 0.127 of Fe K-alpha) falls inside the Co window; with ``strip_fe_kb`` the
    part of it that does (a Gaussian at the detector resolution) is subtracted from the Co net
    count. The ratio ``fe_net / co_net`` is an intensity ratio, not an atomic ratio: compare it with
    the same function applied to a reference spectrum.

    Examples
    --------
    >>> import numpy as np
    >>> e = (np.arange(2048) + 0.5) * 0.01
    >>> s = np.full(2048, 2.0)          # flat background of 2 counts a channel
    >>> s[(e > 6.35) & (e < 6.45)] += 30.0
    >>> li = fe_co_lines(s, e, strip_fe_kb=False)
    >>> float(li.fe_net), float(li.co_net)
    (300.0, 0.0)
    """
    s = np.asarray(spectrum, dtype=np.float64)
    e = np.asarray(energy_axis_kev, dtype=np.float64)
    if e.ndim != 1 or s.shape[-1] != e.size:
        raise ValueError(f"spectrum has {s.shape[-1]} channels, the energy axis {e.shape}")
    (l0, l1), (h0, h1) = BACKGROUND_WINDOWS_KEV
    lo = (e >= l0) & (e < l1)
    hi = (e >= h0) & (e < h1)
    if not lo.any() or not hi.any():
        raise ValueError("the energy axis does not cover the background windows 5.70-6.10 and 7.25-7.45 keV")
    n_lo, n_hi = int(lo.sum()), int(hi.sum())
    e_lo, e_hi = float(e[lo].mean()), float(e[hi].mean())
    c_lo = s[..., lo].sum(axis=-1)
    c_hi = s[..., hi].sum(axis=-1)

    def window(line: float):
        f = float(fwhm_kev(line, fwhm_mnka_kev))
        w = (e >= line - width_fwhm * f) & (e <= line + width_fwhm * f)
        if not w.any():
            raise ValueError(f"no channel inside the {line:.3f} keV window")
        gross = s[..., w].sum(axis=-1)
        # background under the window: sum over its channels of a line through the side means
        a_hi = float(((e[w] - e_lo) / (e_hi - e_lo)).sum())
        a_lo = float(w.sum()) - a_hi
        bg = a_lo * c_lo / n_lo + a_hi * c_hi / n_hi
        var = gross + (a_lo / n_lo) ** 2 * c_lo + (a_hi / n_hi) ** 2 * c_hi
        return gross - bg, bg, var, w, f

    fe_net, fe_bg, fe_var, _, f_fe = window(FE_KA_KEV)
    co_net, co_bg, co_var, w_co, f_co = window(CO_KA_KEV)
    if strip_fe_kb:
        edges = e[w_co]
        half = 0.5 * (e[1] - e[0]) if e.size > 1 else 0.0
        in_co = _gauss_fraction(edges[0] - half, edges[-1] + half, FE_KB_KEV, float(fwhm_kev(FE_KB_KEV, fwhm_mnka_kev)))
        in_fe = _gauss_fraction(FE_KA_KEV - width_fwhm * f_fe, FE_KA_KEV + width_fwhm * f_fe, FE_KA_KEV, f_fe)
        k = KB_KA * in_co / in_fe
        co_net = co_net - k * fe_net
        co_var = co_var + k * k * fe_var
    return LineIntensities(fe_net=np.asarray(fe_net), co_net=np.asarray(co_net), fe_background=np.asarray(fe_bg),
                           co_background=np.asarray(co_bg), fe_sigma=np.sqrt(fe_var), co_sigma=np.sqrt(co_var))


def fe_co_ratio(spectrum, energy_axis_kev, **kwargs) -> float | np.ndarray:
    """Fe/Co K-alpha net intensity ratio of ``spectrum`` (NaN where Co's net count is <= 0);
    see :func:`fe_co_lines`."""
    return fe_co_lines(spectrum, energy_axis_kev, **kwargs).ratio


def bin_pattern(frames: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Sum blocks of ``frames`` (n, H, W) down to (n, *shape) float32; H, W multiples of shape."""
    f = np.asarray(frames)
    n, h, w = f.shape
    by, bx = shape
    if h % by or w % bx:
        raise ValueError(f"frame shape {(h, w)} is not a multiple of the stored shape {shape}")
    fy, fx = h // by, w // bx
    if fy == 1 and fx == 1:
        return f.astype(np.float32, copy=False)
    return f.reshape(n, by, fy, bx, fx).sum(axis=(2, 4), dtype=np.float64).astype(np.float32)


@dataclass(frozen=True)
class CentreSet:
    """Thresholded centres at one moment.

    ``cbed`` (T, c, *cbed_shape) and ``eds`` (T, c, channels) float64 weighted means (NaN for a
    cluster with no position above the threshold); ``weight`` (T, c) the sum of weights;
    ``count`` (T, c) the positions above each threshold; ``full`` (T, c, H, W) the live
    full-resolution centres (arrival-time memberships) or None.
    """

    thresholds: tuple
    cbed: np.ndarray
    eds: np.ndarray
    weight: np.ndarray
    count: np.ndarray
    full: np.ndarray | None = None

    def spectrum(self, cluster: int, threshold: float) -> np.ndarray:
        """The centre spectrum of ``cluster`` at ``threshold`` (one of :attr:`thresholds`)."""
        return self.eds[self.thresholds.index(threshold), cluster]


class ThresholdedCentres:
    """Exact thresholded, membership-weighted centres of raw signals, kept live.

    Parameters
    ----------
    n_clusters : int
    thresholds : tuple of float
        Membership thresholds (a position counts for cluster k at t when ``u[p, k] > t``).
    n_positions : int
        Scan positions (the store is allocated zeroed; pages are touched only as positions
        arrive, so memory grows with the scan).
    cbed_shape : (int, int)
        Stored (binned) pattern shape; arriving frames are block-summed to it.
    channels : slice, optional
        EDS channels stored (default all).
    full_resolution : bool
        Also accumulate full-resolution centres live with arrival-time memberships (see the
        module docstring for the approximation).
    """

    def __init__(self, n_clusters: int, thresholds: tuple = (0.5, 0.75), *, n_positions: int,
                 cbed_shape: tuple = (32, 32), channels: slice | None = None,
                 full_resolution: bool = False, spill_dir: str | None = None) -> None:
        self.n_clusters = n_clusters
        self.thresholds = thresholds
        self.n_positions = n_positions
        self.cbed_shape = cbed_shape
        self.channels = channels
        self.full_resolution = full_resolution
        # spill_dir: the raw per-position store and the flagger's feature cache live in unlinked
        # files there (streamclust.decomposition.spill; issue 16), released after every pass
        self.spill_dir = spill_dir
        if int(n_clusters) < 1 or int(n_positions) < 1:
            raise ValueError("n_clusters and n_positions must be >= 1")
        if not thresholds or any(not 0.0 <= float(t) < 1.0 for t in thresholds):
            raise ValueError(f"thresholds must be in [0, 1), got {thresholds!r}")
        self._thr = np.asarray(tuple(float(t) for t in thresholds))
        self.stats = {"added": 0, "duplicates": 0, "updates": 0, "rows_changed": 0}
        self._cbed = None  # allocated on the first add (channel count known then)

    # ------------------------------------------------------------------ sizes
    @staticmethod
    def state_bytes(n_positions: int, n_clusters: int = 6, n_thresholds: int = 2,
                    cbed_shape: tuple = (32, 32), n_channels: int = 2048) -> dict:
        """Bytes of the per-position store: ``{"per_position": ..., "total": ..., "features": ...}``.

        ``features``: the part of ``per_position`` that :meth:`features` keeps once the flagger
        has asked for it (float32 square-rooted patterns and the spectra rebinned by 8, at most).
        """
        features = 4 * int(np.prod(cbed_shape)) + 4 * -(-int(n_channels) // 8)
        per = 4 * int(np.prod(cbed_shape)) + 2 * int(n_channels) + 8 * n_thresholds * n_clusters + 1 + features
        return {"per_position": per, "total": per * int(n_positions), "features": features}

    def _allocate(self, n_channels: int, frame_shape) -> None:
        n = int(self.n_positions)
        t, c = self._thr.size, int(self.n_clusters)
        self._cbed = self._array((n, int(np.prod(self.cbed_shape))), np.float32, "centres-cbed")
        self._eds = self._array((n, n_channels), np.uint16, "centres-eds")
        self._stored = np.zeros(n, bool)
        self._w = np.zeros((n, t * c))
        self._sum_cbed = np.zeros((t * c, self._cbed.shape[1]))
        self._sum_eds = np.zeros((t * c, n_channels))
        self._sum_w = np.zeros(t * c)
        self._full = None
        if self.full_resolution:
            self._frame_shape = tuple(frame_shape)
            self._full = np.zeros((t * c, int(np.prod(frame_shape))))
            self._full_w = np.zeros(t * c)

    def _array(self, shape: tuple, dtype, name: str, fill=0) -> np.ndarray:
        if self.spill_dir is None:
            return np.full(shape, fill, dtype) if fill else np.zeros(shape, dtype)
        a = spill_array(shape, dtype, self.spill_dir, f"{name}-{id(self):x}", unlink=True)
        if fill:
            for s in range(0, shape[0], 8192):
                a[s:s + 8192] = fill
                release(a, s, s + 8192)
        return a

    # ------------------------------------------------------------------ read access (live view)
    @property
    def stored(self) -> np.ndarray | None:
        """(n_positions,) bool, read-only: positions whose signals are stored (None before the
        first :meth:`add`)."""
        if self._cbed is None:
            return None
        view = self._stored.view()
        view.flags.writeable = False
        return view

    def signals(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the stored signals of ``positions``: ``(patterns (n, *cbed_shape) float32,
        spectra (n, channels) uint16)``. Positions not stored (see :attr:`stored`) read as zeros.
        Raises RuntimeError before the first :meth:`add`, IndexError outside the scan."""
        if self._cbed is None:
            raise RuntimeError("no position stored yet: call add() first")
        p = np.asarray(positions, dtype=np.int64).reshape(-1)
        if p.size and (p.min() < 0 or p.max() >= self.n_positions):
            raise IndexError(f"scan positions must be in [0, {self.n_positions})")
        # fancy indexing copies: the caller never holds a view into the (possibly spilled) store
        return self._cbed[p].reshape(p.size, *self.cbed_shape), self._eds[p]

    def release(self) -> None:
        """Drop the spilled arrays' pages from the resident set (after a pass; no-op in RAM)."""
        if self.spill_dir is None or self._cbed is None:
            return
        release(self._cbed)
        release(self._eds)
        cache = getattr(self, "_feature_cache", None)
        if cache is not None:
            release(cache[1])
            release(cache[2])

    # ------------------------------------------------------------------ data in
    def add(self, positions, cbed, spectra, memberships=None) -> None:
        """Store the raw signals of newly arrived positions.

        Parameters
        ----------
        positions : (n,) int
        cbed : (n, H, W) frames (block-summed to ``cbed_shape``) or (n, *cbed_shape) binned
        spectra : (n, channels) counts (< 65536 after the channel selection)
        memberships : (n, c), optional
            Arrival-time memberships, used only for the live full-resolution centres.
        """
        pos = np.asarray(positions)
        if pos.ndim != 1 or (pos.size and not np.issubdtype(pos.dtype, np.integer)):
            raise TypeError("positions must be a 1-D sequence of integers")
        pos = pos.astype(np.int64)
        frames = np.asarray(cbed)
        spec = np.asarray(spectra)
        if self.channels is not None:
            spec = spec[:, self.channels]
        if frames.ndim != 3 or frames.shape[0] != pos.size or spec.ndim != 2 or spec.shape[0] != pos.size:
            raise ValueError(f"{pos.size} positions need (n, H, W) patterns and (n, channels) spectra, "
                             f"got {frames.shape} and {spec.shape}")
        if pos.size and (pos.min() < 0 or pos.max() >= self.n_positions):
            bad = pos[(pos < 0) | (pos >= self.n_positions)][0]
            raise IndexError(f"scan position {bad} out of range [0, {self.n_positions})")
        if self._cbed is None:
            self._allocate(spec.shape[1], frames.shape[1:])
        if spec.shape[1] != self._eds.shape[1]:
            raise ValueError(f"spectra have {spec.shape[1]} channels, the store {self._eds.shape[1]}")
        if spec.size and (spec.min() < 0 or spec.max() > 65535):
            row = int(np.flatnonzero((spec < 0).any(1) | (spec > 65535).any(1))[0])
            raise ValueError(f"spectrum of position {pos[row]} has counts outside 0-65535")
        # the first arrival of a position is kept (as the joiner does); later ones are counted
        _, first = np.unique(pos, return_index=True)
        keep = np.zeros(pos.size, bool)
        keep[first] = True
        keep &= ~self._stored[pos]
        self.stats["duplicates"] += int(pos.size - keep.sum())
        if not keep.any():
            return
        p = pos[keep]
        binned = bin_pattern(frames[keep], tuple(self.cbed_shape))
        self._cbed[p] = binned.reshape(p.size, -1)
        self._eds[p] = spec[keep]
        self._stored[p] = True
        if self.spill_dir is not None and p.size:
            release(self._cbed, int(p.min()), int(p.max()) + 1)
            release(self._eds, int(p.min()), int(p.max()) + 1)
        self.stats["added"] += int(p.size)
        if self._full is not None and memberships is not None:
            u = np.asarray(memberships, dtype=np.float64)[keep]
            w = self._weights(u)
            f = frames[keep].reshape(p.size, -1)
            if f.shape[1] != self._full.shape[1]:
                raise ValueError(f"full-resolution frames of shape {frames.shape[1:]} where {self._frame_shape} expected")
            self._full += w.T @ f.astype(np.float64)
            self._full_w += w.sum(axis=0)

    def features(self, *, eds_rebin: int = 8, eds_channels: slice | None = None,
                 missing: float = np.nan) -> tuple[np.ndarray, np.ndarray]:
        """Per-position block signals from the store, for :class:`~streamclust.flags.flagger.SecondPhaseFlagger`.

        Returns ``(cbed, eds)`` float32 arrays (n_positions, d) with rows of ``missing`` (NaN by
        default) where nothing is stored (:attr:`stored`): the square root of the binned patterns
        (Poisson variance-stabilised) and the spectra of ``eds_channels`` summed in groups of
        ``eds_rebin`` channels. The arrays are read-only and updated in place by later calls
        (copy them to keep a snapshot).

        ``missing=0.0`` with ``scanned_mask=stored`` and ``check_finite=False`` lets the flagger
        skip its scan of the whole blocks for NaN rows: at 65,536 positions that scan and the
        zero-filled copy it made were 0.5 s of a 0.84 s assessment.
        """
        if self._cbed is None:
            raise RuntimeError("no position stored yet: call add() first")
        # a stored position never changes (the first arrival is kept), so its features are
        # computed once: only the positions added since the last call are (recomputing all was
        # 0.16 s of a 0.53 s flag assessment at 8,192 positions, benchmarks/bench_flag_latency.py).
        # Memory: one more float32 CBED block and the rebinned EDS block (state_bytes "features")
        if isinstance(eds_channels, slice) or eds_channels is None:
            window = eds_channels
            key_channels = None if window is None else (window.start, window.stop, window.step)
        else:
            window = np.asarray(eds_channels)
            key_channels = ("index", tuple(window.ravel().tolist()))
        key = (int(eds_rebin), key_channels, "nan" if np.isnan(missing) else float(missing))
        cache = getattr(self, "_feature_cache", None)
        if cache is None or cache[0] != key:
            width = self._eds[:1, window].shape[1] if window is not None else self._eds.shape[1]
            m = width // eds_rebin * eds_rebin
            cache = (key, self._array(self._cbed.shape, np.float32, "features-cbed", fill=missing),
                     self._array((self._eds.shape[0], m // eds_rebin), np.float32, "features-eds", fill=missing),
                     np.zeros(self._stored.shape, bool))
            self._feature_cache = cache
        _, cbed, eds, done = cache
        idx = np.flatnonzero(self._stored & ~done)
        if idx.size:
            cbed[idx] = np.sqrt(np.maximum(self._cbed[idx], 0.0))
            spec = self._eds[idx] if window is None else self._eds[idx][:, window]
            m = eds.shape[1] * eds_rebin
            eds[idx] = spec[:, :m].reshape(idx.size, -1, eds_rebin).sum(axis=2, dtype=np.float32)
            done[idx] = True
            if self.spill_dir is not None:
                lo, hi = int(idx.min()), int(idx.max()) + 1
                for a in (self._cbed, self._eds, cbed, eds):
                    release(a, lo, hi)
        # read-only views of the cache: the flagger only reads them
        cbed_view, eds_view = cbed.view(), eds.view()
        cbed_view.flags.writeable = eds_view.flags.writeable = False
        return cbed_view, eds_view

    def _weights(self, u: np.ndarray) -> np.ndarray:
        """(n, c) memberships -> (n, T * c) thresholded weights, threshold-major."""
        u = np.where(np.isfinite(u), u, 0.0)
        w = np.where(u[:, None, :] > self._thr[None, :, None], u[:, None, :], 0.0)
        return w.reshape(u.shape[0], -1)

    # ------------------------------------------------------------------ memberships in, centres out
    def update(self, memberships) -> CentreSet:
        """Bring the centres in line with ``memberships`` (n_positions, c); NaN rows are unseen.

        Only rows whose thresholded weights changed are multiplied, so a refresh that moves few
        memberships across a threshold is cheap; the result equals :meth:`recompute`.
        """
        u = np.asarray(memberships, dtype=np.float64)
        if u.shape != (self.n_positions, self.n_clusters):
            raise ValueError(f"memberships must be ({self.n_positions}, {self.n_clusters}), got {u.shape}")
        if self._cbed is None:
            raise RuntimeError("no position stored yet: call add() first")
        w = self._weights(u)
        w[~self._stored] = 0.0  # a membership without stored signals cannot contribute
        changed = np.flatnonzero((w != self._w).any(axis=1))
        self.stats["updates"] += 1
        self.stats["rows_changed"] += int(changed.size)
        for i in range(0, changed.size, 4096):  # bounded temporaries
            rows = changed[i:i + 4096]
            d = w[rows] - self._w[rows]
            self._sum_cbed += d.T @ self._cbed[rows].astype(np.float64)
            self._sum_eds += d.T @ self._eds[rows].astype(np.float64)
            self._sum_w += d.sum(axis=0)
            if self.spill_dir is not None:
                release(self._cbed, int(rows.min()), int(rows.max()) + 1)
                release(self._eds, int(rows.min()), int(rows.max()) + 1)
        self._w[changed] = w[changed]
        return self.centres()

    def recompute(self) -> CentreSet:
        """Redo the sums from scratch with the current weights (removes accumulated rounding)."""
        if self._cbed is None:
            raise RuntimeError("no position stored yet: call add() first")
        n, tc = self._w.shape
        self._sum_cbed = np.zeros((tc, self._cbed.shape[1]))
        self._sum_eds = np.zeros((tc, self._eds.shape[1]))
        for s in range(0, n, 8192):  # in chunks: bounded temporaries, and a spilled store stays so
            w = self._w[s:s + 8192].T
            self._sum_cbed += w @ self._cbed[s:s + 8192].astype(np.float64)
            self._sum_eds += w @ self._eds[s:s + 8192].astype(np.float64)
            if self.spill_dir is not None:
                release(self._cbed, s, s + 8192)
                release(self._eds, s, s + 8192)
        self._sum_w = self._w.sum(axis=0)
        return self.centres()

    def centres(self) -> CentreSet:
        """The current centres (see :class:`CentreSet`)."""
        if self._cbed is None:
            raise RuntimeError("no position stored yet: call add() first")
        t, c = self._thr.size, int(self.n_clusters)
        wsum = self._sum_w.copy()
        # rounding of the incremental sums leaves ~1e-16 where a cluster emptied
        empty = wsum <= 1e-9
        wsafe = np.where(empty, 1.0, wsum)[:, None]
        cbed = np.where(empty[:, None], np.nan, self._sum_cbed / wsafe)
        eds = np.where(empty[:, None], np.nan, self._sum_eds / wsafe)
        count = (self._w > 0).sum(axis=0)
        full = None
        if self._full is not None:
            fe = self._full_w <= 0
            full = np.where(fe[:, None], np.nan, self._full / np.where(fe, 1.0, self._full_w)[:, None])
            full = full.reshape(t, c, *self._frame_shape)
        return CentreSet(
            thresholds=tuple(float(v) for v in self._thr),
            cbed=cbed.reshape(t, c, *self.cbed_shape),
            eds=eds.reshape(t, c, -1),
            weight=np.where(empty, 0.0, wsum).reshape(t, c),
            count=count.reshape(t, c),
            full=full,
        )


def centre_signals(centres: CentreSet, energy_axis_kev, threshold: float | None = None) -> dict:
    """Summaries of each cluster's thresholded centre spectrum, for the event stream.

    Returns ``{cluster: {"threshold", "n_positions", "fe_ka_net", "co_ka_net", "fe_co_ratio",
    "fe_ka_snr"}}`` at ``threshold`` (default the highest). The net counts are those of the
    *mean* spectrum; ``fe_ka_snr`` is the Fe K-alpha SNR of the *summed* spectrum of the
    positions above the threshold (approximated by the weighted mean times the count), the figure a control script compares with a
    follow-up acquisition. Clusters with no position above the threshold are left out.
    """
    t = max(centres.thresholds) if threshold is None else float(threshold)
    i = centres.thresholds.index(t)
    out = {}
    for k in range(centres.eds.shape[1]):
        n = int(centres.count[i, k])
        if n == 0:
            continue
        mean = centres.eds[i, k]
        li = fe_co_lines(mean, energy_axis_kev)
        # the SNR of a sum of n spectra: scale the mean's counts up before the Poisson estimate
        snr = float(fe_co_lines(mean * n, energy_axis_kev).snr_fe)
        out[k] = {"threshold": t, "n_positions": n, "fe_ka_net": float(li.fe_net),
                  "co_ka_net": float(li.co_net), "fe_co_ratio": float(li.ratio), "fe_ka_snr": snr}
    return out
