"""Replay of a recorded scan: the same batches and the same result as the live scan of the same data."""

from __future__ import annotations

import json
import h5py
import numpy as np
import pytest

from streamclust.adapters.eds_file import read_eds_recording
from streamclust.adapters.mib import MibFile
from streamclust.app.config import load_config
from streamclust.app.replay import ReplayStats, dask_config, iter_batches, replay_scan
from streamclust.app.run import ScanSession
from streamclust.simulators.phantom import LamellaPhantom
from streamclust.simulators.recording import record_scan

SHAPE = (16, 16)
# small-scan settings (the defaults are sized for 256 x 256 scans); the same for live and replay
CONFIG = {"engine": {"warmup_positions": 96, "refresh_every": 128}, "centres": {"assess_every": 64},
          "scan": {"batch_size": 64}, "results": {"pictures": False}}


@pytest.fixture(scope="module")
def phantom():
    return LamellaPhantom(scan_shape=SHAPE, seed=3)


@pytest.fixture(scope="module")
def recording(phantom, tmp_path_factory):
    return record_scan(phantom, tmp_path_factory.mktemp("rec") / "scan")


class _Keep(ScanSession):
    """A session that remembers every batch it analysed (what the engine saw, in order)."""

    last = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []
        _Keep.last = self

    def on_batch(self, batch):
        self.seen.append((batch.positions.copy(), batch.has_frame.copy(), batch.has_spectrum.copy(),
                          int(batch.frames.astype(np.int64).sum()), int(batch.spectra.astype(np.int64).sum())))
        super().on_batch(batch)


def _live_scan(phantom, cfg, out_dir):
    """A demo-style live scan: simulated microscope -> acquire_scan -> the same session as replay."""
    from streamclust.app.acquisition import acquire_scan
    from streamclust.simulators.microscope import MicroscopeConfig, SimulatedMicroscope

    session = _Keep(cfg, scan_shape=phantom.scan_shape, frame_shape=phantom.frame_shape,
                    energy_axis_kev=phantom.energy_axis_kev, out_dir=out_dir, scan_id="live",
                    events_endpoint="tcp://127.0.0.1:0")
    session.warm_up()
    with SimulatedMicroscope(phantom, MicroscopeConfig(data_port=0, control_port=0, eds_port=0)) as scope:
        report = acquire_scan(scope.merlin.data_address, scope.eds.endpoint, phantom.n_positions,
                              session.on_batch, batch_size=cfg.scan.batch_size,
                              join_timeout_s=cfg.scan.join_timeout_s, on_missing=cfg.scan.on_missing)
    assert report.complete
    summary = session.finish(report)
    return session, summary


def test_replay_equals_the_live_scan_of_the_same_data(phantom, recording, tmp_path):
    cfg = load_config(CONFIG)
    live, live_summary = _live_scan(phantom, cfg, tmp_path / "live")
    summary = replay_scan(recording.mib, recording.eds, tmp_path / "replay", config=cfg,
                          session_factory=_Keep)
    replayed = _Keep.last
    assert replayed is not live
    # the same batches, in the same order, with the same content
    assert len(replayed.seen) == len(live.seen)
    for a, b in zip(live.seen, replayed.seen):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[2], b[2])
        assert a[3:] == b[3:]
    # hence the same memberships, flags and counters
    u_live = live.live.engine.memberships_
    u_replay = replayed.live.engine.memberships_
    assert np.isfinite(u_live).all()
    np.testing.assert_array_equal(u_live, u_replay)
    def untimed(flags):  # wall-clock seconds differ; everything decided from the data must not
        return json.dumps([{k: v for k, v in f.items() if k != "seconds_at_first_flag"} for f in flags])

    assert untimed(live_summary["flags"]) == untimed(summary["flags"])
    assert summary["status"] == "complete" and summary["positions_seen"] == phantom.n_positions
    assert summary["frames_received"] == summary["frames_processed"] == phantom.n_positions
    assert summary["ingest"]["replay"]["joined"] == phantom.n_positions
    on_disk = json.loads((tmp_path / "replay" / "summary.json").read_text())
    assert on_disk["positions_seen"] == phantom.n_positions
    with h5py.File(tmp_path / "replay" / "results.hspy") as f:
        assert f.attrs["status"] == "complete"


