"""A FIB lamella of a Co2FeSi film on Si, scanned in 4D-STEM with simultaneous EDS.

Modelled on Duran et al. 2023: a Co2FeSi Heusler film on Si(110), viewed along [1-10], with a
B2-ordered matrix and embedded Fe-richer second-phase inclusions whose patterns carry extra faint
reflections (L21-type odd reflections and satellites at G +/- q, q = 1/3(2 2 -2)*), under an
amorphous carbon and Pt/Pd capping layer. The raster scan starts (row 0) in the Si substrate and
ends in the capping layer. Every position's signal is the thickness-weighted mixture of the phases
the beam crosses; the ground truth (phase fractions, majority label, second-phase mask) is exact.

At per-position counts the matrix and the second phase differ only weakly in EDS (about 35
counts a spectrum) and, in the patterns, only in faint superlattice discs (well under 1 % of a
220 disc) under strong bending contrast. How hard that makes them to separate with the paper's
batch pipeline is measured, not assumed (docs/phantom.md, tests/test_reference.py): on the film
the defaults reproduce the paper's claim that only the merged signals find the second phase.

Frames are exact Poisson fields sampled sparsely (:mod:`streamclust.simulators.phantom_kernels`):
thousands of quad frames a second on one core. Each frame and spectrum depends only on
``(seed, position)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from scipy.ndimage import gaussian_filter

from streamclust.simulators import diffraction as dif
from streamclust.simulators import phantom_kernels as pk
from streamclust.simulators import xray

logger = logging.getLogger(__name__)

__all__ = ["Phase", "GroundTruth", "LamellaPhantom", "COUNTER_SATURATION"]

#: counter depth (bits) -> saturation value of a Medipix3 counter
COUNTER_SATURATION = {1: 1, 6: 63, 12: 4095, 24: 16_777_215}
_COUNTER_DTYPE = {1: np.uint8, 6: np.uint8, 12: np.uint16, 24: np.uint32}
_ELECTRON_CHARGE = 1.602176634e-19


@dataclass(frozen=True)
class Phase:
    """One phase of the lamella.

    Attributes
    ----------
    name : str
        Label name, as in ``truth.label_names``.
    label : int
        Index in ``truth.label_names``.
    composition : Mapping[str, float]
        Atomic fractions (sum 1).
    lattice_a : float or None
        Cubic lattice parameter in A (None for amorphous/nanocrystalline layers).
    ordering : str
        Structure as simulated (e.g. ``"B2"``, ``"L21/D03 + satellites G +/- q"``).
    """

    name: str
    label: int
    composition: MappingProxyType
    lattice_a: float | None
    ordering: str

    @property
    def fe_co_ratio(self) -> float:
        """True Fe/Co atomic ratio (``nan`` without Co)."""
        co = self.composition.get("Co", 0.0)
        return float(self.composition.get("Fe", 0.0) / co) if co > 0 else float("nan")


@dataclass(frozen=True)
class GroundTruth:
    """Exact per-position truth of a phantom (arrays are read-only, shape ``scan_shape``)."""

    labels: np.ndarray
    label_names: tuple
    fractions: dict
    second_phase: np.ndarray
    thickness_nm: np.ndarray = field(repr=False)
    tilt_mrad: np.ndarray = field(repr=False)  # (2, ny, nx): tilt about x ([001]*) and y
    #: path fraction through L21-ordered domains of the matrix (part of ``cfs_matrix``: same
    #: composition, but 111-type discs like the second phase)
    matrix_l21: np.ndarray = field(default=None, repr=False)
    #: path fraction through Fe-enriched B2 zones of the matrix (part of ``cfs_matrix``:
    #: B2 patterns like the matrix, but the second phase's composition)
    matrix_fe_rich: np.ndarray = field(default=None, repr=False)


def _smooth_field(rng: np.random.Generator, shape: tuple, sigma: float) -> np.ndarray:
    """A smooth random field with zero mean and unit maximum modulus."""
    f = gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    f -= f.mean()
    m = np.abs(f).max()
    return f / m if m > 0 else f


class LamellaPhantom:
    """A scan across a Co2FeSi/Si FIB lamella: CBED frames and EDS spectra with exact ground truth.

    Parameters
    ----------
    scan_shape : (int, int)
        Scan positions (ny, nx); positions are 0-based row-major raster indices.
    seed : int
        Sample seed: geometry, thickness, bending and every count derive from it.
    frame_shape : (int, int)
        Detector frame (512, 512: Merlin quad; its wide central-cross pixels are modelled).
    counter_depth : {1, 6, 12, 24}
        Counter depth; frames saturate at 1 / 63 / 4095 / 16,777,215.
    dwell_s : float
        Dwell time a position (s); scales frame and EDS counts.
    beam_current_pa : float
        Probe current (pA). With ``detector_efficiency`` it fixes the counts: about 800 counts a
        direct-beam pixel at 5 pA and 10 ms in vacuum (physics.md); the default 4 pA gives about
        400 in the 60 nm film.
    detector_efficiency : float
        Counted fraction of electrons.
    n_inclusions : int
        Second-phase inclusions (0: a single-phase film). ``inclusions`` is an alias.
    inclusion_radius : (float, float)
        Range of inclusion radii in scan positions for a 128-position-wide scan (scaled with nx).
    inclusion_depth : (float, float)
        Range of the fraction of the lamella thickness an inclusion fills (< 1: partly through).
    n_l21_domains : int
        L21-ordered domains of the matrix (same composition as the matrix, same 111-type discs
        as the second phase; sized like the inclusions). They are matrix in the truth labels and
        recorded in ``truth.matrix_l21``.
    n_fe_rich_zones : int
        Fe-enriched B2 zones of the matrix (the second phase's composition, the matrix's
        patterns); matrix in the labels, recorded in ``truth.matrix_fe_rich``.
    thickness_nm, thickness_variation_nm : float
        Mean lamella thickness, and the amplitude of its smooth variation plus a wedge
        (default 20 nm: a FIB lamella varies by about +-30 % over a few microns).
    bending_mrad : float
        Largest local tilt from the zone axis (lamella bending), 1-5 mrad realistic; the
        default 5 mrad (a strongly bent lamella) makes orientation the dominant variation of
        the patterns, as in the paper.
    superlattice_scale : float
        Multiplies the B2/L21 superlattice amplitudes (long-range order parameter S; 1 = full
        order, about 1 % of the 220 intensity). Default 0.64 (S = 0.64, intensities x 0.41):
        partial order, as in sputtered Heusler films.
    satellite_ratio : float
        Intensity of a G +/- q satellite of the second phase relative to the 220 disc
        (default 0.29 %).
    matrix_composition, second_phase_composition : dict
        Atomic fractions. Defaults Co2FeSi (Fe/Co 0.5) and an Fe-rich Fe2.4Co0.6Si-like phase
        (Fe 0.6, Co 0.15, Si 0.25: Fe/Co 4).
    eds_k_counts : float
        Expected Fe+Co+Si K-line counts of a 60 nm Co2FeSi spectrum at the default 4 pA and
        10 ms (default 22: about 35 counts a spectrum in total); scales linearly with current,
        dwell and thickness. physics.md's scale is about 5 at 30 pA and 10 ms (12 at 25 ms);
        the default assumes a large-solid-angle (multi-detector) collection at the lower
        current that keeps 12-bit frames unsaturated; spectra stay sparse (tens of counts).
    n_channels, channel_width_kev, energy_offset_kev : int, float, float
        EDS energy axis: channel i is centred at ``offset + (i + 0.5) * width``.
    descan_drift_px : float
        Slow drift of the pattern centre over the whole scan (pixels; rounded to whole pixels).
    mrad_per_px, convergence_mrad, psf_sigma_px : float
        Detector calibration (0.15 mrad/px), probe semi-angle (1.5 mrad: 10 px discs), point
        spread.
    dead_fraction : float
        Fraction of dead pixels (fixed per ``detector_seed``).
    n_hot_pixels : int
        Hot pixels (fixed per ``detector_seed``), ``hot_pixel_rate_hz`` counts a second each.
    detector_seed : int
        Seed of the detector's fixed defects (independent of the sample seed).
    dense_threshold : float
        Mean counts a pixel above which a component is sampled pixel by pixel rather than by
        superposition (a speed setting; both are exact).

    Examples
    --------
    >>> from streamclust.simulators.phantom import LamellaPhantom
    >>> ph = LamellaPhantom(scan_shape=(16, 16), seed=1)
    >>> ph.n_positions, ph.frame_shape, ph.frame_dtype
    (256, (512, 512), <class 'numpy.uint16'>)
    >>> f = ph.frame(37)
    >>> bool((f == ph.frame(37)).all()) and int(f.max()) <= 4095
    True
    >>> ph.spectrum(37).shape
    (2048,)
    >>> ph.truth.label_names
    ('si', 'cfs_matrix', 'cfs_second', 'carbon', 'ptpd')
    """

    def __init__(
        self,
        scan_shape: tuple = (128, 128),
        seed: int = 0,
        *,
        frame_shape: tuple = (512, 512),
        counter_depth: int = 12,
        dwell_s: float = 0.01,
        beam_current_pa: float = 4.0,
        detector_efficiency: float = 0.8,
        n_inclusions: int | None = None,
        inclusions: int | None = None,
        inclusion_radius: tuple = (3.0, 10.0),
        inclusion_depth: tuple = (0.6, 1.0),
        n_l21_domains: int = 0,
        n_fe_rich_zones: int = 0,
        thickness_nm: float = 60.0,
        thickness_variation_nm: float = 20.0,
        bending_mrad: float = 5.0,
        superlattice_scale: float = 0.64,
        satellite_ratio: float = 0.0029,
        matrix_composition: dict | None = None,
        second_phase_composition: dict | None = None,
        eds_k_counts: float = 22.0,
        n_channels: int = 2048,
        channel_width_kev: float = 0.01,
        energy_offset_kev: float = 0.0,
        descan_drift_px: float = 2.0,
        mrad_per_px: float = 0.15,
        convergence_mrad: float = 1.5,
        psf_sigma_px: float = 0.5,
        dead_fraction: float = 2e-4,
        n_hot_pixels: int = 6,
        hot_pixel_rate_hz: float = 2e5,
        detector_seed: int = 0,
        dense_threshold: float = 1.0,
    ):
        ny, nx = (int(v) for v in scan_shape)
        if ny < 1 or nx < 1 or ny * nx >= 1 << 24:
            raise ValueError(f"scan_shape must be positive with < 2**24 positions, got {scan_shape}")
        fy, fx = (int(v) for v in frame_shape)
        if fy < 16 or fx < 16:
            raise ValueError(f"frame_shape must be at least 16x16, got {frame_shape}")
        if counter_depth not in COUNTER_SATURATION:
            raise ValueError(f"counter_depth must be one of 1, 6, 12, 24, got {counter_depth}")
        if dwell_s <= 0 or beam_current_pa < 0:
            raise ValueError("dwell_s must be > 0 and beam_current_pa >= 0")
        if n_inclusions is not None and inclusions is not None and n_inclusions != inclusions:
            raise ValueError("give n_inclusions or inclusions, not two different values")
        n_inc = n_inclusions if n_inclusions is not None else inclusions
        n_inc = 8 if n_inc is None else int(n_inc)
        if n_inc < 0:
            raise ValueError("n_inclusions must be >= 0")
        if n_channels < 1 or channel_width_kev <= 0:
            raise ValueError("n_channels must be >= 1 and channel_width_kev > 0")

        self.scan_shape = (ny, nx)
        self.n_positions = ny * nx
        self.seed = int(seed)
        self.frame_shape = (fy, fx)
        self.counter_depth = int(counter_depth)
        self.frame_dtype = _COUNTER_DTYPE[self.counter_depth]
        self.saturation = COUNTER_SATURATION[self.counter_depth]
        self.dwell_s = float(dwell_s)
        self.beam_current_pa = float(beam_current_pa)
        self.n_inclusions = n_inc
        self.n_channels = int(n_channels)
        self.channel_width_kev = float(channel_width_kev)
        self.energy_offset_kev = float(energy_offset_kev)
        self.energy_axis_kev = self.energy_offset_kev + (np.arange(self.n_channels) + 0.5) * self.channel_width_kev
        self.spectrum_dtype = np.uint16
        self._dense_threshold = float(dense_threshold)
        self.options = MappingProxyType(
            dict(
                detector_efficiency=detector_efficiency, inclusion_radius=tuple(inclusion_radius),
                inclusion_depth=tuple(inclusion_depth), n_l21_domains=n_l21_domains,
                n_fe_rich_zones=n_fe_rich_zones,
                thickness_nm=thickness_nm,
                thickness_variation_nm=thickness_variation_nm, bending_mrad=bending_mrad,
                superlattice_scale=superlattice_scale, satellite_ratio=satellite_ratio,
                eds_k_counts=eds_k_counts, descan_drift_px=descan_drift_px,
                mrad_per_px=mrad_per_px, convergence_mrad=convergence_mrad,
                psf_sigma_px=psf_sigma_px, dead_fraction=dead_fraction,
                n_hot_pixels=n_hot_pixels, hot_pixel_rate_hz=hot_pixel_rate_hz,
                detector_seed=detector_seed,
            )
        )
        matrix = dict(matrix_composition or {"Co": 0.5, "Fe": 0.25, "Si": 0.25})
        second = dict(second_phase_composition or {"Fe": 0.6, "Co": 0.15, "Si": 0.25})
        comps = (
            ("si", {"Si": 0.98, "O": 0.02}, 5.431, "diamond"),
            ("cfs_matrix", matrix, 5.64, "B2"),
            ("cfs_second", second, 5.64, "L21/D03 + satellites G +/- q, q = 1/3(2 2 -2)*"),
            ("carbon", {"C": 0.97, "O": 0.03}, None, "amorphous"),
            ("ptpd", {"Pt": 0.6, "Pd": 0.2, "C": 0.2}, None, "nanocrystalline"),
        )
        phases = []
        for i, (name, comp, a, ordering) in enumerate(comps):
            tot = sum(comp.values())
            if tot <= 0 or any(v < 0 for v in comp.values()):
                raise ValueError(f"composition of {name} must be non-negative with a positive sum")
            norm = MappingProxyType({k: v / tot for k, v in comp.items()})
            phases.append(Phase(name, i, norm, a, ordering))
        self.phases = tuple(phases)

        rng = np.random.default_rng([self.seed, 0x1A4E11A])
        self._build_geometry(rng)
        self._build_frame_model()
        self._build_spectrum_model()
        logger.debug(
            "phantom seed=%d scan=%s: %d frame components, %d bright-support pixels",
            self.seed, self.scan_shape, self._ptr.shape[0] - 1, self._py.shape[0],
        )

    # ------------------------------------------------------------------ geometry and truth
    def _build_geometry(self, rng: np.random.Generator) -> None:
        o = self.options
        ny, nx = self.scan_shape
        yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
        scale = nx / 128.0
        # interfaces (rows) with a little roughness along x
        rough = _smooth_field(rng, (1, nx), max(nx / 16, 1.0))[0]
        b_sub = 0.12 * ny + 0.6 * scale * rough
        b_cap = 0.86 * ny + 0.5 * scale * _smooth_field(rng, (1, nx), max(nx / 16, 1.0))[0]
        b_pt = 0.92 * ny + 0.5 * scale * _smooth_field(rng, (1, nx), max(nx / 16, 1.0))[0]
        si = np.clip(b_sub[None, :] - yy + 0.5, 0, 1)
        below_cap = np.clip(b_cap[None, :] - yy + 0.5, 0, 1)
        below_pt = np.clip(b_pt[None, :] - yy + 0.5, 0, 1)
        ptpd = 1 - below_pt
        carbon = below_pt - below_cap
        film = np.clip(below_cap - si, 0, 1)

        # inclusions: columnar grains with a soft rim, some only partly through the thickness
        incl = np.zeros((ny, nx))
        r_lo, r_hi = (float(v) * scale for v in o["inclusion_radius"])
        d_lo, d_hi = o["inclusion_depth"]
        self.inclusion_table = []
        for _ in range(self.n_inclusions):
            r = float(rng.uniform(r_lo, r_hi))
            ry, rx = r * rng.uniform(0.75, 1.25), r * rng.uniform(0.75, 1.25)
            cy = float(rng.uniform(b_sub.max() + ry + 1, b_cap.min() - ry - 1)) if (
                b_cap.min() - b_sub.max() > 2 * ry + 2) else float(0.5 * (b_sub.max() + b_cap.min()))
            cx = float(rng.uniform(0, nx - 1))
            depth = float(rng.uniform(d_lo, d_hi))
            rr = np.hypot((yy - cy) / ry, (xx - cx) / rx) * r
            shape = np.clip(r - rr + 0.5, 0, 1)
            incl = np.maximum(incl, depth * shape)
            self.inclusion_table.append(dict(centre=(cy, cx), radii=(ry, rx), depth=depth))
        second = film * incl
        matrix = film - second
        # L21-ordered domains of the matrix: Co2FeSi composition, yet 111-type discs like the
        # second phase (the ordering varies across real films); they keep clear of inclusions
        dom = np.zeros((ny, nx))
        self.l21_domain_table = []
        for _ in range(int(o["n_l21_domains"])):
            r = float(rng.uniform(r_lo, r_hi))
            ry, rx = r * rng.uniform(0.75, 1.25), r * rng.uniform(0.75, 1.25)
            cy = float(rng.uniform(b_sub.max(), b_cap.min()))
            cx = float(rng.uniform(0, nx - 1))
            rr = np.hypot((yy - cy) / ry, (xx - cx) / rx) * r
            dom = np.maximum(dom, np.clip(r - rr + 0.5, 0, 1))
            self.l21_domain_table.append(dict(centre=(cy, cx), radii=(ry, rx)))
        l21 = matrix * dom * (incl == 0)
        # Fe-enriched B2 zones of the matrix: the second phase's composition, the matrix's
        # structure (off-stoichiometric regions); clear of inclusions and L21 domains
        zon = np.zeros((ny, nx))
        for _ in range(int(o["n_fe_rich_zones"])):
            r = float(rng.uniform(r_lo, r_hi))
            ry, rx = r * rng.uniform(0.75, 1.25), r * rng.uniform(0.75, 1.25)
            cy = float(rng.uniform(b_sub.max(), b_cap.min()))
            cx = float(rng.uniform(0, nx - 1))
            rr = np.hypot((yy - cy) / ry, (xx - cx) / rx) * r
            zon = np.maximum(zon, np.clip(r - rr + 0.5, 0, 1))
        fe_rich = (matrix - l21) * zon * (incl == 0)
        fr = np.stack([si, matrix, second, carbon, ptpd])
        fr = np.clip(fr, 0, None)
        fr /= fr.sum(axis=0, keepdims=True)

        # thickness: a wedge (thicker toward the substrate) plus smooth variation
        t0, dt = float(o["thickness_nm"]), float(o["thickness_variation_nm"])
        wedge = (0.5 - yy / max(ny - 1, 1)) * 0.5
        t = t0 + dt * (wedge + 0.7 * _smooth_field(rng, (ny, nx), max(nx / 10, 1.0)))
        t = np.clip(t, 0.2 * t0, None)
        # bending: a smooth tilt field plus a gentle gradient, largest modulus bending_mrad
        bend = float(o["bending_mrad"])
        tilt = np.stack([
            0.7 * _smooth_field(rng, (ny, nx), max(nx / 8, 1.0)) + 0.3 * (xx / max(nx - 1, 1) - 0.5) * 2,
            0.7 * _smooth_field(rng, (ny, nx), max(nx / 8, 1.0)) + 0.3 * (yy / max(ny - 1, 1) - 0.5) * 2,
        ])
        m = np.abs(tilt).max()
        tilt = tilt / m * bend if m > 0 else tilt

        names = tuple(p.name for p in self.phases)
        ro = []
        for a in (fr, t, tilt, l21, fe_rich):
            a.setflags(write=False)
            ro.append(a)
        labels = np.argmax(fr, axis=0).astype(np.int64)
        sp = fr[2] >= 0.5
        for a in (labels, sp):
            a.setflags(write=False)
        self.truth = GroundTruth(
            labels=labels,
            label_names=names,
            fractions=MappingProxyType({n: fr[i] for i, n in enumerate(names)}),
            second_phase=sp,
            thickness_nm=t,
            tilt_mrad=tilt,
            matrix_l21=l21,
            matrix_fe_rich=fe_rich,
        )
        self._fractions = fr.reshape(len(names), -1)  # (n_phase, n_pos)
        self._thickness = t.reshape(-1)
        self._tilt = tilt.reshape(2, -1)
        self._l21 = l21.reshape(-1)
        self._fe_rich = fe_rich.reshape(-1)

    # ------------------------------------------------------------------ frames
    def _build_frame_model(self) -> None:
        o = self.options
        fy, fx = self.frame_shape
        n_pix = fy * fx
        centre = (fy / 2 - 0.5, fx / 2 - 0.5)
        px_per_inv_a = dif.WAVELENGTH_A / (o["mrad_per_px"] * 1e-3)
        radius = o["convergence_mrad"] / o["mrad_per_px"]
        alpha = o["convergence_mrad"] * 1e-3
        psf = float(o["psf_sigma_px"])
        g_max = (np.hypot(fy, fx) / 2 + radius) / px_per_inv_a
        t_a = self._thickness * 10.0
        t0_a = float(o["thickness_nm"]) * 10.0
        tx, ty = self._tilt * 1e-3  # rad
        fr = self._fractions
        n_pos = self.n_positions
        electrons = self.beam_current_pa * 1e-12 * self.dwell_s / _ELECTRON_CHARGE
        counted = electrons * float(o["detector_efficiency"])

        comps = []  # (idx, va, vb)
        wa_cols, wb_cols = [], []
        scattered = np.zeros(n_pos)
        f220 = dif.structure_factor("fundamental", 0.502)
        i220 = 0.05  # beam fraction in one 220 disc at the reference thickness, on zone
        area = np.pi * radius**2
        t_ref = np.linspace(0.5 * t0_a, 1.5 * t0_a, 33)

        def add_disc(gx, gy, f_abs, a_latt, weight_rows, ratio):
            """A reflection's disc and its per-position intensity (two-beam, ramp across disc)."""
            cy = centre[0] + gy * px_per_inv_a
            cx = centre[1] + gx * px_per_inv_a
            g = float(np.hypot(gx, gy))
            idx, lo, hi = dif.disc_template((fy, fx), (cy, cx), radius, (gy / g, gx / g), psf)
            if idx.size == 0:
                return 0.0
            idx = idx.astype(np.int64)
            xi = dif.extinction_distance_a(f_abs, a_latt)
            norm = float(np.mean(dif.two_beam(t_ref, 0.0, xi)))
            s_c = gx * tx + gy * ty  # excitation error from the local tilt (1/A)
            i_lo = ratio * dif.two_beam(t_a, s_c - g * alpha, xi) / norm
            i_hi = ratio * dif.two_beam(t_a, s_c + g * alpha, xi) / norm
            comps.append((1, idx // fx, idx % fx, lo, hi))
            wa_cols.append(weight_rows * i_lo)
            wb_cols.append(weight_rows * i_hi)
            nonlocal scattered
            scattered = scattered + weight_rows * 0.5 * (i_lo + i_hi)
            return ratio

        sl = float(o["superlattice_scale"])
        cfs = fr[1] + fr[2]
        for r in dif.zone_reflections(5.64, g_max):
            ratio = i220 * (r.f_abs / f220) ** 2
            if r.kind == "fundamental":
                add_disc(r.gx, r.gy, r.f_abs, 5.64, cfs, ratio)
            elif r.kind == "b2":
                add_disc(r.gx, r.gy, r.f_abs * sl, 5.64, cfs, ratio * sl**2)
            elif r.kind == "l21":
                add_disc(r.gx, r.gy, r.f_abs * sl, 5.64, fr[2] + self._l21, ratio * sl**2)
        # satellites of the second phase at G +/- q around 000 and the inner reflections
        q = np.array([-2 / 3 / 5.64, np.sqrt(2) * 2 / 3 / 5.64])  # (gx, gy) of 1/3(2 2 -2)*
        sat = float(o["satellite_ratio"]) * i220
        f_sat = f220 * np.sqrt(float(o["satellite_ratio"]))
        centres = [(0.0, 0.0)] + [
            (r.gx, r.gy) for r in dif.zone_reflections(5.64, 0.9) if r.kind in ("fundamental", "b2")
        ]
        for gx, gy in centres:
            for sgn in (1, -1):
                sx, sy = gx + sgn * q[0], gy + sgn * q[1]
                gs = float(np.hypot(sx, sy))
                fall = np.exp(-0.8 * max(gs**2 - 0.1, 0.0))
                add_disc(sx, sy, f_sat * np.sqrt(fall), 5.64, fr[2], sat * fall)
        for r in dif.zone_reflections(5.431, g_max, silicon=True):
            ratio = i220 * (r.f_abs / f220) ** 2
            add_disc(r.gx, r.gy, r.f_abs, 5.431, fr[0], ratio)

        # diffuse components (beam fractions per position), each a full-frame template
        tt = self._thickness / float(o["thickness_nm"])
        rad_px = np.hypot(*np.mgrid[0:fy, 0:fx].astype(np.float64) - np.array(centre)[:, None, None])
        s_inv_a = rad_px / px_per_inv_a / 2  # s = g / 2
        tds_t = (1 - np.exp(-2 * 0.4 * s_inv_a**2)) / (1 + (s_inv_a / 0.5) ** 2) ** 2
        halo_t = np.clip(rad_px - radius + 1, 0, 1) / (rad_px**2 + (3 * radius) ** 2)
        ring = lambda r0, w: np.exp(-0.5 * ((rad_px - r0 / o["mrad_per_px"]) / w) ** 2)  # noqa: E731
        carbon_t = ring(12.0, 2.2 * radius)
        pt_t = (ring(11.1, 0.6 * radius) + 0.5 * ring(12.8, 0.6 * radius)
                + 0.35 * ring(18.15, 0.6 * radius) + 0.25 * ring(21.3, 0.6 * radius))
        z_tds = np.array([0.005, 0.012, 0.012, 0.002, 0.04])
        diffuse = [
            (tds_t, tt * (z_tds @ fr)),
            (halo_t, tt * (0.008 + 0.01 * fr[3])),
            (carbon_t, tt * 0.03 * fr[3]),
            (pt_t, tt * 0.12 * fr[4]),
        ]
        # full-frame templates are block-constant on b x b blocks (smooth backgrounds): the
        # alias tables shrink b^2-fold and stay in cache; the pixel inside a block is uniform
        blk = 4 if fy % 4 == 0 and fx % 4 == 0 else 1
        for tmpl, frac in diffuse:
            tb = tmpl.reshape(fy // blk, blk, fx // blk, blk).mean(axis=(1, 3))
            tb = tb / (tb.sum() * blk * blk)
            scattered = scattered + frac
            # split into zones of similar value so that bright zones can go pixel by pixel
            z = np.floor(np.log(tb.max() / np.maximum(tb, 1e-300)) / np.log(4.0))
            z = np.minimum(z, 7).reshape(-1)
            flat = tb.reshape(-1)
            for k in np.unique(z):
                idx = np.nonzero((z == k) & (flat > 0))[0]
                if idx.size == 0:
                    continue
                v = flat[idx].astype(np.float32)
                by, bx = np.divmod(idx, fx // blk)
                comps.append((blk, by * blk, bx * blk, v, np.zeros_like(v)))
                wa_cols.append(frac)
                wb_cols.append(np.zeros(n_pos))
        # the direct beam takes what is not scattered (dynamical sums are capped, see docs)
        over = np.maximum(scattered / 0.85, 1.0)
        for i in range(len(wa_cols)):
            wa_cols[i] = wa_cols[i] / over
            wb_cols[i] = wb_cols[i] / over
        direct = np.clip(1.0 - scattered / over, 0.05, 1.0)
        idx, lo, _ = dif.disc_template((fy, fx), centre, radius, None, psf)
        comps.insert(0, (1, idx // fx, idx % fx, lo, np.zeros_like(lo)))
        wa_cols.insert(0, direct)
        wb_cols.insert(0, np.zeros(n_pos))
        # beam fractions -> counts: disc templates are 1 inside, full-frame templates sum to 1
        scale = np.array([counted if c[0] > 1 else counted / area for c in comps])
        self._wa = (np.stack(wa_cols, axis=1) * scale).astype(np.float32)
        self._wb = (np.stack(wb_cols, axis=1) * scale).astype(np.float32)

        n_c = len(comps)
        ptr = np.zeros(n_c + 1, np.int64)
        ptr[1:] = np.cumsum([c[1].size for c in comps])
        self._ptr = ptr
        self._blk = np.array([c[0] for c in comps], np.int64)
        self._py = np.concatenate([c[1] for c in comps]).astype(np.int16)
        self._px = np.concatenate([c[2] for c in comps]).astype(np.int16)
        self._va = np.concatenate([c[3] for c in comps]).astype(np.float32)
        self._vb = np.concatenate([c[4] for c in comps]).astype(np.float32)
        area_of = (self._blk**2).astype(np.float64)
        self._suma = np.array([float(c[3].sum(dtype=np.float64)) for c in comps]) * area_of
        self._sumb = np.array([float(c[4].sum(dtype=np.float64)) for c in comps]) * area_of
        self._proba = np.empty(self._py.size)
        self._aliasa = np.empty(self._py.size, np.int32)
        self._probb = np.empty(self._py.size)
        self._aliasb = np.empty(self._py.size, np.int32)
        for c in range(n_c):
            s = slice(ptr[c], ptr[c + 1])
            self._proba[s], self._aliasa[s] = pk.build_alias(self._va[s].astype(np.float64))
            self._probb[s], self._aliasb[s] = pk.build_alias(self._vb[s].astype(np.float64))
        # per-pixel expansion (component, flat pixel, va, vb): the cross band and expected_frame
        comp_of = np.repeat(np.arange(n_c), np.diff(ptr))
        e_c, e_p, e_a, e_b = [], [], [], []
        for bsz in np.unique(self._blk):
            sel = self._blk[comp_of] == bsz
            for sy in range(bsz):
                for sx in range(bsz):
                    e_c.append(comp_of[sel])
                    e_p.append((self._py[sel].astype(np.int64) + sy) * fx + self._px[sel] + sx)
                    e_a.append(self._va[sel])
                    e_b.append(self._vb[sel])
        self._pix_comp = np.concatenate(e_c)
        self._pix_flat = np.concatenate(e_p)
        self._pix_va = np.concatenate(e_a).astype(np.float64)
        self._pix_vb = np.concatenate(e_b).astype(np.float64)

        # descan drift: slow, whole pixels, along one direction plus a slow wobble
        d = float(o["descan_drift_px"])
        tpos = np.arange(n_pos) / max(n_pos - 1, 1)
        ang = np.random.default_rng([self.seed, 0xD1F7]).uniform(0, 2 * np.pi)
        self._dy = np.rint(d * (tpos * np.sin(ang) + 0.25 * np.sin(2 * np.pi * 3 * tpos))).astype(np.int64)
        self._dx = np.rint(d * (tpos * np.cos(ang) + 0.25 * np.cos(2 * np.pi * 2 * tpos))).astype(np.int64)
        dmax = int(max(np.abs(self._dy).max(initial=0), np.abs(self._dx).max(initial=0)))

        # the quad's central cross: rows/cols 255-256 are about 3x wider (9x at the crossing)
        gain = np.ones((fy, fx))
        if (fy, fx) == (512, 512):
            gain[255:257, :] *= 3.0
            gain[:, 255:257] *= 3.0
        cross = np.nonzero(gain.reshape(-1) > 1)[0]
        self._cross_pix = cross.astype(np.int64)
        self._cross_gm1 = (gain.reshape(-1)[cross] - 1.0).astype(np.float64)
        band = np.zeros((fy, fx), bool)
        if cross.size:
            band[max(255 - dmax, 0):257 + dmax, :] = True
            band[:, max(255 - dmax, 0):257 + dmax] = True
        inb = band.reshape(-1)[self._pix_flat]
        bp, bc = self._pix_flat[inb], self._pix_comp[inb]
        order = np.argsort(bp, kind="stable")
        bp, bc = bp[order], bc[order]
        self._band_comp = bc.astype(np.int64)
        self._band_va = self._pix_va[inb][order]
        self._band_vb = self._pix_vb[inb][order]
        uniq, start = np.unique(bp, return_index=True)
        self._band_ptr = np.append(start, bp.size).astype(np.int64)
        self._band_of = np.full(n_pix, -1, np.int64)
        self._band_of[uniq] = np.arange(uniq.size)

        det = np.random.default_rng([int(o["detector_seed"]), 0xDE7EC7])
        n_dead = int(round(float(o["dead_fraction"]) * n_pix))
        perm = det.permutation(n_pix)
        self._dead = np.sort(perm[:n_dead]).astype(np.int64)
        self._hot = np.sort(perm[n_dead:n_dead + int(o["n_hot_pixels"])]).astype(np.int64)
        self._hot_lambda = float(o["hot_pixel_rate_hz"]) * self.dwell_s
        self._frame_seeds = pk.position_seeds(self.seed, np.arange(n_pos), 1)

    # ------------------------------------------------------------------ spectra
    def _build_spectrum_model(self) -> None:
        o = self.options
        e = self.energy_axis_kev
        w = self.channel_width_kev
        cfs = self.phases[1].composition
        k_ref = xray.k_line_fraction(cfs)  # K-line yield of Co2FeSi per atom
        templates = []
        for ph in self.phases:
            lines = {}
            for (el, line), lw in xray.LINE_WEIGHTS.items():
                if el in ph.composition and el != "Cu":
                    lines[xray.LINES_KEV[(el, line)]] = ph.composition[el] * lw / k_ref
            spec = xray.line_spectrum(e, w, lines)
            mean_z = sum(xray.ATOMIC_NUMBER[el] * f for el, f in ph.composition.items())
            brems = xray.kramers(e, mean_z)
            # continuum about 2.5 counts per 100 counts of lines per keV near 5 keV
            ref = float(xray.kramers(np.array([5.0]), 26.0)[0])
            spec += brems / ref * 0.02 * w
            templates.append(spec)
        templates.append(templates[2].copy())  # Fe-rich B2 zones: the second phase's composition
        templates.append(xray.line_spectrum(e, w, {xray.LINES_KEV[("Cu", "Ka")]: 1.0}))
        tmpl = np.array(templates)
        self._spec_totals = tmpl.sum(axis=1)
        self._spec_prob = np.empty(tmpl.shape)
        self._spec_alias = np.empty(tmpl.shape, np.int32)
        for c in range(tmpl.shape[0]):
            self._spec_prob[c], self._spec_alias[c] = pk.build_alias(tmpl[c])
        self._spec_templates = tmpl
        dose = self.beam_current_pa / 4.0 * self.dwell_s / 0.01 * float(o["eds_k_counts"])
        tt = self._thickness / float(o["thickness_nm"])
        wts = np.empty((self.n_positions, tmpl.shape[0]))
        fr = self._fractions.copy()
        fr[1] -= self._fe_rich
        wts[:, :-2] = (fr * tt * dose).T
        wts[:, -2] = self._fe_rich * tt * dose
        wts[:, -1] = 0.06 * dose * (0.5 + 0.5 * tt)  # Cu grid system peak
        self._spec_w = wts
        self._spec_seeds = pk.position_seeds(self.seed, np.arange(self.n_positions), 2)

    # ------------------------------------------------------------------ public API
    def _check_position(self, position) -> int:
        p = int(position)
        if p != position or not 0 <= p < self.n_positions:
            raise IndexError(f"scan position {position!r} out of range [0, {self.n_positions})")
        return p

    def _check_positions(self, positions) -> np.ndarray:
        pos = np.asarray(positions)
        if pos.ndim != 1 or (pos.size and not np.issubdtype(pos.dtype, np.integer)):
            raise TypeError("positions must be a 1-D sequence of integers")
        pos = pos.astype(np.int64)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n_positions):
            bad = pos[(pos < 0) | (pos >= self.n_positions)][0]
            raise IndexError(f"scan position {bad} out of range [0, {self.n_positions})")
        return pos

    def _frame_args(self):
        return (
            self._ptr, self._blk, self._py, self._px, self._va, self._vb, self._suma, self._sumb,
            self._proba,
            self._aliasa, self._probb, self._aliasb,
        )

    def _detector_args(self):
        return (
            self.frame_shape[0], self.frame_shape[1], self._cross_pix, self._cross_gm1,
            self._band_of, self._band_ptr, self._band_comp, self._band_va, self._band_vb,
            self._dead, self._hot, self._hot_lambda, self.saturation, self._dense_threshold,
        )

    def frame_into(self, position: int, out: np.ndarray) -> np.ndarray:
        """Render the frame of ``position`` into ``out`` (frame_shape, frame_dtype, C-contiguous)."""
        p = self._check_position(position)
        if out.shape != self.frame_shape or out.dtype != self.frame_dtype or not out.flags.c_contiguous:
            raise ValueError(
                f"out must be a C-contiguous {self.frame_shape} {np.dtype(self.frame_dtype).name} "
                f"array, got {out.shape} {out.dtype}"
            )
        pk.render_frame(
            self._frame_seeds[p], out.reshape(-1), self._wa[p], self._wb[p], *self._frame_args(),
            self._dy[p], self._dx[p], *self._detector_args(),
        )
        return out

    def frame(self, position: int) -> np.ndarray:
        """The CBED frame at ``position`` (deterministic per seed and position)."""
        out = np.empty(self.frame_shape, self.frame_dtype)
        return self.frame_into(position, out)

    def frames(self, positions) -> np.ndarray:
        """Frames of several positions, shape (n, *frame_shape); equal to :meth:`frame` each."""
        pos = self._check_positions(positions)
        out = np.empty((pos.size, *self.frame_shape), self.frame_dtype)
        if pos.size:
            pk.render_frames(
                self._frame_seeds[pos], out.reshape(pos.size, -1), self._wa[pos], self._wb[pos],
                *self._frame_args(), self._dy[pos], self._dx[pos], *self._detector_args(),
            )
        return out

    def spectrum(self, position: int) -> np.ndarray:
        """The EDS spectrum at ``position``: uint16 counts on :attr:`energy_axis_kev`."""
        p = self._check_position(position)
        out = np.empty(self.n_channels, self.spectrum_dtype)
        pk.render_spectrum(
            self._spec_seeds[p], out, self._spec_w[p], self._spec_totals, self._spec_prob,
            self._spec_alias, 65535,
        )
        return out

    def spectra(self, positions) -> np.ndarray:
        """Spectra of several positions, shape (n, n_channels); equal to :meth:`spectrum` each."""
        pos = self._check_positions(positions)
        out = np.empty((pos.size, self.n_channels), self.spectrum_dtype)
        if pos.size:
            pk.render_spectra(
                self._spec_seeds[pos], out, self._spec_w[pos], self._spec_totals,
                self._spec_prob, self._spec_alias, 65535,
            )
        return out

    # ------------------------------------------------------------------ noiseless references
    def expected_frame(self, position: int) -> np.ndarray:
        """Noiseless expected counts of ``position`` (float64, detector coordinates, no defects
        or saturation): the lambda that :meth:`frame` samples."""
        p = self._check_position(position)
        fy, fx = self.frame_shape
        lam = np.zeros(fy * fx)
        c = self._pix_comp
        v = self._wa[p, c] * self._pix_va + self._wb[p, c] * self._pix_vb
        np.add.at(lam, self._pix_flat, v)
        lam = lam.reshape(fy, fx)
        dy, dx = int(self._dy[p]), int(self._dx[p])
        shifted = np.zeros_like(lam)
        ys, yd = (slice(0, fy - dy), slice(dy, fy)) if dy >= 0 else (slice(-dy, fy), slice(0, fy + dy))
        xs, xd = (slice(0, fx - dx), slice(dx, fx)) if dx >= 0 else (slice(-dx, fx), slice(0, fx + dx))
        shifted[yd, xd] = lam[ys, xs]
        gain = np.ones(fy * fx)
        gain[self._cross_pix] += self._cross_gm1
        return shifted * gain.reshape(fy, fx)

    def expected_spectrum(self, position: int) -> np.ndarray:
        """Noiseless expected EDS counts of ``position`` (float64)."""
        p = self._check_position(position)
        return self._spec_w[p] @ self._spec_templates

    def phase_spectrum(self, name: str) -> np.ndarray:
        """Noiseless spectrum shape of a pure phase (per unit weight), for reference plots."""
        names = [p.name for p in self.phases]
        return self._spec_templates[names.index(name)].copy()

    def __repr__(self) -> str:
        return (
            f"LamellaPhantom(scan_shape={self.scan_shape}, seed={self.seed}, "
            f"frame_shape={self.frame_shape}, counter_depth={self.counter_depth}, "
            f"n_inclusions={self.n_inclusions})"
        )
