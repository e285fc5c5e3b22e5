"""Recording a scan while it runs, and finding recordings to replay.

:class:`ScanRecorder` writes what a scan delivers into a folder, as the instruments' own software
would: ``scan.mib`` + ``scan.hdr`` (Merlin format, :mod:`streamclust.simulators.mib_encode`) and
``scan_eds.hspy`` (the EDS spectrum image, :mod:`streamclust.simulators.eds_recording`; HyperSpy
opens it with a plain ``hs.load``). The scan never waits for the disk: :meth:`ScanRecorder.put`
hands a batch to a writer thread through a queue bounded in bytes; a batch that does not fit is
not recorded and its frames and spectra are counted (``frames_not_recorded``), never silently lost.

Frame time stamps: frame ``p`` (scan position ``p``, sequence ``p + 1``) is stamped
``start + p * dwell + row * flyback`` to the nanosecond, as a scan generator that waits at each
line start would: readers that infer the navigation shape from the time stamps (rosettasciio)
find the scan rows. The acquisition header also carries ``ScanX``/``ScanY``.

:func:`find_recording` resolves what ``streamclust replay`` is given: a folder, or a ``.mib``
with or without its EDS file.
"""

from __future__ import annotations

import logging
import queue
import threading
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from streamclust.adapters.errors import StreamclustError

logger = logging.getLogger(__name__)

__all__ = ["ScanRecorder", "RecordingNotFound", "find_recording", "layout_for_shape", "MIB_NAME",
           "EDS_NAME"]

MIB_NAME = "scan.mib"
EDS_NAME = "scan_eds.hspy"
#: EDS file names looked for beside a ``<stem>.mib``, in this order
_EDS_SUFFIXES = ("_eds.hspy", "_eds.h5")
_DEPTH_FOR_DTYPE = {1: 6, 2: 12, 4: 24}  # processed pixel types: U08, U16, U32
_STOP = object()


class RecordingNotFound(StreamclustError, FileNotFoundError):
    """No recording where one was expected (what was looked for is in the message)."""


def find_recording(source, eds=None, *, require_eds: bool = True) -> tuple[Path, Path | None]:
    """The ``.mib`` and EDS file of a recording.

    Parameters
    ----------
    source : path-like
        A recording folder (one ``.mib`` in it) or a ``.mib`` file.
    eds : path-like, optional
        The EDS file; by default ``<stem>_eds.hspy`` or ``<stem>_eds.h5`` beside the ``.mib``.
    require_eds : bool, default True
        False: a ``.mib`` without an EDS file gives ``(mib, None)``.

    Raises
    ------
    RecordingNotFound
        With what was looked for and where.
    """
    src = Path(source)
    if not src.exists():
        raise RecordingNotFound(f"no such file or folder: {src}; give a recording folder or a .mib file")
    if src.is_dir():
        mibs = sorted(src.glob("*.mib"))
        if len(mibs) != 1:
            raise RecordingNotFound(f"{src}: expected one .mib file in the folder, found {len(mibs)}"
                                    + (f" ({', '.join(p.name for p in mibs)}); give the .mib file" if mibs
                                       else "; is it a recording folder (streamclust run --record)?"))
        mib = mibs[0]
    else:
        mib = src
    if eds is not None:
        eds_path = Path(eds)
        if not eds_path.is_file():
            raise RecordingNotFound(f"no such EDS recording: {eds_path}; check the path")
        return mib, eds_path
    for suffix in _EDS_SUFFIXES:
        candidate = mib.with_name(mib.stem + suffix)
        if candidate.is_file():
            return mib, candidate
    if not mib.is_file():
        raise RecordingNotFound(f"no such file: {mib}; give a recording folder or a .mib file")
    if not require_eds:
        return mib, None
    raise RecordingNotFound(f"{mib}: no EDS recording beside it (looked for "
                            f"{', '.join(mib.stem + s for s in _EDS_SUFFIXES)}); give it as the second argument")


def layout_for_shape(shape) -> str:
    """The Merlin sensor layout of an assembled frame shape (region-of-interest readouts included).

    Examples
    --------
    >>> [layout_for_shape(s) for s in [(256, 256), (128, 256), (512, 512), (514, 514), (256, 768)]]
    ['1x1', '1x1', '2x2', '2x2G', '3x1']
    """
    h, w = (int(v) for v in shape)
    if w == 514 and h <= 514:
        return "2x2G"
    if w <= 256 and h <= 256:
        return "1x1"
    if h <= 256 and w % 256 == 0 and w != 512:
        return f"{w // 256}x1"
    if w <= 512 and h <= 512:
        return "2x2"
    raise ValueError(f"no Merlin layout holds frames of shape {shape}")


