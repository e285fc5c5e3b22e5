"""``streamclust simulate --from DIR``: a recording served over the real Merlin protocol and EDS stream.

Received with the same receivers as a live scan; frames must be bit-identical to the file's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from streamclust.app.acquisition import acquire_scan
from streamclust.adapters.eds_file import read_eds_recording
from streamclust.adapters.merlin import MerlinReceiver
from streamclust.adapters.mib import read_mib
from streamclust.simulators.merlin import Fault
from streamclust.simulators.microscope import MicroscopeConfig, SimulatedMicroscope
from streamclust.simulators.mib_encode import write_mib
from streamclust.simulators.phantom import LamellaPhantom
from streamclust.simulators.record_live import record_phantom
from streamclust.simulators.recorded import RecordedScan

SHAPE = (6, 5)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rec")
    record_phantom(LamellaPhantom(scan_shape=SHAPE, seed=6), folder)
    return folder


def _ports(**kw):
    return MicroscopeConfig(data_port=0, control_port=0, eds_port=0, dwell_s=0.0, **kw)


def test_a_served_recording_arrives_bit_identical_frames_and_spectra(recorded):
    frames = read_mib(recorded / "scan.mib")
    eds = read_eds_recording(recorded / "scan_eds.hspy")
    got_frames, got_spectra = {}, {}

    def keep(batch):
        for j, p in enumerate(batch.positions.tolist()):
            got_frames[p] = batch.frames[j].copy()
            got_spectra[p] = batch.spectra[j].copy()

    with RecordedScan(recorded / "scan.mib", recorded / "scan_eds.hspy") as source, \
            SimulatedMicroscope(source, _ports()) as scope:
        assert source.scan_shape == SHAPE and source.counter_depth == 12
        report = acquire_scan(scope.merlin.data_address, scope.eds.endpoint, source.n_positions, keep,
                              batch_size=8)
    assert report.complete and report.frames_delivered == report.spectra_delivered == len(frames)
    for p in range(len(frames)):
        np.testing.assert_array_equal(got_frames[p], frames[p])
        np.testing.assert_array_equal(got_spectra[p], eds.flat_spectra[p])


def test_a_mib_without_eds_raw_roi_is_served_frames_alone(tmp_path):
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 2, (5, 128, 256)).astype(np.uint8)  # a single-chip 256x128 ROI, raw 1-bit
    mib, _ = write_mib(tmp_path / "roi", frames, counter_depth=1, raw=True, layout="1x1", shutter_s=0.002)
    with RecordedScan(mib) as source, \
            SimulatedMicroscope(source, _ports(counter_depth=source.counter_depth, raw=source.raw)) as scope:
        assert source.raw and source.counter_depth == 1 and source.layout == "1x1"
        assert not source.has_eds and scope.eds is None and source.dwell_s == pytest.approx(0.002)
        with MerlinReceiver(*scope.merlin.data_address, timeout=5.0) as rx:
            got = [(f.sequence, f.image.copy()) for f in rx.frames()]
    assert [s for s, _ in got] == [1, 2, 3, 4, 5]
    for seq, image in got:
        np.testing.assert_array_equal(image, frames[seq - 1])


def test_fault_options_apply_to_a_served_recording(recorded):
    frames = read_mib(recorded / "scan.mib")
    config = MicroscopeConfig(data_port=0, control_port=0, eds_port=0, dwell_s=0.0,
                              merlin_faults=(Fault("skip", 3), Fault("corrupt_header", 5)))
    with RecordedScan(recorded / "scan.mib") as source, SimulatedMicroscope(source, config) as scope:
        with MerlinReceiver(*scope.merlin.data_address, timeout=5.0) as rx:
            got = {f.sequence: f.image.copy() for f in rx.frames()}
    assert sorted(got) == [s for s in range(1, len(frames) + 1) if s not in (3, 5)]
    assert rx.stats.dropped["bad_header"] == 1 and rx.stats.sequence_gaps >= 1
    for seq, image in got.items():
        np.testing.assert_array_equal(image, frames[seq - 1])


def test_simulate_from_on_the_command_line(recorded):
    frames = read_mib(recorded / "scan.mib")
    proc = subprocess.Popen([sys.executable, "-m", "streamclust.app.cli", "simulate", "--from", str(recorded),
                             "--data-port", "0", "--control-port", "0", "--eds-port", "0", "--dwell", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        endpoints = json.loads(proc.stdout.readline())  # printed once everything listens
        host, port = endpoints["merlin_data"].rsplit(":", 1)
        assert endpoints["scan_shape"] == list(SHAPE) and endpoints["eds"].startswith("tcp://")
        with MerlinReceiver(host, int(port), timeout=10.0) as rx:
            got = {f.sequence: f.image.copy() for f in rx.frames()}
        assert sorted(got) == list(range(1, len(frames) + 1))
        for seq, image in got.items():
            np.testing.assert_array_equal(image, frames[seq - 1])
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_simulate_from_a_missing_folder_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "streamclust.app.cli", "simulate", "--from", str(tmp_path / "no")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 4
    assert done.stderr.strip().startswith("streamclust: error: no such file or folder")
