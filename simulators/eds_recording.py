"""Write an EDS spectrum image to HDF5 in streamclust's recording layout.

Layout (documented in ``docs/wire-formats.md``, read back by
:func:`streamclust.adapters.eds_file.read_eds_recording`)::

    /eds                       group; attrs format="streamclust-eds", version=1
    /eds/spectra               (ny, nx, c) counts, chunked (1, nx, c), uncompressed (written live)
        attrs: energy_offset_kev, channel_width_kev, live_time_s, real_time_s,
               scan_shape=(ny, nx), axes_names=["y", "x", "Energy"], axes_units=["", "", "keV"],
               signal_type="EDS_TEM"  (HyperSpy's name for a TEM EDS signal)
    /eds/energy_axis_kev       (c,) float64, attached as dimension scale of axis 2
    /eds/acquired              (ny, nx) bool: False where no spectrum was written (zeros there)

A 1-D scan is stored as ``ny = 1``.

The same file is also a HyperSpy (``hspy``) file, so that ``hs.load(path, file_format="HSPY")``
(or a plain ``hs.load`` of a ``.hspy`` file) gives an ``EDS_TEM`` spectrum image with exspy's
metadata; the spectra are stored once, the HyperSpy names are HDF5 hard links to the same
datasets::

    /  attrs file_format="HyperSpy", file_format_version="3.3"
    /Experiments/<title>/data                      hard link to /eds/spectra
    /Experiments/<title>/axis-0, axis-1, axis-2    y, x (navigation), Energy (keV, offset, scale)
    /Experiments/<title>/metadata/...              General.title, Signal.signal_type="EDS_TEM",
        Acquisition_instrument.TEM.beam_energy (keV),
        Acquisition_instrument.TEM.Detector.EDS.live_time / real_time (s), energy_resolution_MnKa,
        elevation_angle, azimuth_angle
    /Experiments/<title>/original_metadata/streamclust   format, version; acquired (hard link)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import h5py
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["write_eds_recording", "EDSRecordingWriter", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "streamclust-eds"
FORMAT_VERSION = 1
#: HyperSpy's hspy format version of the linked view (the one HyperSpy 2.x writes)
HSPY_VERSION = "3.3"
#: exspy's defaults for a TEM EDS detector, written so that exspy needs no further setup
_EDS_DETECTOR = {"energy_resolution_MnKa": 130.0, "elevation_angle": 35.0, "azimuth_angle": 0.0}


def _items(spectra, n_positions: int):
    """(position, counts) pairs from an array, or an iterable of arrays / pairs / Spectrum objects."""
    if isinstance(spectra, np.ndarray):
        flat = spectra.reshape(n_positions, -1) if spectra.ndim == 3 else spectra
        if flat.ndim != 2 or flat.shape[0] != n_positions:
            raise ValueError(f"spectra of shape {spectra.shape} do not fit {n_positions} positions")
        yield from enumerate(flat)
        return
    for i, item in enumerate(spectra):
        if hasattr(item, "position") and hasattr(item, "counts"):
            yield int(item.position), item.counts
        elif isinstance(item, tuple) and len(item) == 2:
            yield int(item[0]), item[1]
        else:
            yield i, item


class EDSRecordingWriter:
    """Write an EDS spectrum image position by position (the file is valid once closed).

    Spectra may come in any order, with gaps and duplicates (counted); each scan row is buffered
    and written once. See :func:`write_eds_recording` for the parameters.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "eds.h5")
    >>> with EDSRecordingWriter(path, scan_shape=(2, 2), n_channels=3, energy_offset_kev=0.0,
    ...                         channel_width_kev=0.5, live_time_s=0.01) as w:
    ...     w.put(3, np.array([1, 2, 3]))
    True
    >>> w.report
    {'written': 1, 'missing': 3, 'duplicates': 0, 'out_of_range': 0}
    """

    def __init__(self, path: str | os.PathLike, *, scan_shape: tuple, n_channels: int,
                 energy_offset_kev: float, channel_width_kev: float, live_time_s: float,
                 real_time_s: float | None = None, dtype=np.uint16, attrs: dict | None = None,
                 beam_energy_kev: float | None = None, title: str = "eds"):
        scan_shape = tuple(int(n) for n in scan_shape)
        if not 1 <= len(scan_shape) <= 2 or min(scan_shape) < 1:
            raise ValueError(f"scan_shape must be (n,) or (ny, nx) of positive sizes, got {scan_shape}")
        self.ny, self.nx = (1, scan_shape[0]) if len(scan_shape) == 1 else scan_shape
        self.n_positions = self.ny * self.nx
        self.n_channels = int(n_channels)
        self.dtype = np.dtype(dtype)
        if self.dtype.kind not in "ui":
            raise ValueError(f"counts are stored as integers, got dtype {self.dtype}")
        self._info = np.iinfo(self.dtype)
        real_time_s = live_time_s if real_time_s is None else real_time_s
        self.report = {"written": 0, "missing": 0, "duplicates": 0, "out_of_range": 0}
        self.path = path
        self.acquired = np.zeros((self.ny, self.nx), dtype=bool)
        self._f = h5py.File(path, "w")
        try:
            self._create(scan_shape, energy_offset_kev, channel_width_kev, live_time_s, real_time_s,
                         attrs, beam_energy_kev, title)
        except BaseException:
            self._f.close()
            raise
        self._row = np.zeros((self.nx, self.n_channels), dtype=self.dtype)
        self._row_index = None
        self._row_dirty = False

    def _create(self, scan_shape, offset, width, live_time_s, real_time_s, attrs, beam_energy_kev, title):
        f, ny, nx, nch = self._f, self.ny, self.nx, self.n_channels
        group = f.create_group("eds")
        group.attrs["format"] = FORMAT_NAME
        group.attrs["version"] = FORMAT_VERSION
        for key, value in (attrs or {}).items():
            group.attrs[key] = value
        dset = group.create_dataset("spectra", shape=(ny, nx, nch), dtype=self.dtype,
                                    chunks=(1, nx, nch), fillvalue=0)
        dset.attrs.update({
            "energy_offset_kev": float(offset), "channel_width_kev": float(width),
            "live_time_s": float(live_time_s), "real_time_s": float(real_time_s),
            "scan_shape": np.asarray(scan_shape, dtype=np.int64),
            "axes_names": ["y", "x", "Energy"], "axes_units": ["", "", "keV"],
            "signal_type": "EDS_TEM",
        })
        energy = offset + width * np.arange(nch, dtype=np.float64)
        escale = group.create_dataset("energy_axis_kev", data=energy)
        escale.make_scale("Energy (keV)")
        dset.dims[2].attach_scale(escale)
        dset.dims[2].label = "Energy"
        dset.dims[0].label = "y"
        dset.dims[1].label = "x"
        self._dset = dset
        # -- the HyperSpy view: hard links, so the counts are stored once -----------------------
        f.attrs["file_format"] = "HyperSpy"
        f.attrs["file_format_version"] = HSPY_VERSION
        exp = f.create_group(f"Experiments/{title}")
        # exspy's signal class is picked from "package"; without exspy HyperSpy loads a Signal1D
        exp.attrs["package"] = "exspy"
        exp.attrs["package_version"] = ""
        exp["data"] = dset
        flags = exp.create_group("attributes")
        flags.attrs["_lazy"] = False
        flags.attrs["ragged"] = False
        for i, (name, size, scale, off, units, nav) in enumerate((
                ("y", ny, 1.0, 0.0, "_None_", True), ("x", nx, 1.0, 0.0, "_None_", True),
                ("Energy", nch, float(width), float(offset), "keV", False))):
            ax = exp.create_group(f"axis-{i}")
            ax.attrs.update({"_type": "UniformDataAxis", "name": name, "size": int(size),
                             "scale": scale, "offset": off, "units": units, "navigate": nav,
                             "is_binned": not nav})  # counts a channel: a binned energy axis
        meta = exp.create_group("metadata")
        meta.create_group("General").attrs["title"] = title
        meta.create_group("Signal").attrs["signal_type"] = "EDS_TEM"
        tem = meta.create_group("Acquisition_instrument/TEM")
        if beam_energy_kev is not None:
            tem.attrs["beam_energy"] = float(beam_energy_kev)
        det = tem.create_group("Detector/EDS")
        det.attrs.update({"live_time": float(live_time_s), "real_time": float(real_time_s),
                          **_EDS_DETECTOR})
        orig = exp.create_group("original_metadata/streamclust")
        orig.attrs["format"] = FORMAT_NAME
        orig.attrs["version"] = FORMAT_VERSION
        self._orig = orig

    def __enter__(self) -> "EDSRecordingWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def put(self, position: int, counts) -> bool:
        """Store the spectrum of ``position`` (row-major flat index); False when not stored
        (out of range or a duplicate, counted in :attr:`report`)."""
        if self._f is None:
            raise ValueError("EDSRecordingWriter is closed")
        position = int(position)
        if not 0 <= position < self.n_positions:
            self.report["out_of_range"] += 1
            return False
        y, x = divmod(position, self.nx)
        if self.acquired[y, x]:
            self.report["duplicates"] += 1
            return False
        counts = np.asarray(counts)
        if counts.shape != (self.n_channels,):
            raise ValueError(f"spectrum at position {position} has shape {counts.shape}, "
                             f"expected ({self.n_channels},)")
        info = self._info
        if counts.size and (counts.min() < info.min or counts.max() > info.max
                            or (counts.dtype.kind == "f" and not np.all(counts == np.round(counts)))):
            raise ValueError(f"spectrum at position {position} does not fit {self.dtype} counts")
        if y != self._row_index:
            self._flush_row()
            self._row_index, self._row_dirty = y, False
            self._row[...] = self._dset[y]
        self._row[x] = counts
        self._row_dirty = True
        self.acquired[y, x] = True
        self.report["written"] += 1
        return True

    def _flush_row(self) -> None:
        if self._row_index is not None and self._row_dirty:
            self._dset[self._row_index] = self._row

    def close(self) -> dict:
        """Write the last row and the ``acquired`` mask, close the file; returns :attr:`report`."""
        if self._f is None:
            return self.report
        try:
            self._flush_row()
            # chunked: HyperSpy's lazy loader maps every dataset to a dask array by its chunks
            acq = self._f["eds"].create_dataset("acquired", data=self.acquired,
                                                chunks=self.acquired.shape)
            self._orig["acquired"] = acq
        finally:
            self._f.close()
            self._f = None
        self.report["missing"] = self.n_positions - self.report["written"]
        if self.report["missing"]:
            logger.info("EDS recording %s: %d of %d positions missing", self.path, self.report["missing"],
                        self.n_positions)
        return self.report


def write_eds_recording(path: str | os.PathLike, spectra: np.ndarray | Iterable, *, scan_shape: tuple,
                        energy_offset_kev: float, channel_width_kev: float, live_time_s: float,
                        real_time_s: float | None = None, n_channels: int | None = None,
                        dtype=np.uint16, attrs: dict | None = None,
                        beam_energy_kev: float | None = None, title: str = "eds") -> dict:
    """Write spectra of a scan to ``path`` (HDF5, overwritten).

    Parameters
    ----------
    spectra : ndarray or iterable
        ``(n_positions, c)`` or ``(ny, nx, c)`` array; or an iterable of arrays (consecutive
        positions), ``(position, counts)`` pairs, or objects with ``.position`` and ``.counts``
        (e.g. :class:`~streamclust.adapters.eds.Spectrum`), in any order, possibly with gaps.
    scan_shape : tuple
        ``(ny, nx)`` or ``(n,)``; positions are row-major flat indices.
    energy_offset_kev, channel_width_kev : float
        Energy of channel ``k`` is ``energy_offset_kev + k * channel_width_kev``.
    live_time_s, real_time_s : float
        Per-position acquisition times (real defaults to live).
    n_channels : int, optional
        Needed only for an iterable whose first item does not come at once (inferred otherwise).
    dtype : dtype
        Integer dtype of the stored counts; values outside its range raise ValueError.
    attrs : dict, optional
        Extra attributes stored on ``/eds``.
    beam_energy_kev : float, optional
        Written to the HyperSpy metadata (``Acquisition_instrument.TEM.beam_energy``): exspy
        needs it to pick the X-ray lines a spectrum can hold.
    title : str, default "eds"
        HyperSpy title (the ``/Experiments/<title>`` group).

    Returns
    -------
    dict
        ``written`` (positions), ``missing`` (positions never given), ``duplicates`` (later
        copies of a position, ignored), ``out_of_range``.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from streamclust.adapters.eds_file import read_eds_recording
    >>> path = os.path.join(tempfile.mkdtemp(), "eds.h5")
    >>> counts = np.arange(24, dtype=np.uint16).reshape(6, 4)
    >>> write_eds_recording(path, counts, scan_shape=(2, 3), energy_offset_kev=0.0,
    ...                     channel_width_kev=0.5, live_time_s=0.01)["written"]
    6
    >>> rec = read_eds_recording(path)
    >>> rec.spectra.shape, rec.energy_axis_kev.tolist()
    ((2, 3, 4), [0.0, 0.5, 1.0, 1.5])
    """
    scan_shape = tuple(int(n) for n in scan_shape)
    if not 1 <= len(scan_shape) <= 2 or min(scan_shape) < 1:
        raise ValueError(f"scan_shape must be (n,) or (ny, nx) of positive sizes, got {scan_shape}")
    n_positions = int(np.prod(scan_shape))
    items = _items(spectra, n_positions)
    first = next(items, None)
    if n_channels is None:
        if first is None:
            raise ValueError("no spectra and no n_channels: the channel count is unknown")
        n_channels = int(np.asarray(first[1]).shape[-1])
    with EDSRecordingWriter(path, scan_shape=scan_shape, n_channels=n_channels,
                            energy_offset_kev=energy_offset_kev, channel_width_kev=channel_width_kev,
                            live_time_s=live_time_s, real_time_s=real_time_s, dtype=dtype, attrs=attrs,
                            beam_energy_kev=beam_energy_kev, title=title) as writer:
        for position, counts in _chain_first(first, items):
            writer.put(position, counts)
    return writer.report


def _chain_first(first, items):
    if first is not None:
        yield first
    yield from items