class ScanRecorder:
    """Record a scan's frames and spectra into ``folder`` while it runs.

    Parameters
    ----------
    folder : path-like
        Created if needed; ``scan.mib``, ``scan.hdr`` and ``scan_eds.hspy`` are written there.
    scan_shape : (int, int)
    energy_offset_kev, channel_width_kev : float
        Energy of EDS channel ``k``: ``offset + k * width``.
    dwell_s : float
        Time a position (frame shutter, EDS live time, time-stamp step).
    flyback_s : float, default 1e-3
        Extra time at each line start.
    counter_depth : int, optional
        Default: from the frames' dtype (uint8 6-bit, uint16 12-bit, uint32 24-bit).
    layout : str, optional
        Default: from the frame shape (:func:`layout_for_shape`).
    beam_energy_kev : float, optional
        Written to the EDS file's metadata.
    max_queue_bytes : int, default 256 MiB
        Frames and spectra waiting for the disk at most; beyond it :meth:`put` drops (counted).
    start_time : datetime, optional
        Time stamp of position 0 (default: when the first batch arrives).
    """

    def __init__(self, folder, *, scan_shape, energy_offset_kev: float, channel_width_kev: float,
                 dwell_s: float, flyback_s: float = 1e-3, counter_depth: int | None = None,
                 layout: str | None = None, beam_energy_kev: float | None = None,
                 max_queue_bytes: int = 256 * 2**20, start_time: datetime | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.scan_shape = tuple(int(v) for v in scan_shape)
        self.n_positions = self.scan_shape[0] * self.scan_shape[1]
        self.energy_offset_kev = float(energy_offset_kev)
        self.channel_width_kev = float(channel_width_kev)
        self.dwell_ns = int(round(float(dwell_s) * 1e9))
        self.flyback_ns = int(round(float(flyback_s) * 1e9))
        if self.dwell_ns < 0 or self.flyback_ns < 0:
            raise ValueError("dwell_s and flyback_s must not be negative")
        self.counter_depth = counter_depth
        self.layout = layout
        self.beam_energy_kev = beam_energy_kev
        self.max_queue_bytes = int(max_queue_bytes)
        self.start_time = start_time
        self.mib_path = self.folder / MIB_NAME
        self.hdr_path = self.mib_path.with_suffix(".hdr")
        self.eds_path = self.folder / EDS_NAME
        self.stats = {"frames_recorded": 0, "spectra_recorded": 0, "frames_not_recorded": 0,
                      "spectra_not_recorded": 0, "batches_not_recorded": 0, "bytes_written": 0,
                      "write_errors": 0, "queue_bytes_peak": 0}
        self.error: str | None = None
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._encoder = None
        self._mib = None
        self._eds = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="scan-recorder", daemon=True)
        self._thread.start()

    # -- producer side (the scan's thread) ----------------------------------------------------------
    def put(self, positions, frames, spectra, has_frame, has_spectrum, *, block: bool = False) -> bool:
        """Queue one batch for the disk; False (and counted) when the queue is full and not ``block``.

        The arrays are taken by reference: the caller must not change them afterwards (the live
        joiner makes new arrays for every batch).
        """
        if self._closed:
            raise ValueError("ScanRecorder is closed")
        has_frame = np.asarray(has_frame, bool)
        has_spectrum = np.asarray(has_spectrum, bool)
        nbytes = int(frames.nbytes + spectra.nbytes)
        with self._lock:
            # an empty queue takes any batch: a bound below one batch would otherwise record nothing
            fits = self._queued_bytes + nbytes <= self.max_queue_bytes or self._queued_bytes == 0
            if fits or block:
                self._queued_bytes += nbytes
                self.stats["queue_bytes_peak"] = max(self.stats["queue_bytes_peak"], self._queued_bytes)
        if not (fits or block) or self.error is not None:
            with self._lock:
                if fits or block:
                    self._queued_bytes -= nbytes
                self.stats["frames_not_recorded"] += int(has_frame.sum())
                self.stats["spectra_not_recorded"] += int(has_spectrum.sum())
                self.stats["batches_not_recorded"] += 1
            return False
        if self.start_time is None:
            self.start_time = datetime.now().astimezone()
        if block and not fits:
            # wait for the writer: nothing is lost when the producer can wait (a recording of a
            # simulation, not a live detector)
            self._queue.join()
        self._queue.put((np.asarray(positions), frames, spectra, has_frame, has_spectrum, nbytes))
        return True

    def put_batch(self, batch, *, block: bool = False) -> bool:
        """:meth:`put` of a :class:`~streamclust.adapters.join.Batch`."""
        return self.put(batch.positions, batch.frames, batch.spectra, batch.has_frame, batch.has_spectrum,
                        block=block)

    def close(self) -> dict:
        """Write what is queued, the ``.hdr`` and the EDS file's mask; returns :attr:`stats`."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
            self._finish_files()
        out = dict(self.stats)
        out.update({"folder": str(self.folder), "error": self.error})
        return out

    def __enter__(self) -> "ScanRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the writer thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                positions, frames, spectra, has_frame, has_spectrum, nbytes = item
                done = (self.stats["frames_recorded"], self.stats["spectra_recorded"])
                if self.error is None:
                    try:
                        self._write(positions, frames, spectra, has_frame, has_spectrum)
                    except Exception as exc:  # disk full, permissions: the scan goes on, unrecorded
                        self.error = f"{type(exc).__name__}: {exc}"
                        self.stats["write_errors"] += 1
                        logger.error("recording to %s stopped: %s", self.folder, self.error)
                if self.error is not None:
                    # what of this batch did not reach the files (a batch may fail half way)
                    with self._lock:
                        self.stats["frames_not_recorded"] += int(has_frame.sum()) - (
                            self.stats["frames_recorded"] - done[0])
                        self.stats["spectra_not_recorded"] += int(has_spectrum.sum()) - (
                            self.stats["spectra_recorded"] - done[1])
                with self._lock:
                    self._queued_bytes -= nbytes
            finally:
                self._queue.task_done()

    def _timestamp(self, position: int) -> tuple[datetime, int]:
        row = position // self.scan_shape[1]
        ns = position * self.dwell_ns + row * self.flyback_ns
        return self.start_time + timedelta(microseconds=ns // 1000), ns % 1000

    def _write(self, positions, frames, spectra, has_frame, has_spectrum) -> None:
        from streamclust.simulators.eds_recording import EDSRecordingWriter
        from streamclust.simulators.mib_encode import FrameEncoder

        if self._encoder is None and has_frame.any():
            shape = frames.shape[1:]
            depth = self.counter_depth or _DEPTH_FOR_DTYPE.get(frames.dtype.itemsize, 24)
            self.counter_depth = depth
            self.layout = self.layout or layout_for_shape(shape)
            self._encoder = FrameEncoder(image_shape=shape, counter_depth=depth, layout=self.layout,
                                         shutter_s=self.dwell_ns * 1e-9)
            self._mib = open(self.mib_path, "wb")
        if self._eds is None and has_spectrum.any():
            self._eds = EDSRecordingWriter(
                self.eds_path, scan_shape=self.scan_shape, n_channels=spectra.shape[1],
                energy_offset_kev=self.energy_offset_kev, channel_width_kev=self.channel_width_kev,
                live_time_s=self.dwell_ns * 1e-9, dtype=spectra.dtype if spectra.dtype.kind in "ui" else np.uint32,
                beam_energy_kev=self.beam_energy_kev, title="scan_eds")
        for j, pos in enumerate(positions.tolist()):
            if has_frame[j]:
                ts, extra_ns = self._timestamp(pos)
                record = self._encoder.encode(pos + 1, frames[j], ts, extra_ns=extra_ns)
                self._mib.write(record)
                self.stats["frames_recorded"] += 1
                self.stats["bytes_written"] += len(record)
            if has_spectrum[j] and self._eds.put(pos, spectra[j]):
                self.stats["spectra_recorded"] += 1

    def _finish_files(self) -> None:
        from streamclust.simulators.mib_encode import encode_acquisition_header

        try:
            if self._mib is not None:
                if self.error is not None:
                    # a record cut by the failing write would make the whole file unreadable
                    self._mib.truncate(self.stats["frames_recorded"] * self._encoder.message_size)
                self._mib.close()
                self.hdr_path.write_bytes(encode_acquisition_header(
                    n_frames=self.stats["frames_recorded"], counter_depth=self.counter_depth,
                    layout=self.layout, scan_shape=self.scan_shape, time_stamp=self.start_time))
            if self._eds is not None:
                self._eds.close()
        except OSError as exc:
            self.error = self.error or f"{type(exc).__name__}: {exc}"
            self.stats["write_errors"] += 1
            logger.error("finishing the recording in %s failed: %s", self.folder, exc)
        if self.stats["frames_not_recorded"] or self.stats["spectra_not_recorded"]:
            logger.warning("recording %s: %d frames and %d spectra NOT recorded (disk too slow or failing)",
                           self.folder, self.stats["frames_not_recorded"], self.stats["spectra_not_recorded"])
