"""Issue 20: the live view shows the evidence behind a flag and lets the operator act on it.

The scene (tests/liveview_scene.py) is a real flag: the lamella phantom's frames and spectra in a
real centre store, memberships from the truth plus noise, the real flagger (``method = "test"``)
re-assessing as rows arrive; follow-ups go to the simulated microscope's real ZeroMQ endpoint.
"""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest

from browser import Browser, find_chromium
from liveview_scene import ROWS, Scene
from streamclust.engine.centres import fe_co_lines
from streamclust.app.liveview import LiveView
from streamclust.simulators.followup import FollowUpServer
from streamclust.simulators.phantom import LamellaPhantom


@pytest.fixture(scope="module")
def scene():
    return Scene()


@pytest.fixture
def server(scene):
    with FollowUpServer(scene.phantom) as srv:
        yield srv


@pytest.fixture(scope="module")
def fed(scene):
    """A view (not started) fed through the first three assessments; the flag is active."""
    view = scene.view()
    for rows in ROWS[:3]:
        scene.feed(view, rows)
    assert view.snapshot.flags, "the phantom raised no flag"
    return view


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def _post(url: str, body: dict | bytes, content_type: str = "application/json", **headers) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type, **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _png_rgba(png: bytes) -> np.ndarray:
    """Decode the view's own PNGs (8-bit RGBA, filter 0, one IDAT)."""
    w, h = struct.unpack(">II", png[16:24])
    idat = png.index(b"IDAT")
    n = struct.unpack(">I", png[idat - 4:idat])[0]
    raw = np.frombuffer(zlib.decompress(png[idat + 4:idat + 4 + n]), np.uint8).reshape(h, w * 4 + 1)
    return raw[:, 1:].reshape(h, w, 4)


def test_evidence_of_a_flag_is_its_centre_against_the_matrix(scene, fed):
    flag = fed.snapshot.flags[0]
    ev = fed.evidence(flag_id=flag["flag_id"])
    json.dumps(ev, allow_nan=False)  # what the page gets must parse in a browser
    assert ev["available"] and ev["cluster"] == flag["cluster"] and ev["matrix_cluster"] == flag["neighbour"]
    names = scene.phantom.truth.label_names
    assert names[ev["cluster"]] == "cfs_second" and names[ev["matrix_cluster"]] == "cfs_matrix"
    # the second phase is Fe-rich: its Fe/Co ratio exceeds the matrix's by many standard deviations
    r, m = ev["region"]["fe_co"], ev["matrix"]["fe_co"]
    assert r["ratio"] - m["ratio"] > 5 * np.hypot(r["sigma"], m["sigma"]), (r, m)
    # ... and the ratio is fe_co_lines' on the centre spectrum
    c = fed.snapshot.centres
    li = fe_co_lines(c["eds"][ev["cluster"]], scene.phantom.energy_axis_kev)
    assert r["ratio"] == pytest.approx(float(li.ratio), rel=1e-9)
    assert {ln["name"] for ln in ev["lines"]} == {"Fe Ka", "Co Ka", "Si Ka"}
    assert len(ev["energy_kev"]) == len(ev["region"]["counts"]) == len(ev["matrix"]["counts"]) <= 512
    pat = np.array(ev["region"]["pattern"], float)
    assert pat.shape == (32, 32) and np.array(ev["pattern_difference"]).shape == (32, 32)
    # the statistics behind the flag and their history over the three assessments
    st = ev["statistics"]
    assert st["p_value_eds"] <= st["level"] and st["p_value_cbed"] <= st["level"]
    assert len(st["composition"]["region_share"]) == len(scene.flagger.elements)
    assert ev["elements"] == list(scene.flagger.elements)  # they name the shares on the page
    hist = ev["history"]
    assert [h["fraction"] for h in hist] == [rows / 64 for rows in ROWS[:3]]
    assert all(h["p_value_eds"] is not None for h in hist)


def test_bright_field_is_incremental_and_transparent_where_not_scanned(scene, fed):
    bf = fed.snapshot.bright_field
    done = ROWS[2] * 64
    assert np.isfinite(bf[:done]).all() and np.isnan(bf[done:]).all()
    # the virtual detector sums the same pixels of every stored pattern
    mask = fed._bf_store["mask"]
    p = 700
    assert bf[p] == pytest.approx(scene.store.signals([p])[0].reshape(-1)[mask].sum(), rel=1e-5)
    rgba = _png_rgba(fed.bf_png())
    assert rgba.shape == (64, 64, 4)
    assert (rgba[:ROWS[2], :, 3] == 255).all() and (rgba[ROWS[2]:, :, 3] == 0).all()
    # grey, not flat: thickness varies across the lamella
    assert rgba[:ROWS[2], :, 0].std() > 10


