"""Closing the loop: act on second-phase flags by asking the microscope for a follow-up scan.

:class:`FollowUpClient` talks to a follow-up control endpoint (the simulated one is
:class:`streamclust.simulators.followup.FollowUpServer`; the request/reply format is documented
there and in ``docs/events.md``). :class:`FollowUpConsumer` is the example control script:
it subscribes to the event stream and, for each ``raised`` flag, requests the boxes of the flag's
components (or its whole bounding box) at a longer dwell, sums the follow-up spectra over the flag's own positions, and reports the Fe/Co
K-alpha ratio and the Fe K-alpha signal-to-noise ratio (:func:`streamclust.engine.centres.fe_co_lines`).

Examples
--------
>>> from streamclust.simulators.phantom import LamellaPhantom
>>> from streamclust.simulators.followup import FollowUpServer
>>> ph = LamellaPhantom(scan_shape=(16, 16), seed=0, frame_shape=(64, 64))
>>> with FollowUpServer(ph) as server, FollowUpClient(server.endpoint) as client:
...     res = client.acquire_region((0, 0, 2, 2), dwell_s=0.05, per_position=True)
>>> res.spectra.shape, res.summed.shape, res.positions.tolist()
((4, 2048), (2048,), [0, 1, 16, 17])
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import zmq

from streamclust.adapters.errors import StreamclustError, WireFormatError
from streamclust.adapters.wire import decode_array_message
from streamclust.engine.centres import fe_co_lines
from streamclust.flags.events import EventSubscriber

logger = logging.getLogger(__name__)

__all__ = ["FollowUpError", "FollowUpResult", "FollowUpReport", "FollowUpClient", "FollowUpConsumer",
           "follow_up_flag"]


class FollowUpError(StreamclustError):
    """The follow-up endpoint refused a request, answered badly, or did not answer.

    ``kind`` is the server's error kind (``bad_bbox``, ``bad_dwell``, ...) or ``timeout`` /
    ``bad_reply``.
    """

    reason = "followup_error"

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(f"follow-up {kind}: {message}")


@dataclass(frozen=True)
class FollowUpResult:
    """A follow-up acquisition: ``summed`` (channels,) counts over the box, ``spectra``
    (n, channels) per position (raster order inside the box) or None, ``positions`` the flat
    scan positions of the box, ``energy_axis_kev`` the channel centres, ``header`` the reply."""

    bbox: tuple
    dwell_s: float
    positions: np.ndarray
    summed: np.ndarray
    spectra: np.ndarray | None
    energy_axis_kev: np.ndarray
    header: dict = field(repr=False)

    def sum_over(self, positions) -> np.ndarray:
        """Summed spectrum over those of ``positions`` inside the box (needs ``per_position``)."""
        if self.spectra is None:
            raise ValueError("per-position spectra were not requested")
        sel = np.isin(self.positions, np.asarray(positions))
        return self.spectra[sel].sum(axis=0, dtype=np.int64)


@dataclass(frozen=True)
class FollowUpReport:
    """What the consumer did for one raised flag: ``spectrum`` is the follow-up spectrum summed
    over the flag's own positions (``n_flag_positions``; flat indices in ``positions``, sorted),
    ``n_acquired`` the positions re-acquired, ``results`` one :class:`FollowUpResult` per
    requested region, ``dwell_s`` the follow-up's dwell."""

    flag_id: int
    bbox: tuple
    n_flag_positions: int
    n_acquired: int
    fe_co_ratio: float
    snr_fe: float
    spectrum: np.ndarray = field(repr=False)
    results: tuple = field(repr=False)
    event: dict = field(repr=False)
    positions: np.ndarray | None = field(default=None, repr=False)
    dwell_s: float | None = None


