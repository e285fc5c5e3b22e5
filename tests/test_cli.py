"""The command line, end to end, as a user runs it: as a subprocess and through click's CliRunner."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

from streamclust.app.cli import main
from streamclust.app.config import load_config

ROOT = Path(__file__).resolve().parent.parent
STREAMCLUST = Path(sys.executable).with_name("streamclust")
# small-scan engine settings shared by the fast tests (the defaults are sized for large scans)
SMALL = "[engine]\nwarmup_positions = 128\nrefresh_every = 192\n[centres]\nassess_every = 128\n"


def run_cli(*args, timeout=1800, **kw):  # a guard against hangs, not a speed limit (loaded machines)
    """The installed ``streamclust`` script when there is one (as a user types it), else ``-m``."""
    cmd = [str(STREAMCLUST)] if STREAMCLUST.exists() else [sys.executable, "-m", "streamclust.app.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, **kw)


def test_demo_writes_results_pictures_and_a_summary(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--out", str(out), "--scan", "24", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    for key in ("frames_received", "frames_processed", "frames_dropped", "elapsed_s", "frames_per_s",
                "n_clusters", "flags", "second_phase_f1", "ari_live_vs_offline"):
        assert key in summary, key
    assert summary["frames_received"] == summary["frames_processed"] == 576
    assert summary["frames_dropped"] == 0
    assert summary["elapsed_s"] > 0 and summary["frames_per_s"] > 0
    assert summary["n_clusters"] == 6
    assert set(summary["second_phase_f1"]) == {"merged", "eds_only", "cbed_only"}
    assert all(0.0 <= v <= 1.0 for v in summary["second_phase_f1"].values())
    assert -1.0 <= summary["ari_live_vs_offline"] <= 1.0
    assert summary["engine"]["positions_seen"] == 576
    assert summary["config"]["engine"]["n_clusters"] == 6
    for flag in summary["flags"]:
        assert 0.0 < flag["scan_fraction_at_first_flag"] <= 1.0 and len(flag["bbox"]) == 4
    with h5py.File(out / "results.hspy") as f:
        assert f.attrs["status"] == "complete"
        assert f["labels/merged"].shape == (24, 24)
        assert int((f["labels/merged"][()] >= 0).sum()) == 576
        assert int((f["labels/live"][()] >= 0).sum()) == 576
        assert f["ground_truth/second_phase"].shape == (24, 24)
    for picture in ("cluster_maps.png", "cluster_spectra.png"):
        assert (out / picture).stat().st_size > 10_000
    assert "frames received" in proc.stdout
    # stderr is not a terminal: progress comes as plain lines, the last at 100 %
    assert "scan 576/576 (100.0 %) row 23 col 23" in proc.stderr


def test_bad_option_is_a_clear_usage_error():
    proc = run_cli("demo", "--scan", "many")
    assert proc.returncode == 2
    assert "Invalid value for '--scan'" in proc.stderr


def test_config_show_prints_the_effective_configuration(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[engine]\nn_clusters = 4\n[liveview]\nenabled = true\n")
    result = CliRunner().invoke(main, ["config", "--show", "--config", str(path)])
    assert result.exit_code == 0, result.output
    shown = tomllib.loads(result.output)
    assert shown["engine"]["n_clusters"] == 4 and shown["liveview"]["enabled"] is True
    assert shown["detector"]["host"] == "127.0.0.1"
    assert load_config(shown) == load_config(path)
    plain = CliRunner().invoke(main, ["config", "--plain"])
    assert plain.exit_code == 0 and "  #" not in plain.output


@pytest.mark.parametrize("command", ["demo", "run", "config", "bench"])
def test_configuration_errors_name_the_key_on_every_command(tmp_path, command):
    path = tmp_path / "bad.toml"
    path.write_text("[engine]\nn_cluster = 3\n")
    result = CliRunner().invoke(main, [command, "--config", str(path)])
    assert result.exit_code == 2
    assert "Invalid value for '--config'" in result.output
    assert "[engine] unknown key 'n_cluster' (did you mean 'n_clusters'?)" in result.output


@pytest.fixture
def microscope():
    """A simulated microscope on free ports that waits for STARTACQUISITION (as a real Merlin)."""
    from streamclust.simulators.microscope import MicroscopeConfig, SimulatedMicroscope
    from streamclust.simulators.phantom import LamellaPhantom

    phantom = LamellaPhantom(scan_shape=(16, 16), seed=2)
    config = MicroscopeConfig(data_port=0, control_port=0, eds_port=0, headless=False)
    with SimulatedMicroscope(phantom, config) as scope:
        yield scope


def _run_on(microscope, tmp_path, *extra):
    """``streamclust run`` against the simulated microscope (its ports and EDS axis in the config)."""
    (host, data_port), (_, control_port) = microscope.merlin.data_address, microscope.merlin.control_address
    cfg = tmp_path / "run.toml"
    cfg.write_text(SMALL + f'[eds]\nendpoint = "{microscope.eds.endpoint}"\nchannels = 2048\n'
                   f"energy_offset_kev = {float(microscope.phantom.energy_axis_kev[0])!r}\n"
                   f"channel_width_kev = {float(microscope.phantom.channel_width_kev)!r}\n"
                   "[results]\ncheckpoint_every_s = 0.5\npictures = false\n")
    result = CliRunner().invoke(main, ["run", "--config", str(cfg), "--host", host, "--data-port", str(data_port),
                                       "--control-port", str(control_port), "--scan", "16", "16", "--start",
                                       *[str(v) for v in extra]])
    return result, cfg


def test_run_against_a_triggered_instrument(microscope, tmp_path):
    out = tmp_path / "run"
    result, _ = _run_on(microscope, tmp_path, "--out", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["frames_received"] == summary["frames_processed"] == 256
    assert summary["frames_dropped"] == 0 and summary["positions_seen"] == 256
    assert summary["config"]["detector"]["start_acquisition"] is True
    with h5py.File(out / "results.hspy") as f:
        assert f.attrs["status"] == "complete"
    assert "256 frames received" in result.output


def test_run_without_an_instrument_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "run.toml"
    cfg.write_text(SMALL + "[detector]\ntimeout = 1.0\n[scan]\nshape = [16, 16]\n")
    result = CliRunner().invoke(main, ["run", "--config", str(cfg), "--data-port", str(port), "--out",
                                       str(tmp_path / "out")])
    assert result.exit_code == 5  # EXIT_UNREACHABLE (docs/cli.md)
    assert f"cannot reach the instrument (Merlin data port 127.0.0.1:{port}" in result.output


def test_verbose_flags_raise_the_log_level(tmp_path):
    import logging

    root = logging.getLogger()
    before = root.level
    try:
        result = CliRunner().invoke(main, ["-vv", "config"])
        assert result.exit_code == 0
        assert root.level == logging.DEBUG
        result = CliRunner().invoke(main, ["config", "-v"])
        assert result.exit_code == 0 and root.level == logging.INFO
    finally:
        root.setLevel(before)


# -- bench ------------------------------------------------------------------------------------------
def _load_run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_merges_figures_and_reports_missing_ones_as_null(tmp_path, monkeypatch):
    run_all = _load_run_all()
    scripts = tmp_path / "benchmarks"
    scripts.mkdir()
    # real scripts with the contract's behaviours: a good report, a missing figure, a crash, no JSON
    (scripts / "bench_ingest.py").write_text(
        "import json, sys\nassert sys.argv[1:] == ['--quick', '--json'], sys.argv\n"
        "print('some text')\nprint(json.dumps({'ingest_u16_fps': 2100.5, 'drain_u16_fps': 2300.0,"
        " 'ingest_raw1_fps': 13000.0, 'drain_raw1_fps': 14000.0}))\n")
    (scripts / "bench_end_to_end.py").write_text("import json\nprint(json.dumps({'drain_fps': 1.0}))\n")
    (scripts / "bench_fcm.py").write_text("import sys\nsys.exit('boom')\n")
    (scripts / "bench_flag_latency.py").write_text("print('no json here')\n")
    monkeypatch.setattr(run_all, "HERE", scripts)
    merged = run_all.run_json([], True, 60.0, tmp_path)
    assert merged["ingest_u16_fps"] == 2100.5 and merged["drain_raw1_fps"] == 14000.0
    assert merged["end_to_end_fps"] is None and merged["fcm_speedup_vs_skfuzzy"] is None
    assert merged["flag_latency_s"] is None
    errors = {e["script"]: e for e in merged["errors"]}
    assert set(errors) == {"bench_end_to_end.py", "bench_fcm.py", "bench_flag_latency.py", "scale.py"}
    assert errors["bench_end_to_end.py"]["keys"] == ["end_to_end_fps"]
    # a headline script that is not there: its figures are null and it is named, not skipped silently
    assert errors["scale.py"]["error"] == "script not present" and merged["scale_256_keepup"] is None
    assert "boom" in errors["bench_fcm.py"]["error"]
    assert "no JSON" in errors["bench_flag_latency.py"]["error"]
    assert merged["details"]["bench_end_to_end.py"] == {"drain_fps": 1.0}
    json.dumps(merged)


def test_bench_json_runs_a_script_and_prints_one_object():
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    proc = run_cli("bench", "--json", "--quick", "--only", "bench_no_such_script.py", env=env)
    assert proc.returncode == 0, proc.stderr
    merged = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("ingest_u16_fps", "drain_u16_fps", "ingest_raw1_fps", "drain_raw1_fps", "end_to_end_fps",
                "fcm_speedup_vs_skfuzzy", "flag_latency_s"):
        assert key in merged and merged[key] is None  # nothing ran: nothing invented
    assert merged["quick"] is True


@pytest.mark.slow
def test_bench_json_quick_measures_every_headline_figure():
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    proc = run_cli("bench", "--json", "--quick", env=env, timeout=3600)
    assert proc.returncode == 0, proc.stderr
    merged = json.loads(proc.stdout.strip().splitlines()[-1])
    assert merged["end_to_end_fps"] > 0
    for key in ("ingest_u16_fps", "drain_u16_fps", "ingest_raw1_fps", "drain_raw1_fps",
                "fcm_speedup_vs_skfuzzy", "flag_latency_s"):
        assert merged[key] is not None or any(key in e["keys"] for e in merged["errors"]), key


def test_run_with_the_event_port_taken_is_a_clear_error(tmp_path):
    import zmq

    ctx = zmq.Context.instance()
    taken = ctx.socket(zmq.PUB)
    taken.setsockopt(zmq.LINGER, 0)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        cfg = tmp_path / "run.toml"
        cfg.write_text(SMALL + f'[events]\nendpoint = "tcp://127.0.0.1:{port}"\n[scan]\nshape = [16, 16]\n')
        result = CliRunner().invoke(main, ["run", "--config", str(cfg), "--out", str(tmp_path / "out")])
    finally:
        taken.close()
    assert result.exit_code == 5  # EXIT_UNREACHABLE (docs/cli.md)
    assert f"ZeroMQ socket error ([events] endpoint tcp://127.0.0.1:{port}" in result.output


@pytest.mark.slow
def test_replay_on_dask_from_the_command_line(tmp_path):
    pytest.importorskip("distributed")
    from streamclust.simulators.phantom import LamellaPhantom
    from streamclust.simulators.recording import record_scan

    rec = record_scan(LamellaPhantom(scan_shape=(16, 16), seed=1), tmp_path / "scan")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["replay", str(rec.mib), str(rec.eds), "--out", str(out), "--dask"])
    assert result.exit_code == 0, result.output
    assert (out / "results.hspy").exists()


def test_progress_on_a_terminal_rewrites_one_line_and_respects_quiet():
    import io

    from streamclust.app.progress import ProgressDisplay

    out = io.StringIO()
    p = ProgressDisplay(total=20, scan_shape=(4, 5), stream=out, tty=True, refresh_s=1.0)
    t0 = p.t0
    p.update(10, {"missing spectra": 12}, now=t0 + 1.0)
    p.update(11, now=t0 + 1.5)  # within refresh_s: not written
    p.update(12, {"missing spectra": 0}, now=t0 + 2.0)
    p.close(now=t0 + 2.0)
    text = out.getvalue()
    assert "\n" not in text[:-1] and text.endswith("\n")
    frames = text.rstrip("\n").split("\r")[1:]
    assert [f.split(" |")[0] for f in frames] == ["scan 10/20 (50.0 %) row 1 col 4", "scan 12/20 (60.0 %) row 2 col 1",
                                                  "scan 12/20 (60.0 %) row 2 col 1"]
    # a shorter line pads over the longer one it replaces
    assert len(frames[1]) >= len(frames[0])
    quiet = io.StringIO()
    q = ProgressDisplay(total=20, stream=quiet, enabled=False)
    q.update(5)
    q.close()
    assert quiet.getvalue() == ""


def test_run_stopped_by_sigterm_finalises_a_partial_scan(tmp_path):
    import signal

    from streamclust.simulators.microscope import MicroscopeConfig, SimulatedMicroscope
    from streamclust.simulators.phantom import LamellaPhantom

    phantom = LamellaPhantom(scan_shape=(16, 16), seed=2)
    with SimulatedMicroscope(phantom, MicroscopeConfig(data_port=0, control_port=0, eds_port=0,
                                                       dwell_s=0.05)) as scope:
        host, port = scope.merlin.data_address
        cfg = tmp_path / "run.toml"
        cfg.write_text(SMALL.replace("warmup_positions = 128", "warmup_positions = 32")
                       + f'[detector]\nhost = "{host}"\ndata_port = {port}\n'
                       f'[eds]\nendpoint = "{scope.eds.endpoint}"\n[scan]\nshape = [16, 16]\nbatch_size = 16\n'
                       '[events]\nendpoint = "tcp://127.0.0.1:0"\n'
                       "[results]\npictures = false\n[logging]\nprogress_every_s = 0.1\n")
        out = tmp_path / "out"
        cmd = [str(STREAMCLUST)] if STREAMCLUST.exists() else [sys.executable, "-m", "streamclust.app.cli"]
        proc = subprocess.Popen([*cmd, "run", "--config", str(cfg), "--out", str(out)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            for line in proc.stderr:  # the first progress line: positions are being analysed
                if line.startswith("scan ") and not line.startswith("scan 0/"):
                    break
            proc.send_signal(signal.SIGTERM)
            stdout, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 3, stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "partial"
    assert 0 < summary["positions_seen"] < 256
    assert summary["ingest"]["stopped"] is True
    with h5py.File(out / "results.hspy") as f:
        assert f.attrs["status"] == "partial"
    assert "scan status: partial" in stdout


def test_demo_offers_inclusions_and_dose():
    result = CliRunner().invoke(main, ["demo", "--help"])
    assert result.exit_code == 0
    assert "--inclusions" in result.output and "--dose" in result.output
    bad = CliRunner().invoke(main, ["demo", "--inclusions", "-1"])
    assert bad.exit_code == 2 and "--inclusions" in bad.output
    bad = CliRunner().invoke(main, ["demo", "--dose", "0"])
    assert bad.exit_code == 2 and "--dose" in bad.output


def test_simulate_fault_option_is_validated():
    bad = CliRunner().invoke(main, ["simulate", "--fault", "melt:3"])
    assert bad.exit_code == 2 and "KIND:SEQ" in bad.output


def test_run_with_record_writes_a_recording_that_replays(microscope, tmp_path):
    rec = tmp_path / "rec"
    result, cfg = _run_on(microscope, tmp_path, "--out", tmp_path / "run", "--record", rec,
                          "--beam-energy", "300", "--quiet")
    assert result.exit_code == 0, result.output
    assert f"recorded 256 frames and 256 spectra to {rec} (0 frames, 0 spectra NOT recorded)" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["recording"]["frames_recorded"] == 256 and summary["recording"]["error"] is None
    with h5py.File(rec / "scan_eds.hspy") as f:
        assert f["Experiments/scan_eds/metadata/Acquisition_instrument/TEM"].attrs["beam_energy"] == 300.0
    replayed = CliRunner().invoke(main, ["replay", str(rec), "--config", str(cfg), "--out",
                                         str(tmp_path / "replay"), "--quiet"])
    assert replayed.exit_code == 0, replayed.output
    assert "256 frames received, 256 processed, 0 dropped" in replayed.output
