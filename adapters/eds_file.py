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


def read_eds_recording(path: str | os.PathLike, *, max_bytes: int | None = None) -> EDSRecording:
    """Load and validate an EDS recording.

    Parameters
    ----------
    path : path-like
        The HDF5 file.
    max_bytes : int, optional
        Largest spectra dataset (in bytes) to load; a file whose dataset claims more raises
        before anything is allocated for it. None: no bound.

    Raises
    ------
    EDSRecordingError
        Not HDF5, missing ``/eds`` group or ``/eds/spectra``, wrong format name or version,
        missing or inconsistent attributes, energy axis or ``acquired`` mask of the wrong size,
        a spectra dataset larger than ``max_bytes``, or damaged HDF5 content (h5py's errors).
    FileNotFoundError
        If ``path`` does not exist.

    Notes
    -----
    Only for files we wrote ourselves (or that come from a trusted source): fuzzing found
    damaged files on which the HDF5 C library itself loops forever (HDF5 2.0.0, reading an
    attribute), which no Python code can interrupt. See ``docs/fuzzing.md``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise EDSRecordingError(f"{path}: not an HDF5 file ({exc})") from None
    with f:
        try:
            return _read(f, path, max_bytes)
        except EDSRecordingError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError, OverflowError) as exc:
            # h5py's errors on a damaged file (a corrupt chunk, attribute or object header)
            raise EDSRecordingError(f"{path}: damaged HDF5 content ({type(exc).__name__}: {exc})") from None


def _read(f: h5py.File, path: str, max_bytes: int | None) -> EDSRecording:
    """Validate and load the open file ``f`` (raises EDSRecordingError or h5py's errors)."""
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
    if max_bytes is not None and dset.size * dset.dtype.itemsize > max_bytes:
        raise EDSRecordingError(f"{path}: /eds/spectra {dset.shape} {dset.dtype} exceeds {max_bytes} bytes")
    scan_shape = tuple(int(n) for n in np.atleast_1d(attrs["scan_shape"]))
    if int(np.prod(scan_shape)) != ny * nx or len(scan_shape) not in (1, 2):
        raise EDSRecordingError(f"{path}: scan_shape {scan_shape} does not match /eds/spectra {dset.shape}")
    width = float(attrs["channel_width_kev"])
    if not np.isfinite(width) or width <= 0:
        raise EDSRecordingError(f"{path}: channel_width_kev must be > 0, got {width}")
    energy_ds = group.get("energy_axis_kev")
    if isinstance(energy_ds, h5py.Dataset):
        # shapes are checked before reading, so a damaged file cannot make us allocate its claim
        if energy_ds.shape != (nch,):
            raise EDSRecordingError(f"{path}: /eds/energy_axis_kev has shape {energy_ds.shape}, expected ({nch},)")
        energy = energy_ds[()]
    else:
        energy = float(attrs["energy_offset_kev"]) + width * np.arange(nch, dtype=np.float64)
    acq_ds = group.get("acquired")
    if isinstance(acq_ds, h5py.Dataset):
        if acq_ds.shape != (ny, nx):
            raise EDSRecordingError(f"{path}: /eds/acquired has shape {acq_ds.shape}, expected {(ny, nx)}")
        acquired = acq_ds[()].astype(bool)
    else:
        acquired = np.ones((ny, nx), dtype=bool)
    spectra = dset[()]
    attrs.update({f"eds.{k}": _plain(v) for k, v in group.attrs.items()})
    return EDSRecording(spectra=spectra, scan_shape=scan_shape, energy_axis_kev=energy, attrs=attrs,
                        acquired=acquired)
