"""A recorded scan on disk: its layout checked from the headers (:func:`probe_recording`, on the
client) and one chunk of positions read from both files (:func:`read_chunk`, on a worker).

The ``.mib`` is memory-mapped with :class:`~streamclust.adapters.mib.MibFile`, the spectra are an
HDF5 row slice of the EDS recording (docs/wire-formats.md). A damaged frame is skipped and counted,
a truncated ``.mib`` leaves its last positions without a frame, and the EDS recording's
``acquired`` mask says which positions have a spectrum.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import h5py
import numpy as np

from streamclust.adapters.eds_file import EDSRecordingError
from streamclust.adapters.errors import ProtocolError
from streamclust.adapters.mib import MibFile

logger = logging.getLogger(__name__)

__all__ = ["RecordingInfo", "probe_recording", "ChunkSpec", "ChunkRaw", "COUNTERS", "read_chunk", "chunk_specs"]

#: the counters every chunk reports (summed over the scan in the replay's summary)
COUNTERS = ("positions", "incomplete", "skipped", "missing_frames", "bad_frames", "missing_spectra")


@dataclass(frozen=True)
class RecordingInfo:
    """What a task needs to read its chunk: paths and the validated layout of both files."""

    mib_path: str
    eds_path: str
    scan_shape: tuple
    n_positions: int
    n_frames: int
    frame_shape: tuple
    n_channels: int
    energy_axis_kev: tuple = field(repr=False)


def _eds_dataset(f: h5py.File, path: str) -> h5py.Dataset:
    group = f.get("eds")
    if not isinstance(group, h5py.Group) or group.attrs.get("format") not in ("streamclust-eds", b"streamclust-eds"):
        raise EDSRecordingError(f"{path}: no /eds group of format 'streamclust-eds'")
    if int(group.attrs.get("version", -1)) != 1:
        raise EDSRecordingError(f"{path}: /eds version {group.attrs.get('version')!r} is not supported (expected 1)")
    dset = group.get("spectra")
    if not isinstance(dset, h5py.Dataset) or dset.ndim != 3 or dset.dtype.kind not in "ui":
        raise EDSRecordingError(f"{path}: /eds/spectra must be an integer (ny, nx, channels) dataset")
    return dset


def probe_recording(mib_path: str | os.PathLike, eds_path: str | os.PathLike) -> RecordingInfo:
    """Validate both files' headers and layouts without reading the data (client side).

    The scan shape comes from the ``.hdr`` (``ScanX``/``ScanY``) when present, else from the EDS
    recording; both must agree when both give one. A ``.mib`` holding fewer frames than positions
    (a truncated recording) is accepted: the missing positions have no frame.

    Raises
    ------
    HeaderError, PixelDataError
        From :class:`~streamclust.adapters.mib.MibFile` (with the byte offset).
    EDSRecordingError
        Not a streamclust EDS recording, or a scan shape that disagrees with the ``.mib``'s.
    """
    mib_path, eds_path = os.fspath(mib_path), os.fspath(eds_path)
    with MibFile(mib_path, on_truncated="skip") as mf:
        n_frames = len(mf)
        frame_shape = tuple(int(v) for v in mf.image_shape)
        mib_scan = mf.acquisition_header.scan_shape if mf.acquisition_header is not None else None
    if not os.path.exists(eds_path):
        raise FileNotFoundError(eds_path)
    with h5py.File(eds_path, "r") as f:
        dset = _eds_dataset(f, eds_path)
        ny, nx, nch = (int(v) for v in dset.shape)
        attrs = dset.attrs
        try:
            width = float(attrs["channel_width_kev"])
            offset = float(attrs["energy_offset_kev"])
        except KeyError as exc:
            raise EDSRecordingError(f"{eds_path}: /eds/spectra lacks attribute {exc}") from None
        axis_ds = f["eds"].get("energy_axis_kev")
        if isinstance(axis_ds, h5py.Dataset) and axis_ds.shape == (nch,):
            axis = np.asarray(axis_ds[()], dtype=np.float64)
        else:
            axis = offset + width * np.arange(nch, dtype=np.float64)
    scan = (ny, nx)
    if mib_scan is not None and tuple(int(v) for v in mib_scan) != scan:
        raise EDSRecordingError(f"{eds_path}: scan shape {scan} differs from {mib_path}'s header {tuple(mib_scan)}")
    n = ny * nx
    if n_frames > n:
        logger.warning("%s holds %d frames for %d positions: the extra frames are ignored", mib_path, n_frames, n)
    return RecordingInfo(mib_path, eds_path, scan, n, min(n_frames, n), frame_shape, nch,
                         tuple(float(v) for v in axis))


@dataclass(frozen=True)
class ChunkSpec:
    """Positions ``start <= p < stop`` of the scan."""

    start: int
    stop: int


@dataclass
class ChunkRaw:
    positions: np.ndarray
    frames: np.ndarray
    spectra: np.ndarray
    has_frame: np.ndarray
    has_spectrum: np.ndarray
    counters: dict


def chunk_specs(n_positions: int, chunk_positions: int) -> list[ChunkSpec]:
    """The scan cut into chunks of at most ``chunk_positions`` consecutive positions."""
    step = max(1, int(chunk_positions))
    return [ChunkSpec(s, min(n_positions, s + step)) for s in range(0, n_positions, step)]


def read_chunk(info: RecordingInfo, spec: ChunkSpec) -> ChunkRaw:
    """Read the frames and spectra of ``spec``'s positions (frames memory-mapped, spectra sliced).

    A frame whose header is damaged is skipped, counted (``bad_frames``) and logged with its byte
    offset; positions past the end of a truncated ``.mib`` have no frame; spectra follow the
    recording's ``acquired`` mask.
    """
    start, stop = int(spec.start), int(spec.stop)
    if not 0 <= start <= stop <= info.n_positions:
        raise ValueError(f"chunk {start}..{stop} outside the scan's 0..{info.n_positions}")
    n = stop - start
    pos = np.arange(start, stop, dtype=np.int64)
    counters = dict.fromkeys(COUNTERS, 0)
    has_frame = pos < info.n_frames
    with MibFile(info.mib_path, on_truncated="skip") as mf:
        frames = np.zeros((n, *info.frame_shape), dtype=mf.image_dtype)
        for i in np.flatnonzero(has_frame):
            try:
                mf.frame(int(pos[i]), out=frames[i])
            except ProtocolError as exc:
                has_frame[i] = False
                counters["bad_frames"] += 1
                key = f"bad_frames_{exc.reason}"
                counters[key] = counters.get(key, 0) + 1
                logger.warning("position %d: frame skipped (%s)", int(pos[i]), exc)
    counters["missing_frames"] += int(np.count_nonzero(~has_frame))
    ny, nx = info.scan_shape
    with h5py.File(info.eds_path, "r") as f:
        dset = _eds_dataset(f, info.eds_path)
        if tuple(dset.shape) != (ny, nx, info.n_channels):
            raise EDSRecordingError(f"{info.eds_path}: /eds/spectra changed shape to {dset.shape}")
        y0, y1 = start // nx, -(-stop // nx)
        lo, hi = start - y0 * nx, stop - y0 * nx
        spectra = np.asarray(dset[y0:y1]).reshape(-1, info.n_channels)[lo:hi]
        acq_ds = f["eds"].get("acquired")
        if isinstance(acq_ds, h5py.Dataset) and acq_ds.shape == (ny, nx):
            has_spectrum = np.asarray(acq_ds[y0:y1], dtype=bool).reshape(-1)[lo:hi].copy()
        else:
            has_spectrum = np.ones(n, dtype=bool)
    counters["missing_spectra"] += int(np.count_nonzero(~has_spectrum))
    return ChunkRaw(pos, frames, spectra, has_frame, has_spectrum, counters)
