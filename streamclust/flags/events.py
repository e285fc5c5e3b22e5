"""The event stream: second-phase flags on ZeroMQ for viewers and control scripts.

Every event is one message of the project's wire format (``docs/wire-formats.md``): two parts, a
JSON header with ``stream = "event"`` and an **empty** array buffer (``dtype "|u1"``, ``shape
[0]``). Keeping the two-part convention lets one decoder (:func:`streamclust.adapters.wire.decode_array_message`)
validate every message we send, and lets a later version attach an array (e.g. a centre spectrum)
without a new framing. The event schema (``event_version`` 1) is documented with an example in
``docs/events.md``; :func:`validate_event` checks it.

Sockets: :class:`EventPublisher` binds a PUB socket (viewers; a subscriber that is slow or joins
late misses events; drops at the high-water mark are counted because ``XPUB_NODROP`` makes ZeroMQ
report them) or a PUSH socket (lossless: a send waits while the receiver's queue is full, up to
``send_timeout_s``, then counts the event as ``push_timeouts``). :class:`EventSubscriber` connects
SUB or PULL, validates each message and counts the malformed ones by kind.

Examples
--------
>>> from streamclust.flags.flagger import FlagEvent
>>> import numpy as np
>>> ev = FlagEvent(kind="raised", flag_id=1, cluster=2, neighbour=1, score=0.9, coherence=1.0,
...                distance_cbed=1.2, distance_eds=1.1, n_positions=4, fraction=0.01,
...                bbox=(3, 4, 5, 6), components=((3, 4, 5, 6),), positions=np.array([196, 197, 260, 261]),
...                scan_shape=(64, 64), update=7, signals={"fe_co_ratio": 1.8})
>>> with EventPublisher(socket_type="push", scan_id="demo") as pub, \\
...         EventSubscriber(pub.endpoint, socket_type="pull") as sub:
...     pub.publish(ev)
...     msg = sub.recv(timeout_s=5.0)
True
>>> msg["event"], msg["flag_id"], msg["bbox"], msg["positions"], msg["signals"]["fe_co_ratio"]
('raised', 1, [3, 4, 5, 6], [196, 197, 260, 261], 1.8)
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter

import numpy as np
import zmq

from streamclust.adapters.errors import WireFormatError
from streamclust.adapters.security import apply_security, release_server, warn_if_exposed
from streamclust.adapters.wire import decode_array_message, encode_array_message, end_header
from streamclust.flags.flagger import FlagEvent

logger = logging.getLogger(__name__)

__all__ = [
    "EVENT_VERSION",
    "EVENT_KINDS",
    "event_header",
    "validate_event",
    "EventPublisher",
    "EventSubscriber",
]

#: Version of the event schema (``event_version``), independent of the wire format's ``version``.
EVENT_VERSION = 1
EVENT_KINDS = ("raised", "updated", "retracted")
#: Keys every event carries, with the JSON types accepted.
_REQUIRED = {
    "event_version": int, "event": str, "flag_id": int, "time_unix": (int, float), "update": int,
    "cluster": int, "neighbour": int, "score": (int, float), "coherence": (int, float),
    "distinctness": dict, "n_positions": int, "fraction": (int, float), "bbox": list,
    "components": list, "positions": (list, type(None)), "positions_truncated": bool, "components_truncated": bool, "scan_shape": list, "signals": dict,
    "reason": str,
}
_EMPTY = np.zeros(0, np.uint8)
#: components listed when an event's header would otherwise exceed the wire format's 64 KiB
MAX_COMPONENTS = 512


def _finite(v) -> float | None:
    """JSON has no NaN/inf: non-finite numbers travel as null."""
    v = float(v)
    return v if math.isfinite(v) else None


def event_header(ev: FlagEvent, *, scan_id: str | int, sequence: int, time_unix: float | None = None,
                 max_positions: int = 4096) -> dict:
    """The JSON header of one event (without the wire keys ``version``/``dtype``/``shape``).

    ``positions`` is the list of flat raster indices, or null when there are more than
    ``max_positions`` of them (then ``positions_truncated`` is true; bbox and components remain).
    """
    pos = np.asarray(ev.positions, dtype=np.int64)
    listed = pos.size <= max_positions
    signals = {str(k): (_finite(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
               for k, v in ev.signals.items()}
    return {
        # "stream" first: SUB prefix filters match on the header's first bytes
        "stream": "event",
        "scan_id": scan_id,
        "sequence": int(sequence),
        "event_version": EVENT_VERSION,
        "event": ev.kind,
        "flag_id": int(ev.flag_id),
        "time_unix": float(time.time() if time_unix is None else time_unix),
        "update": int(ev.update),
        "cluster": int(ev.cluster),
        "neighbour": int(ev.neighbour),
        "score": _finite(ev.score),
        "coherence": _finite(ev.coherence),
        "distinctness": {"cbed": _finite(ev.distance_cbed), "eds": _finite(ev.distance_eds)},
        "n_positions": int(ev.n_positions),
        "fraction": _finite(ev.fraction),
        "bbox": [int(v) for v in ev.bbox],
        "components": [[int(v) for v in c] for c in ev.components],
        "components_truncated": False,
        "positions": pos.tolist() if listed else None,
        "positions_truncated": not listed,
        "scan_shape": [int(v) for v in ev.scan_shape],
        "signals": signals,
        "reason": ev.reason,
        # [flags] method = "test": the statistics behind the flag, else null (docs/events.md)
        "statistics": None if ev.p_value_eds is None else {
            "p_value_eds": float(ev.p_value_eds), "p_value_cbed": float(ev.p_value_cbed),
            "effect_eds": _finite(ev.effect_eds), "effect_cbed": _finite(ev.effect_cbed),
            "level": float(ev.level), "composition": ev.composition,
        },
    }


def _bad(message: str, sequence=None) -> WireFormatError:
    err = WireFormatError(message, sequence=sequence)
    err.kind = "bad_event"
    return err


def validate_event(header: dict) -> dict:
    """Check an event header against schema version 1; returns it, raises :class:`WireFormatError`
    (``kind = "bad_event"``) naming the offending key otherwise. Extra keys are allowed."""
    seq = header.get("sequence")
    if header.get("stream") != "event":
        raise _bad(f"stream is {header.get('stream')!r}, not 'event'", seq)
    for key, types in _REQUIRED.items():
        if key not in header:
            raise _bad(f"event lacks key {key!r}", seq)
        v = header[key]
        if (isinstance(v, bool) and types is not bool) or not isinstance(v, types):
            # numbers may be null where they were not finite
            if not (v is None and types == (int, float)):
                raise _bad(f"event key {key!r} has the wrong type ({type(v).__name__})", seq)
    if header["event_version"] != EVENT_VERSION:
        raise _bad(f"event_version {header['event_version']!r} is not supported (expected {EVENT_VERSION})", seq)
    if header["event"] not in EVENT_KINDS:
        raise _bad(f"event {header['event']!r} is not one of {EVENT_KINDS}", seq)
    bbox = header["bbox"]
    if len(bbox) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in bbox):
        raise _bad(f"bbox must be 4 integers >= 0, got {bbox!r}", seq)
    shape = header["scan_shape"]
    if len(shape) != 2 or not all(isinstance(v, int) and v > 0 for v in shape):
        raise _bad(f"scan_shape must be [ny, nx], got {shape!r}", seq)
    if bbox[2] > shape[0] or bbox[3] > shape[1] or bbox[0] > bbox[2] or bbox[1] > bbox[3]:
        raise _bad(f"bbox {bbox} is not a box inside scan_shape {shape}", seq)
    pos = header["positions"]
    if pos is not None:
        n = shape[0] * shape[1]
        if not all(isinstance(p, int) and 0 <= p < n for p in pos):
            raise _bad("positions must be integers in [0, ny * nx)", seq)
    if set(header["distinctness"]) != {"cbed", "eds"}:
        raise _bad("distinctness must hold 'cbed' and 'eds'", seq)
    return header


class EventPublisher:
    """Bind a PUB or PUSH socket and send flag events.

    Parameters
    ----------
    endpoint : str
        Bind address; port 0 picks a free port (see :attr:`endpoint` afterwards).
    socket_type : {"pub", "push"}
        PUB for viewers (may drop), PUSH for a lossless consumer.
    scan_id : str or int
    hwm : int
        Send high-water mark.
    send_timeout_s : float or None
        PUSH only: how long a send may wait for the receiver (None: forever).
    security : CurveServer, optional
        CURVE key pair (and client allow-list) for an endpoint reachable from the network
        (:mod:`streamclust.adapters.security`); binding a non-loopback address without it logs a warning.
    context : zmq.Context, optional
    """

    def __init__(self, endpoint: str = "tcp://127.0.0.1:0", socket_type: str = "pub", *,
                 scan_id: str | int = "scan", hwm: int = 1000, send_timeout_s: float | None = 10.0,
                 max_positions: int = 4096, security=None, context: zmq.Context | None = None) -> None:
        if socket_type not in ("pub", "push"):
            raise ValueError(f"socket_type must be 'pub' or 'push', got {socket_type!r}")
        self.socket_type = socket_type
        self.scan_id = scan_id
        self.max_positions = max_positions
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB if socket_type == "pub" else zmq.PUSH)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, int(hwm))
        if socket_type == "pub":
            self._sock.setsockopt(zmq.XPUB_NODROP, 1)
        elif send_timeout_s is not None:
            self._sock.setsockopt(zmq.SNDTIMEO, int(send_timeout_s * 1000))
        self.security = security
        secured = False
        try:
            apply_security(self._sock, security, self._ctx, role="server")
            secured = security is not None
            warn_if_exposed(endpoint, security, "EventPublisher")
            self._sock.bind(endpoint)
        except BaseException:
            self._sock.close(linger=0)
            if secured:
                release_server(security, self._ctx)
            raise
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sequence = 0
        self.stats = Counter(sent=0, hwm_dropped=0, push_timeouts=0)

    def publish(self, event: FlagEvent, *, time_unix: float | None = None) -> bool:
        """Send one event; True if it left the socket (False: dropped at the HWM or timed out)."""
        self._sequence += 1
        head = event_header(event, scan_id=self.scan_id, sequence=self._sequence, time_unix=time_unix,
                            max_positions=self.max_positions)
        try:
            parts = encode_array_message(head, _EMPTY)
        except ValueError:
            # over the 64 KiB header limit (thousands of positions or components): the bbox and
            # the first components still tell a control script where to look
            head.update(positions=None, positions_truncated=True,
                        components=head["components"][:MAX_COMPONENTS], components_truncated=True)
            parts = encode_array_message(head, _EMPTY)
        try:
            self._sock.send_multipart(parts, flags=zmq.NOBLOCK if self.socket_type == "pub" else 0)
        except zmq.Again:
            key = "hwm_dropped" if self.socket_type == "pub" else "push_timeouts"
            self.stats[key] += 1
            logger.warning("event %s of flag %d not sent (%s)", event.kind, event.flag_id, key)
            return False
        self.stats["sent"] += 1
        return True

    def publish_all(self, events) -> int:
        """Send several events; returns how many left the socket."""
        return sum(self.publish(ev) for ev in events)

    def end(self) -> bool:
        """Send the common end-of-scan marker (``stream "end"``, ``of_stream "event"``) with the
        publisher's counters as ``totals``; subscribers receive it as a header dict."""
        self._sequence += 1
        head = end_header("event", self.scan_id, self._sequence, dict(self.stats))
        try:
            self._sock.send_multipart(encode_array_message(head, _EMPTY),
                                      flags=zmq.NOBLOCK if self.socket_type == "pub" else 0)
        except zmq.Again:
            return False
        return True

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close(linger=0)
            release_server(self.security, self._ctx)

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EventSubscriber:
    """Connect SUB or PULL to an :class:`EventPublisher` and receive validated events (dicts).

    Malformed messages are counted in ``stats["malformed_by_kind"]``, logged and skipped.
    ``security`` (a :class:`~streamclust.adapters.security.CurveClient`) connects to a CURVE publisher.
    """

    def __init__(self, endpoint: str, socket_type: str = "sub", *, hwm: int = 1000,
                 context: zmq.Context | None = None, max_bytes: int = 1 << 16, security=None) -> None:
        if socket_type not in ("sub", "pull"):
            raise ValueError(f"socket_type must be 'sub' or 'pull', got {socket_type!r}")
        self.endpoint = endpoint
        self.socket_type = socket_type
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB if socket_type == "sub" else zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, int(hwm))
        # events are small: refuse anything absurd before ZeroMQ allocates it
        self._sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_bytes + 65536)
        if socket_type == "sub":
            self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            apply_security(self._sock, security, self._ctx, role="client")
        except BaseException:
            self._sock.close(linger=0)
            raise
        self._sock.connect(endpoint)
        self._max_bytes = max_bytes
        self.stats = {"received": 0, "malformed": 0, "malformed_by_kind": Counter()}

    def recv(self, timeout_s: float | None = None) -> dict | None:
        """The next valid event, or None when none arrived within ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._sock.poll(None if wait is None else int(wait * 1000)):
                return None
            parts = self._sock.recv_multipart(copy=False)
            try:
                head, _ = decode_array_message(parts, max_bytes=self._max_bytes, expect_stream="event")
                if head["stream"] == "end":
                    # a publisher may end a scan with the common end marker: pass it on
                    self.stats["received"] += 1
                    return head
                validate_event(head)
            except WireFormatError as exc:
                kind = getattr(exc, "kind", exc.reason)
                self.stats["malformed"] += 1
                self.stats["malformed_by_kind"][kind] += 1
                logger.warning("malformed event message skipped (%s): %s", kind, exc)
                continue
            self.stats["received"] += 1
            return head

    def events(self, idle_timeout_s: float = 1.0):
        """Yield events until none arrives for ``idle_timeout_s``."""
        while (ev := self.recv(idle_timeout_s)) is not None:
            yield ev

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> EventSubscriber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