def test_http_evidence_position_and_bad_queries(scene, fed):
    with fed:
        st = json.loads(_get(fed.url + "state.json"))
        assert st["evidence"] and st["bf_version"] == st["version"] and st["positions_available"]
        # the region of a flag (thousands of integers) is kept out of the periodic state
        assert "positions" not in st["flags"][0] and "components" not in st["flags"][0]
        fid = st["flags"][0]["flag_id"]
        ev = json.loads(_get(fed.url + f"evidence.json?flag={fid}"))
        assert ev["flag_id"] == fid and ev["available"]
        before = fed.stats["not_found"]
        for bad in ("evidence.json?flag=99", "evidence.json?cluster=17", "evidence.json?flag=x",
                    "position.json?p=999999", f"position.json?p={64 * 63}"):
            with pytest.raises(urllib.error.HTTPError) as err:
                _get(fed.url + bad)
            assert err.value.code == 404, bad
        assert fed.stats["not_found"] == before + 5
        pos = json.loads(_get(fed.url + "position.json?p=130"))
        assert (pos["y"], pos["x"]) == (2, 2)
        # the position's own spectrum, rebinned as the centres' for the plot
        from streamclust.app.liveview_render import spectrum_for_plot
        _, expect = spectrum_for_plot(scene.spectra[130], scene.phantom.energy_axis_kev)
        np.testing.assert_allclose(pos["counts"], expect, rtol=1e-3)


def test_followup_from_the_api_reaches_the_microscope_once_and_reports(server):
    scene = Scene()  # its own: the module's scene is fed to ROWS[2] already
    view = scene.view(followup_endpoint=server.endpoint)
    for rows in ROWS[:2]:
        scene.feed(view, rows)
    fid = view.snapshot.flags[0]["flag_id"]
    with view:
        code, body = _post(view.url + "action", {"action": "followup", "flag_id": fid, "dwell_s": 0.1})
        assert code == 200 and body["followup"]["state"] in ("sent", "acknowledged", "done")
        # a second press while it runs is not a second acquisition
        code, again = _post(view.url + "action", {"action": "followup", "flag_id": fid})
        assert code == 200
        _wait(lambda: view.actions()[str(fid)]["followup"]["state"] in ("done", "failed"))
    fu = view.actions()[str(fid)]["followup"]
    assert fu["state"] == "done", fu
    (report,) = view.followup_reports
    n_regions = len(view._regions[fid].get("components") or [None])
    assert server.stats["ok"] == n_regions and fu["regions_done"] == n_regions
    assert fu["fe_co_ratio"] > 1.0 and fu["snr_fe"] > 0
    assert report.n_flag_positions == len(view._regions[fid]["positions"])


def test_dismiss_is_recorded_and_actions_are_guarded(fed):
    fid = fed.snapshot.flags[0]["flag_id"]
    with fed:
        # no follow-up endpoint configured: refused, and said why
        code, body = _post(fed.url + "action", {"action": "followup", "flag_id": fid})
        assert code == 409 and "endpoint" in body["error"]
        # a form post (what another web page can send without a preflight) is refused
        code, _ = _post(fed.url + "action", b"action=dismiss", content_type="application/x-www-form-urlencoded")
        assert code == 415
        code, _ = _post(fed.url + "action", {"action": "dismiss", "flag_id": fid}, Origin="http://evil.example")
        assert code == 403
        code, _ = _post(fed.url + "action", {"action": "dismiss", "flag_id": fid, "pad": "x" * 5000})
        assert code == 413
        code, _ = _post(fed.url + "action", {"action": "launch", "flag_id": fid})
        assert code == 400
        assert fed.stats["actions_refused"] == 5 and fed.judgements == []
        code, body = _post(fed.url + "action", {"action": "dismiss", "flag_id": fid, "note": "carbon"})
        assert code == 200
    (j,) = fed.judgements
    assert j["flag_id"] == fid and j["judgement"] == "dismissed" and j["note"] == "carbon"
    assert j["p_value_eds"] is not None and j["scan_fraction"] == ROWS[2] / 64
    assert fed.actions()[str(fid)]["judgement"] == "dismissed"


def test_acting_off_loopback_needs_the_token():
    assert LiveView(host="127.0.0.1").authorised(None)
    exposed = LiveView(host="0.0.0.0")
    assert not exposed.authorised(None) and not exposed.authorised("guess")
    with_token = LiveView(host="0.0.0.0", action_token="s3cret")
    assert with_token.authorised("s3cret") and not with_token.authorised("s3cre") and not with_token.authorised(None)


