"""Exception types for everything that arrives from outside: bytes, files, sockets.

Every error names *what* was wrong and *where* (byte offset in a stream or file, frame sequence
number, scan position), so an operator can find it in a capture and a counter can record it.
Protocol errors subclass :class:`ValueError` so generic callers can still catch them.
"""

from __future__ import annotations

__all__ = [
    "StreamclustError",
    "ProtocolError",
    "FramingError",
    "HeaderError",
    "PixelDataError",
    "WireFormatError",
    "ConnectionLost",
    "AcquisitionIncomplete",
    "ControlError",
]


class StreamclustError(Exception):
    """Base class of all streamclust errors."""


class ProtocolError(StreamclustError, ValueError):
    """Bytes that do not follow the protocol or file format.

    Parameters
    ----------
    message : str
        What was wrong, in words.
    offset : int, optional
        Byte offset in the stream or file where the offending item starts.
    sequence : int, optional
        Frame sequence number (1-based, as in the MQ1 header) or message sequence.
    """

    def __init__(self, message: str, *, offset: int | None = None, sequence: int | None = None):
        self.message = message
        self.offset = offset
        self.sequence = sequence
        where = []
        if offset is not None:
            where.append(f"byte offset {offset}")
        if sequence is not None:
            where.append(f"sequence {sequence}")
        super().__init__(message + (f" (at {', '.join(where)})" if where else ""))

    #: short machine-readable reason, used as the key of drop counters
    reason = "protocol_error"


class FramingError(ProtocolError):
    """The ``MPX,<length>,`` message prefix is missing, malformed, or claims an impossible length."""

    reason = "bad_framing"


class HeaderError(ProtocolError):
    """An acquisition header (HDR) or frame header (MQ1) cannot be parsed or is inconsistent."""

    reason = "bad_header"


class PixelDataError(ProtocolError):
    """Pixel data of the wrong size or type for its frame header."""

    reason = "bad_pixel_data"


class WireFormatError(ProtocolError):
    """A ZeroMQ message that does not follow one of streamclust's documented wire formats."""

    reason = "bad_message"


class ConnectionLost(StreamclustError, ConnectionError):
    """The peer closed or reset the connection before the acquisition was complete."""

    reason = "connection_lost"


class AcquisitionIncomplete(StreamclustError):
    """An acquisition ended (timeout, abort, drop) before the header's frame count was reached.

    Attributes
    ----------
    expected : int
        Frames the acquisition header announced (0 = continuous).
    received : int
        Frames actually received and accounted for.
    """

    reason = "incomplete"

    def __init__(self, message: str, *, expected: int, received: int):
        self.expected = expected
        self.received = received
        super().__init__(f"{message}: received {received} of {expected} frames")


class ControlError(StreamclustError):
    """The detector's control port answered a request with a non-zero error code.

    Codes (Merlin): 1 busy, 2 unrecognised command or parameter, 3 value out of range;
    one driver uses 4 for busy.
    """

    CODES = {1: "busy", 2: "unrecognised", 3: "out of range", 4: "busy"}

    def __init__(self, request: str, code: int):
        self.request = request
        self.code = code
        super().__init__(f"detector refused {request!r}: error {code} ({self.CODES.get(code, 'unknown')})")
