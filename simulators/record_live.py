"""Record a simulated scan with the same recorder a live ``streamclust run --record`` uses.

``streamclust simulate --record DIR`` writes the phantom's scan as the instruments' software would
have saved it (``scan.mib`` + ``scan.hdr`` with per-frame time stamps including the line flyback,
``scan_eds.hspy``), through :class:`streamclust.adapters.recording.ScanRecorder`: one code path
for simulated and live recordings.
"""

from __future__ import annotations

import logging

import numpy as np

from streamclust.adapters.recording import ScanRecorder

logger = logging.getLogger(__name__)

__all__ = ["record_phantom", "BEAM_ENERGY_KEV"]

#: the phantom's diffraction is computed for 200 kV electrons (simulators/diffraction.py)
BEAM_ENERGY_KEV = 200.0


def record_phantom(phantom, folder, *, dwell_s: float | None = None, flyback_s: float = 1e-3,
                   chunk: int = 64, beam_energy_kev: float = BEAM_ENERGY_KEV) -> dict:
    """Write every frame and spectrum of ``phantom`` into ``folder``; returns the recorder's counters.

    ``dwell_s`` (default: the phantom's own) is the time-stamp step and the EDS live time. The
    recorder is fed with ``block=True``: a simulation can wait for the disk, so nothing is dropped.

    Examples
    --------
    >>> import tempfile
    >>> from streamclust.simulators.phantom import LamellaPhantom
    >>> from streamclust.adapters.mib import read_mib
    >>> ph = LamellaPhantom(scan_shape=(2, 3), seed=0)
    >>> d = tempfile.mkdtemp()
    >>> record_phantom(ph, d)["frames_recorded"]
    6
    >>> bool((read_mib(d + "/scan.mib") == ph.frames(range(6))).all())
    True
    """
    ny, nx = (int(v) for v in phantom.scan_shape)
    n = ny * nx
    axis = np.asarray(phantom.energy_axis_kev)
    recorder = ScanRecorder(
        folder, scan_shape=(ny, nx),
        # the recording's axis is channel k at offset + k * width (HyperSpy); the phantom's axis
        # holds channel centres, so the first centre is the offset (as simulators/recording.py)
        energy_offset_kev=float(axis[0]), channel_width_kev=float(phantom.channel_width_kev),
        dwell_s=float(phantom.dwell_s if dwell_s is None else dwell_s), flyback_s=flyback_s,
        counter_depth=int(phantom.counter_depth), beam_energy_kev=beam_energy_kev)
    try:
        for start in range(0, n, chunk):
            positions = np.arange(start, min(n, start + chunk))
            frames = np.asarray(phantom.frames(positions))
            spectra = np.stack([phantom.spectrum(int(p)) for p in positions])
            ones = np.ones(len(positions), bool)
            recorder.put(positions, frames, spectra, ones, ones, block=True)
    finally:
        stats = recorder.close()
    logger.info("recorded %d positions to %s", n, folder)
    return stats