def test_view_without_evidence_still_serves(fed):
    view = LiveView(scan_shape=(4, 4), n_clusters=2)
    view.update(labels=np.zeros(16, int), flags=[{"cluster": 1, "bbox": (0, 0, 2, 2), "flag_id": 1}])
    ev = view.evidence(flag_id=1)
    assert ev["available"] is False and view.bf_png() is None
    with pytest.raises(KeyError):
        view.position(3)


def _wait(cond, timeout: float = 60.0) -> None:
    """Liveness guard for a condition (not a timed assertion)."""
    import time
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition never became true")
        time.sleep(0.02)


@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (make browser)")
def test_browser_shows_the_evidence_and_sends_a_followup(server):
    """Headless Chromium: a flag appears mid-scan; the page shows its spectra, patterns and the
    bright field, a click on a position fetches that position's data, and the follow-up button
    makes the simulated microscope re-acquire the flag's regions."""
    scene = Scene()
    with scene.view(followup_endpoint=server.endpoint) as view, Browser(size=(1180, 1500)) as b:
        scene.feed(view, 16)  # before the flag
        b.goto(view.url)
        b.wait_for("document.getElementById('bf').naturalWidth === 64")
        assert b.evaluate("document.getElementById('evidence').className") == ""
        for rows in ROWS[:2]:
            scene.feed(view, rows)
        fid = view.snapshot.flags[0]["flag_id"]
        # the first flag is selected by itself; its evidence is drawn
        b.wait_for(f"document.getElementById('evidence').dataset.flag === '{fid}'")
        b.wait_for("document.getElementById('spectrum').dataset.series === 'spec-matrix spec-region'")
        n_points = b.evaluate("document.getElementById('spec-region').getAttribute('points').split(' ').length")
        assert n_points == len(view.evidence(flag_id=fid)["energy_kev"])
        assert b.evaluate("document.querySelectorAll('#spectrum .line-marker').length") == 3
        for c in ("pat-region", "pat-matrix", "pat-diff"):
            assert b.evaluate(f"document.getElementById('{c}').dataset.drawn") == "32x32"
        assert "Fe/Co" in b.evaluate("document.getElementById('fe-co').textContent")
        b.wait_for("document.querySelector('#history polyline.hist-p_value_eds') !== null")
        assert b.evaluate("document.querySelectorAll('#bfboxes .bfbox').length") == 1
        # the composition's line shares, named by the flagger's elements
        stats = b.wait_for("document.getElementById('stats').textContent")
        assert "Fe share region / matrix" in stats and "Co share region / matrix" in stats
        assert "NaN" not in stats and "line " not in stats, stats
        # click a scanned position on the bright-field image: its own spectrum joins the plot
        b.evaluate("(() => { const r = document.getElementById('bf').getBoundingClientRect();"
                   "document.getElementById('bf').dispatchEvent(new MouseEvent('click', {clientX: r.left + r.width * 10.5 / 64,"
                   " clientY: r.top + r.height * 3.5 / 64, bubbles: true})); })()")
        b.wait_for("document.getElementById('spectrum').dataset.series.includes('spec-position')")
        assert "position 3,10" in b.evaluate("document.getElementById('cap-region').textContent")
        # act: follow up from the page; the microscope's endpoint receives it and the state shows
        assert server.stats["ok"] == 0
        b.wait_for("document.getElementById('btn-followup') && !document.getElementById('btn-followup').disabled")
        b.evaluate("document.getElementById('btn-followup').click()")
        b.wait_for("document.getElementById('action-state').dataset.state === 'done'")
        # the microscope re-acquired exactly the flag's component boxes, at the page's dwell
        boxes = view._regions[fid].get("components") or [view._regions[fid]["bbox"]]
        assert [a["bbox"] for a in server.acquisitions] == boxes
        assert {a["dwell_s"] for a in server.acquisitions} == {0.1} and server.stats["errors"] == 0
        assert len(view.followup_reports) == 1 and view.followup_reports[0].flag_id == fid
        assert "follow-up done: Fe/Co" in b.evaluate("document.getElementById('action-state').textContent")
        b.evaluate("document.getElementById('btn-dismiss').click()")
        b.wait_for("document.getElementById('btn-dismiss').disabled")
        assert [j["flag_id"] for j in view.judgements] == [fid]


