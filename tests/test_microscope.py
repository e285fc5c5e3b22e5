"""The whole simulated microscope over real sockets: frames and spectra are the phantom's, position for position."""

from __future__ import annotations

import numpy as np
import pytest

from streamclust.app.acquisition import acquire_scan
from streamclust.adapters.eds_file import read_eds_recording
from streamclust.adapters.mib import MibFile, read_mib
from streamclust.simulators.microscope import MicroscopeConfig, SimulatedMicroscope
from streamclust.simulators.phantom import LamellaPhantom
from streamclust.simulators.recording import record_scan


@pytest.fixture(scope="module")
def phantom():
    return LamellaPhantom(scan_shape=(8, 10), seed=3)


def test_microscope_serves_the_phantom_position_for_position(phantom):
    got_frames, got_spectra = {}, {}

    def on_batch(batch):
        for i, p in enumerate(batch.positions.tolist()):
            assert batch.has_frame[i] and batch.has_spectrum[i]
            got_frames[p] = batch.frames[i].copy()
            got_spectra[p] = batch.spectra[i].copy()

    config = MicroscopeConfig(data_port=0, control_port=0, eds_port=0, dwell_s=0.0)
    with SimulatedMicroscope(phantom, config) as scope:
        ep = scope.endpoints
        assert ep["scan_shape"] == [8, 10] and ep["merlin_data"].startswith("127.0.0.1:")
        report = acquire_scan(scope.merlin.data_address, scope.eds.endpoint, phantom.n_positions, on_batch,
                              timeout_s=10.0)
    assert report.complete
    assert sorted(got_frames) == list(range(phantom.n_positions))
    for p in range(phantom.n_positions):
        np.testing.assert_array_equal(got_frames[p], phantom.frame(p))
        np.testing.assert_array_equal(got_spectra[p], phantom.spectrum(p))
    assert report.join["joined"] == phantom.n_positions
    assert report.frames_dropped == 0


def test_both_detectors_follow_one_paced_scan_clock(phantom):
    """At a dwell of 5 ms the frames and spectra of each position arrive together, not one stream first."""
    config = MicroscopeConfig(data_port=0, control_port=0, eds_port=0, dwell_s=0.005)
    arrivals = []
    with SimulatedMicroscope(phantom, config) as scope:
        report = acquire_scan(scope.merlin.data_address, scope.eds.endpoint, phantom.n_positions,
                              lambda b: arrivals.append(len(b.positions)), batch_size=8, timeout_s=10.0)
    assert report.complete and sum(arrivals) == phantom.n_positions
    # paced: the scan took at least n * dwell; nothing expired waiting for a partner
    assert report.elapsed_s >= phantom.n_positions * 0.005
    assert report.join["expired_frames"] == report.join["expired_spectra"] == 0


def test_recorded_scan_reads_back_identically(phantom, tmp_path):
    rec = record_scan(phantom, tmp_path / "scan")
    frames = read_mib(rec.mib)
    assert frames.shape == (phantom.n_positions, *phantom.frame_shape)
    np.testing.assert_array_equal(frames, phantom.frames(np.arange(phantom.n_positions)))
    with MibFile(rec.mib) as f:
        assert f.acquisition_header.scan_shape == tuple(phantom.scan_shape)
        assert f.acquisition_header.n_frames == phantom.n_positions
        assert [h.sequence for h in f.headers] == list(range(1, phantom.n_positions + 1))
    eds = read_eds_recording(rec.eds)
    assert eds.spectra.shape == (*phantom.scan_shape, phantom.n_channels)
    np.testing.assert_array_equal(eds.spectra.reshape(phantom.n_positions, -1),
                                  phantom.spectra(np.arange(phantom.n_positions)))
    np.testing.assert_allclose(eds.energy_axis_kev, phantom.energy_axis_kev, atol=1e-9)
    assert eds.acquired.all()
