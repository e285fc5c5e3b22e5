"""EDS spectra for the phantom: characteristic lines, Fiori-Newbury resolution, Kramers background.

Energies from physics.md (exspy's database). A phase's noiseless spectrum is a sum of Gaussian
lines (areas proportional to atomic fraction times a per-line production weight) plus a Kramers
bremsstrahlung continuum ``Z (E0 - E) / E``, all times the detector efficiency, which cuts off the
low energies (window and dead layer) and slowly falls at high energy (finite Si thickness).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "LINES_KEV",
    "LINE_WEIGHTS",
    "ATOMIC_NUMBER",
    "fwhm_kev",
    "detector_efficiency",
    "line_spectrum",
    "kramers",
    "k_line_fraction",
]

#: (element, line) -> energy in keV
LINES_KEV = {
    ("Co", "Ka"): 6.9303, ("Co", "Kb"): 7.6494, ("Co", "La"): 0.7757,
    ("Fe", "Ka"): 6.4039, ("Fe", "Kb"): 7.058, ("Fe", "La"): 0.7045,
    ("Si", "Ka"): 1.7397,
    ("Pt", "La"): 9.4421, ("Pt", "Ma"): 2.0505,
    ("Pd", "La"): 2.8386,
    ("C", "Ka"): 0.2774,
    ("O", "Ka"): 0.5249,
    ("Cu", "Ka"): 8.0478,
}

#: counts a line yields per atom, relative to Fe Ka (cross-section x fluorescence yield x
#: relative line intensity; Kb/Ka = 0.127 for Fe and Co; Cliff-Lorimer k(Co/Fe) close to 1)
LINE_WEIGHTS = {
    ("Co", "Ka"): 0.96, ("Co", "Kb"): 0.96 * 0.127, ("Co", "La"): 0.25,
    ("Fe", "Ka"): 1.00, ("Fe", "Kb"): 0.127, ("Fe", "La"): 0.22,
    ("Si", "Ka"): 1.10,
    ("Pt", "La"): 0.55, ("Pt", "Ma"): 1.20,
    ("Pd", "La"): 0.90,
    ("C", "Ka"): 0.35,
    ("O", "Ka"): 0.45,
    ("Cu", "Ka"): 1.00,
}

ATOMIC_NUMBER = {"C": 6, "O": 8, "Si": 14, "Fe": 26, "Co": 27, "Cu": 29, "Pd": 46, "Pt": 78}

_MN_KA = 5.8987


def fwhm_kev(energy_kev, fwhm_mnka_kev: float = 0.130):
    """Fiori-Newbury: FWHM^2 = FWHM_MnKa^2 + 2.5 eV * (E - 5.899 keV) (all in keV here)."""
    e = np.asarray(energy_kev, dtype=np.float64)
    return np.sqrt(np.maximum(fwhm_mnka_kev**2 + 2.5e-3 * (e - _MN_KA), 1e-6))


def detector_efficiency(energy_kev) -> np.ndarray:
    """Windowless-SDD-like efficiency: low-energy cut-off and slow high-energy fall-off."""
    e = np.maximum(np.asarray(energy_kev, dtype=np.float64), 1e-3)
    return np.exp(-((0.22 / e) ** 3)) * np.exp(-e / 60.0) / (1.0 + (e / 25.0) ** 4)


def line_spectrum(energy_axis_kev: np.ndarray, channel_width_kev: float, lines: dict) -> np.ndarray:
    """Gaussian lines of given areas (counts) on the channel centres, times the efficiency.

    ``lines`` maps an energy (keV) to an area. Each line is integrated over its channel (error
    functions), so areas are exact for any channel width.
    """
    from scipy.special import erf

    e = np.asarray(energy_axis_kev, dtype=np.float64)
    lo, hi = e - channel_width_kev / 2, e + channel_width_kev / 2
    out = np.zeros_like(e)
    for e0, area in lines.items():
        sigma = fwhm_kev(e0) / 2.3548
        out += area * detector_efficiency(e0) * 0.5 * (
            erf((hi - e0) / (np.sqrt(2) * sigma)) - erf((lo - e0) / (np.sqrt(2) * sigma))
        )
    return out


def kramers(energy_axis_kev: np.ndarray, mean_z: float, e0_kev: float = 200.0) -> np.ndarray:
    """Kramers continuum ``Z (E0 - E) / E`` times the detector efficiency (arbitrary scale)."""
    e = np.maximum(np.asarray(energy_axis_kev, dtype=np.float64), 0.05)
    return np.where(e < e0_kev, mean_z * (e0_kev - e) / e, 0.0) * detector_efficiency(e)


def k_line_fraction(composition: dict) -> float:
    """Relative K-line yield per atom of a composition (Si/Fe/Co K alpha + K beta)."""
    total = 0.0
    for el, frac in composition.items():
        for (e2, line), w in LINE_WEIGHTS.items():
            if e2 == el and line.startswith("K"):
                total += frac * w * float(detector_efficiency(LINES_KEV[(e2, line)]))
    return total
