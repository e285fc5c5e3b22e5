"""The live view: snapshots, rendering, HTTP endpoints, slow clients, and the page in a real Chromium."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from matplotlib.image import imread

from streamclust.app.liveview import LiveView
from streamclust.app.liveview_render import cluster_palette, encode_png, render_rgba

import browser

NY, NX, C = 24, 32, 4


def _scene(done: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and memberships of a raster scan with ``done`` positions clustered (rest unknown)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:NY, :NX]
    lab = (xx // 8).astype(np.int64)
    lab[(yy - 12) ** 2 + (xx - 20) ** 2 < 16] = 3
    lab = lab.reshape(-1)
    u = rng.uniform(0.0, 0.1, (NY * NX, C))
    u[np.arange(NY * NX), lab] = rng.uniform(0.5, 1.0, NY * NX)
    lab[done:] = -1
    u[done:] = np.nan
    return lab, u


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


@pytest.fixture
def view():
    with LiveView(scan_shape=(NY, NX), n_clusters=C, title="test <scan>") as v:
        yield v


def _wait(predicate, what: str, timeout: float = 30.0):
    """Liveness guard for conditions reached through other threads (not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


# ---------------------------------------------------------------- rendering
def test_png_decodes_to_expected_colours():
    lab, u = _scene(done=400)
    pal = cluster_palette(C)
    png = encode_png(render_rgba(None, u, (NY, NX), pal))
    img = imread(io.BytesIO(png), format="png")  # float RGBA in [0, 1]
    assert img.shape == (NY, NX, 4)
    flat = img.reshape(-1, 4)
    k = np.arange(400)
    expected = pal[lab[:400]] / 255.0 * np.nanmax(u[:400], axis=1)[:, None]
    np.testing.assert_allclose(flat[k, :3], expected, atol=1.0 / 255 + 1e-6)
    assert np.all(flat[:400, 3] == 1.0)
    assert np.all(flat[400:] == 0.0)  # not yet scanned: transparent


def test_labels_win_over_argmax_and_labels_alone_are_full_brightness():
    pal = cluster_palette(3)
    u = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    rgba = render_rgba(np.array([2, -1]), u, (1, 2), pal)
    np.testing.assert_array_equal(rgba[0, 0, :3], np.rint(pal[2] * np.float32(0.6)).astype(np.uint8))
    assert rgba[0, 1, 3] == 0
    rgba = render_rgba(np.array([[1, 0]]), None, (1, 2), pal)
    np.testing.assert_array_equal(rgba[0, :, :3], pal[[1, 0]])


def test_palette_is_distinct_for_many_clusters():
    pal = cluster_palette(20)
    assert len({tuple(c) for c in pal.tolist()}) == 20


def test_encode_png_rejects_wrong_images():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="at least one pixel"):
        encode_png(np.zeros((0, 2, 4), np.uint8))


# ---------------------------------------------------------------- producer side
def test_update_copies_and_keeps_unchanged_fields(view):
    lab, u = _scene(done=100)
    assert view.update(labels=lab, memberships=u, progress=(100, NY * NX), counters={"frames": 100}) == 1
    lab[:] = 0  # the engine keeps writing its own arrays: the snapshot must not change
    u[:] = 0.5
    snap = view.snapshot
    assert snap.labels[150] == -1 and np.isnan(snap.memberships[150]).all()
    assert not snap.labels.flags.writeable and not snap.memberships.flags.writeable
    assert view.update(counters={"frames": 120}) == 2
    snap2 = view.snapshot
    assert snap2.labels is snap.labels and snap2.progress == (100, NY * NX)
    assert snap2.counters == {"frames": 120} and snap.counters == {"frames": 100}


