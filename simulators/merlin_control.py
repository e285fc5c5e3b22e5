"""The simulated Merlin's control-port vocabulary: parameters, their ranges, and reply forms.

This module owns the text protocol only (parse a request, validate, produce the reply);
:class:`~streamclust.simulators.merlin.MerlinServer` owns the sockets and what commands *do*.

Replies follow the real detector: ``GET,<PARAM>,<VALUE>,<ERR>`` and ``SET|CMD,<NAME>,<ERR>`` with
``ERR`` 0 ok, 1 busy (SET or STARTACQUISITION while acquiring), 2 unrecognised (unknown verb,
parameter or command, or SET of a read-only parameter), 3 out of range. Requests with and without a
trailing ``,0`` on GET/CMD are both accepted.

Examples
--------
>>> settings = DetectorSettings()
>>> settings.handle(b"SET,COUNTERDEPTH,6", busy=False)[0]
b'SET,COUNTERDEPTH,0'
>>> settings.handle(b"GET,COUNTERDEPTH,0", busy=False)[0]
b'GET,COUNTERDEPTH,6,0'
>>> settings.handle(b"SET,COUNTERDEPTH,7", busy=False)[0]
b'SET,COUNTERDEPTH,3'
>>> settings.handle(b"GET,FLUXCAPACITOR", busy=False)[0]
b'GET,FLUXCAPACITOR,2'
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["DetectorSettings", "ParamSpec", "PARAMETERS", "COMMANDS", "OK", "BUSY", "UNRECOGNISED", "OUT_OF_RANGE"]

logger = logging.getLogger(__name__)

OK, BUSY, UNRECOGNISED, OUT_OF_RANGE = 0, 1, 2, 3

COMMANDS = ("STARTACQUISITION", "SOFTTRIGGER", "STOPACQUISITION", "ABORT", "RESET")


@dataclass(frozen=True)
class ParamSpec:
    """A control parameter: how to parse a value, whether it is valid, whether SET is allowed."""

    parse: Callable[[str], object]
    valid: Callable[[object], bool]
    writable: bool = True


def _int(text: str) -> int:
    value = float(text)
    if value != int(value):
        raise ValueError(text)
    return int(value)


def _flag(v: object) -> bool:
    return v in (0, 1)


PARAMETERS: dict[str, ParamSpec] = {
    "NUMFRAMESTOACQUIRE": ParamSpec(_int, lambda v: 0 <= v <= 2**31 - 1),
    "NUMFRAMESPERTRIGGER": ParamSpec(_int, lambda v: 1 <= v <= 2**31 - 1),
    "ACQUISITIONTIME": ParamSpec(float, lambda v: 0.0 <= v <= 1e7),  # ms
    "ACQUISITIONPERIOD": ParamSpec(float, lambda v: 0.0 <= v <= 1e7),  # ms
    "COUNTERDEPTH": ParamSpec(_int, lambda v: v in (1, 6, 12, 24)),
    "CONTINUOUSRW": ParamSpec(_int, _flag),
    # 0 internal, 1-4 hardware edges (simulated as internal), 5 soft trigger, 6 soft + hardware
    "TRIGGERSTART": ParamSpec(_int, lambda v: 0 <= v <= 6),
    "TRIGGERSTOP": ParamSpec(_int, lambda v: 0 <= v <= 6),
    "RUNHEADLESS": ParamSpec(_int, _flag),
    "FILEFORMAT": ParamSpec(_int, lambda v: v in (0, 2)),  # 0 binary, 2 raw binary
    "FILEENABLE": ParamSpec(_int, _flag),
    "IMAGEX": ParamSpec(_int, lambda v: True, writable=False),
    "IMAGEY": ParamSpec(_int, lambda v: True, writable=False),
    "SOFTWAREVERSION": ParamSpec(str, lambda v: True, writable=False),
    "DETECTORSTATUS": ParamSpec(_int, lambda v: True, writable=False),
    **{f"THRESHOLD{i}": ParamSpec(float, lambda v: 0.0 <= v <= 999.0) for i in range(8)},
}

# parameters that cannot change while an acquisition runs (the real detector answers busy)
_LOCKED_WHILE_ACQUIRING = frozenset(PARAMETERS) - {"DETECTORSTATUS"}


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass
class DetectorSettings:
    """Current values of every control parameter, with the real detector's defaults."""

    values: dict[str, object] = field(default_factory=lambda: {
        "NUMFRAMESTOACQUIRE": 1,
        "NUMFRAMESPERTRIGGER": 1,
        "ACQUISITIONTIME": 0.0,
        "ACQUISITIONPERIOD": 0.0,
        "COUNTERDEPTH": 12,
        "CONTINUOUSRW": 1,
        "TRIGGERSTART": 0,
        "TRIGGERSTOP": 0,
        "RUNHEADLESS": 0,
        "FILEFORMAT": 0,
        "FILEENABLE": 0,
        "IMAGEX": 512,
        "IMAGEY": 512,
        "SOFTWAREVERSION": "0.77.0.16-streamclust-sim",
        "DETECTORSTATUS": 0,
        **{f"THRESHOLD{i}": 0.0 for i in range(8)},
    })

    def __getitem__(self, name: str) -> object:
        return self.values[name]

    def __setitem__(self, name: str, value: object) -> None:
        self.values[name] = value

    def handle(self, payload: bytes, *, busy: bool) -> tuple[bytes, str | None]:
        """Answer one request payload.

        Returns
        -------
        reply : bytes
            The reply payload (without MPX prefix). For commands the code is OK here; the caller
            may rewrite it with :meth:`command_reply` once the command has run.
        command : str or None
            The command to execute when the request was a valid ``CMD``.
        """
        try:
            text = payload.decode("ascii").strip("\x00\r\n ")
        except UnicodeDecodeError:
            return b"CMD,UNKNOWN,%d" % UNRECOGNISED, None
        parts = [p.strip() for p in text.split(",")]
        verb = parts[0].upper()
        name = parts[1].upper() if len(parts) > 1 else ""
        if verb == "GET" and len(parts) in (2, 3):
            spec = PARAMETERS.get(name)
            if spec is None:
                return f"GET,{name},{UNRECOGNISED}".encode(), None
            return f"GET,{name},{_format(self.values[name])},{OK}".encode(), None
        if verb == "SET" and len(parts) == 3:
            spec = PARAMETERS.get(name)
            if spec is None or not spec.writable:
                return f"SET,{name},{UNRECOGNISED}".encode(), None
            if busy and name in _LOCKED_WHILE_ACQUIRING:
                return f"SET,{name},{BUSY}".encode(), None
            try:
                value = spec.parse(parts[2])
            except ValueError:
                return f"SET,{name},{OUT_OF_RANGE}".encode(), None
            if not spec.valid(value):
                return f"SET,{name},{OUT_OF_RANGE}".encode(), None
            self.values[name] = value
            logger.debug("SET %s = %r", name, value)
            return f"SET,{name},{OK}".encode(), None
        if verb == "CMD" and len(parts) in (2, 3):
            if name not in COMMANDS:
                return f"CMD,{name},{UNRECOGNISED}".encode(), None
            return f"CMD,{name},{OK}".encode(), name
        return f"{verb or 'CMD'},{name or 'UNKNOWN'},{UNRECOGNISED}".encode(), None

    @staticmethod
    def command_reply(command: str, code: int) -> bytes:
        return f"CMD,{command},{code}".encode()

    @property
    def dwell_s(self) -> float:
        """Seconds a frame: the longer of ACQUISITIONTIME and ACQUISITIONPERIOD (both in ms)."""
        return max(float(self.values["ACQUISITIONTIME"]), float(self.values["ACQUISITIONPERIOD"])) / 1000.0
