"""Pictures for the live view: cluster colours, the membership map as RGBA, and a stdlib PNG encoder.

The map follows the paper's Fig. 4: hue says which cluster a position belongs to (its arg-max
membership), brightness says how sure (its maximum membership). Positions not yet scanned (label
``-1``, or a membership row of NaN) are fully transparent, so the page's background pattern shows
through and "not yet" is never confused with "dark = uncertain".

The PNG encoder is zlib + struct (no filter, level 1): on a 256 x 256 worst-case (noisy) map it took
about 2.2 ms and 99 kB, against 15 ms at zlib level 6 (95 kB) and 21 ms for matplotlib's ``imsave``
(195 kB) on this project's 2-core machine (docs/liveview.md has the figures).

Examples
--------
>>> import numpy as np
>>> from streamclust.app.liveview_render import cluster_palette, render_rgba, encode_png
>>> labels = np.array([[0, 1], [-1, 1]])
>>> rgba = render_rgba(labels, None, (2, 2), cluster_palette(2))
>>> rgba[1, 0].tolist(), int(rgba[0, 0, 3])
([0, 0, 0, 0], 255)
>>> encode_png(rgba)[:8]
b'\\x89PNG\\r\\n\\x1a\\n'
"""

from __future__ import annotations

import colorsys
import math
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["cluster_palette", "render_rgba", "encode_png", "labels_and_confidence", "finite_or_none", "jsonable",
           "json_ready", "rounded"]

# Okabe-Ito-like, distinguishable by most colour-blind viewers and bright enough to be scaled
# down by membership; beyond these, hues are spread by the golden angle.
_BASE_PALETTE = (
    (230, 159, 0),    # orange
    (86, 180, 233),   # sky blue
    (0, 158, 115),    # bluish green
    (240, 228, 66),   # yellow
    (204, 121, 167),  # reddish purple
    (213, 94, 0),     # vermillion
    (0, 114, 178),    # blue
    (255, 255, 255),  # white
)


def cluster_palette(n_clusters: int) -> np.ndarray:
    """Colours of clusters ``0 .. n_clusters - 1`` as an ``(n_clusters, 3)`` uint8 array.

    Parameters
    ----------
    n_clusters : int
        At least 1.

    Returns
    -------
    ndarray of shape (n_clusters, 3), uint8

    Examples
    --------
    >>> cluster_palette(3).tolist()
    [[230, 159, 0], [86, 180, 233], [0, 158, 115]]
    >>> cluster_palette(12).shape
    (12, 3)
    """
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    colours = list(_BASE_PALETTE[:n_clusters])
    k = 0
    while len(colours) < n_clusters:
        h = (k * 0.618033988749895 + 0.1) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.65, 1.0)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
        k += 1
    return np.asarray(colours, dtype=np.uint8)


