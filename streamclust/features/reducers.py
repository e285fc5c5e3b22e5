"""Per-frame and per-spectrum feature reduction: the first stage after ingest.

A 512x512 diffraction frame is reduced to a 64x64 grid of summed counts (4,096 float32 features)
and a 2,048-channel EDS spectrum to an energy window, rebinned. Both reducers are stateless
transforms: everything they derive (pixel weights, channel selection) depends only on their
parameters and the input shape, so they can be rebuilt anywhere (a Dask worker, an offline rerun)
and give identical features.

Masking convention: every mask is boolean with ``True`` meaning *excluded* (as in ``numpy.ma``).
A bin that loses pixels to masks is rescaled by the inverse of its live fraction, so a bin's value
stays an estimate of the counts the whole bin would have recorded; bins whose live fraction falls
below ``min_live_fraction`` are set to 0 (a constant feature: zero IQR, zero variance, so it drops out
of scaling, PCA and clustering without changing the feature count).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from streamclust.features.kernels import (
    bin_corrected_frames,
    bin_sum_frames,
    bin_sum_frames_numpy,
    bin_weighted_frames,
    bin_weighted_frames_numpy,
)

logger = logging.getLogger(__name__)

__all__ = ["FrameReducer", "SpectrumReducer", "quad_cross_area"]

_SUPPORTED_FRAME_DTYPES = (np.uint8, np.uint16, np.uint32, np.int16, np.int32, np.float32)


def quad_cross_area(shape: tuple[int, int] = (512, 512), width: int = 3) -> np.ndarray:
    """Relative area of each pixel of a processed quad frame (no gap inserted).

    The pixels on the quad's central cross (rows/columns ``h//2 - 1`` and ``h//2``, i.e. 255-256 on
    a 512x512 frame) are about ``width`` times wider; where the row and column of the cross meet,
    the pixel is ``width**2`` times larger.

    Examples
    --------
    >>> a = quad_cross_area((8, 8))
    >>> float(a[0, 0]), float(a[3, 0]), float(a[0, 4]), float(a[3, 4])
    (1.0, 3.0, 3.0, 9.0)
    """
    h, w = shape
    ry = np.ones(h, dtype=np.float32)
    rx = np.ones(w, dtype=np.float32)
    ry[h // 2 - 1 : h // 2 + 1] = width
    rx[w // 2 - 1 : w // 2 + 1] = width
    return np.outer(ry, rx)


class FrameReducer(TransformerMixin, BaseEstimator):
    """Reduce (n, H, W) integer frames to float32 feature vectors by sum-binning.

    Parameters
    ----------
    bin_factor : int, default=8
        Square binning factor; 512x512 frames become 64x64 = 4,096 features.
    mask : ndarray of bool, shape (H, W), optional
        User exclusion mask (``True`` = excluded), e.g. a beam stop shadow.
    crop : tuple (row_start, row_stop, col_start, col_stop), optional
        Region kept before binning, in full-frame pixel coordinates; its size must be a multiple
        of ``bin_factor``. Masks and the chip-cross geometry are given in full-frame coordinates.
    direct_beam_radius : float, optional
        Exclude pixels within this radius (pixels) of ``direct_beam_center``. The direct beam
        carries most counts but little structural contrast; masking it stops it from dominating.
    direct_beam_center : tuple (row, col), optional
        Centre of the direct beam; default the frame centre ``((H-1)/2, (W-1)/2)``.
    dead_pixel_mask : ndarray of bool, shape (H, W), optional
        Dead/hot pixels (``True`` = excluded).
    chip_gap : {"keep", "area", "mask"}, default="keep"
        Treatment of the quad's central cross (rows/columns 255-256 of a 512x512 frame are about
        3x wider pixels and look brighter). "keep": raw counts. "area": divide each pixel's counts by
        its relative area (3, or 9 where the cross meets), so every pixel counts per standard
        pixel area. "mask": exclude the cross and rescale its bins by their live fraction.
    min_live_fraction : float, default=0.25
        Bins with a smaller live fraction are set to 0.
    frame_shape : tuple (H, W), default=(512, 512)
        Expected frame shape; frames of another shape are refused with ``ValueError``.

    Attributes
    ----------
    n_features_out_ : int
        Number of output features, set on first use (or by :meth:`fit`).
    feature_shape_ : tuple (rows, cols)
        Shape of the binned image.
    live_fraction_ : ndarray of float32, shape feature_shape_
        Live fraction of each bin (1 without masks).
    weights_ : ndarray of float32 or None
        Per-pixel weights of the cropped region; ``None`` on the unweighted fast path.

    Examples
    --------
    >>> import numpy as np
    >>> frames = np.ones((3, 16, 16), dtype=np.uint16)
    >>> red = FrameReducer(bin_factor=4, frame_shape=(16, 16))
    >>> X = red.transform(frames)
    >>> X.shape, X.dtype, float(X[0, 0])
    ((3, 16), dtype('float32'), 16.0)
    >>> dead = np.zeros((16, 16), dtype=bool); dead[0, 0] = True
    >>> float(FrameReducer(bin_factor=4, dead_pixel_mask=dead, frame_shape=(16, 16)).transform(frames)[0, 0])
    16.0
    """

    def __init__(
        self,
        bin_factor: int = 8,
        mask: np.ndarray | None = None,
        crop: Sequence[int] | None = None,
        direct_beam_radius: float | None = None,
        direct_beam_center: Sequence[float] | None = None,
        dead_pixel_mask: np.ndarray | None = None,
        chip_gap: str = "keep",
        min_live_fraction: float = 0.25,
        frame_shape: Sequence[int] = (512, 512),
    ) -> None:
        self.bin_factor = bin_factor
        self.mask = mask
        self.crop = crop
        self.direct_beam_radius = direct_beam_radius
        self.direct_beam_center = direct_beam_center
        self.dead_pixel_mask = dead_pixel_mask
        self.chip_gap = chip_gap
        self.min_live_fraction = min_live_fraction
        self.frame_shape = frame_shape

    # -- set-up -------------------------------------------------------------------------------
    def fit(self, frames: np.ndarray | None = None) -> FrameReducer:
        """Derive weights and bin geometry from the parameters (``frames`` is only shape-checked)."""
        h, w = (int(v) for v in self.frame_shape)
        if frames is not None:
            frames = np.asarray(frames)
            if frames.ndim != 3 or frames.shape[1:] != (h, w):
                raise ValueError(f"frames must have shape (n, {h}, {w}); got {frames.shape}")
        f = int(self.bin_factor)
        if f < 1:
            raise ValueError(f"bin_factor must be >= 1; got {self.bin_factor}")
        if self.chip_gap not in ("keep", "area", "mask"):
            raise ValueError(f"chip_gap must be 'keep', 'area' or 'mask'; got {self.chip_gap!r}")
        r0, r1, c0, c1 = (0, h, 0, w) if self.crop is None else (int(v) for v in self.crop)
        if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w):
            raise ValueError(f"crop {self.crop} does not fit a {h}x{w} frame")
        if (r1 - r0) % f or (c1 - c0) % f:
            raise ValueError(
                f"crop size {(r1 - r0, c1 - c0)} (or frame shape) is not a multiple of bin_factor {f}"
            )
        excluded = np.zeros((h, w), dtype=bool)
        for name in ("mask", "dead_pixel_mask"):
            m = getattr(self, name)
            if m is not None:
                m = np.asarray(m, dtype=bool)
                if m.shape != (h, w):
                    raise ValueError(f"{name} must have shape {(h, w)}; got {m.shape}")
                excluded |= m
        if self.direct_beam_radius is not None:
            cy, cx = (
                ((h - 1) / 2.0, (w - 1) / 2.0)
                if self.direct_beam_center is None
                else (float(v) for v in self.direct_beam_center)
            )
            yy, xx = np.ogrid[:h, :w]
            excluded |= (yy - cy) ** 2 + (xx - cx) ** 2 <= float(self.direct_beam_radius) ** 2
        weights = np.ones((h, w), dtype=np.float32)
        if self.chip_gap == "area":
            weights /= quad_cross_area((h, w))
        elif self.chip_gap == "mask":
            excluded |= quad_cross_area((h, w)) > 1
        weights[excluded] = 0.0
        weights = weights[r0:r1, c0:c1]
        live = (~excluded[r0:r1, c0:c1]).astype(np.float64)
        hb, wb = (r1 - r0) // f, (c1 - c0) // f
        live_fraction = live.reshape(hb, f, wb, f).mean(axis=(1, 3))
        bin_scale = np.zeros_like(live_fraction)
        keep = live_fraction >= max(float(self.min_live_fraction), 1e-12)
        bin_scale[keep] = 1.0 / live_fraction[keep]
        self._crop_ = (r0, r1, c0, c1)
        self.feature_shape_ = (hb, wb)
        self.n_features_out_ = hb * wb
        self.live_fraction_ = live_fraction.astype(np.float32)
        unweighted = not excluded.any() and self.chip_gap != "area"
        self.weights_ = None if unweighted else np.ascontiguousarray(weights)
        self._bin_scale_ = bin_scale.astype(np.float32)
        rows, cols = np.nonzero(weights != 1.0)
        # pixels whose weight is not 1, in cropped coordinates: the sparse correction's input
        self._corr_rows_ = rows.astype(np.int64)
        self._corr_cols_ = cols.astype(np.int64)
        self._corr_wm1_ = weights[rows, cols].astype(np.float64) - 1.0
        if (~keep).any():
            logger.info("FrameReducer: %d of %d bins dropped (live fraction < %g)",
                        int((~keep).sum()), keep.size, self.min_live_fraction)
        return self

    def warm_up(self, dtypes: Sequence[type] = (np.uint16,)) -> FrameReducer:
        """Compile the kernels for ``dtypes`` before a detector is armed, not on the first live frame."""
        h, w = (int(v) for v in self.frame_shape)
        for dt in dtypes:
            self.transform(np.zeros((1, h, w), dtype=dt))
        return self

    # -- reduction ----------------------------------------------------------------------------
    def _check(self, frames: np.ndarray) -> np.ndarray:
        if not hasattr(self, "n_features_out_"):
            self.fit()
        frames = np.asarray(frames)
        if frames.ndim == 2:
            frames = frames[np.newaxis]
        h, w = (int(v) for v in self.frame_shape)
        if frames.ndim != 3 or frames.shape[1:] != (h, w):
            raise ValueError(f"frames must have shape (n, {h}, {w}); got {frames.shape}")
        if frames.dtype.type not in _SUPPORTED_FRAME_DTYPES:
            raise TypeError(
                f"frame dtype {frames.dtype} not supported; use one of "
                f"{[np.dtype(t).name for t in _SUPPORTED_FRAME_DTYPES]}"
            )
        r0, r1, c0, c1 = self._crop_
        frames = frames[:, r0:r1, c0:c1]
        if not frames.dtype.isnative:
            # Merlin's raw pixel data are big-endian; Numba needs native byte order (one copy)
            frames = frames.astype(frames.dtype.newbyteorder("="))
        return frames

    def transform(self, frames: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Reduce frames (n, H, W) (or one frame (H, W)) to features (n, n_features_out_) float32.

        ``out``, if given, must be a C-contiguous float32 array of shape (n, n_features_out_);
        it is filled in place and returned (no allocation on the hot path).
        """
        frames = self._check(frames)
        n = frames.shape[0]
        hb, wb = self.feature_shape_
        if out is None:
            out = np.empty((n, hb * wb), dtype=np.float32)
        elif out.shape != (n, hb * wb) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float32 of shape {(n, hb * wb)}")
        if n == 0:
            return out
        view = out.reshape(n, hb, wb)
        if self.weights_ is None:
            bin_sum_frames(frames, int(self.bin_factor), view)
        elif self._corr_rows_.size * 8 < frames.shape[1] * frames.shape[2]:
            # few exceptional pixels (the usual case): integer binning plus sparse correction
            bin_corrected_frames(frames, int(self.bin_factor), self._corr_rows_, self._corr_cols_,
                                 self._corr_wm1_, self._bin_scale_, view)
        else:
            bin_weighted_frames(frames, self.weights_, self._bin_scale_, int(self.bin_factor), view)
        return out

    def transform_numpy(self, frames: np.ndarray) -> np.ndarray:
        """Reference reduction with the NumPy twins (slow; for tests and checking)."""
        frames = self._check(frames)
        n = frames.shape[0]
        if self.weights_ is None:
            res = bin_sum_frames_numpy(frames, int(self.bin_factor))
        else:
            res = bin_weighted_frames_numpy(frames, self.weights_, self._bin_scale_, int(self.bin_factor))
        return res.reshape(n, -1)


