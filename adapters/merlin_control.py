"""Client for the Merlin control port (TCP 6341): ``GET``/``SET``/``CMD`` text requests.

Every request and reply is one MPX message (``MPX,<L>,`` + payload, see
:mod:`streamclust.adapters.framing`). Requests are ``GET,<PARAM>``, ``SET,<PARAM>,<VALUE>`` and
``CMD,<COMMAND>``; replies echo them with the value (GET) and an error code appended:
``GET,<PARAM>,<VALUE>,<ERR>`` or ``SET|CMD,<PARAM>,<ERR>``. ``ERR`` 0 is success; anything else
(1 busy, 2 unrecognised, 3 out of range, 4 busy on some drivers) raises
:class:`~streamclust.adapters.errors.ControlError`.

Some clients append ``,0`` to GET and CMD requests; real detectors accept both forms. This client
sends the plain form unless ``trailing_zero=True``.

Examples
--------
>>> parse_control_reply(b"GET,DETECTORSTATUS,0,0")
ControlReply(verb='GET', name='DETECTORSTATUS', value='0', code=0)
>>> parse_control_reply(b"CMD,STARTACQUISITION,1")
ControlReply(verb='CMD', name='STARTACQUISITION', value=None, code=1)
>>> encode_control_request("SET", "NUMFRAMESTOACQUIRE", 4096)
b'MPX,0000000028,SET,NUMFRAMESTOACQUIRE,4096'
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass

from streamclust.adapters.errors import ConnectionLost, ControlError, FramingError
from streamclust.adapters.framing import MPX_PREFIX_SIZE, frame_message, parse_mpx_prefix

__all__ = [
    "MerlinControl",
    "ControlReply",
    "parse_control_reply",
    "encode_control_request",
    "MAX_CONTROL_PAYLOAD",
    "DETECTOR_IDLE",
    "DETECTOR_ACQUIRING",
    "DETECTOR_BUSY",
]

logger = logging.getLogger(__name__)

#: control replies are short text; anything longer is a framing error, never an allocation
MAX_CONTROL_PAYLOAD = 4096

#: DETECTORSTATUS values
DETECTOR_IDLE, DETECTOR_ACQUIRING, DETECTOR_BUSY = 0, 1, 2

_VERBS = ("GET", "SET", "CMD")


@dataclass(frozen=True)
class ControlReply:
    """One parsed control reply: the echoed verb and name, the value (GET only) and the error code."""

    verb: str
    name: str
    value: str | None
    code: int


def encode_control_request(verb: str, name: str, value: object = None, *, trailing_zero: bool = False) -> bytes:
    """Return the framed request ``MPX,<L>,<VERB>,<NAME>[,<VALUE>]``.

    ``trailing_zero`` appends ``,0`` to GET and CMD requests (the form some clients send).
    """
    verb = verb.upper()
    if verb not in _VERBS:
        raise ValueError(f"verb must be one of {_VERBS}, got {verb!r}")
    name = str(name).upper()
    if not name or "," in name:
        raise ValueError(f"invalid parameter or command name {name!r}")
    parts = [verb, name]
    if verb == "SET":
        if value is None:
            raise ValueError("SET needs a value")
        parts.append(_format_value(value))
    elif trailing_zero:
        parts.append("0")
    return frame_message(",".join(parts).encode("ascii"))


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    text = str(value)
    if "," in text or "\r" in text or "\n" in text:
        raise ValueError(f"control values must not contain commas or line breaks: {text!r}")
    return text


def parse_control_reply(payload: bytes | bytearray | memoryview) -> ControlReply:
    """Parse a control reply payload (without the MPX prefix).

    Raises
    ------
    FramingError
        If the reply is not ``VERB,NAME[,VALUE],ERR`` with an integer error code.
    """
    try:
        text = bytes(payload).decode("ascii").strip("\x00\r\n ")
    except UnicodeDecodeError:
        raise FramingError(f"control reply is not ASCII: {bytes(payload)[:64]!r}") from None
    parts = text.split(",")
    if len(parts) < 3 or parts[0].upper() not in _VERBS:
        raise FramingError(f"malformed control reply {text[:80]!r}")
    verb, name = parts[0].upper(), parts[1].upper()
    try:
        code = int(parts[-1])
    except ValueError:
        raise FramingError(f"control reply without an integer error code: {text[:80]!r}") from None
    value = ",".join(parts[2:-1]) if verb == "GET" and len(parts) > 3 else None
    return ControlReply(verb, name, value, code)


class MerlinControl:
    """Synchronous client for the Merlin control port.

    Parameters
    ----------
    host : str, default "127.0.0.1"
    port : int, default 6341
    timeout : float, default 5.0
        Seconds to wait for connecting and for each reply; a silent detector raises
        :class:`TimeoutError`, never hangs.
    trailing_zero : bool, default False
        Send GET and CMD requests with a trailing ``,0``.

    Notes
    -----
    One request is in flight at a time (a lock serialises callers), because replies carry no
    request id. Use as a context manager, or call :meth:`connect` and :meth:`close`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 6341, *, timeout: float = 5.0,
                 trailing_zero: bool = False):
        self.host = host
        self.port = port
        self.timeout = timeout
        self.trailing_zero = trailing_zero
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    # -- connection -------------------------------------------------------------------------
    def connect(self) -> "MerlinControl":
        if self._sock is None:
            self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            logger.debug("control connected to %s:%s", self.host, self.port)
        return self

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> "MerlinControl":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------------
    def request(self, verb: str, name: str, value: object = None) -> ControlReply:
        """Send one request and return its reply; raise ControlError on a non-zero code."""
        message = encode_control_request(verb, name, value, trailing_zero=self.trailing_zero)
        with self._lock:
            if self._sock is None:
                self.connect()
            sock = self._sock
            sock.settimeout(self.timeout)
            try:
                sock.sendall(message)
                reply = parse_control_reply(self._read_message(sock))
            except (socket.timeout, TimeoutError):
                # the connection state is unknown after a lost reply: start afresh next time
                self.close()
                raise TimeoutError(f"no reply to {message[15:].decode()!r} within {self.timeout} s") from None
            except OSError as exc:
                self.close()
                raise ConnectionLost(f"control connection failed during {message[15:].decode()!r}: {exc}") from exc
        request_text = message[MPX_PREFIX_SIZE:].decode("ascii")
        if reply.verb != verb.upper() or reply.name != str(name).upper():
            raise FramingError(f"reply {reply} does not answer request {request_text!r}")
        if reply.code != 0:
            raise ControlError(request_text, reply.code)
        return reply

    def _read_message(self, sock: socket.socket) -> bytes:
        prefix = _recv_exact(sock, MPX_PREFIX_SIZE)
        length = parse_mpx_prefix(prefix, max_payload=MAX_CONTROL_PAYLOAD)
        return _recv_exact(sock, length)

    def get(self, name: str) -> str:
        """Return the value of parameter ``name`` as text."""
        return self.request("GET", name).value or ""

    def get_int(self, name: str) -> int:
        return int(float(self.get(name)))

    def set(self, name: str, value: object) -> None:
        """Set parameter ``name``; booleans are sent as 1/0."""
        self.request("SET", name, value)

    def cmd(self, command: str) -> None:
        """Run ``command`` (STARTACQUISITION, SOFTTRIGGER, STOPACQUISITION, ABORT, RESET)."""
        self.request("CMD", command)

    # -- helpers ----------------------------------------------------------------------------
    def start_acquisition(self) -> None:
        """Arm the detector: the data port sends the acquisition header, then frames on trigger."""
        self.cmd("STARTACQUISITION")

    arm = start_acquisition

    def soft_trigger(self) -> None:
        self.cmd("SOFTTRIGGER")

    def stop(self) -> None:
        self.cmd("STOPACQUISITION")

    def abort(self) -> None:
        self.cmd("ABORT")

    def reset(self) -> None:
        self.cmd("RESET")

    def status(self) -> int:
        """DETECTORSTATUS: 0 idle, 1 acquiring, 2 busy."""
        return self.get_int("DETECTORSTATUS")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionLost(f"control connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)
