"""The live view: a small HTTP server that shows a scan's membership map and flags while it runs.

The engine's thread calls :meth:`LiveView.update` after each refresh. That call only swaps an
immutable snapshot in under a lock and bumps a version counter: it never renders, never touches a
socket and never waits on a browser, so a slow or dead viewer cannot slow acquisition. Rendering
(PNG, JSON) happens in the HTTP server's own threads, on request, once per version however many
viewers poll (the PNG is cached per version).

Endpoints (all on ``127.0.0.1`` by default: never the instrument network unless asked for):

``/``
    The page: HTML with inline CSS and JS and no external resource (the instrument PC may be
    offline). It polls ``state.json`` about every 300 ms and reloads ``map.png?v=<version>`` when
    the version changes.
``/state.json``
    ``version``, ``scan_shape``, ``n_clusters``, ``palette``, ``progress``, ``counters``, ``flags``,
    per-cluster position counts, the snapshot's age and the server's own counters.
``/map.png``
    The membership map at the scan's resolution (one pixel per position, RGBA; the browser scales it
    up with ``image-rendering: pixelated``).

Examples
--------
>>> import json, urllib.request
>>> import numpy as np

>>> from streamclust.liveview import LiveView
>>> with LiveView(scan_shape=(4, 6), n_clusters=2, title="demo") as view:
...     labels = np.full(24, -1)
...     labels[:10] = 0
...     _ = view.update(labels=labels, progress=(10, 24), counters={"frames received": 10})
...     state = json.load(urllib.request.urlopen(view.url + "state.json"))
...     png = urllib.request.urlopen(view.url + "map.png").read()
>>> state["version"], state["progress"]["done"], state["cluster_counts"]
(1, 10, [10, 0])
>>> png[:4]
b'\\x89PNG'
"""

from __future__ import annotations

import html
import json
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from .adapters.security import warn_if_exposed
from .liveview_page import PAGE_TEMPLATE
from .liveview_render import cluster_palette, encode_png, labels_and_confidence, render_rgba

logger = logging.getLogger(__name__)

__all__ = ["LiveView", "Snapshot"]

# A client that vanished mid-response is normal for a page that reloads or a laptop that sleeps:
# counted, never a traceback in the log.
_CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


@dataclass(frozen=True)
class Snapshot:
    """One immutable state of the scan as the engine last reported it.

    Arrays are private copies (or arrays whose ownership the caller handed over with
    ``copy=False``) and are never written after the snapshot is made.
    """

    version: int
    time: float
    labels: np.ndarray | None = None
    memberships: np.ndarray | None = None
    flags: tuple[dict, ...] = ()
    progress: tuple[int, int] | None = None
    counters: dict = field(default_factory=dict)


@dataclass
class _Rendered:
    version: int
    png: bytes
    cluster_counts: list[int]
    invalid_labels: int


def _finite_or_none(value: Any) -> Any:
    """NaN and infinities become null: browsers' ``JSON.parse`` rejects them."""
    if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
        return None
    return value