def labels_and_confidence(labels: np.ndarray | None, memberships: np.ndarray | None,
                          n_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-position cluster (-1 = unknown) and brightness in [0, 1] from whatever the engine gave.

    ``labels`` win where both are given (the engine may hold a label while a membership row is being
    recomputed); brightness is the maximum membership, or 1 when only labels are known.

    Parameters
    ----------
    labels : ndarray (n_positions,) int or None
    memberships : ndarray (n_positions, n_clusters) float or None
        Rows of NaN are positions not yet clustered.
    n_positions : int

    Returns
    -------
    labels : ndarray (n_positions,) int64
    confidence : ndarray (n_positions,) float32
    """
    if memberships is not None:
        u = np.asarray(memberships, dtype=np.float32)
        known = np.isfinite(u).all(axis=1)
        conf = np.where(known, np.max(np.where(np.isfinite(u), u, 0.0), axis=1), 0.0).astype(np.float32)
        if labels is None:
            lab = np.where(known, np.argmax(np.where(np.isfinite(u), u, -np.inf), axis=1), -1)
        else:
            lab = np.asarray(labels, dtype=np.int64).reshape(-1)
            conf = np.where(known, conf, 1.0).astype(np.float32)
    elif labels is not None:
        lab = np.asarray(labels, dtype=np.int64).reshape(-1)
        conf = np.ones(n_positions, dtype=np.float32)
    else:
        lab = np.full(n_positions, -1, dtype=np.int64)
        conf = np.zeros(n_positions, dtype=np.float32)
    return lab.astype(np.int64, copy=False), np.clip(conf, 0.0, 1.0)


def render_rgba(labels: np.ndarray | None, memberships: np.ndarray | None,
                scan_shape: tuple[int, int], palette: np.ndarray) -> np.ndarray:
    """The membership map, one pixel per scan position: ``(ny, nx, 4)`` uint8 RGBA.

    Parameters
    ----------
    labels : ndarray (ny * nx,) or (ny, nx) int or None
        -1 = not yet scanned.
    memberships : ndarray (ny * nx, n_clusters) float or None
        Brightness = maximum membership (Fig. 4 of the paper).
    scan_shape : (int, int)
    palette : ndarray (n_clusters, 3) uint8

    Returns
    -------
    ndarray (ny, nx, 4) uint8
        Alpha is 0 where the position has no cluster yet, 255 elsewhere.

    Examples
    --------
    >>> import numpy as np
    >>> pal = cluster_palette(2)
    >>> u = np.array([[1.0, 0.0], [0.25, 0.75], [np.nan, np.nan], [0.5, 0.5]])
    >>> render_rgba(None, u, (2, 2), pal)[0].tolist()
    [[230, 159, 0, 255], [64, 135, 175, 255]]
    """
    ny, nx = scan_shape
    n = ny * nx
    lab, conf = labels_and_confidence(labels, memberships, n)
    rgba = np.zeros((n, 4), dtype=np.uint8)
    known = (lab >= 0) & (lab < len(palette))
    colour = palette[lab[known]].astype(np.float32) * conf[known, None]
    rgba[known, :3] = np.rint(colour).astype(np.uint8)
    rgba[known, 3] = 255
    return rgba.reshape(ny, nx, 4)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(rgba: np.ndarray, level: int = 1) -> bytes:
    """Encode an ``(h, w, 4)`` uint8 image as PNG (8-bit RGBA, no filter) with the stdlib only.

    Parameters
    ----------
    rgba : ndarray (h, w, 4) uint8
    level : int, default=1
        zlib level: 1 is several times faster than 6 for a few % more bytes on these maps.

    Returns
    -------
    bytes
    """
    rgba = np.asarray(rgba)
    if rgba.ndim != 3 or rgba.shape[2] != 4 or rgba.dtype != np.uint8:
        raise ValueError(f"expected an (h, w, 4) uint8 image, got {rgba.shape} {rgba.dtype}")
    h, w, _ = rgba.shape
    if h < 1 or w < 1:
        raise ValueError(f"PNG needs at least one pixel, got {h} x {w}")
    raw = np.empty((h, w * 4 + 1), dtype=np.uint8)
    raw[:, 0] = 0  # filter type "None" on every row: the map is flat colour, zlib does the rest
    raw[:, 1:] = rgba.reshape(h, w * 4)
    header = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw.tobytes(), level)) + _chunk(b"IEND", b""))


# ---------------------------------------------------------------------- evidence behind a flag
# Element lines marked on the page's spectra (keV; K-alpha, as the flag test's windows).
DEFAULT_LINES_KEV = (("Si Ka", 1.740), ("Fe Ka", 6.404), ("Co Ka", 6.930))


def fe_co_with_uncertainty(mean_spectrum: np.ndarray, n_positions: int, energy_axis_kev: np.ndarray) -> dict:
    """Fe/Co K-alpha ratio of a centre spectrum with its Poisson standard deviation.

    The centre spectrum is a (weighted) mean; the counts behind it are about ``mean * n`` (as
    :func:`streamclust.engine.centres.centre_signals` does for the SNR), so the uncertainty is that of the
    summed spectrum. ``sigma`` propagates the two net counts' variances to first order and treats them
    as independent (the Fe K-beta strip couples them a little: ``co`` carries ~0.1 of ``fe``'s
    variance), which is what the operator needs to tell 0.5 from 2.

    Returns ``{"ratio", "sigma", "fe_net", "co_net", "fe_snr"}`` (None where undefined).
    """
    from streamclust.engine.centres import fe_co_lines  # centres imports nothing of the live view

    n = max(int(n_positions), 1)
    li = fe_co_lines(np.asarray(mean_spectrum, dtype=np.float64) * n, energy_axis_kev)
    fe, co = float(li.fe_net), float(li.co_net)
    sf, sc = float(li.fe_sigma), float(li.co_sigma)
    if co <= 0 or fe <= 0:
        ratio = sigma = None
    else:
        ratio = fe / co
        sigma = ratio * float(np.hypot(sf / fe, sc / co))
    return {"ratio": ratio, "sigma": sigma, "fe_net": fe / n, "co_net": co / n,
            "fe_snr": fe / sf if sf > 0 else None}


def spectrum_for_plot(spectrum: np.ndarray, energy_axis_kev: np.ndarray, lo_kev: float = 0.2,
                      hi_kev: float = 10.0, max_points: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """``(energy, counts)`` of ``spectrum`` between ``lo_kev`` and ``hi_kev``, summed in bins so that
    at most ``max_points`` remain (a 512-px wide plot shows no more; the JSON stays a few kB).
    Counts are per original channel (the bin mean), so rebinned spectra compare with unbinned ones."""
    e = np.asarray(energy_axis_kev, dtype=np.float64)
    s = np.asarray(spectrum, dtype=np.float64)
    i0, i1 = (int(v) for v in np.searchsorted(e, (lo_kev, hi_kev)))
    i1 = max(i1, i0 + 1)
    f = max(1, -(-(i1 - i0) // max_points))
    m = (i1 - i0) // f * f
    if m == 0:
        return e[i0:i1], s[i0:i1]
    return e[i0:i0 + m].reshape(-1, f).mean(axis=1), s[i0:i0 + m].reshape(-1, f).mean(axis=1)


def bright_field_mask(mean_pattern: np.ndarray) -> np.ndarray:
    """The virtual bright-field detector for patterns like ``mean_pattern`` (h, w): the pixels
    above half the maximum of the mean pattern (the direct beam's disc; in a diffraction pattern
    nothing else is that bright on average), or the central quarter when the mean is flat/empty."""
    p = np.asarray(mean_pattern, dtype=np.float64)
    top = float(np.nanmax(p)) if p.size and np.isfinite(p).any() else 0.0
    if top <= 0:
        h, w = p.shape
        mask = np.zeros(p.shape, bool)
        mask[h // 4: h - h // 4, w // 4: w - w // 4] = True
        return mask
    return np.nan_to_num(p) > 0.5 * top


def render_gray_rgba(values: np.ndarray, scan_shape: tuple[int, int]) -> np.ndarray:
    """A grey image (ny, nx, 4) uint8 of ``values`` (n,) scaled between its 1st and 99th
    percentile; NaN (not scanned) is transparent."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    known = np.isfinite(v)
    rgba = np.zeros((v.size, 4), np.uint8)
    if known.any():
        lo, hi = np.percentile(v[known], (1, 99))
        g = np.clip((v[known] - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
        rgba[known, :3] = np.rint(40 + 215 * g).astype(np.uint8)[:, None]
        rgba[known, 3] = 255
    return rgba.reshape(*scan_shape, 4)


# ---------------------------------------------------------------------------------------------
# JSON for the page (state.json, evidence.json, position.json)
# ---------------------------------------------------------------------------------------------
def finite_or_none(value: Any) -> Any:
    """NaN and infinities become null: browsers' ``JSON.parse`` rejects them."""
    if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
        return None
    return value


def jsonable(obj: Any) -> Any:
    """``json.dumps`` fallback for NumPy scalars and arrays in flags and counters."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def json_ready(obj: Any) -> Any:
    """A JSON-ready copy of nested dicts/lists/arrays with NaN and infinities as None."""
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [json_ready(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    return finite_or_none(obj)


def rounded(a: np.ndarray, digits: int = 4) -> list:
    """Array as a nested list with ``digits`` significant figures and NaN as None: the page needs
    no more, and the JSON is a third of full precision's."""
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(np.isfinite(a) & (a != 0), 10 ** (digits - 1 - np.floor(np.log10(np.abs(a)))), 1.0)
        r = np.round(a * mag) / mag
    return json_ready(r)
