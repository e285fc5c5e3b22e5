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
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import h5py
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["write_eds_recording", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "streamclust-eds"
FORMAT_VERSION = 1


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


def write_eds_recording(path: str | os.PathLike, spectra: np.ndarray | Iterable, *, scan_shape: tuple,
                        energy_offset_kev: float, channel_width_kev: float, live_time_s: float,
                        real_time_s: float | None = None, n_channels: int | None = None,
                        dtype=np.uint16, attrs: dict | None = None) -> dict:
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
    ny, nx = (1, scan_shape[0]) if len(scan_shape) == 1 else scan_shape
    n_positions = ny * nx
    dtype = np.dtype(dtype)
    if dtype.kind not in "ui":
        raise ValueError(f"counts are stored as integers, got dtype {dtype}")
    info = np.iinfo(dtype)
    real_time_s = live_time_s if real_time_s is None else real_time_s
    report = {"written": 0, "missing": 0, "duplicates": 0, "out_of_range": 0}
    items = _items(spectra, n_positions)
    first = next(items, None)
    if n_channels is None:
        if first is None:
            raise ValueError("no spectra and no n_channels: the channel count is unknown")
        n_channels = int(np.asarray(first[1]).shape[-1])
    acquired = np.zeros((ny, nx), dtype=bool)
    with h5py.File(path, "w") as f:
        group = f.create_group("eds")
        group.attrs["format"] = FORMAT_NAME
        group.attrs["version"] = FORMAT_VERSION
        for key, value in (attrs or {}).items():
            group.attrs[key] = value
        dset = group.create_dataset("spectra", shape=(ny, nx, n_channels), dtype=dtype,
                                    chunks=(1, nx, n_channels), fillvalue=0)
        dset.attrs.update({
            "energy_offset_kev": float(energy_offset_kev), "channel_width_kev": float(channel_width_kev),
            "live_time_s": float(live_time_s), "real_time_s": float(real_time_s),
            "scan_shape": np.asarray(scan_shape, dtype=np.int64),
            "axes_names": ["y", "x", "Energy"], "axes_units": ["", "", "keV"],
            "signal_type": "EDS_TEM",
        })
        energy = energy_offset_kev + channel_width_kev * np.arange(n_channels, dtype=np.float64)
        escale = group.create_dataset("energy_axis_kev", data=energy)
        escale.make_scale("Energy (keV)")
        dset.dims[2].attach_scale(escale)
        dset.dims[2].label = "Energy"
        dset.dims[0].label = "y"
        dset.dims[1].label = "x"
        # buffer one scan row, so each chunk is written once
        row_buf = np.zeros((nx, n_channels), dtype=dtype)
        row_index = None
        row_dirty = False

        def flush_row():
            if row_index is not None and row_dirty:
                dset[row_index] = row_buf

        stream = _chain_first(first, items)
        for position, counts in stream:
            if not 0 <= position < n_positions:
                report["out_of_range"] += 1
                continue
            y, x = divmod(position, nx)
            if acquired[y, x]:
                report["duplicates"] += 1
                continue
            counts = np.asarray(counts)
            if counts.shape != (n_channels,):
                raise ValueError(f"spectrum at position {position} has shape {counts.shape}, "
                                 f"expected ({n_channels},)")
            if counts.size and (counts.min() < info.min or counts.max() > info.max
                                or (counts.dtype.kind == "f" and not np.all(counts == np.round(counts)))):
                raise ValueError(f"spectrum at position {position} does not fit {dtype} counts")
            if y != row_index:
                flush_row()
                row_index, row_dirty = y, False
                row_buf[...] = dset[y]
            row_buf[x] = counts
            row_dirty = True
            acquired[y, x] = True
            report["written"] += 1
        flush_row()
        group.create_dataset("acquired", data=acquired)
    report["missing"] = n_positions - report["written"]
    if report["missing"]:
        logger.info("EDS recording %s: %d of %d positions missing", path, report["missing"], n_positions)
    return report


def _chain_first(first, items):
    if first is not None:
        yield first
    yield from items