def test_a_refused_followup_shows_failed_with_the_microscopes_reason():
    scene = Scene()
    # the microscope accepts at most one position a request: every component box is too large
    with FollowUpServer(scene.phantom, max_region_positions=1) as strict:
        view = scene.view(followup_endpoint=strict.endpoint)
        for rows in ROWS[:2]:
            scene.feed(view, rows)
        fid = view.snapshot.flags[0]["flag_id"]
        assert view.request_followup(fid, 0.1)["state"] == "sent"
        _wait(lambda: view.actions()[str(fid)]["followup"]["state"] in ("done", "failed"))
    fu = view.actions()[str(fid)]["followup"]
    assert fu["state"] == "failed" and "too_large" in fu["error"]
    assert strict.stats["errors_by_kind"]["too_large"] == 1 and view.followup_reports == []
    with pytest.raises(ValueError, match="dwell_s"):
        view.request_followup(fid, 99.0)


def test_update_from_a_live_analysis():
    """The feed the live analysis will use (LiveAnalysis._assess -> update_from_analysis): the
    engine's memberships, its centres, the bright field and per-position data reach the view."""
    from streamclust.adapters.join import Batch
    from streamclust.app.live import LiveAnalysis

    ph = LamellaPhantom((32, 32), seed=0, frame_shape=(64, 64))
    live = LiveAnalysis(ph.scan_shape, ph.frame_shape, ph.energy_axis_kev, random_state=0, assess_every=256,
                        engine_params={"warmup_positions": 256, "refresh_every": 256})
    view = LiveView(scan_shape=ph.scan_shape, n_clusters=live.n_output_clusters)
    for start in range(0, 512, 128):
        pos = np.arange(start, start + 128)
        ones = np.ones(pos.size, bool)
        live.process(Batch(pos, ph.frames(pos), ph.spectra(pos), ones, ones))
    assert live.centre_set is not None, "no assessment in 512 positions"
    view.update_from_analysis(live)
    snap = view.snapshot
    assert snap.progress == (512, 1024)
    assert np.isfinite(snap.bright_field[:512]).all() and np.isnan(snap.bright_field[512:]).all()
    k = int(np.argmax(snap.centres["count"]))
    ev = view.evidence(cluster=k)
    assert ev["available"] and ev["region"]["n_positions"] == snap.centres["count"][k] > 0
    pos = view.position(100)
    # patterns travel with 3 significant figures: relative rounding error at most half a unit, 5e-3
    np.testing.assert_allclose(pos["pattern"], np.sqrt(live.centres.signals([100])[0][0]), rtol=5e-3)
    with pytest.raises(KeyError, match="not acquired"):
        view.position(900)


def test_results_entries_keep_every_followup_with_the_scan_baseline(server):
    """What the results file gets: a flag followed up twice keeps both (``flag_<id>``,
    ``flag_<id>_2``), each with the live scan's spectrum over the same positions, and every state."""
    scene = Scene()
    view = scene.view(followup_endpoint=server.endpoint)
    for rows in ROWS[:2]:
        scene.feed(view, rows)
    fid = view.snapshot.flags[0]["flag_id"]
    for dwell in (0.1, 0.05):
        view.request_followup(fid, dwell)
        assert view.wait_followups()
    view.dismiss(fid, "twice is enough")
    e = view.results_entries()
    rows = json.loads(e["liveview/followups"])
    assert [r["name"] for r in rows] == [f"flag_{fid}", f"flag_{fid}_2"]
    assert [r["dwell_s"] for r in rows] == [0.1, 0.05]
    assert [x["state"] for x in json.loads(e["liveview/followup_log"])] == ["sent", "acknowledged", "done"] * 2
    assert json.loads(e["liveview/judgements"])[0]["note"] == "twice is enough"
    for r in rows:
        pos = e[f"liveview/followup_positions/{r['name']}"]
        assert pos.size == r["n_flag_positions"] > 0
        scan = e[f"liveview/followup_scan_spectra/{r['name']}"]
        # the baseline is the scan's own spectra of those positions, as stored
        np.testing.assert_array_equal(scan, scene.spectra[pos].sum(axis=0, dtype=np.int64))
        assert r["scan_counts"] == scan.sum() and r["counts"] == e[f"liveview/followup_spectra/{r['name']}"].sum()
    # scan dwell 10 ms: the longer follow-up has more counts, the Fe line a higher SNR
    assert rows[0]["counts"] > rows[1]["counts"] > rows[0]["scan_counts"]
    assert rows[0]["snr_fe"] > rows[0]["scan_snr_fe"]
    # the page's state carries the last follow-up's and the scan's SNR (shown side by side)
    fu = view.actions()[str(fid)]["followup"]
    assert fu["snr_fe"] == pytest.approx(rows[1]["snr_fe"]) and fu["scan_snr_fe"] == pytest.approx(rows[1]["scan_snr_fe"])
