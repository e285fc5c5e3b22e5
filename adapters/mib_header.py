"""The MIB headers: the acquisition header (the ``.hdr`` text, the first data-port message) and the
``MQ1`` frame header in front of every frame's pixels.

Both are parsed from bytes that may be anything: every field is checked, every failure is a
:class:`~streamclust.adapters.errors.HeaderError` with the offset (and sequence when known), and no
size a header claims is allocated. What the fields mean is in ``docs/merlin-format.md``; the
pixels are decoded by :mod:`streamclust.adapters.mib_decode`, files read by
:mod:`streamclust.adapters.mib` (which re-exports these names).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from streamclust.adapters import mib_kernels as _k
from streamclust.adapters.errors import HeaderError

__all__ = [
    "AcquisitionHeader",
    "parse_acquisition_header",
    "MQ1_PEEK",
    "MAX_HEADER_SIZE",
    "MIN_HEADER_SIZE",
    "FrameHeader",
    "peek_header_size",
    "parse_frame_header",
    "COUNTER_DEPTHS",
    "PIXEL_TYPES",
    "RAW_BITS",
    "CHIP_GAP",
]

#: counter depths a Medipix3 can be read out at
COUNTER_DEPTHS = (1, 6, 12, 24)
#: pixel types in the MQ1 header and the big-endian dtypes of the processed ones
PIXEL_TYPES = {"U08": ">u1", "U16": ">u2", "U32": ">u4", "U64": ">u8", "R64": ">u8"}
#: bytes needed before the header size (bytes 11-15 of an MQ1 header) is known
MQ1_PEEK = 16
#: largest MQ1 header we accept (real ones: 384 single chip, 768 quad)
MAX_HEADER_SIZE = 65536
#: smallest MQ1 header that can hold the mandatory fields
MIN_HEADER_SIZE = 64
#: bits a raw (R64) pixel occupies per counter depth (pixels are padded to 1, 8, 16 bits; 24-bit
#: raw carries two 12-bit frames)
RAW_BITS = {1: 1, 6: 8, 12: 16, 24: 32}
_IMAGE_DTYPE = {1: np.dtype(np.uint8), 6: np.dtype(np.uint8), 12: np.dtype(np.uint16),
                24: np.dtype(np.uint32)}
_PROCESSED_DTYPE = {"U08": np.dtype(np.uint8), "U16": np.dtype(np.uint16),
                    "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64)}
_DEFAULT_DEPTH = {"U16": 12, "U32": 24, "U64": 24}
_LAYOUTS = ("1x1", "2x2", "2x2G")
_NX1 = re.compile(r"^([1-9][0-9]?)x1$")
_CHIP = _k.CHIP_SIZE
#: pixels between the chips of a ``2x2G`` (gapped quad) image
CHIP_GAP = 2


# --------------------------------------------------------------------------------------------
# acquisition header (.hdr / first data-port message)
# --------------------------------------------------------------------------------------------

def _norm_key(key: str) -> str:
    """Lower case, whitespace collapsed, ``(...)`` hint dropped: how known keys are looked up."""
    key = key.split("(", 1)[0]
    return " ".join(key.lower().split())


class AcquisitionHeader(Mapping[str, str]):
    """The acquisition header: every key/value of the ``HDR`` text, unknown keys kept.

    Lookups by exact key work as for a dict (``header["Counter Depth (number)"]``); the typed
    properties find known keys case-insensitively and ignore the parenthesised hints, which vary
    between software versions (``(Number)`` / ``(number)``).

    Parameters
    ----------
    fields : mapping of str to str
        Keys and values in header order.

    Examples
    --------
    >>> h = parse_acquisition_header(b"HDR,\\r\\nFrames in Acquisition (Number):\\t9\\r\\n"
    ...     b"Counter Depth (number):\\t12\\r\\nAssembly Size (NX1, 2X2):\\t   2x2\\r\\nEnd\\t   ")
    >>> h.n_frames, h.counter_depth, h.assembly_size, h.frames_per_trigger, h.scan_shape
    (9, 12, '2x2', 1, None)
    """

    def __init__(self, fields: Mapping[str, str]):
        self._fields = dict(fields)
        self._by_norm = {}
        for key, value in self._fields.items():
            self._by_norm.setdefault(_norm_key(key), value)

    def __getitem__(self, key: str) -> str:
        return self._fields[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return (f"AcquisitionHeader(n_frames={self.n_frames}, counter_depth={self.counter_depth}, "
                f"assembly_size={self.assembly_size!r}, scan_shape={self.scan_shape})")

    def get_field(self, name: str, default: str | None = None) -> str | None:
        """Value of a key found case-insensitively, ignoring any ``(...)`` hint."""
        return self._by_norm.get(_norm_key(name), default)

    def _int(self, name: str, default: int | None = None) -> int:
        value = self.get_field(name)
        if value is None:
            if default is None:
                raise HeaderError(f"acquisition header has no {name!r}")
            return default
        try:
            return int(value.strip())
        except ValueError:
            raise HeaderError(f"acquisition header {name!r} is not an integer: {value!r}") from None

    @property
    def n_frames(self) -> int:
        """``Frames in Acquisition (Number)``; 0 means continuous."""
        return self._int("Frames in Acquisition")

    @property
    def frames_per_trigger(self) -> int:
        """``Frames per Trigger (Number)`` (1 when absent)."""
        return self._int("Frames per Trigger", 1)

    @property
    def counter_depth(self) -> int:
        """``Counter Depth (number)``: 1, 6, 12 or 24."""
        return self._int("Counter Depth")

    @property
    def assembly_size(self) -> str:
        """``Assembly Size (NX1, 2X2)`` as given, stripped (``"1x1"``, ``"2x2"``, ...)."""
        return (self.get_field("Assembly Size") or "").strip()

    @property
    def scan_shape(self) -> tuple[int, int] | None:
        """``(ScanY, ScanX)`` when the software sends them (newer versions), else None."""
        if self.get_field("ScanX") is None or self.get_field("ScanY") is None:
            return None
        return (self._int("ScanY"), self._int("ScanX"))

    @property
    def chip_mode(self) -> str | None:
        """``Chip Mode`` (SPM, CSM, CM, CSCM)."""
        return self.get_field("Chip Mode")

    @property
    def software_version(self) -> str | None:
        """``Software Version``."""
        return self.get_field("Software Version")

    @property
    def thresholds(self) -> tuple[float, ...]:
        """``Thresholds (keV)`` as floats (empty when absent or unparsable)."""
        value = self.get_field("Thresholds") or ""
        try:
            return tuple(float(v) for v in value.split(",") if v.strip())
        except ValueError:
            return ()


_HDR_TEXT_BAD = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def parse_acquisition_header(data: bytes | bytearray | memoryview) -> AcquisitionHeader:
    """Parse the acquisition header text (``.hdr`` file or the first data-port message).

    Accepts the text with or without the leading ``HDR,``, CRLF or LF line ends, a tab or spaces
    after the colon, and any space/NUL padding after ``End``. Everything after ``End`` is ignored.

    Parameters
    ----------
    data : bytes-like
        The header bytes (Latin-1 text).

    Returns
    -------
    AcquisitionHeader

    Raises
    ------
    HeaderError
        Control characters in a line, a line without ``key: value``, no fields at all, or
        ``Frames in Acquisition`` / ``Counter Depth`` missing or invalid (offset = line start).

    Examples
    --------
    >>> text = b"Frames in Acquisition (Number): 0\\nCounter Depth (number): 6\\n"
    >>> parse_acquisition_header(text).n_frames
    0
    """
    text = bytes(data).decode("latin-1")
    fields: dict[str, str] = {}
    pos = 0
    for line in text.split("\n"):
        start = pos
        pos += len(line) + 1
        # trailing spaces are part of some real values ("Board Humidity 14.500183 ")
        stripped = line.rstrip("\r").lstrip(" \t\x00")
        if not stripped.strip(" \t\x00"):
            continue
        if stripped.startswith("HDR,"):
            stripped = stripped[4:].strip(" \t")
            if not stripped:
                continue
        if stripped.rstrip(" \t\x00") == "End" or stripped.startswith(("End\t", "End ")):
            break
        if _HDR_TEXT_BAD.search(stripped):
            raise HeaderError("acquisition header line holds control characters", offset=start)
        key, sep, value = stripped.partition(":")
        if not sep or not key.strip():
            raise HeaderError(f"acquisition header line is not 'key: value': {stripped[:60]!r}",
                              offset=start)
        fields[key.strip()] = value.lstrip(" \t")
    if not fields:
        raise HeaderError("acquisition header holds no fields", offset=0)
    header = AcquisitionHeader(fields)
    n_frames = header.n_frames
    if n_frames < 0:
        raise HeaderError(f"acquisition header frame count {n_frames} is negative")
    if header.frames_per_trigger < 0:
        raise HeaderError("acquisition header frames per trigger is negative")
    if header.counter_depth not in COUNTER_DEPTHS:
        raise HeaderError(f"acquisition header counter depth {header.counter_depth} not in "
                          f"{COUNTER_DEPTHS}")
    shape = header.scan_shape
    if shape is not None and min(shape) < 1:
        raise HeaderError(f"acquisition header scan shape {shape} is not positive")
    return header


# --------------------------------------------------------------------------------------------
# frame header (MQ1)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FrameHeader:
    """One parsed ``MQ1`` frame header.

    Attributes
    ----------
    sequence : int
        Frame number, 1-based.
    header_size : int
        Bytes from the start of the header to the pixel data (384 single chip, 768 quad).
    n_chips, width, height : int
        As written in the header (raw quad: 4, 1024, 256).
    pixel_type : str
        ``U08``, ``U16``, ``U32``, ``U64`` (processed, big-endian) or ``R64`` (raw).
    layout : str
        ``1x1``, ``2x2``, ``2x2G`` or ``Nx1`` (stripped of the padding spaces).
    counter_depth : int
        From the ``MQ1A`` tail when present, else a hint, else implied by the pixel type.
    chip_select : int
        Bit mask of active chips (hex in the header).
    timestamp : str
        Local wall-clock time as written (``2021-04-15 14:44:43.100924``).
    shutter_s : float
        Shutter (exposure) time in seconds.
    counter, colour_mode, gain_mode : int
        Fields 11-13.
    thresholds : tuple of float
        The eight thresholds (keV).
    dacs : tuple of tuple of int
        Per-chip DAC values (the ``3RX`` blocks).
    tail_timestamp : str or None
        ``MQ1A`` extended timestamp (UTC, nanoseconds), when present.
    shutter_ns : int or None
        ``MQ1A`` shutter time in nanoseconds, when present.
    pixel_bytes : int
        Size of the pixel data that follows the header.
    image_shape : tuple of int
        Shape of the assembled image (raw quad 1024x256 -> 512x512; ``2x2G`` 514x514; a raw
        region-of-interest readout of ``r`` rows: ``(r, 256)`` single chip, ``(2r, 512)`` quad).
    image_dtype : numpy.dtype
        uint8 for 1/6-bit, uint16 for 12-bit, uint32 for 24-bit (raw included); uint64 for U64.
    """

    sequence: int
    header_size: int
    n_chips: int
    width: int
    height: int
    pixel_type: str
    layout: str
    counter_depth: int
    chip_select: int
    timestamp: str
    shutter_s: float
    counter: int
    colour_mode: int
    gain_mode: int
    thresholds: tuple[float, ...]
    dacs: tuple[tuple[int, ...], ...]
    tail_timestamp: str | None
    shutter_ns: int | None
    pixel_bytes: int
    image_shape: tuple[int, int]
    image_dtype: np.dtype = field(compare=False)

    @property
    def raw(self) -> bool:
        """True for raw (``R64``) pixel data."""
        return self.pixel_type == "R64"

    @property
    def message_size(self) -> int:
        """Header plus pixel bytes: one ``.mib`` record, one data-port payload."""
        return self.header_size + self.pixel_bytes

    def geometry(self) -> tuple:
        """What must stay the same for one :class:`FrameDecoder` to decode a frame."""
        return (self.n_chips, self.width, self.height, self.pixel_type, self.layout,
                self.counter_depth)


def peek_header_size(data: bytes | bytearray | memoryview, *, offset: int = 0) -> int:
    """Return the MQ1 header size from the first :data:`MQ1_PEEK` bytes of a frame.

    Raises
    ------
    HeaderError
        Too few bytes, wrong magic, or a header size that is not 5 digits within
        ``MIN_HEADER_SIZE..MAX_HEADER_SIZE`` (offset = ``offset``).

    Examples
    --------
    >>> peek_header_size(b"MQ1,000001,00768,04,")
    768
    """
    # 32 bytes when available: a sequence number beyond 999,999 pushes the size one byte on
    with memoryview(data) as view:
        raw = bytes(view[offset:offset + 32])
    if len(raw) < MQ1_PEEK:
        raise HeaderError(f"MQ1 header needs {MQ1_PEEK} bytes to find its size, got {len(raw)}",
                          offset=offset)
    if raw[:4] != b"MQ1,":
        raise HeaderError(f"frame header expected magic b'MQ1,', got {raw[:4]!r}", offset=offset)
    comma = raw.find(b",", 4)
    digits = raw[comma + 1:comma + 6] if comma > 4 else b""
    if not raw[4:comma].isdigit() or len(digits) < 5 or not digits.isdigit():
        raise HeaderError(f"MQ1 header size must be 5 digits after the sequence number, got "
                          f"{raw[:16]!r}", offset=offset)
    size = int(digits)
    if not MIN_HEADER_SIZE <= size <= MAX_HEADER_SIZE:
        raise HeaderError(f"MQ1 header size {size} outside {MIN_HEADER_SIZE}..{MAX_HEADER_SIZE}",
                          offset=offset)
    return size


def _layout_geometry(pixel_type: str, layout: str, n_chips: int, width: int, height: int,
                     depth: int, offset: int, sequence: int) -> tuple[int, tuple[int, int]]:
    """Pixel byte count and assembled image shape; HeaderError when inconsistent."""
    def bad(msg: str) -> HeaderError:
        return HeaderError(msg, offset=offset, sequence=sequence)

    m = _NX1.match(layout)
    if layout not in _LAYOUTS and m is None:
        raise bad(f"unknown sensor layout {layout!r}")
    chips_for_layout = {"1x1": 1, "2x2": 4, "2x2G": 4}.get(layout) or int(m.group(1))
    if n_chips != chips_for_layout:
        raise bad(f"layout {layout!r} needs {chips_for_layout} chips, header says {n_chips}")
    n_pixels = width * height
    # a region-of-interest readout sends fewer rows (and, processed, possibly fewer columns)
    # than the layout's full frame: the header's width and height are followed, bounded by
    # the full frame of its chips (never more than the chips can hold)
    if pixel_type == "R64":
        if layout not in _LAYOUTS:
            raise bad(f"raw (R64) frames with layout {layout!r} are not supported")
        full_w = n_chips * _CHIP
        if width != full_w or not 1 <= height <= _CHIP:
            raise bad(f"raw {layout} frame must be {full_w} wide and 1..{_CHIP} rows, header "
                      f"says {width}x{height}")
        if layout == "1x1":
            shape = (height, _CHIP)
        else:
            gap = CHIP_GAP if layout == "2x2G" else 0
            shape = (2 * height + gap, 2 * _CHIP + gap)
        return n_pixels * RAW_BITS[depth] // 8, shape
    itemsize = np.dtype(PIXEL_TYPES[pixel_type]).itemsize
    full_w, full_h = _full_frame(layout, n_chips)
    if not (width <= full_w and height <= full_h):
        raise bad(f"{layout} frame is at most {full_w}x{full_h}, header says {width}x{height}")
    return n_pixels * itemsize, (height, width)


def _full_frame(layout: str, n_chips: int) -> tuple[int, int]:
    """Width and height of a full (not region-of-interest) processed frame of ``layout``."""
    if layout == "1x1":
        return _CHIP, _CHIP
    if layout == "2x2":
        return 2 * _CHIP, 2 * _CHIP
    if layout == "2x2G":
        return 2 * _CHIP + CHIP_GAP, 2 * _CHIP + CHIP_GAP
    return n_chips * _CHIP, _CHIP


@lru_cache(maxsize=64)
def _parse_thresholds_dacs(segment: str) -> tuple[tuple[float, ...], tuple[tuple[int, ...], ...]]:
    """Thresholds (fields 14-21) and per-chip DAC blocks (``3RX``, then integers)."""
    parts = segment.split(",") if segment else []
    thresholds = tuple(float(v) for v in parts[:8])
    dacs = []
    i = 8
    while i < len(parts):
        if not parts[i].isalnum() or parts[i].isdigit():
            raise ValueError(f"expected a chip DAC block, got {parts[i]!r}")
        j = i + 1
        while j < len(parts) and parts[j].isdigit():
            j += 1
        dacs.append(tuple(int(v) for v in parts[i + 1:j]))
        i = j
    return thresholds, tuple(dacs)


def parse_frame_header(
    data: bytes | bytearray | memoryview,
    *,
    offset: int = 0,
    counter_depth: int | None = None,
    max_pixel_bytes: int | None = None,
    sequence_hint: int | None = None,
) -> FrameHeader:
    """Parse one ``MQ1`` frame header.

    Parameters
    ----------
    data : bytes-like
        Buffer holding the whole header (``header_size`` bytes) from ``offset`` on; pixel data
        may follow.
    offset : int, default 0
        Index in ``data`` where the header starts; reported in errors as the byte offset.
    counter_depth : int, optional
        Depth to use when the header has no ``MQ1A`` tail (old software): needed for raw data
        and to tell 1-bit from 6-bit ``U08``. A tail that disagrees with it raises.
    max_pixel_bytes : int, optional
        Largest pixel data acceptable; a header claiming more raises before anything is
        allocated for it.
    sequence_hint : int, optional
        Sequence number to report in errors raised before the header's own is parsed.

    Returns
    -------
    FrameHeader

    Raises
    ------
    HeaderError
        Wrong magic, short buffer, malformed or inconsistent fields (geometry, pixel type,
        counter depth, header size); ``.offset`` and (once parsed) ``.sequence`` say where.
    """
    header_size = peek_header_size(data, offset=offset)
    with memoryview(data) as view:
        available = len(view) - offset
        region = bytes(view[offset:offset + header_size])
    if available < header_size:
        raise HeaderError(f"MQ1 header of {header_size} bytes but only {available} available",
                          offset=offset, sequence=sequence_hint)
    text = region.rstrip(b"\x00")
    if region[-1:] != b"\x00" and text[-1:] != b",":
        # real headers are NUL padded; a size too small cuts the text mid-field
        raise HeaderError(f"MQ1 header size {header_size} cuts the header text (no NUL padding)",
                          offset=offset, sequence=sequence_hint)
    try:
        text_s = text.decode("ascii")
    except UnicodeDecodeError:
        raise HeaderError("MQ1 header is not ASCII text", offset=offset,
                          sequence=sequence_hint) from None
    if "\x00" in text_s:
        raise HeaderError("MQ1 header holds NUL bytes before its end", offset=offset,
                          sequence=sequence_hint)
    parts = text_s.split(",")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # the header text ends with a comma
    seq = sequence_hint
    try:
        seq = int(parts[1])
        n_chips = int(parts[3])
        width = int(parts[4])
        height = int(parts[5])
        pixel_type = parts[6]
        layout = parts[7].strip()
        chip_select = int(parts[8], 16)
        timestamp = parts[9]
        shutter_s = float(parts[10])
        counter = int(parts[11])
        colour_mode = int(parts[12])
        gain_mode = int(parts[13])
    except (IndexError, ValueError) as exc:
        raise HeaderError(f"MQ1 header fields 1-13 malformed ({exc})", offset=offset,
                          sequence=seq) from None
    if not parts[1].isdigit() or seq < 0:
        raise HeaderError(f"MQ1 sequence {parts[1]!r} is not a number", offset=offset,
                          sequence=sequence_hint)
    if pixel_type not in PIXEL_TYPES:
        raise HeaderError(f"unknown pixel type {pixel_type!r}", offset=offset, sequence=seq)
    if not (0 < n_chips <= 64 and 0 < width <= 16384 and 0 < height <= 16384):
        raise HeaderError(f"MQ1 geometry {n_chips} chips {width}x{height} impossible",
                          offset=offset, sequence=seq)
    if not (shutter_s >= 0 and shutter_s < 1e9):  # also rejects nan
        raise HeaderError(f"MQ1 shutter time {shutter_s} invalid", offset=offset, sequence=seq)

    # the MQ1A tail (software >= 0.67) ends the header: MQ1A,<ISO ns>,<N>ns,<depth>,
    tail_timestamp = None
    shutter_ns = None
    tail_depth = None
    try:
        tail_at = parts.index("MQ1A", 14)
    except ValueError:
        tail_at = len(parts)
    else:
        try:
            tail_timestamp = parts[tail_at + 1]
            ns = parts[tail_at + 2]
            if not ns.endswith("ns"):
                raise ValueError(f"shutter {ns!r} lacks 'ns'")
            shutter_ns = int(ns[:-2])
            tail_depth = int(parts[tail_at + 3])
        except (IndexError, ValueError) as exc:
            raise HeaderError(f"MQ1A tail malformed ({exc})", offset=offset,
                              sequence=seq) from None
    try:
        # identical in every frame of an acquisition: parse once (the DACs are ~110 numbers)
        thresholds, dacs = _parse_thresholds_dacs(",".join(parts[14:tail_at]))
    except ValueError as exc:
        raise HeaderError(f"MQ1 thresholds/DACs malformed ({exc})", offset=offset,
                          sequence=seq) from None

    if tail_depth is not None:
        if counter_depth is not None and counter_depth != tail_depth:
            raise HeaderError(f"MQ1A counter depth {tail_depth} disagrees with the expected "
                              f"{counter_depth}", offset=offset, sequence=seq)
        depth = tail_depth
    elif counter_depth is not None:
        depth = counter_depth
    elif pixel_type in _DEFAULT_DEPTH:
        depth = _DEFAULT_DEPTH[pixel_type]
    elif pixel_type == "U08":
        depth = 6  # 1-bit and 6-bit both arrive as U08; both decode to uint8 alike
    else:
        raise HeaderError("raw (R64) frame without MQ1A tail: pass counter_depth",
                          offset=offset, sequence=seq)
    if depth not in COUNTER_DEPTHS:
        raise HeaderError(f"counter depth {depth} not in {COUNTER_DEPTHS}", offset=offset,
                          sequence=seq)
    allowed = {"U08": (1, 6), "U16": (12,), "U32": (24, 12, 6, 1), "U64": COUNTER_DEPTHS,
               "R64": COUNTER_DEPTHS}[pixel_type]
    if depth not in allowed:
        raise HeaderError(f"counter depth {depth} cannot be carried as {pixel_type}",
                          offset=offset, sequence=seq)
    pixel_bytes, image_shape = _layout_geometry(pixel_type, layout, n_chips, width, height,
                                                depth, offset, seq)
    if max_pixel_bytes is not None and pixel_bytes > max_pixel_bytes:
        raise HeaderError(f"frame claims {pixel_bytes} pixel bytes, more than the "
                          f"{max_pixel_bytes} allowed", offset=offset, sequence=seq)
    image_dtype = _IMAGE_DTYPE[depth] if pixel_type == "R64" else _PROCESSED_DTYPE[pixel_type]
    return FrameHeader(
        sequence=seq, header_size=header_size, n_chips=n_chips, width=width, height=height,
        pixel_type=pixel_type, layout=layout, counter_depth=depth, chip_select=chip_select,
        timestamp=timestamp, shutter_s=shutter_s, counter=counter, colour_mode=colour_mode,
        gain_mode=gain_mode, thresholds=thresholds, dacs=dacs,
        tail_timestamp=tail_timestamp, shutter_ns=shutter_ns, pixel_bytes=pixel_bytes,
        image_shape=image_shape, image_dtype=image_dtype,
    )

