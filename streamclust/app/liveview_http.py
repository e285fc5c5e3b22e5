"""The live view's HTTP side: a threading server that drops vanished clients quietly, and the
request handler of its endpoints (docs/liveview.md).

:class:`ViewHandler` answers from the :class:`~streamclust.app.liveview.LiveView` it is bound to
(``live_view``): the page, ``state.json``, ``map.png``, ``bf.png``, ``evidence.json``,
``position.json`` and the ``/action`` POST. It never touches the analysis.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from streamclust.app.liveview_render import jsonable

logger = logging.getLogger(__name__)

__all__ = ["ViewServer", "ViewHandler"]

# a POST body larger than this is refused before it is read (an action is a few dozen bytes)
_MAX_ACTION_BYTES = 4096

# A client that vanished mid-response is normal for a page that reloads or a laptop that sleeps:
# counted, never a traceback in the log.
_CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class ViewServer(ThreadingHTTPServer):
    daemon_threads = True
    live_view: Any  # the LiveView served

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


class ViewHandler(BaseHTTPRequestHandler):
    live_view: Any  # the LiveView served
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
                body = json.dumps(view.state(), default=jsonable, allow_nan=False).encode("utf-8")
                self._send(body, "application/json")
            elif path == "/map.png":
                self._send(view.map_png(), "image/png")
            elif path == "/bf.png":
                png = view.bf_png()
                if png is None:
                    self._not_found("no bright-field image yet")
                else:
                    self._send(png, "image/png")
            elif path in ("/evidence.json", "/position.json"):
                query = parse_qs(urlsplit(self.path).query)
                try:
                    if path == "/position.json":
                        body = view.position(int(query["p"][0]))
                        self._send(json.dumps(body, default=jsonable, allow_nan=False).encode(), "application/json")
                    else:
                        fid = int(query["flag"][0]) if "flag" in query else None
                        cluster = int(query["cluster"][0]) if "cluster" in query else None
                        self._send(view.evidence_json(fid, cluster), "application/json")
                except (KeyError, ValueError, IndexError) as exc:
                    self._not_found(str(exc))
            else:
                self._not_found("no such page")
        except _CLIENT_GONE as exc:
            # counted here: the stdlib would swallow a write timeout as "request timed out"
            view._count("client_errors")
            logger.debug("live view client %s went away: %r", self.client_address, exc)
            self.close_connection = True
        except Exception:
            view._count("server_errors")
            logger.exception("live view: error answering %s", self.path)
            self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR)

    def _not_found(self, message: str) -> None:
        self.live_view._count("not_found")
        self.send_error(HTTPStatus.NOT_FOUND, message.encode("ascii", "replace").decode("ascii")[:200])

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        """``/action``: a JSON object ``{"action": "followup", "flag_id": 3, "dwell_s": 0.2}`` or
        ``{"action": "dismiss", "flag_id": 3, "note": "..."}``; answers the flag's action state."""
        view = self.live_view
        view._count("requests")
        try:
            status, body = self._action()
        except _CLIENT_GONE as exc:
            view._count("client_errors")
            logger.debug("live view client %s went away: %r", self.client_address, exc)
            self.close_connection = True
            return
        except Exception:
            view._count("server_errors")
            logger.exception("live view: error answering POST %s", self.path)
            status, body = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"}
        if status != HTTPStatus.OK:
            view._count("actions_refused")
            # the body was not read: a client that sent one must not have it taken as a request
            self.close_connection = True
        self._send(json.dumps(body, default=jsonable).encode(), "application/json", status)

    def _action(self) -> tuple[HTTPStatus, dict]:
        view = self.live_view
        if urlsplit(self.path).path != "/action":
            return HTTPStatus.NOT_FOUND, {"error": "no such action endpoint"}
        if not view.authorised(self.headers.get("X-Streamclust-Token")):
            return HTTPStatus.FORBIDDEN, {"error": "acting on flags needs the action token here (docs/liveview.md)"}
        # a JSON content type makes a browser preflight a cross-site request, which this server
        # never approves: another web page open in the operator's browser cannot act on flags
        if self.headers.get_content_type() != "application/json":
            return HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "Content-Type must be application/json"}
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != self.headers.get("Host"):
            return HTTPStatus.FORBIDDEN, {"error": f"cross-origin request from {origin!r} refused"}
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"}
        if not 0 < length <= _MAX_ACTION_BYTES:
            return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body of {length} bytes; 1 .. {_MAX_ACTION_BYTES}"}
        raw = self.rfile.read(length)
        try:
            req = json.loads(raw.decode("utf-8"))
            action, fid = req["action"], int(req["flag_id"])
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            return HTTPStatus.BAD_REQUEST, {"error": f"expected {{'action', 'flag_id'}} JSON: {exc}"}
        try:
            if action == "followup":
                dwell = req.get("dwell_s")
                state = view.request_followup(fid, None if dwell is None else float(dwell))
                return HTTPStatus.OK, {"flag_id": fid, "followup": state}
            if action == "dismiss":
                return HTTPStatus.OK, {"flag_id": fid, "judgement": view.dismiss(fid, str(req.get("note", "")))}
        except PermissionError as exc:
            return HTTPStatus.CONFLICT, {"error": str(exc)}
        except KeyError as exc:
            return HTTPStatus.NOT_FOUND, {"error": str(exc)}
        except (TypeError, ValueError) as exc:
            return HTTPStatus.BAD_REQUEST, {"error": str(exc)}
        return HTTPStatus.BAD_REQUEST, {"error": f"unknown action {action!r} (followup, dismiss)"}

    def _send(self, body: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK) -> None:
        self.live_view._count("responses_in_flight")
        try:  # headers too: they are the first write to block when a client stopped reading
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)
        finally:
            self.live_view._count("responses_in_flight", -1)
