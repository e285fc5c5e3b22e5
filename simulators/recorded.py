"""Serve a recording as if it were the sample: the source behind ``streamclust simulate --from DIR``.

:class:`RecordedScan` has the phantom's source interface (``frame_into``, ``spectrum``, scan and
frame shapes, counter depth, dwell), so the simulated microscope serves a recorded scan (ours, or
any ``.mib`` the reader accepts, with or without its EDS file) over the real Merlin protocol and
the EDS stream: what facility engineers use to test their systems with real data.

Frames are decoded from the memory-mapped ``.mib`` one at a time (the file is never loaded
whole) and re-encoded by the Merlin server in the recording's own pixel type, counter depth and
sensor layout, so a receiver decodes the very pixels of the recording. Scan positions come from
the frames' sequence numbers (position = sequence - 1); a position without a frame is served as
an empty frame and counted (:attr:`RecordedScan.missing_frames_served`); a position without a
spectrum is not sent (the publisher counts it as dropped).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from streamclust.adapters.mib import MibFile

logger = logging.getLogger(__name__)

__all__ = ["RecordedScan"]


class RecordedScan:
    """A recorded scan as a frame and spectrum source.

    Parameters
    ----------
    mib_path : path-like
        The ``.mib`` (its ``.hdr`` beside it, when present).
    eds_path : path-like, optional
        The EDS recording; without it only frames are served.
    scan_shape : (int, int), optional
        Default: the acquisition header's ``ScanY``/``ScanX``, else the EDS recording's, else one
        row of all frames.

    Raises
    ------
    HeaderError, PixelDataError, EDSRecordingError
        The recording cannot be read (from the readers, with offset and frame).
    """

    #: the MIB decoder keeps scratch buffers: one rendering thread at a time
    thread_safe = False

    def __init__(self, mib_path, eds_path=None, *, scan_shape=None):
        self.mib_path = Path(mib_path)
        self._mib = MibFile(self.mib_path)
        try:
            self._setup(eds_path, scan_shape)
        except BaseException:
            self._mib.close()
            raise

    def _setup(self, eds_path, scan_shape) -> None:
        mib = self._mib
        first = mib.first_header
        self.frame_shape = tuple(int(v) for v in mib.image_shape)
        self.frame_dtype = mib.image_dtype
        self.counter_depth = int(first.counter_depth)
        self.raw = bool(first.raw)
        self.layout = first.layout
        self.dwell_s = float(first.shutter_ns * 1e-9 if first.shutter_ns is not None else first.shutter_s)
        self.eds = None
        if eds_path is not None:
            from streamclust.adapters.eds_file import read_eds_recording

            self.eds = read_eds_recording(eds_path)
        hdr = mib.acquisition_header
        if scan_shape is None and hdr is not None:
            scan_shape = hdr.scan_shape
        if scan_shape is None and self.eds is not None:
            scan_shape = tuple(int(v) for v in self.eds.spectra.shape[:2])
        if scan_shape is None:
            scan_shape = (1, len(mib))
        self.scan_shape = tuple(int(v) for v in scan_shape)
        self.n_positions = self.scan_shape[0] * self.scan_shape[1]
        if self.eds is not None and self.eds.spectra.shape[0] * self.eds.spectra.shape[1] != self.n_positions:
            raise ValueError(f"{self.mib_path}: scan shape {self.scan_shape} and the EDS recording's "
                             f"{self.eds.spectra.shape[:2]} differ")
        # which file record holds each position (every header is validated on the way)
        self._index = np.full(self.n_positions, -1, np.int64)
        self.frames_outside_scan = 0
        for i in range(len(mib)):
            pos = mib.header(i).sequence - 1
            if 0 <= pos < self.n_positions and self._index[pos] < 0:
                self._index[pos] = i
            else:
                self.frames_outside_scan += 1
        self.missing_frames = int((self._index < 0).sum())
        self.missing_frames_served = 0
        if self.eds is not None:
            self._spectra = self.eds.flat_spectra
            self._acquired = self.eds.acquired.ravel()
            self.n_channels = int(self._spectra.shape[1])
            self.energy_axis_kev = np.asarray(self.eds.energy_axis_kev, float)
            self.energy_offset_kev = float(self.energy_axis_kev[0])
            self.channel_width_kev = float(self.eds.attrs.get("channel_width_kev", 0.01))
            self.live_time_s = float(self.eds.attrs.get("live_time_s", self.dwell_s))
        logger.info("serving %s: %d frames of %s %s, scan %s, EDS %s", self.mib_path, len(mib),
                    self.frame_shape, self.frame_dtype, self.scan_shape,
                    "yes" if self.eds is not None else "no")

    @property
    def has_eds(self) -> bool:
        return self.eds is not None

    def frame_into(self, position: int, out: np.ndarray) -> None:
        """Decode the frame of ``position`` into ``out`` (zeros for a position without a frame)."""
        i = int(self._index[position])
        if i < 0:
            out[...] = 0
            self.missing_frames_served += 1
            return
        self._mib.frame(i, out=out)

    def has_spectrum(self, position: int) -> bool:
        return self.eds is not None and bool(self._acquired[position])

    def spectrum(self, position: int) -> np.ndarray:
        if self.eds is None:
            raise ValueError(f"{self.mib_path}: served without an EDS recording")
        return self._spectra[position]

    def close(self) -> None:
        self._mib.close()

    def __enter__(self) -> "RecordedScan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