def test_batches_of_a_recording_with_missing_spectra(recording):
    eds = read_eds_recording(recording.eds)
    n = eds.flat_spectra.shape[0]
    acquired = np.ones(n, bool)
    acquired[[5, 6, 200]] = False
    with MibFile(recording.mib) as mib:
        stats = ReplayStats()
        batches = list(iter_batches(mib, eds.flat_spectra, acquired, batch_size=100, stats=stats))
        dropped_stats = ReplayStats()
        dropped = list(iter_batches(mib, eds.flat_spectra, acquired, batch_size=100, on_missing="drop",
                                    stats=dropped_stats))
        frame7 = mib.frame(7)
    positions = np.concatenate([b.positions for b in batches])
    np.testing.assert_array_equal(positions, np.arange(n))
    assert [len(b) for b in batches] == [100, 100, 56]
    has_spectrum = np.concatenate([b.has_spectrum for b in batches])
    np.testing.assert_array_equal(has_spectrum, acquired)
    assert not batches[0].spectra[5].any() and batches[0].spectra[4].any()
    np.testing.assert_array_equal(batches[0].frames[7], frame7)
    assert stats.joined == n - 3 and stats.frames_without_spectrum == 3 and stats.batches == 3
    kept = np.concatenate([b.positions for b in dropped])
    assert kept.size == n - 3 and not np.isin([5, 6, 200], kept).any()
    assert all(b.has_spectrum.all() and b.has_frame.all() for b in dropped)
    assert dropped_stats.frames_without_spectrum == 3


def test_spectra_without_frames_come_last_alone(recording):
    eds = read_eds_recording(recording.eds)
    n = eds.flat_spectra.shape[0]

    class FirstFrames:
        """The recording cut short: only its first frames (as a crash mid-write would leave it)."""

        def __init__(self, mib, k):
            self.mib, self.k = mib, k
            self.image_shape, self.image_dtype = mib.image_shape, mib.image_dtype

        def __len__(self):
            return self.k

        def header(self, i):
            return self.mib.header(i)

        def frame(self, i, out=None):
            return self.mib.frame(i, out=out)

    with MibFile(recording.mib) as mib:
        stats = ReplayStats()
        batches = list(iter_batches(FirstFrames(mib, 200), eds.flat_spectra, np.ones(n, bool),
                                    batch_size=64, stats=stats))
    last = np.concatenate([b.positions for b in batches])
    np.testing.assert_array_equal(last, np.arange(n))
    has_frame = np.concatenate([b.has_frame for b in batches])
    assert has_frame[:200].all() and not has_frame[200:].any()
    assert not batches[-1].frames[~batches[-1].has_frame].any() and batches[-1].has_frame.any()
    assert stats.spectra_without_frame == n - 200


def test_scan_shape_mismatch_is_a_clear_error(recording, tmp_path):
    from streamclust.simulators.eds_recording import write_eds_recording

    other = tmp_path / "other_eds.h5"
    write_eds_recording(other, (np.zeros(16, np.uint16) for _ in range(10 * 10)), scan_shape=(10, 10),
                        energy_offset_kev=0.0, channel_width_kev=0.01, live_time_s=0.001, n_channels=16)
    with pytest.raises(ValueError, match=r"scan shape \(16, 16\).*\(10, 10\) differ"):
        replay_scan(recording.mib, other, tmp_path / "out")


def test_replay_command_line(recording, tmp_path):
    from click.testing import CliRunner

    from streamclust.app.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text("[engine]\nwarmup_positions = 96\nrefresh_every = 128\n[scan]\nbatch_size = 64\n"
                   "[results]\npictures = false\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["replay", str(recording.mib), str(recording.eds), "--out", str(out),
                                       "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["positions_seen"] == SHAPE[0] * SHAPE[1]
    assert summary["config"]["scan"]["batch_size"] == 64
    n = SHAPE[0] * SHAPE[1]
    assert f"{n} frames received" in result.output
    # not a terminal: plain progress lines (on stderr), the last one at 100 %
    assert f"scan {n}/{n} (100.0 %)" in result.output
    assert "live view" not in result.output


def test_replay_command_line_quiet_with_live_view(recording, tmp_path):
    from click.testing import CliRunner

    from streamclust.app.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text("[engine]\nn_clusters = 4\nwarmup_positions = 96\nrefresh_every = 128\n"
                   "[results]\npictures = false\n")
    result = CliRunner().invoke(main, ["replay", str(recording.mib), str(recording.eds), "--out",
                                       str(tmp_path / "out"), "--config", str(cfg), "--quiet", "--live"])
    assert result.exit_code == 0, result.output
    assert "live view: http://127.0.0.1:" in result.output
    assert "scan " not in result.output  # --quiet: no progress line
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_clusters"] == 4 and summary["config"]["engine"]["n_clusters"] == 4


def test_dask_configuration_is_accepted_by_the_dask_replay():
    dask_replay = pytest.importorskip("streamclust.distributed.dask_replay")
    cfg = load_config({"engine": {"n_clusters": 4, "m": 1.4, "pca_method": "exact"}})
    mapped = dask_config(cfg)
    rc = dask_replay.ReplayConfig.from_any(mapped)
    assert rc.n_clusters == 4 and rc.m == 1.4 and rc.pca_method == "exact"
    assert rc.thresholds == (0.5, 0.75)
    # not set in the file: the Dask replay's own default ("auto": exact when it fits)
    assert dask_config(load_config()).pca_method == dask_replay.ReplayConfig().pca_method == "auto"