class FollowUpClient:
    """REQ client of a follow-up endpoint (lazy-pirate: a timed-out socket is replaced).

    Parameters
    ----------
    endpoint : str
    timeout_s : float
        How long to wait for a reply; then :class:`FollowUpError` (``kind = "timeout"``).
    max_bytes : int
        Largest reply array accepted.
    """

    def __init__(self, endpoint: str, *, timeout_s: float = 30.0, max_bytes: int = 1 << 28,
                 context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self._ctx = context or zmq.Context.instance()
        self._sock = None
        self.stats = {"requests": 0, "errors": 0, "timeouts": 0}

    def _socket(self):
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.REQ)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.MAXMSGSIZE, self.max_bytes + 65536)
            self._sock.connect(self.endpoint)
        return self._sock

    def request(self, req: dict) -> tuple[dict, np.ndarray]:
        """Send one request; return the decoded ``(header, array)`` of an ``ok`` reply."""
        sock = self._socket()
        self.stats["requests"] += 1
        sock.send(json.dumps(req).encode("utf-8"))
        if not sock.poll(int(self.timeout_s * 1000)):
            # a REQ socket without its reply is stuck: drop it, the next call makes a new one
            self.stats["timeouts"] += 1
            self._sock.close(linger=0)
            self._sock = None
            raise FollowUpError("timeout", f"no reply from {self.endpoint} within {self.timeout_s} s")
        try:
            head, arr = decode_array_message(sock.recv_multipart(copy=False), max_bytes=self.max_bytes,
                                             expect_stream="followup")
        except WireFormatError as exc:
            self.stats["errors"] += 1
            raise FollowUpError("bad_reply", str(exc)) from exc
        if head.get("status") != "ok":
            self.stats["errors"] += 1
            raise FollowUpError(str(head.get("error", "unknown")), str(head.get("message", "")))
        return head, arr

    def info(self) -> dict:
        """The endpoint's scan shape, dwell, energy axis and limits."""
        return self.request({"cmd": "info"})[0]

    def acquire_region(self, bbox, dwell_s: float, *, per_position: bool = False) -> FollowUpResult:
        """Re-acquire ``bbox`` (y0, x0, y1, x1), half-open, at ``dwell_s`` seconds a position."""
        box = [int(v) for v in bbox]
        head, arr = self.request({"cmd": "acquire_region", "bbox": box, "dwell_s": float(dwell_s),
                                  "per_position": bool(per_position)})
        y0, x0, y1, x1 = head["bbox"]
        h, w = y1 - y0, x1 - x0
        nx = int(head["scan_shape"][1])
        positions = ((np.arange(y0, y1)[:, None] * nx) + np.arange(x0, x1)[None, :]).ravel()
        n_ch = arr.shape[-1]
        if per_position:
            if arr.shape != (h * w, n_ch):
                raise FollowUpError("bad_reply", f"per-position array {arr.shape} for a {h} x {w} box")
            spectra = np.array(arr)
            summed = spectra.sum(axis=0, dtype=np.int64)
        else:
            if arr.ndim != 1:
                raise FollowUpError("bad_reply", f"summed spectrum of shape {arr.shape}")
            spectra, summed = None, np.array(arr, dtype=np.int64)
        # the wire convention: energy_offset_kev is the energy of channel 0 (its centre)
        energy = head["energy_offset_kev"] + np.arange(n_ch) * head["channel_width_kev"]
        return FollowUpResult(tuple(head["bbox"]), float(head["dwell_s"]), positions, summed, spectra, energy, head)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> FollowUpClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def follow_up_flag(client: FollowUpClient, event: dict, dwell_s: float, *,
                   region: str = "components", on_reply=None) -> FollowUpReport:
    """Re-acquire one flag's regions at ``dwell_s`` and measure them: the follow-up path shared by
    the example control script (:class:`FollowUpConsumer`) and the live view's "follow up" button.

    ``event`` needs ``flag_id`` and ``bbox``, optionally ``components`` (boxes) and ``positions``
    (flat indices of the flag's own positions), as in a flag event (``docs/events.md``).
    ``on_reply(i, n)``, optional, is called after region ``i`` of ``n`` came back (the live view
    shows "acknowledged" after the first). Raises :class:`FollowUpError` when the endpoint refuses
    or does not answer.
    """
    if region not in ("components", "bbox"):
        raise ValueError(f"region must be 'components' or 'bbox', got {region!r}")
    boxes = event.get("components") if region == "components" else None
    boxes = boxes or [event["bbox"]]
    results = []
    for i, b in enumerate(boxes):
        results.append(client.acquire_region(b, dwell_s, per_position=True))
        if on_reply is not None:
            on_reply(i, len(boxes))
    results = tuple(results)
    flag_pos = event.get("positions")
    spectrum = np.zeros(results[0].summed.shape, np.int64)
    taken: set[int] = set()
    for res in results:
        # the flag's own positions (box corners hold matrix), each counted once
        want = res.positions if flag_pos is None else np.intersect1d(res.positions, flag_pos)
        want = np.array([p for p in want.tolist() if p not in taken], np.int64)
        taken.update(want.tolist())
        if want.size:
            spectrum += res.sum_over(want)
    lines = fe_co_lines(spectrum, results[0].energy_axis_kev)
    report = FollowUpReport(
        flag_id=int(event["flag_id"]), bbox=tuple(event["bbox"]), n_flag_positions=len(taken),
        n_acquired=int(sum(r.positions.size for r in results)), fe_co_ratio=float(lines.ratio),
        snr_fe=float(lines.snr_fe), spectrum=spectrum, results=results, event=event,
        positions=np.array(sorted(taken), np.int64), dwell_s=float(dwell_s),
    )
    logger.info("flag %d followed up (%d regions, %d positions at %.3g s): Fe/Co %.2f, Fe Ka SNR %.1f",
                report.flag_id, len(results), report.n_acquired, dwell_s, report.fe_co_ratio, report.snr_fe)
    return report


