"""The command line, end to end, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "streamclust.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_demo_writes_results_pictures_and_a_summary(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--out", str(out), "--scan", "16", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    for key in ("frames_received", "frames_processed", "frames_dropped", "elapsed_s", "frames_per_s",
                "n_clusters", "flags", "second_phase_f1", "ari_live_vs_offline"):
        assert key in summary, key
    assert summary["frames_received"] == summary["frames_processed"] == 256
    assert summary["frames_dropped"] == 0
    assert set(summary["second_phase_f1"]) == {"merged", "eds_only", "cbed_only"}
    assert all(0.0 <= v <= 1.0 for v in summary["second_phase_f1"].values())
    assert -1.0 <= summary["ari_live_vs_offline"] <= 1.0
    assert summary["engine"]["positions_seen"] == 256
    for flag in summary["flags"]:
        assert 0.0 < flag["scan_fraction_at_first_flag"] <= 1.0 and len(flag["bbox"]) == 4
    with h5py.File(out / "results.h5") as f:
        assert f["labels/merged"].shape == (16, 16)
        assert int((f["labels/merged"][()] >= 0).sum()) == 256
        assert int((f["labels/live"][()] >= 0).sum()) == 256
    for picture in ("cluster_maps.png", "cluster_spectra.png"):
        assert (out / picture).stat().st_size > 10_000
    assert "frames received" in proc.stdout


def test_bad_option_is_a_clear_usage_error():
    proc = run_cli("demo", "--scan", "many")
    assert proc.returncode == 2
    assert "Invalid value for '--scan'" in proc.stderr