def _jsonable(obj: Any) -> Any:
    """``json.dumps`` fallback for NumPy scalars and arrays in flags and counters."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


class LiveView:
    """Serve a live membership map, flags, progress and counters to web browsers.

    Parameters
    ----------
    host : str, default="127.0.0.1"
        Address to bind. The default keeps the view on this machine; bind another address only on
        purpose (e.g. ``"0.0.0.0"`` behind the facility's firewall).
    port : int, default=0
        0 picks a free port (see :attr:`url`).
    scan_shape : (int, int), default=(64, 64)
        ``(ny, nx)`` of the raster.
    n_clusters : int, default=6
    title : str, default="streamclust live view"
        Shown as the page's heading.
    poll_ms : int, default=300
        How often the page asks for the state.
    client_timeout : float, default=10.0
        Seconds a socket read or write may block before that client is dropped (and counted):
        a browser that connects and never reads holds one server thread for at most this long.

    Attributes
    ----------
    url : str
        ``http://host:port/`` once started.
    version : int
        Number of :meth:`update` calls so far.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, scan_shape: tuple[int, int] = (64, 64),
                 n_clusters: int = 6, title: str = "streamclust live view", poll_ms: int = 300,
                 client_timeout: float = 10.0) -> None:
        ny, nx = (int(v) for v in scan_shape)
        if ny < 1 or nx < 1:
            raise ValueError(f"scan_shape must be positive, got {scan_shape}")
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        self.host = host
        warn_if_exposed(f"tcp://{host}:{port}", None, "LiveView (plain HTTP)")
        self.port = port
        self.scan_shape = (ny, nx)
        self.n_clusters = int(n_clusters)
        self.title = title
        self.poll_ms = int(poll_ms)
        self.client_timeout = float(client_timeout)
        self.palette = cluster_palette(self.n_clusters)
        self._lock = threading.Lock()          # guards _snapshot only; held for a reference swap
        self._render_lock = threading.Lock()   # one render per version, whatever the viewers
        self._stats_lock = threading.Lock()
        self._snapshot = Snapshot(version=0, time=time.time())
        self._rendered: _Rendered | None = None
        self._stats: dict[str, int] = {"requests": 0, "renders": 0, "client_errors": 0,
                                       "not_found": 0, "server_errors": 0, "responses_in_flight": 0}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._page = PAGE_TEMPLATE.replace("__TITLE__", html.escape(title)).replace(
            "__POLL_MS__", str(self.poll_ms)).encode("utf-8")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LiveView:
        """Bind and serve in a daemon thread; returns ``self``."""
        if self._server is not None:
            raise RuntimeError("LiveView already started")
        view = self

        class Handler(_Handler):
            live_view = view
            timeout = view.client_timeout

        server = _Server((self.host, self.port), Handler)
        server.live_view = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="streamclust-liveview", daemon=True)
        self._thread.start()
        logger.info("live view on %s", self.url)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving: close the listening socket and every open (kept-alive) connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> LiveView:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self.address
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/"

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` actually bound (the port is known once started)."""
        if self._server is None:
            raise RuntimeError("LiveView not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def version(self) -> int:
        return self._snapshot.version

    @property
    def snapshot(self) -> Snapshot:
        """The latest state (immutable)."""
        return self._snapshot

    @property
    def stats(self) -> dict[str, int]:
        """Server counters: requests, renders, client_errors, not_found, server_errors, and
        responses_in_flight (bodies being written now: a viewer that stopped reading holds one)."""
        with self._stats_lock:
            return dict(self._stats)

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] = self._stats.get(key, 0) + n

    # ------------------------------------------------------------------ producer side
    def update(self, labels: Any = None, memberships: Any = None,
               flags: Sequence[Mapping[str, Any]] | None = None,
               progress: tuple[int, int] | float | None = None,
               counters: Mapping[str, Any] | None = None, *, copy: bool = True) -> int:
        """Publish a new state; cheap, and never waits on a viewer.

        Arguments left at None keep their previous value, so a caller may send counters alone.

        Parameters
        ----------
        labels : array-like (ny * nx,) or (ny, nx) int, optional
            Cluster per position, -1 = not yet scanned / clustered. Values outside
            ``-1 .. n_clusters - 1`` are drawn as not scanned and counted (``invalid_labels`` in
            ``/state.json``, a warning in the log): checking them here would double this call's cost.
        memberships : array-like (ny * nx, n_clusters) float, optional
            NaN rows = not yet clustered. Brightness on the map is the maximum membership.
        flags : list of dict, optional
            Each with ``cluster`` (int) and ``bbox`` ``(y0, x0, y1, x1)`` (half-open, like slices:
            rows ``y0 .. y1 - 1``), and optionally ``score``, ``n_positions``, ``label``.
        progress : (done, total) or float in [0, 1], optional
            Positions done.
        counters : dict, optional
            Shown as a table (frames received, processed, dropped...).
        copy : bool, default=True
            Copy the arrays. Pass False only to hand over arrays the caller will never write again.

        Returns
        -------
        int
            The new version.
        """
        n = self.scan_shape[0] * self.scan_shape[1]
        if labels is not None:
            labels = np.array(labels, copy=copy)
            if labels.size != n or labels.dtype.kind not in "iu":
                raise ValueError(f"labels must be {n} integers (scan {self.scan_shape}), "
                                 f"got shape {labels.shape} dtype {labels.dtype}")
            labels = labels.reshape(n)
            labels.flags.writeable = False
        if memberships is not None:
            memberships = np.array(memberships, copy=copy)
            if memberships.shape != (n, self.n_clusters):
                raise ValueError(f"memberships must have shape {(n, self.n_clusters)}, "
                                 f"got {memberships.shape}")
            memberships.flags.writeable = False
        if flags is not None:
            flags = tuple(self._check_flag(i, f) for i, f in enumerate(flags))
        if progress is not None:
            progress = self._check_progress(progress, n)
        if counters is not None:
            counters = dict(counters)
        with self._lock:
            old = self._snapshot
            new = Snapshot(
                version=old.version + 1, time=time.time(),
                labels=old.labels if labels is None else labels,
                memberships=old.memberships if memberships is None else memberships,
                flags=old.flags if flags is None else flags,
                progress=old.progress if progress is None else progress,
                counters=old.counters if counters is None else counters)
            self._snapshot = new
        return new.version

    def _check_flag(self, i: int, flag: Mapping[str, Any]) -> dict:
        try:
            cluster = int(flag["cluster"])
            y0, x0, y1, x1 = (int(v) for v in flag["bbox"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"flag {i}: needs 'cluster' and 'bbox' (y0, x0, y1, x1): {exc!r}") from None
        ny, nx = self.scan_shape
        if not (0 <= y0 < y1 <= ny and 0 <= x0 < x1 <= nx):
            raise ValueError(f"flag {i}: bbox {(y0, x0, y1, x1)} outside the scan {self.scan_shape}")
        if not 0 <= cluster < self.n_clusters:
            raise ValueError(f"flag {i}: cluster {cluster} not in 0 .. {self.n_clusters - 1}")
        out = {str(k): _finite_or_none(v) for k, v in flag.items()}
        score = out.get("score")
        if score is not None:
            try:
                out["score"] = _finite_or_none(float(score))
            except (TypeError, ValueError):
                raise ValueError(f"flag {i}: score {score!r} is not a number") from None
        out["cluster"], out["bbox"] = cluster, (y0, x0, y1, x1)
        return out

    @staticmethod
    def _check_progress(progress: Any, n: int) -> tuple[int, int]:
        if isinstance(progress, (tuple, list, np.ndarray)):
            done, total = (int(v) for v in progress)
        else:
            fraction = float(progress)
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"progress fraction must be in [0, 1], got {fraction}")
            done, total = int(round(fraction * n)), n
        if total < 1 or not 0 <= done <= total:
            raise ValueError(f"progress must satisfy 0 <= done <= total, total >= 1; got {done}/{total}")
        return done, total

    # ------------------------------------------------------------------ viewer side
    def _render(self, snap: Snapshot) -> _Rendered:
        """PNG and per-cluster counts of ``snap``, computed once per version."""
        cached = self._rendered
        if cached is not None and cached.version >= snap.version:
            return cached
        with self._render_lock:
            cached = self._rendered
            if cached is not None and cached.version >= snap.version:
                return cached
            snap = self._snapshot  # render the newest state: older ones are of no use to anyone
            lab, _ = labels_and_confidence(snap.labels, snap.memberships,
                                           self.scan_shape[0] * self.scan_shape[1])
            valid = (lab >= 0) & (lab < self.n_clusters)
            counts = np.bincount(lab[valid], minlength=self.n_clusters)
            # checked here, not in update(): an O(n) scan would double the producer's cost
            invalid = int(np.count_nonzero(~valid & (lab != -1)))
            if invalid:
                logger.warning("live view: %d labels outside -1 .. %d (drawn as not scanned)",
                               invalid, self.n_clusters - 1)
            rgba = render_rgba(lab, snap.memberships, self.scan_shape, self.palette)
            rendered = _Rendered(snap.version, encode_png(rgba), [int(c) for c in counts], invalid)
            self._rendered = rendered
            self._count("renders")
            return rendered

    def state(self) -> dict[str, Any]:
        """What ``/state.json`` returns (JSON-ready)."""
        snap = self._snapshot
        rendered = self._render(snap)
        done, total = snap.progress if snap.progress is not None else (0, self.scan_shape[0] * self.scan_shape[1])
        flags = [{**f, "bbox": list(f["bbox"])} for f in snap.flags]
        return {
            "title": self.title,
            "version": snap.version,
            "map_version": rendered.version,
            "updated_unix": snap.time,
            "age_s": max(0.0, time.time() - snap.time),
            "scan_shape": list(self.scan_shape),
            "n_clusters": self.n_clusters,
            "palette": ["#%02x%02x%02x" % tuple(int(v) for v in c) for c in self.palette],
            "progress": {"done": done, "total": total, "fraction": done / total},
            "counters": {str(k): _finite_or_none(v) for k, v in snap.counters.items()},
            "flags": flags,
            "cluster_counts": rendered.cluster_counts,
            "invalid_labels": rendered.invalid_labels,
            "server": self.stats,
        }

    def map_png(self) -> bytes:
        """What ``/map.png`` returns: the newest state's map (cached per version)."""
        return self._render(self._snapshot).png


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    live_view: LiveView

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End every open connection: a kept-alive browser must not be served after stop()."""
        with self._open_lock:
            open_now = list(self._open)
        for request in open_now:
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, _CLIENT_GONE):
            self.live_view._count("client_errors")
            logger.debug("live view client %s went away: %r", client_address, exc)
        else:
            self.live_view._count("server_errors")
            logger.exception("live view: error serving %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    live_view: LiveView
    server_version = "streamclust-liveview"
    # keep-alive: a polling page reuses one connection instead of a new one every 300 ms
    # (every response carries Content-Length; idle connections close after client_timeout)
    protocol_version = "HTTP/1.1"

    def handle(self) -> None:
        try:
            super().handle()
        except _CLIENT_GONE as exc:
            self.live_view._count("client_errors")
            logger.debug("live view client %s went away: %r", self.client_address, exc)
            self.close_connection = True

    def finish(self) -> None:
        try:
            super().finish()
        except _CLIENT_GONE:
            pass  # already counted by handle(), or the client left after a complete response

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        logger.debug("live view %s: " + format, self.address_string(), *args)

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        view = self.live_view
        view._count("requests")
        path = urlsplit(self.path).path
        try:
            if path in ("/", "/index.html"):
                self._send(view._page, "text/html; charset=utf-8")
            elif path == "/state.json":
                body = json.dumps(view.state(), default=_jsonable, allow_nan=False).encode("utf-8")
                self._send(body, "application/json")
            elif path == "/map.png":
                self._send(view.map_png(), "image/png")
            else:
                view._count("not_found")
                self.send_error(HTTPStatus.NOT_FOUND, "no such page")
        except _CLIENT_GONE as exc:
            # counted here: the stdlib would swallow a write timeout as "request timed out"
            view._count("client_errors")
            logger.debug("live view client %s went away: %r", self.client_address, exc)
            self.close_connection = True
        except Exception:
            view._count("server_errors")
            logger.exception("live view: error answering %s", self.path)
            self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR)

    def _send(self, body: bytes, content_type: str) -> None:
        self.live_view._count("responses_in_flight")
        try:  # headers too: they are the first write to block when a client stopped reading
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)
        finally:
            self.live_view._count("responses_in_flight", -1)