def test_update_rejects_bad_input_and_keeps_serving(view):
    with pytest.raises(ValueError, match="labels must be 768 integers"):
        view.update(labels=np.zeros(10, int))
    with pytest.raises(ValueError, match="integers"):
        view.update(labels=np.zeros(NY * NX))
    with pytest.raises(ValueError, match=r"memberships must have shape \(768, 4\)"):
        view.update(memberships=np.zeros((NY * NX, 3)))
    with pytest.raises(ValueError, match="flag 1: bbox"):
        view.update(flags=[{"cluster": 0, "bbox": (0, 0, 2, 2)}, {"cluster": 1, "bbox": (0, 0, 99, 2)}])
    with pytest.raises(ValueError, match="flag 0: cluster 4 not in 0 .. 3"):
        view.update(flags=[{"cluster": 4, "bbox": (0, 0, 2, 2)}])
    with pytest.raises(ValueError, match="flag 0: score 'high' is not a number"):
        view.update(flags=[{"cluster": 1, "bbox": (0, 0, 2, 2), "score": "high"}])
    with pytest.raises(ValueError, match="flag 0: needs 'cluster'"):
        view.update(flags=[{"bbox": (0, 0, 2, 2)}])
    with pytest.raises(ValueError, match="done <= total"):
        view.update(progress=(5, 3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        view.update(progress=1.5)
    assert view.version == 0
    assert view.update(progress=0.5) == 1
    assert json.loads(_get(view.url + "state.json"))["progress"]["done"] == NY * NX // 2


# ---------------------------------------------------------------- HTTP
def test_endpoints_serve_the_latest_state(view):
    lab, u = _scene(done=300)
    flags = [{"cluster": np.int64(3), "score": np.float32(0.9), "bbox": (8, 16, 17, 25),
              "n_positions": 40, "label": "second phase?"}]
    view.update(labels=lab, memberships=u, flags=flags, progress=(300, NY * NX),
                counters={"frames received": 300, "frames dropped": np.int64(2), "rate": float("nan")})
    state = json.loads(_get(view.url + "state.json"))
    assert state["version"] == 1 and state["scan_shape"] == [NY, NX] and state["n_clusters"] == C
    assert state["progress"] == {"done": 300, "total": NY * NX, "fraction": 300 / (NY * NX)}
    assert state["counters"] == {"frames received": 300, "frames dropped": 2, "rate": None}
    assert state["flags"] == [{"cluster": 3, "score": pytest.approx(0.9), "bbox": [8, 16, 17, 25],
                               "n_positions": 40, "label": "second phase?"}]
    assert state["cluster_counts"] == np.bincount(lab[:300], minlength=C).tolist()
    assert state["invalid_labels"] == 0
    assert state["palette"][0] == "#e69f00"
    img = imread(io.BytesIO(_get(view.url + "map.png?v=1")), format="png")
    np.testing.assert_array_equal(np.rint(img * 255).astype(np.uint8),
                                  render_rgba(lab, u, (NY, NX), cluster_palette(C)))
    page = _get(view.url).decode()
    assert "<title>test &lt;scan&gt;</title>" in page  # the title is escaped
    # No external resource: the instrument PC may be offline.
    assert "http://" not in page and "https://" not in page and "<link" not in page
    with pytest.raises(urllib.error.HTTPError) as err:
        _get(view.url + "nothing")
    err.value.close()
    assert err.value.code == 404 and view.stats["not_found"] == 1


def test_out_of_range_labels_are_counted_and_not_drawn(view):
    lab, _ = _scene(done=100)
    lab[:5] = C  # a producer bug: a cluster the view does not know
    lab[5] = -7
    view.update(labels=lab)
    state = json.loads(_get(view.url + "state.json"))
    assert state["invalid_labels"] == 6 and sum(state["cluster_counts"]) == 94
    img = imread(io.BytesIO(_get(view.url + "map.png")), format="png")
    assert np.all(img.reshape(-1, 4)[:6, 3] == 0) and np.all(img.reshape(-1, 4)[6:100, 3] == 1)


def test_png_rendered_once_per_version_whatever_the_viewers(view):
    lab, u = _scene(done=500)
    view.update(labels=lab, memberships=u)
    bodies = []
    threads = [threading.Thread(target=lambda: bodies.append(_get(view.url + "map.png"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _get(view.url + "state.json")
    assert len(set(bodies)) == 1 and view.stats["renders"] == 1
    view.update(progress=(600, NY * NX))
    assert _get(view.url + "map.png") == bodies[0]  # same map, new version: one more render
    assert view.stats["renders"] == 2


def test_a_client_that_never_reads_cannot_block_updates(caplog):
    """A viewer that stops reading mid-response holds one server thread, never the producer."""
    ny, nx, c = 256, 256, 6
    rng = np.random.default_rng(1)
    u = rng.random((ny * nx, c), dtype=np.float32)  # noisy map: a PNG of ~130 kB
    with LiveView(scan_shape=(ny, nx), n_clusters=c) as view:
        view.update(memberships=u)
        silent = socket.create_connection(view.address)  # connects, never sends a request
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(view.address)
        # 100 pipelined keep-alive requests (~13 MB of answers, more than any socket buffer), never read
        stuck.sendall(b"GET /map.png HTTP/1.1\r\nHost: x\r\n\r\n" * 100)
        try:
            _wait(lambda: view.stats["responses_in_flight"] == 1, "the server writing to the stuck client")
            versions: list[int] = []
            producer = threading.Thread(target=lambda: versions.extend(
                view.update(memberships=u, progress=(k, ny * nx), counters={"k": k}) for k in range(1, 21)))
            producer.start()
            producer.join(60)  # liveness guard: a producer waiting on the stuck viewer never returns
            assert not producer.is_alive(), "update() blocked behind a viewer that does not read"
            assert versions == list(range(2, 22))
            state = json.loads(_get(view.url + "state.json"))  # another viewer still served
            assert state["version"] == 21 and state["counters"] == {"k": 20}
            # the stuck response is still blocked (the other viewer's finishes): update() never waited
            _wait(lambda: view.stats["responses_in_flight"] == 1, "only the stuck response left")
            assert view.stats["client_errors"] == 0
            errors_before = 0
        finally:
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            stuck.close()  # RST: the server's write fails; counted, not a traceback
            silent.close()
        _wait(lambda: view.stats["client_errors"] > errors_before, "the dropped client counted")
        _wait(lambda: view.stats["responses_in_flight"] == 0, "the stuck response released")
        assert view.stats["server_errors"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # counted, no traceback


def test_never_reading_client_is_dropped_after_client_timeout(caplog):
    rng = np.random.default_rng(2)
    u = rng.random((256 * 256, 6), dtype=np.float32)
    with LiveView(scan_shape=(256, 256), n_clusters=6, client_timeout=0.3) as view:
        view.update(memberships=u)
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(view.address)
        stuck.sendall(b"GET /map.png HTTP/1.1\r\nHost: x\r\n\r\n" * 100)
        try:
            _wait(lambda: view.stats["client_errors"] >= 1, "the stalled client timed out and counted")
            _wait(lambda: view.stats["responses_in_flight"] == 0, "its thread released")
        finally:
            stuck.close()
        assert view.stats["server_errors"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_stop_releases_the_port_and_is_idempotent():
    view = LiveView(scan_shape=(2, 2), n_clusters=1).start()
    url = view.url
    assert _get(url + "state.json")
    kept = socket.create_connection(view.address)  # a browser's kept-alive connection
    kept.sendall(b"GET /state.json HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < int(
            reply.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]):
        chunk = kept.recv(65536)
        assert chunk, "server closed a kept-alive connection early"
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 200")
    view.stop()
    kept.settimeout(30)
    try:
        kept.sendall(b"GET /state.json HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(65536) == b""  # closed by stop(), not served by a leftover thread
    except ConnectionError:
        pass
    finally:
        kept.close()
    view.stop()
    with pytest.raises(urllib.error.URLError):
        _get(url + "state.json")
    with pytest.raises(RuntimeError, match="not started"):
        view.url


# ---------------------------------------------------------------- a real browser
needs_chromium = pytest.mark.skipif(browser.find_chromium() is None,
                                    reason="chromium not installed (Debian package 'chromium'; `make browser`)")

_MAP_RECT = ("(() => { const r = document.getElementById('map').getBoundingClientRect();"
             " return [r.x, r.y, r.width, r.height]; })()")


def _pixel(shot: np.ndarray, rect, y: int, x: int) -> np.ndarray:
    """Screenshot RGB at the centre of scan position (y, x)."""
    left, top, width, height = rect
    return shot[int(top + (y + 0.5) * height / NY), int(left + (x + 0.5) * width / NX), :3]


@needs_chromium
def test_page_dump_dom_shows_each_state(view):
    lab, u = _scene(done=200)
    view.update(labels=lab, memberships=u, progress=(200, NY * NX), counters={"frames received": 200})
    dom = browser.dump_dom(view.url)
    assert "200 / 768 positions (26.0 %)" in dom and 'src="map.png?v=1"' in dom
    assert "frames received" in dom and "none yet" in dom  # counters table; no flag yet
    lab, u = _scene(done=700)
    view.update(labels=lab, memberships=u, progress=(700, NY * NX), counters={"frames received": 700},
                flags=[{"cluster": 3, "score": 0.8, "bbox": (8, 16, 17, 25), "n_positions": 40,
                        "label": "Mg2Si?"}])
    dom = browser.dump_dom(view.url)
    assert "700 / 768 positions (91.1 %)" in dom and 'src="map.png?v=2"' in dom
    assert dom.count('class="flagbox"') == 1 and "1: Mg2Si?" in dom


@needs_chromium
def test_page_updates_live_in_one_browser_session(view, tmp_path):
    """One open page sees the producer's updates: DOM, versions seen and the map's pixels change."""
    pal = cluster_palette(C)
    lab_a, u_a = _scene(done=NX * 6)  # six rows scanned
    view.update(labels=lab_a, memberships=u_a, progress=(NX * 6, NY * NX), counters={"frames received": 192})
    with browser.Browser(size=(1100, 700)) as b:
        b.goto(view.url)
        b.wait_for("document.getElementById('map').src.endsWith('v=1') && "
                   "document.getElementById('map').complete && document.getElementById('map').naturalWidth === 32")
        assert b.evaluate("document.getElementById('progress-text').textContent") == "192 / 768 positions (25.0 %)"
        assert b.evaluate("document.querySelectorAll('.flagbox').length") == 0
        rect = b.evaluate(_MAP_RECT)
        shot_a = imread(io.BytesIO(b.screenshot_png()), format="png")
        (tmp_path / "a.png").write_bytes(b.screenshot_png())

        final = {}

        def engine() -> None:  # the producer, in its own thread, as the engine would call it
            for done in range(NX * 7, NX * 20 + 1, NX):
                lab, u = _scene(done=done)
                flags = [] if done < NX * 18 else [{"cluster": 3, "score": 0.93, "bbox": (8, 16, 17, 25),
                                                   "n_positions": 45, "label": "second phase?"}]
                final["version"] = view.update(labels=lab, memberships=u, flags=flags, progress=(done, NY * NX),
                                               counters={"frames received": done})

        producer = threading.Thread(target=engine)
        producer.start()
        producer.join()
        v = final["version"]
        b.wait_for(f"document.getElementById('map').src.endsWith('v={v}') && "
                   "document.getElementById('map').complete")
        seen = [int(s) for s in b.evaluate("document.getElementById('versions-seen').dataset.versions").split()]
        assert seen[0] == 1 and seen[-1] == v == 15 and seen == sorted(seen)
        assert b.evaluate("document.getElementById('progress-text').textContent") == "640 / 768 positions (83.3 %)"
        assert b.evaluate("document.querySelectorAll('.flagbox').length") == 1
        assert b.evaluate("document.querySelector('.flaglabel').textContent") == "1: second phase?"
        assert b.evaluate("document.querySelector('#flag-table .flag-label').textContent") == "second phase?"
        shot_b = imread(io.BytesIO(b.screenshot_png()), format="png")
        (tmp_path / "b.png").write_bytes(b.screenshot_png())
        assert b.evaluate(_MAP_RECT) == rect
        view.stop()  # the plugin stopped: the page says so and keeps the last picture
        b.wait_for("document.getElementById('status').className === 'lost'")
        assert "connection lost" in b.evaluate("document.getElementById('status').textContent")
        assert b.evaluate("document.getElementById('map').src").endswith(f"v={v}")
        (tmp_path / "lost.png").write_bytes(b.screenshot_png())

    lab_b, u_b = _scene(done=NX * 20)
    # a position scanned only in B: striped background before, its cluster colour after
    y, x = 10, 4
    before, after = _pixel(shot_a, rect, y, x), _pixel(shot_b, rect, y, x)
    assert np.ptp(before) < 0.05 and before.max() < 0.25  # grey stripes = not yet scanned
    expected = pal[lab_b[y * NX + x]] / 255.0 * np.nanmax(u_b[y * NX + x])
    np.testing.assert_allclose(after, expected, atol=3 / 255)
    # a position scanned in both keeps its colour
    np.testing.assert_allclose(_pixel(shot_a, rect, 2, 28), _pixel(shot_b, rect, 2, 28), atol=1 / 255)
