"""MPX message framing, as used by the Merlin detector on both TCP ports (control and data).

Every message is ``MPX,`` + a 10-digit zero-padded decimal length ``L`` + ``,`` (15 bytes),
followed by ``L - 1`` payload bytes: ``L`` counts the comma after the digits plus the payload.
A quad 12-bit frame travels as ``MPX,0000525057,`` + 768 header bytes + 524,288 pixel bytes.

The length is never trusted blindly: :func:`parse_mpx_prefix` bounds it by ``max_payload``
(the largest message the acquisition allows) before anyone allocates a buffer for it.

Examples
--------
>>> from streamclust.adapters.framing import encode_mpx_prefix, parse_mpx_prefix, frame_message
>>> encode_mpx_prefix(525056)
b'MPX,0000525057,'
>>> parse_mpx_prefix(b'MPX,0000525057,')
525056
>>> frame_message(b'GET,DETECTORSTATUS')
b'MPX,0000000019,GET,DETECTORSTATUS'
"""

from __future__ import annotations

import logging

from streamclust.adapters.errors import FramingError

__all__ = [
    "MPX_MAGIC",
    "MPX_PREFIX_SIZE",
    "MAX_MPX_PAYLOAD",
    "encode_mpx_prefix",
    "parse_mpx_prefix",
    "frame_message",
]

logger = logging.getLogger(__name__)

#: the four bytes every message starts with
MPX_MAGIC = b"MPX,"
#: ``MPX,`` + 10 digits + ``,``
MPX_PREFIX_SIZE = 15
#: the largest payload ten digits can announce (L = payload + 1 <= 9,999,999,999)
MAX_MPX_PAYLOAD = 9_999_999_998

_DIGITS = frozenset(b"0123456789")


def encode_mpx_prefix(payload_length: int) -> bytes:
    """Return the 15-byte ``MPX,<L>,`` prefix for a payload of ``payload_length`` bytes.

    Parameters
    ----------
    payload_length : int
        Number of payload bytes that follow the prefix (``L - 1``).

    Returns
    -------
    bytes
        ``b"MPX,%010d," % (payload_length + 1)``.

    Raises
    ------
    ValueError
        If the length is negative or does not fit in ten digits.

    Examples
    --------
    >>> encode_mpx_prefix(0)
    b'MPX,0000000001,'
    """
    payload_length = int(payload_length)
    if not 0 <= payload_length <= MAX_MPX_PAYLOAD:
        raise ValueError(f"MPX payload length {payload_length} outside 0..{MAX_MPX_PAYLOAD}")
    return b"MPX,%010d," % (payload_length + 1)


def parse_mpx_prefix(
    prefix: bytes | bytearray | memoryview,
    *,
    offset: int = 0,
    max_payload: int | None = None,
) -> int:
    """Parse a ``MPX,<L>,`` prefix and return the payload length ``L - 1``.

    Parameters
    ----------
    prefix : bytes-like
        Buffer holding at least :data:`MPX_PREFIX_SIZE` bytes from ``offset`` on.
    offset : int, default 0
        Index in ``prefix`` where the message starts. It is also the byte offset reported in a
        :class:`~streamclust.adapters.errors.FramingError`, so pass the whole stream buffer (or
        catch and re-raise with the stream position) to report absolute positions.
    max_payload : int, optional
        Largest acceptable payload length. A longer claim raises before anything is allocated.

    Returns
    -------
    int
        The number of payload bytes that follow the prefix.

    Raises
    ------
    FramingError
        Fewer than 15 bytes, wrong magic, non-digit length, missing comma, ``L < 1`` or a payload
        longer than ``max_payload``; ``.offset`` is ``offset``.

    Examples
    --------
    >>> parse_mpx_prefix(b'xxMPX,0000000001,', offset=2)
    0
    >>> parse_mpx_prefix(b'MPX,0000001001,', max_payload=100)
    Traceback (most recent call last):
    ...
    streamclust.adapters.errors.FramingError: MPX message claims 1000 payload bytes, more than the 100 allowed (at byte offset 0)
    """
    view = memoryview(prefix).cast("B") if not isinstance(prefix, bytes) else prefix
    end = offset + MPX_PREFIX_SIZE
    if offset < 0 or len(view) < end:
        raise FramingError(
            f"MPX prefix needs {MPX_PREFIX_SIZE} bytes, got {max(0, len(view) - offset)}",
            offset=offset,
        )
    raw = bytes(view[offset:end])
    if raw[:4] != MPX_MAGIC:
        raise FramingError(f"MPX prefix expected magic b'MPX,', got {raw[:4]!r}", offset=offset)
    digits = raw[4:14]
    if not _DIGITS.issuperset(digits):
        raise FramingError(f"MPX length must be 10 decimal digits, got {digits!r}", offset=offset)
    if raw[14:15] != b",":
        raise FramingError(f"MPX length must be followed by a comma, got {raw[14:15]!r}",
                           offset=offset)
    length = int(digits)
    if length < 1:
        raise FramingError("MPX length 0: L counts the comma and must be at least 1", offset=offset)
    payload = length - 1
    if max_payload is not None and payload > max_payload:
        raise FramingError(
            f"MPX message claims {payload} payload bytes, more than the {max_payload} allowed",
            offset=offset,
        )
    return payload


def frame_message(payload: bytes | bytearray | memoryview) -> bytes:
    """Return ``payload`` with its ``MPX,<L>,`` prefix.

    Examples
    --------
    >>> frame_message(b'')
    b'MPX,0000000001,'
    """
    payload = bytes(payload)
    return encode_mpx_prefix(len(payload)) + payload
