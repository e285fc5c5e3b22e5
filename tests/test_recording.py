"""Recording while a scan runs (``run --record``, ``simulate --record``) and replaying the folder.

The live scan runs against the simulated microscope over real TCP and ZeroMQ; the recording is
written by the recorder's thread into real files, read back by the same readers as any recording.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime

import numpy as np
import pytest

from streamclust.adapters.eds_file import read_eds_recording
from streamclust.adapters.mib import MibFile, read_mib
from streamclust.adapters.recording import (
    RecordingNotFound,
    ScanRecorder,
    find_recording,
    layout_for_shape,
)
from streamclust.app.config import load_config
from streamclust.app.replay import replay_scan
from streamclust.app.run import ScanSession, run_scan
from streamclust.simulators.phantom import LamellaPhantom
from streamclust.simulators.record_live import record_phantom

SHAPE = (12, 10)
CONFIG = {"engine": {"warmup_positions": 48, "refresh_every": 64}, "centres": {"assess_every": 32},
          "scan": {"batch_size": 32}, "results": {"pictures": False}}


@pytest.fixture(scope="module")
def phantom():
    return LamellaPhantom(scan_shape=SHAPE, seed=5)


@pytest.fixture(scope="module")
def recorded(phantom, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rec")
    stats = record_phantom(phantom, folder, dwell_s=0.002, flyback_s=0.0005)
    return folder, stats


def _iso_ns(text: str) -> int:
    """Nanoseconds of an MQ1A time stamp (``2024-01-01T08:00:00.123456789Z``)."""
    head, frac = text.rstrip("Z").split(".")
    whole = datetime.fromisoformat(head).timestamp()
    return int(round(whole)) * 10**9 + int(frac.ljust(9, "0"))


def test_simulated_recording_holds_every_frame_and_spectrum(phantom, recorded):
    folder, stats = recorded
    n = phantom.n_positions
    assert stats["frames_recorded"] == stats["spectra_recorded"] == n
    assert stats["frames_not_recorded"] == stats["spectra_not_recorded"] == 0 and stats["error"] is None
    np.testing.assert_array_equal(read_mib(folder / "scan.mib"), phantom.frames(range(n)))
    eds = read_eds_recording(folder / "scan_eds.hspy")
    np.testing.assert_array_equal(eds.flat_spectra, np.stack([phantom.spectrum(p) for p in range(n)]))
    assert eds.acquired.all() and eds.spectra.shape[:2] == SHAPE
    with MibFile(folder / "scan.mib") as f:
        assert f.acquisition_header.scan_shape == SHAPE
        assert f.acquisition_header.n_frames == n
        assert [h.sequence for h in f.headers] == list(range(1, n + 1))


def test_time_stamps_step_by_the_dwell_and_jump_at_each_line_start(recorded):
    folder, _ = recorded
    with MibFile(folder / "scan.mib") as f:
        t = np.array([_iso_ns(h.tail_timestamp) for h in f.headers])
    steps = np.diff(t).reshape(-1)
    line_start = np.zeros(steps.size, bool)
    line_start[SHAPE[1] - 1::SHAPE[1]] = True  # the step into the first frame of each new row
    assert set(steps[~line_start].tolist()) == {2_000_000}
    assert set(steps[line_start].tolist()) == {2_500_000}


def test_replay_accepts_the_folder(recorded):
    folder, _ = recorded
    mib, eds = find_recording(folder)
    assert (mib.name, eds.name) == ("scan.mib", "scan_eds.hspy")
    assert find_recording(mib) == (mib, eds)


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "nothing", "no such file or folder"),
    (lambda d: d, "expected one .mib file in the folder, found 0"),
])
def test_find_recording_says_what_it_looked_for(tmp_path, make, match):
    with pytest.raises(RecordingNotFound, match=match):
        find_recording(make(tmp_path))


def test_mib_without_eds_file_is_named(tmp_path):
    (tmp_path / "a.mib").write_bytes(b"")
    with pytest.raises(RecordingNotFound, match="a_eds.hspy, a_eds.h5"):
        find_recording(tmp_path / "a.mib")


def test_layouts_follow_the_frame_shape():
    assert layout_for_shape((128, 256)) == "1x1"
    assert layout_for_shape((256, 1024)) == "4x1"
    with pytest.raises(ValueError):
        layout_for_shape((1024, 1024))


def _batch(rng, positions, shape=(256, 256), channels=16):
    k = len(positions)
    frames = rng.integers(0, 4096, (k, *shape)).astype(np.uint16)
    spectra = rng.integers(0, 50, (k, channels)).astype(np.uint16)
    return np.asarray(positions), frames, spectra


def test_every_frame_is_recorded_or_counted_when_the_queue_is_small(tmp_path):
    rng = np.random.default_rng(0)
    rec = ScanRecorder(tmp_path, scan_shape=(8, 8), energy_offset_kev=0.0, channel_width_kev=0.01,
                       dwell_s=0.001, max_queue_bytes=1)  # one batch in flight at most
    kept = {}
    for start in range(0, 64, 4):
        positions, frames, spectra = _batch(rng, range(start, start + 4))
        ok = rec.put(positions, frames, spectra, np.ones(4, bool), np.ones(4, bool))
        if ok:
            kept.update({int(p): f for p, f in zip(positions, frames)})
    stats = rec.close()
    assert stats["frames_recorded"] + stats["frames_not_recorded"] == 64
    assert stats["spectra_recorded"] + stats["spectra_not_recorded"] == 64
    assert stats["frames_recorded"] == len(kept) >= 4
    with MibFile(tmp_path / "scan.mib") as f:
        got = {h.sequence - 1: img for h, img in f.iter_frames()}
    assert sorted(got) == sorted(kept)
    for p, img in got.items():
        np.testing.assert_array_equal(img, kept[p])
    eds = read_eds_recording(tmp_path / "scan_eds.hspy")
    assert int(eds.acquired.sum()) == stats["spectra_recorded"]


def test_a_disk_that_fails_stops_recording_and_counts_every_frame(tmp_path):
    (tmp_path / "scan.mib").mkdir()  # the .mib cannot be opened: the writer fails at once
    rng = np.random.default_rng(1)
    rec = ScanRecorder(tmp_path, scan_shape=(4, 4), energy_offset_kev=0.0, channel_width_kev=0.01,
                       dwell_s=0.001)
    for start in (0, 4, 8):
        positions, frames, spectra = _batch(rng, range(start, start + 4))
        rec.put(positions, frames, spectra, np.ones(4, bool), np.ones(4, bool), block=True)
    stats = rec.close()
    assert stats["frames_recorded"] == 0 and stats["frames_not_recorded"] == 12
    assert stats["write_errors"] >= 1 and "IsADirectoryError" in stats["error"]


def test_missing_frames_and_spectra_are_left_out_of_the_recording(tmp_path):
    rng = np.random.default_rng(2)
    positions, frames, spectra = _batch(rng, [0, 1, 2, 3])
    has_frame = np.array([True, False, True, True])
    has_spectrum = np.array([True, True, False, True])
    with ScanRecorder(tmp_path, scan_shape=(2, 2), energy_offset_kev=0.0, channel_width_kev=0.01,
                      dwell_s=0.001) as rec:
        rec.put(positions, frames, spectra, has_frame, has_spectrum)
    with MibFile(tmp_path / "scan.mib") as f:
        assert [h.sequence for h in f.headers] == [1, 3, 4]
        np.testing.assert_array_equal(f.frame(1), frames[2])
    eds = read_eds_recording(tmp_path / "scan_eds.hspy")
    assert eds.acquired.ravel().tolist() == [True, True, False, True]
    np.testing.assert_array_equal(eds.flat_spectra[3], spectra[3])


class _Keep(ScanSession):
    """A session that keeps itself reachable (to compare the engine's memberships)."""

    last = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _Keep.last = self


def test_live_scan_recorded_with_run_replays_to_the_same_memberships(phantom, tmp_path):
    from streamclust.simulators.microscope import MicroscopeConfig, SimulatedMicroscope

    axis = phantom.energy_axis_kev
    config = MicroscopeConfig(data_port=0, control_port=0, eds_port=0, headless=False)
    with SimulatedMicroscope(phantom, config) as scope:
        (host, data_port), (_, control_port) = scope.merlin.data_address, scope.merlin.control_address
        cfg = load_config({**CONFIG, "scan": {**CONFIG["scan"], "shape": list(SHAPE)},
                           "detector": {"host": host, "data_port": data_port, "control_port": control_port,
                                        "start_acquisition": True, "frame_shape": list(phantom.frame_shape)},
                           "eds": {"endpoint": scope.eds.endpoint, "channels": int(phantom.n_channels),
                                   "energy_offset_kev": float(axis[0]),
                                   "channel_width_kev": float(phantom.channel_width_kev)},
                           "events": {"endpoint": "tcp://127.0.0.1:0"}})
        live_summary = run_scan(cfg, tmp_path / "live", record=tmp_path / "rec", beam_energy_kev=200.0,
                                session_factory=_Keep)
    live = _Keep.last
    rec = live_summary["recording"]
    assert live_summary["status"] == "complete"
    assert rec["frames_recorded"] == rec["spectra_recorded"] == phantom.n_positions
    assert rec["frames_not_recorded"] == rec["spectra_not_recorded"] == 0
    assert json.loads((tmp_path / "live" / "summary.json").read_text())["recording"]["frames_recorded"] \
        == phantom.n_positions
    mib, eds = find_recording(tmp_path / "rec")
    summary = replay_scan(mib, eds, tmp_path / "replay", config=cfg, session_factory=_Keep)
    replayed = _Keep.last
    assert replayed is not live and summary["status"] == "complete"
    u_live, u_replay = live.live.engine.memberships_, replayed.live.engine.memberships_
    assert np.isfinite(u_live).all()
    np.testing.assert_array_equal(u_live, u_replay)
    np.testing.assert_array_equal(u_live.argmax(axis=1), u_replay.argmax(axis=1))


def test_simulate_record_then_replay_the_folder_on_the_command_line(tmp_path):
    rec = tmp_path / "rec"
    cmd = [sys.executable, "-m", "streamclust.app.cli"]
    done = subprocess.run(cmd + ["simulate", "--record", str(rec), "--scan", "6", "--seed", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["frames_recorded"] == 36
    assert sorted(p.name for p in rec.iterdir()) == ["scan.hdr", "scan.mib", "scan_eds.hspy"]
    cfg = tmp_path / "small.toml"
    cfg.write_text('[engine]\nwarmup_positions = 12\nrefresh_every = 16\n[centres]\nassess_every = 8\n'
                   '[scan]\nbatch_size = 8\n[results]\npictures = false\n[events]\nendpoint = "tcp://127.0.0.1:0"\n')
    done = subprocess.run(cmd + ["replay", str(rec), "--out", str(tmp_path / "out"), "--quiet",
                                 "--config", str(cfg)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "36 frames received, 36 processed, 0 dropped" in done.stdout
