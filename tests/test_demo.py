"""The demo's sample options (issue 17: a single-phase control sample, the dose) and its bounded
scratch storage (issue 16: the scan's features go to memory-mapped files, removed afterwards)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from streamclust.app.demo import run_demo
from streamclust.simulators.phantom import LamellaPhantom


def test_single_phase_control_at_half_dose_with_a_paced_clock(tmp_path):
    out = tmp_path / "ctrl"
    s = run_demo(out, seed=3, scan_shape=(24, 24), inclusions=0, dose=0.5, dwell_s=0.0005)
    assert s["inclusions"] == 0 and s["second_phase_positions"] == 0
    assert s["dose"] == 0.5
    assert s["frames_received"] == s["frames_processed"] == 24 * 24
    # the clock was paced, so keeping up is measured (the analysis may be slower on a loaded machine)
    assert s["scan_nominal_s"] == pytest.approx(24 * 24 * 0.0005)
    assert s["keepup"] is not None and 0 < s["keepup"] <= 1.0 + 1e-9
    assert s["lag_at_scan_end_s"] >= 0
    # the scratch files of the offline yardstick are gone, the results stay
    assert not list(out.glob(".scratch-*"))
    assert json.loads((out / "summary.json").read_text())["inclusions"] == 0
    with h5py.File(out / "results.hspy", "r") as f:
        assert not np.asarray(f["ground_truth/second_phase"]).any()
        got = float(np.sum(f["demo/eds_sum"]))
    # the dose reached the sample: the received X-ray counts are those of a 2 pA beam (Poisson: a
    # sum of about 10,000 counts is within 5 % of its mean at far more than 3 sigma); the full dose
    # would be twice that
    ph = LamellaPhantom((24, 24), seed=3, n_inclusions=0, beam_current_pa=2.0)
    expected = sum(float(ph.expected_spectrum(p).sum()) for p in range(ph.n_positions))
    assert got == pytest.approx(expected, rel=0.05)


def test_dose_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="dose"):
        run_demo(tmp_path / "x", scan_shape=(8, 8), dose=0.0)
