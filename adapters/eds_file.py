"""Read an EDS recording written by :func:`streamclust.simulators.eds_recording.write_eds_recording`.

The layout is described there and in ``docs/wire-formats.md``. Every deviation raises
:class:`EDSRecordingError` naming the file and the offending object or attribute.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import h5py
import numpy as np

from streamclust.adapters.errors import ProtocolError

logger = logging.getLogger(__name__)

__all__ = ["EDSRecording", "EDSRecordingError", "read_eds_recording"]

_REQUIRED_ATTRS = ("energy_offset_kev", "channel_width_kev", "live_time_s", "scan_shape")


class EDSRecordingError(ProtocolError):
    """An HDF5 file that does not follow the streamclust EDS recording layout."""

    reason = "bad_eds_recording"


@dataclass
class EDSRecording:
    """An EDS spectrum image.

    Attributes
    ----------
    spectra : ndarray, shape (ny, nx, c)
    scan_shape : tuple
        As written: ``(ny, nx)`` or ``(n,)``.
    energy_axis_kev : ndarray, shape (c,)
    attrs : dict
        The spectra dataset's attributes plus the group's (``format``, ``version``, extras).
    acquired : ndarray of bool, shape (ny, nx)
        False where no spectrum was recorded.
    """

    spectra: np.ndarray
    scan_shape: tuple
    energy_axis_kev: np.ndarray
    attrs: dict = field(repr=False)
    acquired: np.ndarray = field(repr=False)

    @property
    def flat_spectra(self) -> np.ndarray:
        """``(n_positions, c)`` view, row-major flat position order."""
        return self.spectra.reshape(-1, self.spectra.shape[-1])


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def read_eds_recording(path: str | os.PathLike) -> EDSRecording:
    """Load and validate an EDS recording.

    Raises
    ------
    EDSRecordingError
        Not HDF5, missing ``/eds`` group or ``/eds/spectra``, wrong format name or version,
        missing or inconsistent attributes, energy axis or ``acquired`` mask of the wrong size.
    FileNotFoundError
        If ``path`` does not exist.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise EDSRecordingError(f"{path}: not an HDF5 file ({exc})") from None
    with f:
        group = f.get("eds")
        if not isinstance(group, h5py.Group):
            raise EDSRecordingError(f"{path}: no /eds group")
        fmt = _plain(group.attrs.get("format"))
        if fmt != "streamclust-eds":
            raise EDSRecordingError(f"{path}: /eds format attribute is {fmt!r}, expected 'streamclust-eds'")
        version = _plain(group.attrs.get("version"))
        if version != 1:
            raise EDSRecordingError(f"{path}: /eds version {version!r} is not supported (expected 1)")
        dset = group.get("spectra")
        if not isinstance(dset, h5py.Dataset):
            raise EDSRecordingError(f"{path}: no /eds/spectra dataset")
        if dset.ndim != 3:
            raise EDSRecordingError(f"{path}: /eds/spectra has shape {dset.shape}, expected (ny, nx, channels)")
        if dset.dtype.kind not in "ui":
            raise EDSRecordingError(f"{path}: /eds/spectra has dtype {dset.dtype}, expected integer counts")
        attrs = {k: _plain(v) for k, v in dset.attrs.items() if k != "DIMENSION_LIST"}
        for key in _REQUIRED_ATTRS:
            if key not in attrs:
                raise EDSRecordingError(f"{path}: /eds/spectra lacks attribute {key!r}")
        ny, nx, nch = dset.shape
        scan_shape = tuple(int(n) for n in np.atleast_1d(attrs["scan_shape"]))
        if int(np.prod(scan_shape)) != ny * nx or len(scan_shape) not in (1, 2):
            raise EDSRecordingError(f"{path}: scan_shape {scan_shape} does not match /eds/spectra {dset.shape}")
        width = float(attrs["channel_width_kev"])
        if not np.isfinite(width) or width <= 0:
            raise EDSRecordingError(f"{path}: channel_width_kev must be > 0, got {width}")
        energy_ds = group.get("energy_axis_kev")
        if isinstance(energy_ds, h5py.Dataset):
            energy = energy_ds[()]
            if energy.shape != (nch,):
                raise EDSRecordingError(f"{path}: /eds/energy_axis_kev has shape {energy.shape}, expected ({nch},)")
        else:
            energy = float(attrs["energy_offset_kev"]) + width * np.arange(nch, dtype=np.float64)
        acq_ds = group.get("acquired")
        if isinstance(acq_ds, h5py.Dataset):
            acquired = acq_ds[()].astype(bool)
            if acquired.shape != (ny, nx):
                raise EDSRecordingError(f"{path}: /eds/acquired has shape {acquired.shape}, expected {(ny, nx)}")
        else:
            acquired = np.ones((ny, nx), dtype=bool)
        spectra = dset[()]
        attrs.update({f"eds.{k}": _plain(v) for k, v in group.attrs.items()})
    return EDSRecording(spectra=spectra, scan_shape=scan_shape, energy_axis_kev=energy, attrs=attrs,
                        acquired=acquired)
