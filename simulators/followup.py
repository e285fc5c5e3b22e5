"""The simulated microscope's follow-up control endpoint: re-acquire a region at a longer dwell.

A control script that receives a second-phase flag (``docs/events.md``) asks the microscope to
re-scan the flag's bounding box with a longer dwell, for EDS counts good enough to tell the
composition. :class:`FollowUpServer` plays that microscope: a REP socket in its own thread.

Request: a single-part JSON object (UTF-8, at most 64 KiB)::

    {"cmd": "acquire_region", "bbox": [y0, x0, y1, x1], "dwell_s": 0.1, "per_position": false}
    {"cmd": "info"}

``bbox`` is half-open in scan positions (rows ``y0 <= y < y1``, columns ``x0 <= x < x1``).

Reply: one message of the wire format (``docs/wire-formats.md``), ``stream = "followup"``:

* ``status "ok"``: the header holds ``bbox``, ``dwell_s``, ``n_positions``, ``positions_shape``
  ``[y1 - y0, x1 - x0]``, ``scan_shape``, ``live_time_s`` (total), ``energy_offset_kev`` (centre of channel 0),
  ``channel_width_kev``, ``request`` (the server's request counter); the array is the summed
  spectrum ``(channels,)`` ``<u8``, or with ``per_position`` the spectra ``(n, channels)``
  ``<u4`` in raster order inside the box.
* ``status "error"``: ``error`` names the kind (``bad_json``, ``bad_request``, ``unknown_cmd``,
  ``bad_bbox``, ``bad_dwell``, ``too_large``) and ``message`` says what and where; the array is
  empty. Every error is counted in ``stats["errors_by_kind"]``; the server keeps serving.

The re-acquisition is physical: the phantom's expected counts scale with the dwell time, so a
position's follow-up spectrum is ``Poisson(expected_spectrum(p) * dwell_s / phantom.dwell_s)``,
drawn from a generator seeded by ``(phantom seed, request number)``: independent of the live scan's
noise, reproducible per request.

Examples
--------
>>> import json, zmq
>>> from streamclust.simulators.phantom import LamellaPhantom
>>> from streamclust.adapters.wire import decode_array_message
>>> ph = LamellaPhantom(scan_shape=(16, 16), seed=0, frame_shape=(64, 64))
>>> with FollowUpServer(ph) as server:
...     sock = zmq.Context.instance().socket(zmq.REQ)
...     _ = sock.connect(server.endpoint)
...     sock.send(json.dumps({"cmd": "acquire_region", "bbox": [2, 3, 4, 7], "dwell_s": 0.1}).encode())
...     head, summed = decode_array_message(sock.recv_multipart())
...     sock.close(linger=0)
>>> head["status"], head["n_positions"], summed.shape
('ok', 8, (2048,))
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import Counter, deque

import numpy as np
import zmq

from streamclust.adapters.background import BackgroundSocketThread
from streamclust.adapters.security import warn_if_exposed
from streamclust.adapters.wire import encode_array_message

logger = logging.getLogger(__name__)

__all__ = ["FollowUpServer", "MAX_REQUEST_BYTES"]

MAX_REQUEST_BYTES = 65536
_POLL_MS = 50


class _RequestError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class FollowUpServer(BackgroundSocketThread):
    """REP endpoint that re-acquires regions of a :class:`~streamclust.simulators.phantom.LamellaPhantom`.

    Parameters
    ----------
    phantom : LamellaPhantom
        The sample (its ``dwell_s`` is the live scan's dwell).
    endpoint : str
        Bind address; port 0 picks a free port (:attr:`endpoint` after :meth:`wait_for_listen`).
    max_region_positions : int
        Largest box accepted (bounds the work and the reply size).
    max_dwell_s : float
        Longest dwell accepted.
    context : zmq.Context, optional
    """

    def __init__(self, phantom, endpoint: str = "tcp://127.0.0.1:0", *, max_region_positions: int = 16384,
                 max_dwell_s: float = 10.0, context: zmq.Context | None = None) -> None:
        self.phantom = phantom
        self.max_region_positions = int(max_region_positions)
        self.max_dwell_s = float(max_dwell_s)
        self._endpoint_requested = endpoint
        warn_if_exposed(endpoint, None, "FollowUpServer")
        self._context = context
        self.endpoint: str | None = None
        self.stats = {"requests": 0, "ok": 0, "errors": 0, "errors_by_kind": Counter()}
        #: the last 256 accepted acquisitions (``request``, ``bbox``, ``dwell_s``, ``per_position``):
        #: what the microscope was asked to do, for a test or an operator to check
        self.acquisitions: deque = deque(maxlen=256)
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- lifecycle (start / wait_for_listen / stop / context manager: BackgroundSocketThread) ----
    _thread_name = "followup-server"
    _what = "follow-up server"

    # -- serving --------------------------------------------------------------------------------
    def _run(self) -> None:
        ctx = self._context or zmq.Context.instance()
        sock = ctx.socket(zmq.REP)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            # a request larger than this is refused by ZeroMQ before it is allocated
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
            sock.bind(self._endpoint_requested)
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._listening.set()
            while not self._stop.is_set():
                if not sock.poll(_POLL_MS):
                    continue
                parts = sock.recv_multipart()
                reply = self.handle(parts)
                sock.send_multipart(reply, copy=reply[1].nbytes < 65536)
        except BaseException as exc:  # surfaced by stop()/wait_for_listen()
            self._error = exc
            self._listening.set()
        finally:
            sock.close(linger=0)

    def handle(self, parts) -> list:
        """Answer one request (a list of message parts) with the reply's parts."""
        self.stats["requests"] += 1
        n = self.stats["requests"]
        try:
            req = self._parse(parts)
            cmd = req.get("cmd")
            if cmd == "info":
                head, arr = self._info(), np.zeros(0, np.uint8)
            elif cmd == "acquire_region":
                head, arr = self._acquire(req, n)
            else:
                raise _RequestError("unknown_cmd", f"unknown cmd {cmd!r} (expected 'acquire_region' or 'info')")
        except _RequestError as exc:
            self.stats["errors"] += 1
            self.stats["errors_by_kind"][exc.kind] += 1
            logger.warning("follow-up request %d refused (%s): %s", n, exc.kind, exc)
            head = {"status": "error", "error": exc.kind, "message": str(exc)}
            arr = np.zeros(0, np.uint8)
        else:
            self.stats["ok"] += 1
        head = {"stream": "followup", "scan_id": f"followup-{self.phantom.seed}", "sequence": n,
                "request": n, **head}
        return encode_array_message(head, arr)

    @staticmethod
    def _parse(parts) -> dict:
        if len(parts) != 1:
            raise _RequestError("bad_request", f"request has {len(parts)} parts, expected 1 (JSON)")
        raw = bytes(parts[0])
        if len(raw) > MAX_REQUEST_BYTES:
            raise _RequestError("bad_request", f"request of {len(raw)} bytes exceeds {MAX_REQUEST_BYTES}")
        try:
            req = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise _RequestError("bad_json", f"request is not UTF-8 JSON: {exc}") from None
        if not isinstance(req, dict):
            raise _RequestError("bad_json", f"request is a JSON {type(req).__name__}, not an object")
        return req

    def _info(self) -> dict:
        ph = self.phantom
        return {"status": "ok", "scan_shape": list(ph.scan_shape), "dwell_s": ph.dwell_s,
                "n_channels": int(ph.n_channels), "energy_offset_kev": float(ph.energy_axis_kev[0]),
                "channel_width_kev": float(ph.channel_width_kev), "max_dwell_s": self.max_dwell_s,
                "max_region_positions": self.max_region_positions}

    def _acquire(self, req: dict, n: int) -> tuple[dict, np.ndarray]:
        ph = self.phantom
        ny, nx = ph.scan_shape
        bbox = req.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in bbox)):
            raise _RequestError("bad_bbox", f"bbox must be a list of 4 integers [y0, x0, y1, x1], got {bbox!r}")
        y0, x0, y1, x1 = bbox
        if not (0 <= y0 < y1 <= ny and 0 <= x0 < x1 <= nx):
            raise _RequestError("bad_bbox", f"bbox {bbox} is empty or outside the scan [0, 0, {ny}, {nx}]")
        dwell = req.get("dwell_s")
        if (isinstance(dwell, bool) or not isinstance(dwell, (int, float)) or not math.isfinite(dwell)
                or not 0 < dwell <= self.max_dwell_s):
            raise _RequestError("bad_dwell", f"dwell_s must be a number in (0, {self.max_dwell_s}], got {dwell!r}")
        per_position = req.get("per_position", False)
        if not isinstance(per_position, bool):
            raise _RequestError("bad_request", f"per_position must be true or false, got {per_position!r}")
        h, w = y1 - y0, x1 - x0
        if h * w > self.max_region_positions:
            raise _RequestError("too_large", f"bbox {bbox} holds {h * w} positions, at most "
                                             f"{self.max_region_positions} accepted")
        positions = ((np.arange(y0, y1)[:, None] * nx) + np.arange(x0, x1)[None, :]).ravel()
        scale = float(dwell) / ph.dwell_s
        rng = np.random.default_rng([ph.seed, 0xF0110, n])
        spectra = np.empty((positions.size, ph.n_channels), np.uint32)
        for i, p in enumerate(positions):
            spectra[i] = rng.poisson(ph.expected_spectrum(int(p)) * scale)
        head = {"status": "ok", "bbox": [y0, x0, y1, x1], "dwell_s": float(dwell),
                "n_positions": int(positions.size), "positions_shape": [h, w], "scan_shape": [ny, nx],
                "live_time_s": float(dwell) * positions.size,
                "energy_offset_kev": float(ph.energy_axis_kev[0]),
                "channel_width_kev": float(ph.channel_width_kev), "per_position": per_position}
        logger.info("follow-up %d: bbox %s at %.3g s dwell", n, bbox, dwell)
        self.acquisitions.append({"request": n, "bbox": [y0, x0, y1, x1], "dwell_s": float(dwell),
                                  "per_position": per_position})
        arr = spectra if per_position else spectra.sum(axis=0, dtype=np.uint64)
        return head, arr
