"""Encoding the Merlin MIB format: what the real Merlin software writes, byte for byte.

Every byte is modelled on the real recordings in ``shared/data/merlin-qd`` (software 0.77):
the ``MQ1`` header's field widths, the local timestamp, the per-chip ``3RX`` DAC blocks, the
``MQ1A`` tail (UTC timestamp with nanoseconds, shutter in ns, counter depth) and NUL padding to a
multiple of 384 bytes (384 single chip, 768 quad); the acquisition header's keys, ``\\r\\n`` line
ends and space padding to 2048 bytes. The decoder's tests re-encode the real files' decoded
frames and compare bytes.

Used by the Merlin TCP simulator (:mod:`streamclust.simulators.merlin`) and to write test files.

Examples
--------
>>> import numpy as np
>>> from streamclust.simulators.mib_encode import FrameEncoder
>>> enc = FrameEncoder(image_shape=(512, 512), counter_depth=12)
>>> enc.header_size, enc.pixel_bytes, enc.message_size
(768, 524288, 525056)
>>> enc.header(1)[:40]
b'MQ1,000001,00768,04,0512,0512,U16,   2x2'
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from streamclust.adapters import mib_kernels as _k
from streamclust.adapters.mib import raw_chip_placement

__all__ = [
    "encode_acquisition_header",
    "FrameEncoder",
    "MibWriter",
    "write_mib",
    "HDR_SIZE",
    "DEFAULT_DACS",
    "DEFAULT_THRESHOLDS",
]

logger = logging.getLogger(__name__)

#: size of a real ``.hdr`` file (the text is space padded to it)
HDR_SIZE = 2048
#: MQ1 headers are NUL padded to a multiple of this (384 single chip, 768 quad)
HEADER_BLOCK = 384
#: the 27 DAC values of each chip in the real recordings
DEFAULT_DACS = (11, 511, 0, 0, 0, 0, 0, 0, 175, 10, 200, 125, 100, 100, 93, 100, 99, 30, 128, 4,
                255, 140, 128, 191, 179, 511, 511)
#: the eight thresholds (keV) of the real recordings
DEFAULT_THRESHOLDS = (2.0, 511.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
_CHIP = 256
_GAP = 2
_PROCESSED = {1: ("U08", ">u1"), 6: ("U08", ">u1"), 12: ("U16", ">u2"), 24: ("U32", ">u4")}
_RAW_BITS = {1: 1, 6: 8, 12: 16, 24: 32}
_CHIP_IDS = ("W556_B4", "W556_J2", "W556_M5", "W556_G4")
_CONFIG = r"c:\Merlin_Quad_Config\default\Default_SPM"


def _merlin_float(value: float) -> str:
    """``2.000000E+0`` style: six decimals, exponent without zero padding (as Merlin writes)."""
    value = float(value)
    if value == 0:
        return "0.000000E+0"
    mantissa, exponent = f"{value:.6E}".split("E")
    return f"{mantissa}E{int(exponent):+d}"


def _n_chips(layout: str) -> int:
    if layout == "1x1":
        return 1
    if layout in ("2x2", "2x2G"):
        return 4
    if layout.endswith("x1") and layout[:-2].isdigit() and int(layout[:-2]) > 0:
        return int(layout[:-2])
    raise ValueError(f"unknown layout {layout!r}: use '1x1', '2x2', '2x2G' or 'Nx1'")


def _local(ts: datetime | None) -> datetime:
    """An aware datetime: now in local time by default; a naive one is taken as local time."""
    if ts is None:
        return datetime.now().astimezone()
    return ts if ts.tzinfo is not None else ts.astimezone()


def encode_acquisition_header(
    *,
    n_frames: int,
    counter_depth: int,
    layout: str = "2x2",
    raw: bool = False,
    frames_per_trigger: int = 1,
    scan_shape: tuple[int, int] | None = None,
    **extra,
) -> bytes:
    """Return the acquisition header bytes (the ``.hdr`` file; also the data-port HDR payload).

    Parameters
    ----------
    n_frames : int
        ``Frames in Acquisition (Number)``; 0 for continuous.
    counter_depth : int
        1, 6, 12 or 24.
    layout : str, default "2x2"
        ``Assembly Size``; ``"2x2G"`` is written as ``2x2`` with ``Gap Fill Mode`` unchanged.
    raw : bool, default False
        Accepted for symmetry: Merlin 0.77 writes the same header for raw and processed data
        (checked on the real recordings), so it changes no byte.
    frames_per_trigger : int, default 1
    scan_shape : (int, int), optional
        ``(ScanY, ScanX)``, written as ``ScanX``/``ScanY`` lines before ``End`` (newer software).
    **extra
        Override values: ``time_stamp`` (datetime), ``chip_id``, ``chip_type``, ``chip_mode``,
        ``gain``, ``active_counters``, ``thresholds`` (floats), ``dacs`` (per-chip int
        sequences), ``bpc_file``, ``dac_file``, ``gap_fill_mode``, ``flat_field_file``,
        ``dead_time_file``, ``acquisition_type``, ``trigger_start``, ``trigger_stop``,
        ``sensor_bias``, ``sensor_polarity``, ``temperature``, ``humidity``, ``medipix_clock``,
        ``readout_system``, ``software_version``; ``fields``: a mapping of further raw
        ``key -> value`` lines written before ``End``.

    Returns
    -------
    bytes
        Latin-1 text, space padded to 2048 bytes (longer if the text needs it).

    Examples
    --------
    >>> hdr = encode_acquisition_header(n_frames=9, counter_depth=6, layout="1x1")
    >>> len(hdr), hdr[:7]
    (2048, b'HDR,\\t\\r\\n')
    >>> from streamclust.adapters.mib import parse_acquisition_header
    >>> parse_acquisition_header(hdr).n_frames
    9
    """
    if counter_depth not in _PROCESSED:
        raise ValueError(f"counter depth {counter_depth} not in (1, 6, 12, 24)")
    if n_frames < 0 or frames_per_trigger < 0:
        raise ValueError("frame counts must not be negative")
    n_chips = _n_chips(layout)
    ex = dict(extra)
    fields_extra: Mapping[str, str] = ex.pop("fields", {}) or {}
    ts = _local(ex.pop("time_stamp", None))
    thresholds = ex.pop("thresholds", DEFAULT_THRESHOLDS)
    dacs = ex.pop("dacs", None)
    if dacs is None:
        dacs = [DEFAULT_DACS] * n_chips
    if n_chips == 1:
        default_ids = f"{_CHIP_IDS[0]}, - , - , - "
        dac_text = ",".join(f"{v:03d}" for v in dacs[0]) + "; ; ; "
    else:
        default_ids = ",".join((_CHIP_IDS * ((n_chips + 3) // 4))[:n_chips])
        dac_text = "; ".join(",".join(f"{v:03d}" for v in d) for d in dacs)
    assembly = "2x2" if layout == "2x2G" else layout
    values = {
        "time_stamp": ts.strftime("%d/%m/%Y %H:%M:%S"),
        "chip_id": default_ids,
        "chip_type": "Medipix 3RX",
        "assembly": f"{assembly:>6}",
        "chip_mode": "SPM",
        "counter_depth": str(counter_depth),
        "gain": "SLGM",
        "active_counters": "Counter 0",
        "thresholds": ",".join(_merlin_float(t) for t in thresholds),
        "dacs": dac_text,
        "bpc_file": ",".join([_CONFIG + ".bpc"] * 4),
        "dac_file": ",".join([_CONFIG + ".dacs"] * 4),
        "gap_fill_mode": "None",
        "flat_field_file": "None",
        "dead_time_file": "Dummy (C:\\<NUL>\\)",
        "acquisition_type": "Normal",
        "n_frames": str(n_frames),
        "frames_per_trigger": str(frames_per_trigger),
        "trigger_start": "Internal",
        "trigger_stop": "Internal",
        "sensor_bias": "120 V",
        "sensor_polarity": "Positive",
        "temperature": "Board Temp 43.884327 Deg C",
        "humidity": "Board Humidity 14.500183 ",
        "medipix_clock": "180MHz",
        "readout_system": "Merlin Quad",
        "software_version": "0.77",
    }
    for name, value in ex.items():
        if name not in values or name in ("assembly", "counter_depth", "n_frames",
                                          "frames_per_trigger"):
            raise TypeError(f"unknown acquisition header field {name!r}")
        values[name] = str(value)
    keys = [
        ("Time and Date Stamp (day, mnth, yr, hr, min, s)", "time_stamp"),
        ("Chip ID", "chip_id"),
        ("Chip Type (Medipix 3.0, Medipix 3.1, Medipix 3RX)", "chip_type"),
        ("Assembly Size (NX1, 2X2)", "assembly"),
        ("Chip Mode  (SPM, CSM, CM, CSCM)", "chip_mode"),
        ("Counter Depth (number)", "counter_depth"),
        ("Gain", "gain"),
        ("Active Counters", "active_counters"),
        ("Thresholds (keV)", "thresholds"),
        ("DACs", "dacs"),
        ("bpc File", "bpc_file"),
        ("DAC File", "dac_file"),
        ("Gap Fill Mode", "gap_fill_mode"),
        ("Flat Field File", "flat_field_file"),
        ("Dead Time File", "dead_time_file"),
        ("Acquisition Type (Normal, Th_scan, Config)", "acquisition_type"),
        ("Frames in Acquisition (Number)", "n_frames"),
        ("Frames per Trigger (Number)", "frames_per_trigger"),
        ("Trigger Start (Positive, Negative, Internal)", "trigger_start"),
        ("Trigger Stop (Positive, Negative, Internal)", "trigger_stop"),
        ("Sensor Bias (V)", "sensor_bias"),
        ("Sensor Polarity (Positive, Negative)", "sensor_polarity"),
        ("Temperature (C)", "temperature"),
        ("Humidity (%)", "humidity"),
        ("Medipix Clock (MHz)", "medipix_clock"),
        ("Readout System", "readout_system"),
        ("Software Version", "software_version"),
    ]
    lines = ["HDR,\t"] + [f"{key}:\t{values[name]}" for key, name in keys]
    if scan_shape is not None:
        scan_y, scan_x = (int(v) for v in scan_shape)
        if scan_y < 1 or scan_x < 1:
            raise ValueError(f"scan shape {scan_shape} must be positive")
        lines += [f"ScanX:\t{scan_x}", f"ScanY:\t{scan_y}"]
    lines += [f"{key}:\t{value}" for key, value in fields_extra.items()]
    text = ("\r\n".join(lines) + "\r\nEnd\t").encode("latin-1")
    return text.ljust(max(HDR_SIZE, len(text)), b" ")


class FrameEncoder:
    """Encode frames as the Merlin software does: ``MQ1`` header + big-endian or raw pixels.

    Parameters
    ----------
    image_shape : (int, int), default (512, 512)
        Shape of the images to encode: (256, 256) for ``1x1``, (512, 512) for ``2x2``, (512, 512)
        or (514, 514) for ``2x2G`` (a 512x512 image gets the 2-pixel zero gap inserted),
        (256, 256 * N) for ``Nx1``; or a region-of-interest readout: processed, any smaller
        height and width; raw, whole chip rows, ``(r, 256)`` single chip and ``(2r, 512)``
        (``2x2G``: ``(2r + 2, 514)``) quad for ``r`` rows a chip.
    counter_depth : int, default 12
        1, 6, 12 or 24. Processed pixel types: U08 (1, 6), U16 (12), U32 (24).
    raw : bool, default False
        Raw ``R64`` pixel data (``1x1``, ``2x2`` and ``2x2G``); 24-bit raw is written as two
        12-bit frames, high 12 bits first.
    layout : str, default "2x2"
    shutter_s : float, default 0.001
    thresholds, dacs, counter, colour_mode, gain_mode
        Further header fields (keyword only); defaults as in the real recordings.
    use_numba : bool, default True
        Pack raw data with the Numba kernels (False: their NumPy twins).

    Attributes
    ----------
    header_size, pixel_bytes, message_size : int
        ``message_size = header_size + pixel_bytes`` (one ``.mib`` record, one data message
        without the ``MPX`` prefix).

    Raises
    ------
    ValueError
        On encode, pixel values outside ``0 .. 2**counter_depth - 1`` or a wrong image shape.
    """

    def __init__(self, *, image_shape=(512, 512), counter_depth: int = 12, raw: bool = False,
                 layout: str = "2x2", shutter_s: float = 0.001,
                 thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                 dacs: Sequence[Sequence[int]] | None = None, counter: int = 0,
                 colour_mode: int = 0, gain_mode: int = 0, use_numba: bool = True):
        self.use_numba = use_numba
        if counter_depth not in _PROCESSED:
            raise ValueError(f"counter depth {counter_depth} not in (1, 6, 12, 24)")
        self.counter_depth = counter_depth
        self.raw = bool(raw)
        self.layout = layout
        self.n_chips = _n_chips(layout)
        self.shutter_s = float(shutter_s)
        if not 0 <= self.shutter_s < 1e6:
            raise ValueError(f"shutter time {shutter_s} s out of range")
        self.image_shape = tuple(int(v) for v in image_shape)
        h, w = self.image_shape
        gap = _GAP if layout == "2x2G" else 0
        if self.raw:
            # raw data is whole chip rows: a region-of-interest readout has fewer rows a chip
            # (quad: r rows a chip assemble to 2r image rows, the top chips above the bottom)
            if self.n_chips not in (1, 4) or (self.n_chips == 4 and layout not in ("2x2", "2x2G")):
                raise ValueError(f"raw frames with layout {layout!r} are not supported")
            if self.n_chips == 1:
                rows, allowed = h, [(h, _CHIP)]
            else:
                rows = (h - (gap if w == 2 * _CHIP + gap else 0)) // 2
                allowed = [(2 * rows, 2 * _CHIP)] + ([(2 * rows + gap, 2 * _CHIP + gap)] if gap else [])
            if not 1 <= rows <= _CHIP or self.image_shape not in allowed:
                raise ValueError(f"layout {layout!r} takes raw images of (rows, {_CHIP}) single "
                                 f"chip or (2 rows[+2], 512[+2]) quad with 1..{_CHIP} rows a "
                                 f"chip, not {self.image_shape}")
            self.rows = rows
        else:
            quad = layout in ("2x2", "2x2G")
            full_h = 2 * _CHIP + gap if quad else _CHIP
            full_w = 2 * _CHIP + gap if quad else _CHIP * self.n_chips
            if layout == "2x2G" and self.image_shape == (2 * _CHIP, 2 * _CHIP):
                allowed = [(2 * _CHIP, 2 * _CHIP), (full_h, full_w)]  # the gap is inserted
            elif 1 <= h <= full_h and 1 <= w <= full_w:
                allowed = [self.image_shape]  # full frame, or a region-of-interest readout
            else:
                raise ValueError(f"layout {layout!r} takes images of at most {full_h}x{full_w}, "
                                 f"not {self.image_shape}")
        self._allowed = allowed
        self.max_value = (1 << counter_depth) - 1
        if self.raw:
            self.pixel_type = "R64"
            self.width, self.height = _CHIP * self.n_chips, self.rows
            self.pixel_bytes = self.width * self.height * _RAW_BITS[counter_depth] // 8
            self._row0, self._col0, self._flip = raw_chip_placement(layout, self.rows)
        else:
            self.pixel_type, self._dtype = _PROCESSED[counter_depth]
            self.height, self.width = allowed[-1]
            self.pixel_bytes = self.width * self.height * np.dtype(self._dtype).itemsize
        if dacs is None:
            dacs = [DEFAULT_DACS] * self.n_chips
        if len(dacs) != self.n_chips:
            raise ValueError(f"{len(dacs)} DAC blocks for {self.n_chips} chips")
        thr = ",".join(_merlin_float(t) for t in thresholds)
        dac_text = ",".join("3RX," + ",".join(f"{v:03d}" for v in d) for d in dacs)
        chip_select = (1 << self.n_chips) - 1
        # the fields after the sequence and timestamp do not change from frame to frame
        self._mid = (f"{self.n_chips:02d},{self.width:04d},{self.height:04d},{self.pixel_type},"
                     f"{layout:>6},{chip_select:02X},")
        self.counter = int(counter)
        self._shutter_txt = f",{self.shutter_s:.6f},"
        self._after_counter = f",{colour_mode},{gain_mode},{thr},{dac_text},MQ1A,"
        self._tail_end = f",{round(self.shutter_s * 1e9)}ns,{counter_depth},"
        probe = len(self._text(1, datetime(2000, 1, 1, tzinfo=timezone.utc), 0))
        self.header_size = -(-(probe + 1) // HEADER_BLOCK) * HEADER_BLOCK
        self.message_size = self.header_size + self.pixel_bytes

    def _text(self, sequence: int, ts: datetime, extra_ns: int, counter: int | None = None) -> str:
        utc = ts.astimezone(timezone.utc)
        counter = self.counter if counter is None else counter
        return (f"MQ1,{sequence:06d},{getattr(self, 'header_size', 0):05d},{self._mid}"
                f"{ts.strftime('%Y-%m-%d %H:%M:%S.%f')}{self._shutter_txt}{counter:d}"
                f"{self._after_counter}"
                f"{utc.strftime('%Y-%m-%dT%H:%M:%S.%f')}{extra_ns:03d}Z{self._tail_end}")

    def header(self, sequence: int, timestamp: datetime | None = None, *,
               extra_ns: int = 0, counter: int | None = None) -> bytes:
        """The NUL-padded ``MQ1`` header of frame ``sequence`` (1-based).

        Parameters
        ----------
        sequence : int
            Frame number; written with at least 6 digits.
        timestamp : datetime, optional
            Acquisition time; field 9 is its wall-clock time in its own time zone, the ``MQ1A``
            tail its UTC time. Naive times are taken as local time; default now.
        extra_ns : int, default 0
            Nanoseconds below the microsecond (0-999) for the ``MQ1A`` timestamp.
        counter : int, optional
            Counter field (11); default the constructor's. With ``Active Counters:
            Alternating`` the real software alternates 0 and 1 from frame to frame.
        """
        if sequence < 0:
            raise ValueError("sequence must not be negative")
        if not 0 <= extra_ns <= 999:
            raise ValueError("extra_ns must be 0..999")
        text = self._text(sequence, _local(timestamp), extra_ns, counter).encode("ascii")
        if len(text) > self.header_size:
            raise ValueError(f"header text of {len(text)} bytes exceeds {self.header_size}")
        return text.ljust(self.header_size, b"\x00")

    def _check(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.shape not in self._allowed:
            raise ValueError(f"image of shape {image.shape}, expected one of {self._allowed}")
        if image.dtype.kind not in "uib":
            raise ValueError(f"image dtype {image.dtype} is not integer")
        if image.size:
            hi = image.max()
            lo = image.min() if image.dtype.kind == "i" else 0
            if hi > self.max_value or lo < 0:
                raise ValueError(f"pixel values {lo}..{hi} outside 0..{self.max_value} for a "
                                 f"{self.counter_depth}-bit counter")
        return image

    def pixels(self, image: np.ndarray, out=None) -> bytes | memoryview:
        """Encode an image's pixel data (validated: values above ``2**depth - 1`` raise).

        Parameters
        ----------
        image : ndarray
            Integer image of ``image_shape``.
        out : writable buffer, optional
            ``pixel_bytes`` bytes to write into (e.g. a slice of a message buffer).

        Returns
        -------
        bytes or memoryview
            New bytes, or a memoryview of ``out``.
        """
        image = self._check(image)
        if out is not None:
            dst = np.frombuffer(out, dtype=np.uint8) if not isinstance(out, np.ndarray) else out
            dst = dst.reshape(-1).view(np.uint8)
            if dst.size != self.pixel_bytes:
                raise ValueError(f"out has {dst.size} bytes, need {self.pixel_bytes}")
        else:
            dst = np.empty(self.pixel_bytes, np.uint8)
        if not self.raw:
            if self.layout == "2x2G" and image.shape == (512, 512):
                gapped = np.zeros((514, 514), image.dtype)
                _insert_gap(image, gapped)
                image = gapped
            dst.view(self._dtype).reshape(self.height, self.width)[...] = image
        else:
            if image.shape[1] == 2 * _CHIP + _GAP:
                image = _remove_gap(image)
            if self.counter_depth == 24:
                half = self.pixel_bytes // 2
                image = image.astype(np.uint32, copy=False)
                self._pack(np.asarray(image >> 12, np.uint16), 12, dst[:half])
                self._pack(np.asarray(image & 0xFFF, np.uint16), 12, dst[half:])
            else:
                self._pack(image, self.counter_depth, dst)
        return memoryview(out) if out is not None else dst.tobytes()

    def _pack(self, image: np.ndarray, depth: int, dst: np.ndarray) -> None:
        """Raw-pack an assembled (gap-free) image into ``dst`` (inverse of the decoder)."""
        dtype = np.uint8 if depth in (1, 6) else np.uint16
        image = np.ascontiguousarray(image, dtype=dtype)
        if not self.use_numba:
            if depth == 1:
                _k.pack_raw_1bit_numpy(image, dst, self._row0, self._col0, self._flip)
            else:
                _k.pack_raw_words_numpy(image, dst, self._row0, self._col0, self._flip,
                                        image.itemsize)
            return
        if depth == 1:  # writes bytes: any alignment will do
            _k.pack_raw_1bit(image.view(np.uint64), dst, self._row0, self._col0, self._flip)
            return
        dst64 = dst.view(np.uint64)
        target = dst64 if dst64.flags.aligned else np.empty_like(dst64)
        _k.pack_raw_words(image.view(np.uint64), target, self._row0, self._col0, self._flip,
                          image.itemsize)
        if target is not dst64:
            dst64[...] = target

    def encode(self, sequence: int, image: np.ndarray, timestamp: datetime | None = None, *,
               extra_ns: int = 0) -> bytes:
        """Header + pixel data of one frame (no ``MPX`` prefix): one ``.mib`` record."""
        buf = bytearray(self.message_size)
        buf[:self.header_size] = self.header(sequence, timestamp, extra_ns=extra_ns)
        self.pixels(image, out=memoryview(buf)[self.header_size:])
        return bytes(buf)


def _insert_gap(src: np.ndarray, out: np.ndarray) -> None:
    r = src.shape[0] // 2  # rows a chip (fewer than 256 in a region-of-interest readout)
    out[:r, :_CHIP] = src[:r, :_CHIP]
    out[:r, _CHIP + _GAP:] = src[:r, _CHIP:]
    out[r + _GAP:, :_CHIP] = src[r:, :_CHIP]
    out[r + _GAP:, _CHIP + _GAP:] = src[r:, _CHIP:]


def _remove_gap(src: np.ndarray) -> np.ndarray:
    r = (src.shape[0] - _GAP) // 2
    out = np.empty((2 * r, 2 * _CHIP), src.dtype)
    out[:r, :_CHIP] = src[:r, :_CHIP]
    out[:r, _CHIP:] = src[:r, _CHIP + _GAP:]
    out[r:, :_CHIP] = src[r + _GAP:, :_CHIP]
    out[r:, _CHIP:] = src[r + _GAP:, _CHIP + _GAP:]
    return out


def _paths(stem_or_path) -> tuple[Path, Path]:
    p = Path(stem_or_path)
    mib = p if p.suffix.lower() == ".mib" else Path(str(p) + ".mib")
    return mib, mib.with_suffix(".hdr")


class MibWriter:
    """Write a ``.mib`` file frame by frame, then its ``.hdr`` with the final frame count.

    Parameters
    ----------
    stem_or_path : path-like
        ``name.mib`` or a stem to which ``.mib`` is added; the header goes beside it as ``.hdr``.
    counter_depth, raw, layout, shutter_s
        As for :class:`FrameEncoder`; the image shape is taken from the first frame.
    scan_shape : (int, int), optional
        Written to the acquisition header; frames are then stamped with a line flyback.
    start_time : datetime, optional
        Time stamp of the first frame (default: now); frame ``i`` is stamped
        ``start_time + i * shutter_s + row * flyback_s`` (to the nanosecond; ``row = i // ScanX``
        with a ``scan_shape``, else 0) unless :meth:`write` is given a time. The flyback is
        what real scans have and what readers use to find the scan rows (rosettasciio).
    flyback_s : float, default 1e-3
        Extra time at the start of each scan row.
    **header_extra
        Passed to :func:`encode_acquisition_header`.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from streamclust.adapters.mib import read_mib
    >>> d = tempfile.mkdtemp()
    >>> with MibWriter(os.path.join(d, "scan"), counter_depth=6, layout="1x1") as w:
    ...     w.write(np.full((256, 256), 5, np.uint8))
    >>> read_mib(os.path.join(d, "scan.mib")).shape
    (1, 256, 256)
    """

    def __init__(self, stem_or_path, *, counter_depth: int = 12, raw: bool = False,
                 layout: str = "2x2", scan_shape: tuple[int, int] | None = None,
                 shutter_s: float = 0.001, start_time: datetime | None = None, flyback_s: float = 1e-3,
                 **header_extra):
        self.mib_path, self.hdr_path = _paths(stem_or_path)
        self._shutter_ns = int(round(float(shutter_s) * 1e9))
        self._flyback_ns = int(round(float(flyback_s) * 1e9)) if scan_shape is not None else 0
        self._row_len = int(scan_shape[1]) if scan_shape is not None else 1
        self.counter_depth = counter_depth
        self.raw = raw
        self.layout = layout
        self.scan_shape = scan_shape
        self.shutter_s = shutter_s
        self.start_time = _local(start_time)
        self.header_extra = header_extra
        self.n_written = 0
        self._encoder: FrameEncoder | None = None
        self._file = open(self.mib_path, "wb")

    def __enter__(self) -> MibWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, image: np.ndarray, timestamp: datetime | None = None) -> None:
        """Append one frame (sequence numbers count from 1)."""
        if self._file is None:
            raise ValueError("MibWriter is closed")
        image = np.asarray(image)
        if self._encoder is None:
            self._encoder = FrameEncoder(image_shape=image.shape, counter_depth=self.counter_depth,
                                         raw=self.raw, layout=self.layout,
                                         shutter_s=self.shutter_s)
        extra_ns = 0
        if timestamp is None:
            i = self.n_written
            ns = i * self._shutter_ns + (i // self._row_len) * self._flyback_ns
            timestamp, extra_ns = self.start_time + timedelta(microseconds=ns // 1000), ns % 1000
        self._file.write(self._encoder.encode(self.n_written + 1, image, timestamp, extra_ns=extra_ns))
        self.n_written += 1

    def close(self) -> None:
        """Close the ``.mib`` and write the ``.hdr`` (frame count = frames written)."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        extra = dict(self.header_extra)
        extra.setdefault("time_stamp", self.start_time)
        self.hdr_path.write_bytes(encode_acquisition_header(
            n_frames=self.n_written, counter_depth=self.counter_depth, layout=self.layout,
            raw=self.raw, scan_shape=self.scan_shape, **extra))


def write_mib(stem_or_path, frames: Iterable[np.ndarray] | np.ndarray, *, counter_depth: int = 12,
              raw: bool = False, layout: str = "2x2", scan_shape=None,
              **header_extra) -> tuple[Path, Path]:
    """Write frames to ``.mib`` + ``.hdr`` as the Merlin software does.

    Parameters
    ----------
    stem_or_path : path-like
        ``name.mib`` or a stem.
    frames : iterable of ndarray or ndarray (n, h, w)
    counter_depth, raw, layout, scan_shape
        As for :class:`MibWriter`.
    **header_extra
        ``shutter_s``, ``start_time`` and acquisition header fields (see
        :func:`encode_acquisition_header`).

    Returns
    -------
    (Path, Path)
        The ``.mib`` and ``.hdr`` paths.
    """
    with MibWriter(stem_or_path, counter_depth=counter_depth, raw=raw, layout=layout,
                   scan_shape=scan_shape, **header_extra) as writer:
        for frame in frames:
            writer.write(frame)
    return writer.mib_path, writer.hdr_path
