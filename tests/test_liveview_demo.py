"""Issue 20, done when: a real demo scan with the live view, watched and acted on in headless Chromium.

``streamclust demo --live`` end to end through the functions it calls (``cli._liveview_factory``,
``demo.run_demo``): the simulated microscope (phantom, Merlin TCP server, EDS ZeroMQ publisher and
the follow-up endpoint, all on 127.0.0.1 with port 0) scans; the live analysis raises a flag; the
page shows its spectrum, its pattern and the virtual bright field; the follow-up button sends the
request to the microscope; the microscope re-acquires the flag's regions at the page's dwell, and
the results file holds what happened (the states the page showed, the microscope's acquisitions)
and the follow-up spectrum, whose counts exceed the live scan's at the same positions by the dwell
multiplier.

The only handshake is the scan's last batch: the demo's progress callback holds the scan there
(after the last position is received, before the results are written) until the test has acted,
so a fast scan cannot end before the operator clicked. No sleep, no timed assertion; waits are
liveness guards on conditions.
"""

from __future__ import annotations

import json
import math
import threading
from contextlib import ExitStack

import h5py
import numpy as np
import pytest

from browser import Browser, find_chromium
from streamclust.engine.centres import fe_co_lines
from streamclust.app.cli import _liveview_factory
from streamclust.app.config import load_config
from streamclust.app.demo import run_demo
from streamclust.simulators.phantom import LamellaPhantom

# the smallest square scan of seed 0 that raises a flag (at 56 % of the scan): the whole demo,
# offline yardstick included, is about a minute on 2 shared cores
SCAN = (40, 40)
FOLLOWUP_DWELL_S = 0.1
LIVENESS_S = 300.0  # guards against a hang, never a measurement


@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (make browser)")
def test_demo_scan_flag_evidence_and_followup_from_the_page(tmp_path):
    cfg = load_config()
    views, summaries, failure = [], [], []
    view_made, last_batch, release = threading.Event(), threading.Event(), threading.Event()

    def progress(done: int, total: int) -> None:
        if done == total:  # the last batch: hold the scan until the operator has acted
            last_batch.set()
            if not release.wait(LIVENESS_S):
                raise TimeoutError("the test never released the scan")

    with ExitStack() as stack:
        make = _liveview_factory(cfg, True, stack)  # what `streamclust demo --live` passes

        def factory(*args):
            views.append(make(*args))
            view_made.set()
            return views[-1]

        def scan() -> None:
            try:
                summaries.append(run_demo(tmp_path, seed=0, scan_shape=SCAN, config=cfg, liveview=factory,
                                      progress=progress))
            except BaseException as exc:  # re-raised in the test's thread
                failure.append(exc)
                view_made.set()

        runner = threading.Thread(target=scan, name="demo-scan")
        runner.start()
        try:
            assert view_made.wait(LIVENESS_S) and not failure, failure
            view = views[0]
            with Browser(size=(1180, 1500)) as b:
                b.goto(view.url)
                # a flag: the page selects it by itself and draws its evidence
                fid = int(b.wait_for("document.getElementById('evidence').dataset.flag", timeout=LIVENESS_S))
                b.wait_for("document.getElementById('spectrum').dataset.series === 'spec-matrix spec-region'")
                ev = view.evidence(flag_id=fid)
                n_points = b.evaluate("document.getElementById('spec-region').getAttribute('points').split(' ').length")
                assert n_points == len(ev["energy_kev"])
                assert "Fe/Co" in b.evaluate("document.getElementById('fe-co').textContent")
                h, w = np.asarray(ev["region"]["pattern"]).shape
                for c in ("pat-region", "pat-matrix", "pat-diff"):
                    b.wait_for(f"document.getElementById('{c}').dataset.drawn === '{h}x{w}'")
                # the virtual bright field of the scan so far, with the flag outlined on it
                b.wait_for(f"document.getElementById('bf').naturalWidth === {SCAN[1]}")
                b.wait_for("document.querySelectorAll('#bfboxes .bfbox').length >= 1")
                # act from the page: follow up at the page's dwell
                assert view.followup_endpoint, "the demo gave the live view no follow-up endpoint"
                b.wait_for("document.getElementById('btn-followup') && !document.getElementById('btn-followup').disabled")
                b.evaluate("document.getElementById('btn-followup').click()")
                state = b.wait_for("['done', 'failed'].includes(document.getElementById('action-state').dataset.state)"
                                   " && document.getElementById('action-state').dataset.state", timeout=LIVENESS_S)
                assert state == "done", b.evaluate("document.getElementById('action-state').textContent")
                text = b.evaluate("document.getElementById('action-state').textContent")
                # the operator sees the follow-up's Fe SNR beside the scan's over the same positions
                assert "follow-up done: Fe/Co" in text and "(scan: " in text, text
            # the flag's region as the page's request sent it (the scan goes on meanwhile, and a
            # later assessment may grow the flag)
            (report,) = view.followup_reports
            region = report.event
        finally:
            release.set()
            runner.join(LIVENESS_S)
        assert not runner.is_alive() and not failure, failure
    (summary,) = summaries
    assert last_batch.is_set() and summary["frames_processed"] == SCAN[0] * SCAN[1]

    with h5py.File(tmp_path / "results.hspy", "r") as f:
        lv = f["liveview"]
        followups = json.loads(lv["followups"][()])
        log = json.loads(lv["followup_log"][()])
        asked = json.loads(f["demo/followup_acquisitions"][()])
        spectrum = lv[f"followup_spectra/flag_{fid}"][()]
        scan_spectrum = lv[f"followup_scan_spectra/flag_{fid}"][()]
        positions = lv[f"followup_positions/flag_{fid}"][()]
        assert json.loads(lv["judgements"][()]) == []
    # the states the page went through, in order
    assert [e["state"] for e in log if e["flag_id"] == fid] == ["sent", "acknowledged", "done"]
    (row,) = followups
    boxes = region.get("components") or [region["bbox"]]
    # the microscope re-acquired exactly the flag's regions, at the page's dwell, once each
    assert [a["bbox"] for a in asked] == boxes == row["regions"]
    assert {a["dwell_s"] for a in asked} == {FOLLOWUP_DWELL_S} == {row["dwell_s"]}
    # the spectrum is over the flag's own positions (each once)
    assert positions.tolist() == sorted(set(region["positions"]))
    assert row["n_flag_positions"] == positions.size and spectrum.sum() == row["counts"]

    # the live scan's spectrum over those positions is what the simulated EDS detector sent
    ph = LamellaPhantom(scan_shape=SCAN, seed=0)
    np.testing.assert_array_equal(scan_spectrum, ph.spectra(positions).sum(axis=0, dtype=np.int64))
    # higher SNR: the follow-up's counts are the scan's times the dwell multiplier (the expected
    # counts scale with the dwell); Poisson tolerance from the two totals, 5 standard deviations
    multiplier = FOLLOWUP_DWELL_S / ph.dwell_s
    fu, sc = float(spectrum.sum()), float(scan_spectrum.sum())
    assert sc > 0
    ratio = fu / sc
    sigma = ratio * math.sqrt(1.0 / fu + 1.0 / sc)
    assert abs(ratio - multiplier) < 5 * sigma, (ratio, multiplier, sigma)
    axis = ph.energy_axis_kev
    assert fe_co_lines(spectrum, axis).snr_fe > fe_co_lines(scan_spectrum, axis).snr_fe
    assert row["snr_fe"] > row["scan_snr_fe"]
