"""Convergent-beam patterns of Co2FeSi / Si on the [1-10] zone: reflections, two-beam intensities,
and the noiseless disc and background templates a phantom combines per scan position.

Conventions (docs/phantom.md): reflections (h, h, l); detector x along [001]*, y along [110]*;
``g = (l / a, sqrt(2) h / a)`` in 1/A; a reflection sits at ``lambda * |g| / scale`` pixels from
the pattern centre. Disc templates have value 1 inside the disc (a 0.5 px point spread softens the
rim) and are split into two ramp halves along g, ``(1 - x) / 2`` and ``(1 + x) / 2`` with ``x`` the
position across the disc in units of its radius, so a position's excitation error can tilt the
intensity across the disc (bending) while every template stays non-negative.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

logger = logging.getLogger(__name__)

__all__ = [
    "WAVELENGTH_A",
    "GAMMA_200KV",
    "Reflection",
    "zone_reflections",
    "structure_factor",
    "extinction_distance_a",
    "two_beam",
    "disc_template",
    "radial_template",
]

#: relativistic electron wavelength at 200 kV (A)
WAVELENGTH_A = 0.025079
#: relativistic mass factor at 200 kV (scales the extinction distance)
GAMMA_200KV = 1.3914

# kinematic |F| (A) of the 16-atom Co2FeSi cell on the [1-10] zone (physics.md); intermediate
# and higher orders are interpolated/extrapolated in log|F| against g^2 (Debye-Waller-like fall-off)
_F_TABLE = {
    "fundamental": ((0.502**2, 42.9), (0.709**2, 29.8), (0.869**2, 23.7)),
    "b2": ((0.355**2, 3.61), (0.615**2, 3.72), (0.794**2, 3.30)),
    "l21": ((0.307**2, 3.99), (0.589**2, 3.70), (0.773**2, 3.28)),
}
# diamond Si relative to Co2FeSi: fundamental 8 f_Si, odd 4 sqrt(2) f_Si (f_Si about 2.1 A at 220)
_SI_FUNDAMENTAL_SCALE = 0.40
_SI_ODD_SCALE = 0.40 * 42.9 * 1.06 / 3.99  # F(Si 111) about 1.06 F(Si 220)


@dataclass(frozen=True)
class Reflection:
    """One reflection of a zone-axis pattern."""

    hkl: tuple
    kind: str  # fundamental | b2 | l21 | satellite | si_fundamental | si_odd | si_double
    gx: float  # 1/A, along [001]*
    gy: float  # 1/A, along [110]*
    f_abs: float  # |F| in A (kinematic, 16-atom cell units)

    @property
    def g(self) -> float:
        return float(np.hypot(self.gx, self.gy))


def structure_factor(kind: str, g: float) -> float:
    """Kinematic |F| (A) of a Co2FeSi reflection class at |g| (1/A), from physics.md's table."""
    pts = np.array(_F_TABLE[kind])
    g2 = g * g
    lf = np.log(pts[:, 1])
    if g2 <= pts[0, 0]:
        return float(pts[0, 1])
    if g2 >= pts[-1, 0]:
        slope = (lf[-1] - lf[-2]) / (pts[-1, 0] - pts[-2, 0])
        return float(np.exp(lf[-1] + slope * (g2 - pts[-1, 0])))
    return float(np.exp(np.interp(g2, pts[:, 0], lf)))


def extinction_distance_a(f_abs: float, a: float) -> float:
    """Two-beam extinction distance ``pi V / (lambda gamma |F|)`` in A (220 of Co2FeSi: ~38 nm)."""
    return float(np.pi * a**3 / (WAVELENGTH_A * GAMMA_200KV * max(f_abs, 1e-6)))


def two_beam(t_a, s, xi_a):
    """Two-beam diffracted intensity ``sin^2(pi t s_eff) / (xi s_eff)^2`` (t, s, xi in A, 1/A)."""
    s_eff = np.sqrt(np.asarray(s, dtype=np.float64) ** 2 + 1.0 / xi_a**2)
    return np.sin(np.pi * np.asarray(t_a) * s_eff) ** 2 / (xi_a * s_eff) ** 2


def zone_reflections(a: float, g_max: float, *, silicon: bool = False) -> list[Reflection]:
    """All allowed (h, h, l) reflections with 0 < |g| <= g_max of Co2FeSi (or Si if ``silicon``)."""
    out = []
    hmax = int(np.ceil(g_max * a / np.sqrt(2))) + 1
    lmax = int(np.ceil(g_max * a)) + 1
    for h in range(-hmax, hmax + 1):
        for l in range(-lmax, lmax + 1):
            if h == 0 and l == 0:
                continue
            gx, gy = l / a, np.sqrt(2) * h / a
            g = float(np.hypot(gx, gy))
            if g > g_max:
                continue
            even = h % 2 == 0 and l % 2 == 0
            odd = h % 2 == 1 and l % 2 == 1
            if even and (2 * h + l) % 4 == 0:
                f = structure_factor("fundamental", g)
                kind = "si_fundamental" if silicon else "fundamental"
                if silicon:
                    f *= _SI_FUNDAMENTAL_SCALE
            elif even:
                if silicon:  # kinematically forbidden; on-zone double diffraction
                    kind, f = "si_double", 0.15 * structure_factor("fundamental", g) * _SI_FUNDAMENTAL_SCALE
                else:
                    kind, f = "b2", structure_factor("b2", g)
            elif odd:
                if silicon:
                    kind, f = "si_odd", structure_factor("l21", g) * _SI_ODD_SCALE
                else:
                    kind, f = "l21", structure_factor("l21", g)
            else:
                continue
            out.append(Reflection((h, h, l), kind, gx, gy, f))
    return out


def disc_template(
    shape: tuple, centre: tuple, radius: float, direction: tuple | None, psf_sigma: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A soft-edged disc on a local patch: (flat pixel indices, ramp-low values, ramp-high values).

    ``direction`` is the unit vector (dy, dx) of g; ``None`` returns the whole disc in the first
    channel and zeros in the second (the direct beam).
    """
    ny, nx = shape
    cy, cx = centre
    pad = int(np.ceil(radius + 4 * psf_sigma + 2))
    y0, y1 = max(int(np.floor(cy)) - pad, 0), min(int(np.ceil(cy)) + pad + 1, ny)
    x0, x1 = max(int(np.floor(cx)) - pad, 0), min(int(np.ceil(cx)) + pad + 1, nx)
    if y0 >= y1 or x0 >= x1:
        return np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.float32)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    r = np.hypot(dy, dx)
    disc = np.clip(radius - r + 0.5, 0.0, 1.0)
    if psf_sigma > 0:
        disc = gaussian_filter(disc, psf_sigma, mode="constant")
    if direction is None:
        lo, hi = disc, np.zeros_like(disc)
    else:
        x = np.clip((dy * direction[0] + dx * direction[1]) / radius, -1.0, 1.0)
        lo, hi = disc * (1 - x) / 2, disc * (1 + x) / 2
    keep = disc > 1e-4
    idx = (yy[keep].astype(np.int64) * nx + xx[keep].astype(np.int64)).astype(np.int32)
    return idx, lo[keep].astype(np.float32), hi[keep].astype(np.float32)


def radial_template(shape: tuple, centre: tuple, profile) -> np.ndarray:
    """A full-frame template ``profile(r)`` of the distance r (px) from ``centre``."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    return np.asarray(profile(np.hypot(yy - centre[0], xx - centre[1])), dtype=np.float64)
