"""``streamclust run --live``: the live view can act on flags, and the operator's actions reach the
results file (issue 20), as with the demo.

The simulated microscope (conftest: Merlin TCP server and EDS publisher on 127.0.0.1, port 0) and
a follow-up endpoint stand in for the instrument; ``run_scan`` gets the live view the command
line's factory makes from ``--followup``. The scan is held at its last batch (the progress
display's update, the one hook of a running scan) while the test acts over HTTP, as the page does.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from contextlib import ExitStack

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from streamclust.app import cli
from streamclust.app.config import load_config
from streamclust.app.progress import ProgressDisplay
from streamclust.app.run import run_scan
from streamclust.simulators.followup import FollowUpServer

SCAN = (40, 40)  # seed 0 raises a flag at about half of it (tests/test_liveview_demo.py)
LIVENESS_S = 300.0  # guards against a hang, never a measurement


class _HoldAtEnd(ProgressDisplay):
    """The progress display, silent, holding the scan at its last position until released."""

    def __init__(self, total: int) -> None:
        super().__init__(total, enabled=False)
        self.reached, self.release = threading.Event(), threading.Event()

    def update(self, done, counters=None, **kw) -> None:
        super().update(done, counters, **kw)
        if done == self.total:
            self.reached.set()
            if not self.release.wait(LIVENESS_S):
                raise TimeoutError("the test never released the scan")


def _config(scope, phantom, **liveview):
    (host, data_port), (_, control_port) = scope.merlin.data_address, scope.merlin.control_address
    axis = phantom.energy_axis_kev
    return load_config({
        "engine": {"random_state": 0},
        "scan": {"shape": list(SCAN)},
        "detector": {"host": host, "data_port": data_port, "control_port": control_port,
                     "start_acquisition": True, "frame_shape": list(phantom.frame_shape)},
        "eds": {"endpoint": scope.eds.endpoint, "channels": int(phantom.n_channels),
                "energy_offset_kev": float(axis[0]), "channel_width_kev": float(phantom.channel_width_kev)},
        "events": {"endpoint": "tcp://127.0.0.1:0"},
        "results": {"pictures": False},
        "liveview": liveview})


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_run_live_acts_on_a_flag_and_stores_the_actions(make_phantom, microscope, tmp_path, capsys):
    phantom = make_phantom(scan_shape=SCAN, seed=0)
    scope = microscope(phantom, headless=False)
    cfg = _config(scope, phantom)
    hold = _HoldAtEnd(SCAN[0] * SCAN[1])
    views, summaries, failure = [], [], []
    with FollowUpServer(phantom) as server, ExitStack() as stack:
        make = cli._liveview_factory(cfg, True, stack, followup_endpoint=server.endpoint, followup_dwell_s=0.05)

        def factory(*args):
            views.append(make(*args))
            return views[-1]

        def scan():
            try:
                summaries.append(run_scan(cfg, tmp_path, progress=hold, liveview=factory, scan_id="run-liveview"))
            except BaseException as exc:  # re-raised in the test's thread
                failure.append(exc)
                hold.reached.set()

        runner = threading.Thread(target=scan, name="run-scan")
        runner.start()
        try:
            assert hold.reached.wait(LIVENESS_S) and not failure, failure
            (view,) = views
            assert view.followup_endpoint == server.endpoint and view.followup_dwell_s == 0.05
            state = json.loads(urllib.request.urlopen(view.url + "state.json", timeout=30).read())
            assert state["followup_enabled"] and state["flags"], "no flag raised in the scan"
            fid = state["flags"][0]["flag_id"]
            # the flag's regions now (the scan is held; its final assessment may move them after)
            boxes = view._regions[fid].get("components") or [view._regions[fid]["bbox"]]
            # the page's two actions: follow up (at the configured default dwell), then dismiss
            assert _post(view.url + "action", {"action": "followup", "flag_id": fid})["followup"]["state"] \
                in ("sent", "acknowledged", "done")
            assert _post(view.url + "action", {"action": "dismiss", "flag_id": fid, "note": "seen"})["judgement"]
        finally:
            hold.release.set()  # the follow-up may still run: the session waits for it
            runner.join(LIVENESS_S)
        assert not runner.is_alive() and not failure, failure
        assert [a["bbox"] for a in server.acquisitions] == boxes
        assert {a["dwell_s"] for a in server.acquisitions} == {0.05}
    (summary,) = summaries
    assert summary["status"] == "complete"
    assert summary["liveview"] == {"judgements": 1, "followups": 1, "followups_failed": 0}
    assert "live view: http://127.0.0.1:" in capsys.readouterr().err

    with h5py.File(tmp_path / "results.hspy", "r") as f:
        (judgement,) = json.loads(f["liveview/judgements"][()])
        (row,) = json.loads(f["liveview/followups"][()])
        log = json.loads(f["liveview/followup_log"][()])
        spectrum = f[f"liveview/followup_spectra/flag_{fid}"][()]
        scan_spectrum = f[f"liveview/followup_scan_spectra/flag_{fid}"][()]
        positions = f[f"liveview/followup_positions/flag_{fid}"][()]
    assert judgement["flag_id"] == fid and judgement["note"] == "seen"
    assert [e["state"] for e in log] == ["sent", "acknowledged", "done"]
    assert row["flag_id"] == fid and row["regions"] == boxes and row["dwell_s"] == 0.05
    assert spectrum.sum() == row["counts"] and scan_spectrum.sum() == row["scan_counts"] > 0
    np.testing.assert_array_equal(scan_spectrum, phantom.spectra(positions).sum(axis=0, dtype=np.int64))


def test_run_command_offers_the_followup_endpoint():
    result = CliRunner().invoke(cli.main, ["run", "--help"])
    assert result.exit_code == 0
    assert "--followup" in result.output and "--followup-dwell" in result.output


def test_action_token_off_loopback(monkeypatch):
    monkeypatch.delenv(cli.ACTION_TOKEN_ENV, raising=False)
    assert cli.action_token(load_config()) is None  # loopback: no token needed
    exposed = load_config({"liveview": {"host": "0.0.0.0"}})
    made = cli.action_token(exposed)
    # a random token per scan when none is configured: acting is never open off loopback
    assert made and len(made) >= 24 and made != cli.action_token(exposed)
    monkeypatch.setenv(cli.ACTION_TOKEN_ENV, "from-the-environment")
    assert cli.action_token(exposed) == "from-the-environment"