class SpectrumReducer(TransformerMixin, BaseEstimator):
    """Cut an energy window out of EDS spectra and sum adjacent channels.

    Channel ``i`` is centred on ``energy_offset_kev + i * channel_width_kev``; channels with
    ``window[0] <= E_i < window[1]`` are kept, trimmed to a multiple of ``rebin`` and summed in
    groups of ``rebin``.

    Parameters
    ----------
    energy_window_kev : tuple (low, high), default=(0.2, 10.0)
    rebin : int, default=2
    energy_offset_kev : float, default=0.0
    channel_width_kev : float, default=0.01
    n_channels : int, default=2048

    Attributes
    ----------
    channel_slice_ : slice
        Channels kept (before rebinning).
    energies_kev_ : ndarray of float64
        Centre energy of each output feature (mean of its channels' centres).
    n_features_out_ : int

    Examples
    --------
    >>> import numpy as np
    >>> red = SpectrumReducer()
    >>> X = red.transform(np.ones((2, 2048), dtype=np.uint16))
    >>> X.shape, float(X[0, 0]), round(float(red.energies_kev_[0]), 3)
    ((2, 490), 2.0, 0.205)
    """

    def __init__(
        self,
        energy_window_kev: Sequence[float] = (0.2, 10.0),
        rebin: int = 2,
        energy_offset_kev: float = 0.0,
        channel_width_kev: float = 0.01,
        n_channels: int = 2048,
    ) -> None:
        self.energy_window_kev = energy_window_kev
        self.rebin = rebin
        self.energy_offset_kev = energy_offset_kev
        self.channel_width_kev = channel_width_kev
        self.n_channels = n_channels

    def fit(self, spectra: np.ndarray | None = None) -> SpectrumReducer:
        """Derive the channel selection from the parameters."""
        lo, hi = (float(v) for v in self.energy_window_kev)
        if not hi > lo:
            raise ValueError(f"energy_window_kev must be (low, high) with high > low; got {self.energy_window_kev}")
        if self.channel_width_kev <= 0 or int(self.rebin) < 1:
            raise ValueError("channel_width_kev must be > 0 and rebin >= 1")
        e = float(self.energy_offset_kev) + np.arange(int(self.n_channels)) * float(self.channel_width_kev)
        # a small tolerance so a window edge that falls on a channel centre is not lost to rounding
        tol = 1e-9 * float(self.channel_width_kev)
        idx = np.flatnonzero((e >= lo - tol) & (e < hi - tol))
        r = int(self.rebin)
        n_keep = (idx.size // r) * r
        if n_keep == 0:
            raise ValueError(f"energy window {self.energy_window_kev} keeps no channel")
        start = int(idx[0])
        self.channel_slice_ = slice(start, start + n_keep)
        self.n_features_out_ = n_keep // r
        self.energies_kev_ = e[self.channel_slice_].reshape(-1, r).mean(axis=1)
        if spectra is not None:
            self._check(spectra)
        return self

    def _check(self, spectra: np.ndarray) -> np.ndarray:
        spectra = np.asarray(spectra)
        if spectra.ndim == 1:
            spectra = spectra[np.newaxis]
        if spectra.ndim != 2 or spectra.shape[1] != int(self.n_channels):
            raise ValueError(f"spectra must have shape (n, {self.n_channels}); got {spectra.shape}")
        return spectra

    def transform(self, spectra: np.ndarray) -> np.ndarray:
        """Reduce spectra (n, n_channels) (or one spectrum) to (n, n_features_out_) float32."""
        if not hasattr(self, "n_features_out_"):
            self.fit()
        spectra = self._check(spectra)
        cut = spectra[:, self.channel_slice_]
        r = int(self.rebin)
        return cut.reshape(cut.shape[0], -1, r).sum(axis=2, dtype=np.float64).astype(np.float32)
