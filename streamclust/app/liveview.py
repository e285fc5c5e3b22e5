"""The live view: a small HTTP server that shows a scan's membership map and flags while it runs.

The engine's thread calls :meth:`LiveView.update` after each refresh. That call only swaps an
immutable snapshot in under a lock and bumps a version counter: it never renders, never touches a
socket and never waits on a browser, so a slow or dead viewer cannot slow acquisition. Rendering
(PNG, JSON) happens in the HTTP server's own threads, on request, once per version however many
viewers poll (the PNG is cached per version).

This module holds the view's state and what it shows; the HTTP server and request handler are in
:mod:`streamclust.app.liveview_http`, the operator's actions on a flag (follow-ups, dismissals) in
:mod:`streamclust.app.liveview_actions`, drawing and JSON encoding in :mod:`streamclust.app.liveview_render`
and the page in :mod:`streamclust.app.liveview_page`.

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

>>> from streamclust.app.liveview import LiveView
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
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any

import numpy as np

from streamclust.adapters.security import warn_if_exposed
from streamclust.app.liveview_actions import HISTORY_KEYS, OperatorActions
from streamclust.app.liveview_http import ViewHandler, ViewServer
from streamclust.app.liveview_page import PAGE_TEMPLATE
from streamclust.app.liveview_render import (DEFAULT_LINES_KEV, bright_field_mask, cluster_palette, encode_png,
                              fe_co_with_uncertainty, finite_or_none, json_ready, jsonable, labels_and_confidence,
                              render_gray_rgba, render_rgba, rounded, spectrum_for_plot)

logger = logging.getLogger(__name__)

__all__ = ["LiveView", "Snapshot", "store_position_provider"]


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
    # evidence (optional): centre spectra/patterns of every cluster at one threshold, and the
    # virtual bright-field image (n,) with NaN where not yet scanned
    centres: dict | None = None
    bright_field: np.ndarray | None = None
    bf_version: int = 0


@dataclass
class _Rendered:
    version: int
    png: bytes
    cluster_counts: list[int]
    invalid_labels: int


class LiveView(OperatorActions):
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
    energy_axis_kev : array-like, optional
        Channel centres of the spectra passed in ``centres`` (needed for the evidence panel).
    lines_kev : sequence of (name, keV), default Si, Fe, Co K-alpha
        Element lines marked on the spectra.
    followup_endpoint : str, optional
        The microscope's follow-up control endpoint (:mod:`streamclust.flags.followup`); without it the
        page's "follow up" button is disabled.
    followup_dwell_s : float, default=0.1
        Dwell of a follow-up requested from the page (the page may ask for another within
        ``(0, max_followup_dwell_s]``).
    action_token : str, optional
        Required (header ``X-Streamclust-Token``) to act on a flag when the view is bound to a
        non-loopback address; without one, acting is refused there (docs/liveview.md).
    position_provider : callable, optional
        ``position_provider(p) -> (spectrum, pattern) or None`` for one flat scan position, called
        in a server thread when a viewer clicks a position (kept out of the periodic update).
        :meth:`update_from_analysis` installs one reading the live analysis's centre store.
    history_len : int, default=256
        Statistics kept per flag for the history plot (the oldest are dropped).
    elements : sequence of str, optional
        The flagger's ``[flags] elements``, in order: they name the line shares of a flag's
        composition on the page (:meth:`update_from_analysis` takes them from the flagger).

    Attributes
    ----------
    url : str
        ``http://host:port/`` once started.
    version : int
        Number of :meth:`update` calls so far.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, scan_shape: tuple[int, int] = (64, 64),
                 n_clusters: int = 6, title: str = "streamclust live view", poll_ms: int = 300,
                 client_timeout: float = 10.0, *, energy_axis_kev: Any = None,
                 lines_kev: Sequence[tuple[str, float]] = DEFAULT_LINES_KEV,
                 followup_endpoint: str | None = None, followup_dwell_s: float = 0.1,
                 max_followup_dwell_s: float = 10.0, followup_timeout_s: float = 60.0,
                 action_token: str | None = None,
                 position_provider: Callable[[int], Any] | None = None, history_len: int = 256,
                 elements: Sequence[str] | None = None) -> None:
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
                                       "not_found": 0, "server_errors": 0, "responses_in_flight": 0,
                                       "actions_refused": 0, "bf_renders": 0}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._page = PAGE_TEMPLATE.replace("__TITLE__", html.escape(title)).replace(
            "__POLL_MS__", str(self.poll_ms)).encode("utf-8")
        self.energy_axis_kev = None if energy_axis_kev is None else np.asarray(energy_axis_kev, float)
        self.lines_kev = tuple((str(n), float(e)) for n, e in lines_kev)
        self.followup_endpoint = followup_endpoint
        self.followup_dwell_s = float(followup_dwell_s)
        self.max_followup_dwell_s = float(max_followup_dwell_s)
        self.followup_timeout_s = float(followup_timeout_s)
        self.action_token = action_token
        self.position_provider = position_provider
        self.history_len = int(history_len)
        self.elements = None if elements is None else tuple(str(e) for e in elements)
        # per flag id: statistics over the scan, the flag's region (positions and component boxes,
        # kept here and never sent in state.json: thousands of integers per poll), operator actions
        self._hist_lock = threading.Lock()
        self._history: dict[int, deque] = {}
        self._regions: dict[int, dict] = {}
        self._actions_lock = threading.Lock()
        self._actions: dict[int, dict] = {}
        #: operator judgements in order (``flag_id``, ``judgement``, ``time_unix``, ``scan_fraction``,
        #: ``note``, and the flag's statistics then): what the results writer stores
        self.judgements: list[dict] = []
        #: :class:`~streamclust.flags.followup.FollowUpReport` of every follow-up done from the page
        self.followup_reports: list = []
        #: every follow-up state change in order (``flag_id``, ``state``, ``time_unix``, and the
        #: error of a failed one): what the operator saw, kept for the results file
        self.followup_log: list[dict] = []
        #: per report (same order as :attr:`followup_reports`): the live scan's summed spectrum over
        #: the same positions, read from the position provider (None without one)
        self.followup_scan_spectra: list = []
        self._followup_threads: list[threading.Thread] = []
        self._evidence_cache: dict[tuple, bytes] = {}
        self._bf_png: tuple[int, bytes] | None = None
        self._bf_store: dict = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LiveView:
        """Bind and serve in a daemon thread; returns ``self``."""
        if self._server is not None:
            raise RuntimeError("LiveView already started")
        view = self

        class Handler(ViewHandler):
            live_view = view
            timeout = view.client_timeout

        server = ViewServer((self.host, self.port), Handler)
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
               counters: Mapping[str, Any] | None = None, *, centres: Mapping[str, Any] | None = None,
               bright_field: Any = None, copy: bool = True) -> int:
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
        centres : dict, optional
            The evidence behind flags: ``eds`` (n_clusters, channels) centre spectra, ``cbed``
            (n_clusters, h, w) centre patterns, ``count`` (n_clusters,) positions behind each, and
            optionally ``threshold``. Flags may then carry ``flag_id``, ``neighbour`` (the matrix
            cluster), the statistics ``p_value_eds``, ``p_value_cbed``, ``effect_eds``,
            ``effect_cbed``, ``level``, ``composition``, and ``positions`` / ``components`` (kept
            for follow-ups, not sent to viewers).
        bright_field : array-like (ny * nx,) float, optional
            Virtual bright-field intensity per position, NaN = not yet scanned.
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
        if centres is not None:
            centres = self._check_centres(centres, copy)
        if bright_field is not None:
            bright_field = np.array(bright_field, dtype=np.float32, copy=copy).reshape(-1)
            if bright_field.size != n:
                raise ValueError(f"bright_field must have {n} values, got {bright_field.size}")
            bright_field.flags.writeable = False
        with self._lock:
            old = self._snapshot
            new = Snapshot(
                version=old.version + 1, time=time.time(),
                labels=old.labels if labels is None else labels,
                memberships=old.memberships if memberships is None else memberships,
                flags=old.flags if flags is None else flags,
                progress=old.progress if progress is None else progress,
                counters=old.counters if counters is None else counters,
                centres=old.centres if centres is None else centres,
                bright_field=old.bright_field if bright_field is None else bright_field,
                bf_version=old.bf_version if bright_field is None else old.version + 1)
            self._snapshot = new
        if flags is not None:
            self._record_history(new)
        return new.version

    def _check_centres(self, centres: Mapping[str, Any], copy: bool) -> dict:
        try:
            eds = np.array(centres["eds"], dtype=np.float64, copy=copy)
            cbed = np.array(centres["cbed"], dtype=np.float64, copy=copy)
            count = np.array(centres["count"], dtype=np.int64, copy=copy)
        except KeyError as exc:
            raise ValueError(f"centres needs 'eds', 'cbed' and 'count': missing {exc}") from None
        c = self.n_clusters
        if eds.ndim != 2 or eds.shape[0] != c or cbed.ndim != 3 or cbed.shape[0] != c or count.shape != (c,):
            raise ValueError(f"centres: eds must be ({c}, channels), cbed ({c}, h, w), count ({c},); got "
                             f"{eds.shape}, {cbed.shape}, {count.shape}")
        if self.energy_axis_kev is not None and self.energy_axis_kev.size != eds.shape[1]:
            raise ValueError(f"centres: {eds.shape[1]} channels, the energy axis has {self.energy_axis_kev.size}")
        for a in (eds, cbed, count):
            a.flags.writeable = False
        return {"eds": eds, "cbed": cbed, "count": count, "threshold": centres.get("threshold")}

    def _record_history(self, snap: Snapshot) -> None:
        """Append each flag's statistics to its history when they changed (O(flags) per update)."""
        done, total = snap.progress if snap.progress is not None else (0, 1)
        with self._hist_lock:
            for f in snap.flags:
                fid = f.get("flag_id")
                if fid is None:
                    continue
                rec = {k: f.get(k) for k in HISTORY_KEYS}
                hist = self._history.setdefault(int(fid), deque(maxlen=self.history_len))
                if hist and all(hist[-1][k] == rec[k] for k in HISTORY_KEYS):
                    continue
                hist.append({"fraction": done / total, "version": snap.version, **rec})

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
        flag = dict(flag)
        positions, components = flag.pop("positions", None), flag.pop("components", None)
        if flag.get("flag_id") is not None:
            fid = int(flag["flag_id"])
            region = {"bbox": [y0, x0, y1, x1]}
            if positions is not None:
                region["positions"] = [int(p) for p in np.asarray(positions).reshape(-1)]
            if components:
                region["components"] = [[int(v) for v in b] for b in components]
            self._regions[fid] = region
        out = {str(k): (v if isinstance(v, (dict, list, tuple)) else finite_or_none(v)) for k, v in flag.items()}
        if isinstance(out.get("composition"), dict):
            out["composition"] = json_ready(out["composition"])
        for k in HISTORY_KEYS:
            if out.get(k) is not None:
                try:
                    out[k] = finite_or_none(float(out[k]))
                except (TypeError, ValueError):
                    raise ValueError(f"flag {i}: {k} {out[k]!r} is not a number") from None
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
            "counters": {str(k): finite_or_none(v) for k, v in snap.counters.items()},
            "flags": flags,
            "cluster_counts": rendered.cluster_counts,
            "invalid_labels": rendered.invalid_labels,
            "server": self.stats,
            "evidence": snap.centres is not None and self.energy_axis_kev is not None,
            "bf_version": snap.bf_version if snap.bright_field is not None else None,
            "positions_available": self.position_provider is not None,
            "followup_enabled": self.followup_endpoint is not None,
            "actions": self.actions(),
        }

    def map_png(self) -> bytes:
        """What ``/map.png`` returns: the newest state's map (cached per version)."""
        return self._render(self._snapshot).png

    # ------------------------------------------------------------------ evidence (viewer side)
    def bf_png(self) -> bytes | None:
        """What ``/bf.png`` returns: the virtual bright-field image (grey, transparent where not
        scanned), rendered once per bright-field version; None when none was given."""
        snap = self._snapshot
        if snap.bright_field is None:
            return None
        cached = self._bf_png
        if cached is not None and cached[0] == snap.bf_version:
            return cached[1]
        with self._render_lock:
            png = encode_png(render_gray_rgba(snap.bright_field, self.scan_shape))
            self._bf_png = (snap.bf_version, png)
            self._count("bf_renders")
        return png

    def flag_history(self, flag_id: int) -> list[dict]:
        """The statistics of flag ``flag_id`` each time they changed: ``fraction`` (of the scan),
        ``version``, ``score``, ``p_value_eds``, ``p_value_cbed``, ``effect_eds``, ``effect_cbed``,
        ``level``."""
        with self._hist_lock:
            return [dict(r) for r in self._history.get(int(flag_id), ())]

    def _matrix_of(self, snap: Snapshot, cluster: int, flag: Mapping | None) -> int | None:
        """The flag's neighbour (its matrix); for a plain cluster, the largest other cluster."""
        if flag is not None and flag.get("neighbour") is not None and 0 <= int(flag["neighbour"]) < self.n_clusters:
            return int(flag["neighbour"])
        count = snap.centres["count"].copy()
        count[cluster] = -1
        k = int(np.argmax(count))
        return k if count[k] > 0 else None

    def _series(self, spectrum: np.ndarray, pattern: np.ndarray, n: int) -> dict:
        e, counts = spectrum_for_plot(spectrum, self.energy_axis_kev)
        try:
            fe_co = fe_co_with_uncertainty(spectrum, n, self.energy_axis_kev)
        except ValueError:  # an axis without the Fe/Co windows
            fe_co = None
        # patterns shown on a square-root scale: the direct beam would otherwise hide the reflections
        return {"n_positions": int(n), "counts": rounded(counts), "fe_co": json_ready(fe_co),
                "pattern": rounded(np.sqrt(np.clip(pattern, 0, None)), 3), "_energy": e}

    def evidence(self, flag_id: int | None = None, cluster: int | None = None) -> dict:
        """What ``/evidence.json`` returns for a flag (by id) or a cluster: the centre spectrum and
        pattern of the region and of its matrix, the Fe/Co K-alpha ratio with its uncertainty,
        the flag's statistics and their history. ``available`` is False without centres."""
        snap = self._snapshot
        flag = None
        if flag_id is not None:
            flag = next((f for f in snap.flags if f.get("flag_id") == int(flag_id)), None)
            if flag is None:
                raise KeyError(f"no active flag {flag_id}")
            cluster = int(flag["cluster"])
        if cluster is None or not 0 <= int(cluster) < self.n_clusters:
            raise KeyError(f"no cluster {cluster}")
        cluster = int(cluster)
        out: dict[str, Any] = {"version": snap.version, "flag_id": flag_id, "cluster": cluster,
                               "lines": [{"name": n, "kev": e} for n, e in self.lines_kev]}
        if flag is not None:
            out["statistics"] = {k: flag.get(k) for k in (*HISTORY_KEYS, "composition")}
            if self.elements is not None:
                out["elements"] = list(self.elements)
            out["history"] = self.flag_history(int(flag_id))
        if snap.centres is None or self.energy_axis_kev is None:
            out["available"] = False
            return out
        c = snap.centres
        matrix = self._matrix_of(snap, cluster, flag)
        region = self._series(c["eds"][cluster], c["cbed"][cluster], int(c["count"][cluster]))
        out.update(available=True, threshold=c.get("threshold"), matrix_cluster=matrix, region=region)
        out["energy_kev"] = rounded(region.pop("_energy"), 5)
        if matrix is not None:
            mat = self._series(c["eds"][matrix], c["cbed"][matrix], int(c["count"][matrix]))
            mat.pop("_energy")
            out["matrix"] = mat
            diff = np.sqrt(np.clip(c["cbed"][cluster], 0, None)) - np.sqrt(np.clip(c["cbed"][matrix], 0, None))
            out["pattern_difference"] = rounded(diff, 3)
        return out

    def evidence_json(self, flag_id: int | None = None, cluster: int | None = None) -> bytes:
        """:meth:`evidence` encoded, cached per (version, selection): several viewers of one flag
        cost one computation per version."""
        key = (self._snapshot.version, flag_id, cluster)
        body = self._evidence_cache.get(key)
        if body is None:
            body = json.dumps(self.evidence(flag_id, cluster), default=jsonable, allow_nan=False).encode()
            # only the newest version's entries are worth keeping
            self._evidence_cache = {k: v for k, v in list(self._evidence_cache.items()) if k[0] == key[0]}
            self._evidence_cache[key] = body
        return body

    def position(self, p: int) -> dict:
        """What ``/position.json?p=`` returns: one position's own spectrum and pattern (from the
        ``position_provider``), fetched on demand. Raises KeyError when there is none."""
        n = self.scan_shape[0] * self.scan_shape[1]
        if not 0 <= p < n:
            raise KeyError(f"position {p} outside the scan (0 .. {n - 1})")
        if self.position_provider is None or self.energy_axis_kev is None:
            raise KeyError("no per-position data in this live view")
        got = self.position_provider(p)
        if got is None:
            raise KeyError(f"position {p} not acquired yet")
        spectrum, pattern = got
        series = self._series(np.asarray(spectrum, np.float64), np.asarray(pattern, np.float64), 1)
        energy = series.pop("_energy")
        return {"position": p, "y": p // self.scan_shape[1], "x": p % self.scan_shape[1],
                "energy_kev": rounded(energy, 5), "lines": [{"name": a, "kev": e} for a, e in self.lines_kev],
                **series}

    # ------------------------------------------------------------------ feeding from the analysis
    @staticmethod
    def flag_from_event(f: Any) -> dict:
        """A :class:`~streamclust.flags.flagger.FlagEvent` as a flag for :meth:`update`: geometry, score,
        matrix (neighbour), statistics, and the region (positions, components) for follow-ups."""
        return {"flag_id": int(f.flag_id), "cluster": int(f.cluster), "bbox": tuple(f.bbox),
                "score": float(f.score), "n_positions": int(f.n_positions), "label": f"flag {f.flag_id}",
                "neighbour": int(f.neighbour),
                "fe_co_ratio": f.signals.get("fe_co_ratio") if f.signals else None,
                "p_value_eds": f.p_value_eds, "p_value_cbed": f.p_value_cbed, "effect_eds": f.effect_eds,
                "effect_cbed": f.effect_cbed, "level": f.level, "composition": f.composition or None,
                "positions": f.positions, "components": list(f.components)}

    @staticmethod
    def centres_from_set(cs: Any) -> dict:
        """The ``centres`` argument of :meth:`update` from a :class:`~streamclust.engine.centres.CentreSet`:
        the highest threshold's centres (the purest; docs/events.md section 5)."""
        i = int(np.argmax(cs.thresholds))
        return {"eds": np.nan_to_num(cs.eds[i]), "cbed": np.nan_to_num(cs.cbed[i]),
                "count": cs.count[i], "threshold": cs.thresholds[i]}

    def update_from_analysis(self, analysis: Any) -> int:
        """Publish everything a :class:`streamclust.app.live.LiveAnalysis` knows: memberships, active
        flags with their statistics and regions, the centres at the highest threshold, the
        virtual bright-field image (computed incrementally, only for new positions) and a position
        provider on its centre store. Costs O(new positions) plus the copies of :meth:`update`."""
        if self.energy_axis_kev is None:
            self.energy_axis_kev = np.asarray(analysis.energy_axis_kev, float)
        if self.elements is None and getattr(analysis.flagger, "elements", None):
            self.elements = tuple(analysis.flagger.elements)
        flags = [self.flag_from_event(f) for f in analysis.flagger.active_flags]
        cs = analysis.centre_set
        centres = None if cs is None else self.centres_from_set(cs)
        store = analysis.centres
        if self.position_provider is None:
            self.position_provider = store_position_provider(store)
        bf = self.bright_field_from_store(store)
        return self.update(memberships=analysis.engine.memberships_, flags=flags,
                           progress=(analysis.n_seen, analysis.n_positions),
                           counters={"positions": analysis.n_seen,
                                     "refreshes": analysis.engine.stats_["refreshes"]},
                           centres=centres, bright_field=bf, copy=True)

    def bright_field_from_store(self, store: Any) -> np.ndarray | None:
        """Virtual bright field (n,) of the positions a :class:`~streamclust.engine.centres.ThresholdedCentres`
        stored so far (NaN elsewhere); only positions new since the last call are summed. The
        detector is the direct beam's disc in the mean of the first positions' patterns."""
        stored = getattr(store, "stored", None)
        if stored is None:
            return None
        st = self._bf_store
        if "bf" not in st:
            st["bf"] = np.full(stored.size, np.nan, np.float32)
            st["done"] = np.zeros(stored.size, bool)
        new = np.flatnonzero(stored & ~st["done"])
        if new.size:
            patterns = store.signals(new)[0].reshape(new.size, -1)
            if "mask" not in st:
                st["mask"] = bright_field_mask(patterns.mean(axis=0).reshape(store.cbed_shape)).reshape(-1)
            st["bf"][new] = patterns[:, st["mask"]].sum(axis=1)
            st["done"][new] = True
        return st["bf"]


def store_position_provider(store: Any) -> Callable[[int], tuple[np.ndarray, np.ndarray] | None]:
    """A ``position_provider`` reading one position's spectrum and binned pattern from a
    :class:`~streamclust.engine.centres.ThresholdedCentres` store (None where nothing is stored yet)."""

    def provide(p: int) -> tuple[np.ndarray, np.ndarray] | None:
        stored = store.stored
        if stored is None or not stored[p]:
            return None
        patterns, spectra = store.signals([p])
        return np.asarray(spectra[0], np.float64), np.asarray(patterns[0], np.float64)

    return provide