class FollowUpConsumer:
    """Example control script: follow up every raised flag of the event stream.

    Parameters
    ----------
    events_endpoint : str
        Where an :class:`~streamclust.flags.events.EventPublisher` is bound.
    control_endpoint : str
        The follow-up endpoint.
    dwell_s : float
        Dwell of the follow-up acquisition.
    socket_type : {"sub", "pull"}
    min_score : float
        Raised flags scoring below this are ignored.
    region : {"components", "bbox"}
        Re-acquire each component's box (less beam time when a flag has several inclusions) or
        the flag's whole bounding box.
    """

    def __init__(self, events_endpoint: str, control_endpoint: str, *, dwell_s: float = 0.1,
                 socket_type: str = "sub", min_score: float = 0.0, region: str = "components",
                 timeout_s: float = 30.0, context: zmq.Context | None = None) -> None:
        if region not in ("components", "bbox"):
            raise ValueError(f"region must be 'components' or 'bbox', got {region!r}")
        self.dwell_s = dwell_s
        self.region = region
        self.min_score = min_score
        self.subscriber = EventSubscriber(events_endpoint, socket_type, context=context)
        self.client = FollowUpClient(control_endpoint, timeout_s=timeout_s, context=context)
        self.reports: list[FollowUpReport] = []
        self._seen_ids: set = set()
        self.stats = {"events": 0, "raised": 0, "followed_up": 0, "skipped": 0, "failed": 0}

    def handle(self, event: dict) -> FollowUpReport | None:
        """Act on one event: a flag seen for the first time (``raised``, or ``updated`` when the
        ``raised`` event was missed) scoring at least ``min_score`` is followed up, once."""
        self.stats["events"] += 1
        if event.get("stream") != "event" or event.get("event") not in ("raised", "updated"):
            return None
        # a subscriber that joined late (PUB/SUB) may never see "raised": the first event of an
        # unknown flag id stands in for it; every flag is followed up once
        flag_id = event.get("flag_id")
        if flag_id in self._seen_ids:
            return None
        self._seen_ids.add(flag_id)
        self.stats["raised"] += 1
        if (event.get("score") or 0.0) < self.min_score:
            self.stats["skipped"] += 1
            return None
        try:
            report = follow_up_flag(self.client, event, self.dwell_s, region=self.region)
        except FollowUpError as exc:
            self.stats["failed"] += 1
            logger.warning("follow-up of flag %s failed: %s", event.get("flag_id"), exc)
            return None
        self.stats["followed_up"] += 1
        self.reports.append(report)
        return report

    def run(self, *, max_reports: int | None = None, idle_timeout_s: float = 5.0) -> list[FollowUpReport]:
        """Handle events until ``max_reports`` follow-ups are done, an end marker arrives, or the
        stream is idle for ``idle_timeout_s``."""
        done = []
        for ev in self.subscriber.events(idle_timeout_s):
            if ev.get("stream") == "end":
                break
            rep = self.handle(ev)
            if rep is not None:
                done.append(rep)
                if max_reports is not None and len(done) >= max_reports:
                    break
        return done

    def close(self) -> None:
        self.subscriber.close()
        self.client.close()

    def __enter__(self) -> FollowUpConsumer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
