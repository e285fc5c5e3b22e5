"""streamclust's ZeroMQ wire format: a small JSON header plus one raw array buffer.

Every message we define ourselves (EDS spectra, the frame fan-out, end-of-scan markers) is a
two-part ZeroMQ message:

* part 0: a UTF-8 JSON object (the header), at most :data:`MAX_HEADER_BYTES` bytes;
* part 1: the array's bytes in C order, exactly ``prod(shape) * itemsize`` of them.

The byte-exact description lives in ``docs/wire-formats.md``. Decoding never trusts a size the
header claims: the buffer that actually arrived is measured first, and the claimed size is only
compared with it (and with ``max_bytes``), never used to allocate.

Examples
--------
>>> import numpy as np
>>> parts = encode_array_message(
...     {"stream": "frame", "scan_id": "s1", "position": 0, "sequence": 1, "merlin_sequence": 1},
...     np.arange(6, dtype="<u2").reshape(2, 3))
>>> header, array = decode_array_message(parts)
>>> header["dtype"], header["shape"], array.tolist()
('<u2', [2, 3], [[0, 1, 2], [3, 4, 5]])
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence

import numpy as np
import zmq

from streamclust.adapters.errors import WireFormatError

logger = logging.getLogger(__name__)

__all__ = [
    "WIRE_VERSION",
    "MAX_HEADER_BYTES",
    "COMMON_KEYS",
    "STREAM_KEYS",
    "encode_array_message",
    "decode_array_message",
    "send_array",
    "recv_array",
    "end_header",
]

#: The version every header carries; a receiver rejects any other value.
WIRE_VERSION = 1
#: Upper bound of the JSON header part; larger headers are rejected before parsing.
MAX_HEADER_BYTES = 65536
#: Keys every message's header must carry.
COMMON_KEYS = ("stream", "version", "scan_id", "sequence", "dtype", "shape")
#: Extra keys required per stream (unknown streams only need :data:`COMMON_KEYS`).
STREAM_KEYS = {
    "eds": ("position", "live_time_s", "real_time_s", "energy_offset_kev", "channel_width_kev", "scan_shape"),
    "frame": ("position", "merlin_sequence"),
    "end": ("of_stream", "totals"),
}
#: Default bound of a decoded array buffer (64 MiB: a 2048x2048 float64 frame is 32 MiB).
DEFAULT_MAX_BYTES = 1 << 26
_MAX_NDIM = 8
# explicit byte order, then kind (bool, signed, unsigned, float, complex), then item size
_DTYPE_RE = re.compile(r"^([<>|])([biufc])(\d{1,2})$")
_DECODER = json.JSONDecoder()
#: dtype strings already validated, mapped to their dtype (filled by _parse_dtype)
_DTYPE_CACHE: dict[str, np.dtype] = {}
#: the two header fields that change from one message of a scan to the next: a key with a JSON
#: integer (no sign, no leading 0); _split_varying also wants ``{`` or ``,`` right before the key
#: (so it is never inside a string; a look-behind here would make the split 4x slower)
_VARYING_RE = re.compile(rb'"(sequence|position)":(0|[1-9][0-9]{0,17})(?=[,}])')
_VARYING_NAMES = {(b"sequence", b"position"), (b"position", b"sequence")}
#: validated headers by template (header bytes minus the varying values): see _from_template
_TEMPLATES: dict[tuple, tuple] = {}
_MAX_TEMPLATES = 64


def _fail(kind: str, message: str, sequence: int | None = None) -> WireFormatError:
    err = WireFormatError(message, sequence=sequence)
    # finer than WireFormatError.reason ("bad_message"): the key receivers count drops under
    err.kind = kind
    return err


def _header_bytes(part) -> bytes:
    """The header part as bytes: received with ``copy=True`` it already is (no second copy)."""
    if type(part) is bytes:
        return part
    return _buffer_of(part).tobytes()


def _payload(part):
    """A 1-D byte buffer of the array part; ``bytes`` (``copy=True`` receives) pass through as is."""
    if type(part) is bytes:
        return part
    return _buffer_of(part)


def _buffer_of(part) -> memoryview:
    """A read-only byte view of one received part (zmq.Frame, bytes, memoryview, array)."""
    buf = getattr(part, "buffer", None)  # zmq.Frame received with copy=False
    if buf is None:
        buf = part
    view = memoryview(buf)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B") if view.c_contiguous else memoryview(bytes(view))
    return view


def _loads(text: str):
    """``json.loads(text)``, minus its whitespace scans for the usual compact header."""
    try:
        obj, end = _DECODER.raw_decode(text)
        if end == len(text):
            return obj
    except ValueError:
        pass
    # leading/trailing whitespace, or not JSON: json.loads has the final word (and the message)
    return json.loads(text)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    """An int or float that is finite as a float (an int beyond 1.8e308 is not: no OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_finite_float(value) -> bool:
    # the common case first: a float (NaN and inf fail ``v - v == 0``), then ints and the rest
    if type(value) is float:
        return value - value == 0.0
    return _is_finite_number(value)


def end_header(of_stream: str, scan_id: str, sequence: int, totals: dict, **extra) -> dict:
    """Header of an end-of-scan marker for ``of_stream`` (its buffer is empty)."""
    return {"stream": "end", "of_stream": of_stream, "scan_id": scan_id, "sequence": int(sequence),
            "totals": dict(totals), **extra}


def encode_array_message(header: dict, array: np.ndarray) -> list:
    """Encode ``header`` and ``array`` as ``[json_bytes, buffer]`` without copying the array.

    ``version``, ``dtype`` and ``shape`` are filled in from ``array`` (overriding any given);
    the array is made C-contiguous only if it is not already (then it is copied once). The
    returned buffer is a byte view of the array: keep the array unchanged until sent.

    Raises
    ------
    TypeError
        For dtypes the wire format does not carry (object, strings, records, datetimes).
    """
    array = np.asarray(array)
    if not array.flags.c_contiguous:
        # (not np.ascontiguousarray: it turns 0-d arrays into 1-d ones)
        array = array.copy(order="C")
    dtype_str = array.dtype.str
    if _DTYPE_RE.match(dtype_str) is None:
        raise TypeError(f"dtype {array.dtype} cannot travel in the wire format (numeric and bool only)")
    head = dict(header)
    head["version"] = WIRE_VERSION
    head["dtype"] = dtype_str
    head["shape"] = [int(n) for n in array.shape]
    header_bytes = json.dumps(head, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(header_bytes)} bytes exceeds {MAX_HEADER_BYTES}")
    # a flat uint8 view keeps byte order and costs no copy; 0-d arrays reshape to (1,) first
    payload = memoryview(array.reshape(-1).view(np.uint8))
    return [header_bytes, payload]


def _check_header(head: dict, expect_stream) -> int | None:
    seq = head.get("sequence")
    sequence = seq if _is_int(seq) else None
    for key in COMMON_KEYS:
        if key not in head:
            raise _fail("missing_key", f"header lacks key {key!r}", sequence)
    if type(head["version"]) is not int or head["version"] != WIRE_VERSION:  # (true == 1, 1.0 == 1)
        raise _fail("bad_version", f"unsupported version {head['version']!r} (expected {WIRE_VERSION})", sequence)
    stream = head["stream"]
    if not isinstance(stream, str):
        raise _fail("bad_value", f"stream must be a string, got {stream!r}", sequence)
    if expect_stream is not None:
        if isinstance(expect_stream, str):
            ok = stream == expect_stream or stream == "end"
        else:
            ok = stream == "end" or stream in set(expect_stream)
        if not ok:
            allowed = {expect_stream} if isinstance(expect_stream, str) else set(expect_stream)
            allowed.add("end")
            raise _fail("wrong_stream", f"stream {stream!r} where {sorted(allowed)} expected", sequence)
    if sequence is None or sequence < 1:
        raise _fail("bad_value", f"sequence must be an integer >= 1, got {seq!r}", None)
    for key in STREAM_KEYS.get(stream, ()):
        if key not in head:
            raise _fail("missing_key", f"{stream!r} header lacks key {key!r}", sequence)
    if "position" in head:
        pos = head["position"]
        if type(pos) is not int or pos < 0:  # (bool is a subclass of int, not the type int)
            raise _fail("bad_value", f"position must be an integer >= 0, got {pos!r}", sequence)
    if type(head["scan_id"]) not in (str, int):  # (not a bool, nor a str/int subclass: JSON has none)
        raise _fail("bad_value", f"scan_id must be a string or integer, got {head['scan_id']!r}", sequence)
    if stream == "eds":
        shape = head["scan_shape"]
        if (type(shape) is not list or not 1 <= len(shape) <= 3
                or not all(type(n) is int and n > 0 for n in shape)):
            raise _fail("bad_value", f"scan_shape must be a list of positive integers, got {shape!r}", sequence)
        for key in ("live_time_s", "real_time_s", "energy_offset_kev", "channel_width_kev"):
            value = head[key]
            if not _is_finite_float(value):
                raise _fail("bad_value", f"{key} must be a finite number, got {value!r}", sequence)
    if stream == "frame":
        ms = head["merlin_sequence"]
        if not _is_int(ms) or ms < 1:
            raise _fail("bad_value", f"merlin_sequence must be an integer >= 1, got {ms!r}", sequence)
    if stream == "end" and not isinstance(head["totals"], dict):
        raise _fail("bad_value", "end marker totals must be an object", sequence)
    return sequence


def decode_array_message(parts: Sequence, *, max_bytes: int | None = DEFAULT_MAX_BYTES,
                         expect_stream: str | Iterable[str] | None = None) -> tuple[dict, np.ndarray]:
    """Validate and decode one multipart message into ``(header, array)``.

    Parameters
    ----------
    parts : sequence
        The received parts (``zmq.Frame`` with ``copy=False``, or bytes-like).
    max_bytes : int or None
        Largest array buffer accepted; None for no bound.
    expect_stream : str or iterable of str, optional
        Streams accepted besides ``"end"``.

    Returns
    -------
    header : dict
    array : ndarray
        A read-only view of the received buffer (no copy), with the header's dtype and shape.

    Raises
    ------
    WireFormatError
        With ``.kind`` one of ``part_count``, ``header_too_large``, ``bad_json``, ``missing_key``,
        ``bad_version``, ``wrong_stream``, ``bad_value``, ``bad_dtype``, ``bad_shape``,
        ``too_large``, ``size_mismatch``; ``.sequence`` is set once it is known.
    """
    if len(parts) != 2:
        raise _fail("part_count", f"message has {len(parts)} parts, expected 2 (header, buffer)")
    raw = _header_bytes(parts[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise _fail("header_too_large", f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    pieces = _VARYING_RE.split(raw) if type(expect_stream) is str or expect_stream is None else None
    key = None
    if (pieces is not None and len(pieces) == 7 and pieces[0][-1:] in (b"{", b",")
            and pieces[3][-1:] == b","):
        key = (expect_stream, *pieces[0::3], pieces[1], pieces[4])
        hit = _TEMPLATES.get(key)
        # (a sequence of 0 is invalid: the full path names the error)
        if hit is not None and (pieces[2] if pieces[1] == b"sequence" else pieces[5]) != b"0":
            return _from_template(hit, pieces, parts[1], max_bytes)
    try:
        head = _loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: nesting deeper than the interpreter's limit ("[[[[..." within 64 KiB)
        raise _fail("bad_json", f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(head, dict):
        raise _fail("bad_json", f"header is a JSON {type(head).__name__}, not an object")
    sequence = _check_header(head, expect_stream)

    dtype_str = head["dtype"]
    # a scan repeats one dtype: a string validated once is looked up, not re-parsed
    dtype = _DTYPE_CACHE.get(dtype_str) if type(dtype_str) is str else None
    if dtype is None:
        dtype = _parse_dtype(dtype_str, sequence)

    shape = head["shape"]
    if type(shape) is list and len(shape) == 1 and type(shape[0]) is int and shape[0] >= 0:
        claimed = shape[0] * dtype.itemsize  # the 1-D case (spectra) without the general checks
    else:
        claimed = _check_shape(shape, dtype, sequence)
    if max_bytes is not None and claimed > max_bytes:
        raise _fail("too_large", f"array of {claimed} bytes exceeds the limit of {max_bytes}", sequence)
    buf = _payload(parts[1])
    nbytes = len(buf) if type(buf) is bytes else buf.nbytes
    if nbytes != claimed:
        raise _fail("size_mismatch",
                    f"buffer has {nbytes} bytes, shape {shape} of {dtype_str} needs {claimed}", sequence)
    try:
        array = np.frombuffer(buf, dtype=dtype)
        if len(shape) != 1:
            array = array.reshape(shape)
    except ValueError as exc:
        # an empty buffer with a zero dimension beside a dimension numpy cannot index (> 2**63)
        raise _fail("bad_shape", f"shape {shape} cannot be represented ({exc})", sequence) from None
    array.flags.writeable = False
    if key is not None:
        _remember_template(key, pieces, head, dtype, claimed)
    return head, array


def _remember_template(key: tuple, pieces: list, head: dict, dtype: np.dtype, claimed: int) -> None:
    """Remember a validated header whose only varying fields are ``sequence`` and ``position``.

    A later header equal to it byte for byte except for those two integers differs from it in
    nothing else: it parses to the same object with two other integers, which need no other
    check than ``sequence >= 1`` (a position of any size is valid). That replaces the JSON parse
    and the validation (6.4 us of a 9 us spectrum message) by a regular-expression split.
    """
    names = (pieces[1], pieces[4])
    if names not in _VARYING_NAMES:
        return
    for name, value in zip(names, (pieces[2], pieces[5])):
        got = head.get(name.decode())
        if type(got) is not int or got != int(value):
            return  # the matched text is not what the parser saw (cannot happen; be sure)
    for value in head.values():
        # returned headers get their own copy of every list (see _from_template): flat ones only
        if type(value) is dict or (type(value) is list and any(type(v) in (list, dict) for v in value)):
            return
    if len(_TEMPLATES) >= _MAX_TEMPLATES:
        _TEMPLATES.clear()  # many scans (or a hostile peer varying other fields): start over
    list_keys = tuple(k for k, v in head.items() if type(v) is list)
    _TEMPLATES[key] = (dict(head), list_keys, dtype, claimed)


def _from_template(hit: tuple, pieces: list, payload, max_bytes: int | None) -> tuple[dict, np.ndarray]:
    """Decode a message whose header matches a remembered template (see _remember_template)."""
    cached, list_keys, dtype, claimed = hit
    head = cached.copy()
    for k in list_keys:  # each header its own lists, as a parse would give
        head[k] = head[k][:]
    head[pieces[1].decode()] = int(pieces[2])
    head[pieces[4].decode()] = int(pieces[5])
    sequence = head["sequence"]
    if max_bytes is not None and claimed > max_bytes:
        raise _fail("too_large", f"array of {claimed} bytes exceeds the limit of {max_bytes}", sequence)
    buf = _payload(payload)
    nbytes = len(buf) if type(buf) is bytes else buf.nbytes
    if nbytes != claimed:
        raise _fail("size_mismatch",
                    f"buffer has {nbytes} bytes, shape {head['shape']} of {head['dtype']} needs {claimed}",
                    sequence)
    array = np.frombuffer(buf, dtype=dtype)
    shape = head["shape"]
    if len(shape) != 1:
        array = array.reshape(shape)
    array.flags.writeable = False
    return head, array


def _parse_dtype(dtype_str, sequence: int | None) -> np.dtype:
    """Validate a header's dtype string; remember valid ones in :data:`_DTYPE_CACHE`."""
    match = _DTYPE_RE.match(dtype_str) if isinstance(dtype_str, str) else None
    if match is None:
        raise _fail("bad_dtype", f"dtype {dtype_str!r} is not a numeric dtype with explicit byte order", sequence)
    try:
        dtype = np.dtype(dtype_str)
    except TypeError:
        raise _fail("bad_dtype", f"dtype {dtype_str!r} is not understood", sequence) from None
    if dtype.itemsize != int(match.group(3)) or (match.group(1) == "|") != (dtype.itemsize == 1):
        raise _fail("bad_dtype", f"dtype {dtype_str!r} is not canonical (expected {dtype.str!r})", sequence)
    # bounded: the pattern admits 3 x 5 x 100 strings, and only canonical ones get here
    _DTYPE_CACHE[dtype_str] = dtype
    return dtype


def _check_shape(shape, dtype: np.dtype, sequence: int | None) -> int:
    """Validate a header's shape; return the byte size it claims (never allocated)."""
    if (not isinstance(shape, list) or len(shape) > _MAX_NDIM
            or not all(_is_int(n) and n >= 0 for n in shape)):
        raise _fail("bad_shape", f"shape must be a list of at most {_MAX_NDIM} integers >= 0, got {shape!r}",
                    sequence)
    # Python integers: a hostile shape cannot overflow into a small product
    return math.prod(shape) * dtype.itemsize


def send_array(socket: zmq.Socket, header: dict, array: np.ndarray, *, copy_threshold: int = 65536,
               flags: int = 0) -> None:
    """Send one array message; the buffer goes zero-copy (``copy=False``) above ``copy_threshold``.

    Below pyzmq's 64 KiB threshold copying is as fast as the bookkeeping of a zero-copy send.
    With ``copy=False`` the array must not be modified until ZeroMQ has sent it.
    """
    parts = encode_array_message(header, array)
    socket.send_multipart(parts, flags=flags, copy=parts[1].nbytes < copy_threshold)


def recv_array(socket: zmq.Socket, *, max_bytes: int | None = DEFAULT_MAX_BYTES, flags: int = 0,
               expect_stream=None) -> tuple[dict, np.ndarray]:
    """Receive and decode one array message (zero-copy). Raises :class:`WireFormatError` on bad input."""
    parts = socket.recv_multipart(flags=flags, copy=False)
    return decode_array_message(parts, max_bytes=max_bytes, expect_stream=expect_stream)
