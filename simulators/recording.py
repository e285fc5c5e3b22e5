"""Save a simulated scan as the instruments would: a Merlin ``.mib`` + ``.hdr`` and an EDS recording.

Any phantom scan can so be replayed through the same readers that read real recordings
(:func:`streamclust.adapters.mib.read_mib`, :func:`streamclust.adapters.eds_file.read_eds_recording`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamclust.simulators.eds_recording import write_eds_recording
from streamclust.simulators.mib_encode import MibWriter

logger = logging.getLogger(__name__)

__all__ = ["ScanRecording", "record_scan"]


@dataclass(frozen=True)
class ScanRecording:
    """Paths of one recorded scan."""

    mib: Path
    hdr: Path
    eds: Path
    n_positions: int


def record_scan(phantom, stem: str | Path, *, raw: bool = False, layout: str = "2x2",
                chunk: int = 256) -> ScanRecording:
    """Write every frame and spectrum of ``phantom`` to ``stem.mib``/``stem.hdr``/``stem_eds.h5``.

    Frames are written in raster order with sequence numbers 1..n (position = sequence - 1), the
    acquisition header carries the scan shape (``ScanX``/``ScanY``) as newer Merlin software does,
    and the EDS file uses the layout in docs/wire-formats.md. Memory stays at one chunk of frames.

    Examples
    --------
    >>> import tempfile, os
    >>> from streamclust.simulators.phantom import LamellaPhantom
    >>> from streamclust.adapters.mib import read_mib
    >>> ph = LamellaPhantom(scan_shape=(2, 3), seed=0)
    >>> rec = record_scan(ph, os.path.join(tempfile.mkdtemp(), "scan"))
    >>> bool((read_mib(rec.mib) == ph.frames(range(6))).all())
    True
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    n = phantom.n_positions
    with MibWriter(stem.with_suffix(".mib"), counter_depth=phantom.counter_depth, raw=raw, layout=layout,
                   scan_shape=tuple(phantom.scan_shape), shutter_s=phantom.dwell_s) as writer:
        for start in range(0, n, chunk):
            for frame in phantom.frames(np.arange(start, min(n, start + chunk))):
                writer.write(frame)
        mib, hdr = writer.mib_path, writer.hdr_path
    eds = stem.parent / f"{stem.name}_eds.h5"
    axis = np.asarray(phantom.energy_axis_kev)
    write_eds_recording(
        eds,
        (phantom.spectrum(p) for p in range(n)),
        scan_shape=tuple(phantom.scan_shape),
        # the recording's axis is channel k at offset + k * width (HyperSpy); the phantom's axis
        # holds channel centres, so the first centre is the offset
        energy_offset_kev=float(axis[0]),
        channel_width_kev=float(phantom.channel_width_kev),
        live_time_s=float(phantom.dwell_s),
        n_channels=int(phantom.n_channels),
    )
    logger.info("recorded %d positions to %s (+ .hdr) and %s", n, mib, eds)
    return ScanRecording(mib, hdr, eds, n)
