"""Our recordings in the libraries microscopists use: rosettasciio, HyperSpy, exspy.

Skipped (with the reason) when the optional ``interop`` extra (hyperspy, rosettasciio, exspy) is
not installed. What a HyperSpy user does, and what it must give:

- ``hs.load("scan.mib")`` (rosettasciio's quantumdetector reader): the scan's navigation shape,
  inferred from the frames' time stamps (line flyback), and our pixels, flipped in y as
  rosettasciio does (``np.flip(..., -2)``);
- ``hs.load("scan_eds.hspy")`` (and ``file_format="HSPY"`` for an ``.h5`` name): an
  ``EDSTEMSpectrum`` over the scan, energy axis in keV, live time and beam energy in metadata,
  lazily too;
- exspy on the summed spectrum: ``add_lines()`` picks Fe and Co K-alpha with the beam energy from
  the file, and the peaks are where exspy's own tables put those lines.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

hs = pytest.importorskip("hyperspy.api", reason="hyperspy not installed (pip install '.[interop]')")
rsciio_qd = pytest.importorskip("rsciio.quantumdetector",
                                reason="rosettasciio not installed (pip install '.[interop]')")
exspy = pytest.importorskip("exspy", reason="exspy not installed (pip install '.[interop]')")

from streamclust.adapters.eds_file import read_eds_recording  # noqa: E402
from streamclust.adapters.mib import read_mib  # noqa: E402
from streamclust.simulators.eds_recording import write_eds_recording  # noqa: E402
from streamclust.simulators.phantom import LamellaPhantom  # noqa: E402
from streamclust.simulators.record_live import record_phantom  # noqa: E402

SHAPE = (12, 10)  # rows, columns: not square, so a transposed navigation shape would show


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rec")
    phantom = LamellaPhantom(scan_shape=SHAPE, seed=4)
    record_phantom(phantom, folder)
    return folder, phantom


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HyperSpy's deprecation chatter is not under test
        yield


def test_rosettasciio_loads_the_mib_with_the_scan_shape_and_our_pixels(recorded):
    folder, _ = recorded
    s = hs.load(folder / "scan.mib")
    assert s.data.shape == (*SHAPE, 512, 512)
    assert s.axes_manager.navigation_shape == SHAPE[::-1]
    ours = read_mib(folder / "scan.mib").reshape(*SHAPE, 512, 512)
    # rosettasciio flips axis -2 for display; we keep the detector's orientation (docs)
    np.testing.assert_array_equal(np.asarray(s.data), np.flip(ours, axis=-2))


def test_hyperspy_loads_the_eds_recording_as_an_eds_tem_spectrum_image(recorded):
    folder, phantom = recorded
    s = hs.load(folder / "scan_eds.hspy")
    assert type(s).__name__ == "EDSTEMSpectrum" and s.metadata.Signal.signal_type == "EDS_TEM"
    assert s.data.shape == (*SHAPE, phantom.n_channels)
    energy = s.axes_manager.signal_axes[0]
    assert energy.units == "keV" and energy.size == phantom.n_channels
    np.testing.assert_allclose(energy.axis, phantom.energy_axis_kev, rtol=0, atol=1e-9)
    tem = s.metadata.Acquisition_instrument.TEM
    assert tem.beam_energy == 200.0 and tem.Detector.EDS.live_time == pytest.approx(phantom.dwell_s)
    ours = read_eds_recording(folder / "scan_eds.hspy")
    np.testing.assert_array_equal(np.asarray(s.data), ours.spectra)
    lazy = hs.load(folder / "scan_eds.hspy", lazy=True)
    np.testing.assert_array_equal(np.asarray(lazy.data.compute()), ours.spectra)


def test_an_h5_named_recording_loads_with_the_hspy_format_named(tmp_path):
    path = tmp_path / "scan_eds.h5"
    counts = np.arange(2 * 3 * 8, dtype=np.uint16).reshape(2, 3, 8)
    write_eds_recording(path, counts, scan_shape=(2, 3), energy_offset_kev=0.1, channel_width_kev=0.02,
                        live_time_s=0.5, beam_energy_kev=300.0)
    s = hs.load(path, file_format="HSPY")
    np.testing.assert_array_equal(s.data, counts)
    assert s.axes_manager.signal_axes[0].offset == pytest.approx(0.1)
    assert s.metadata.Acquisition_instrument.TEM.beam_energy == 300.0


def test_exspy_finds_fe_and_co_k_alpha_without_being_told_the_beam_energy(recorded):
    folder, _ = recorded
    spectrum = hs.load(folder / "scan_eds.hspy").sum()
    spectrum.add_elements(["Fe", "Co"])
    spectrum.add_lines()  # needs the beam energy: from the file's metadata
    assert {"Fe_Ka", "Co_Ka"} <= set(spectrum.metadata.Sample.xray_lines)
    width = spectrum.axes_manager.signal_axes[0].scale
    peaks = spectrum.find_peaks1D_ohaver(maxpeakn=20, amp_thresh=0.1 * float(spectrum.data.max()))[0]
    found = np.asarray(peaks["position"], float)
    for element in ("Fe", "Co"):
        line = exspy.material.elements[element].Atomic_properties.Xray_lines.Ka.energy_keV
        # a peak within two channels of exspy's tabulated K-alpha energy
        assert np.min(np.abs(found - line)) <= 2 * width, (element, line, found)
        near = exspy.utils.eds.get_xray_lines_near_energy(float(found[np.argmin(np.abs(found - line))]),
                                                          width=2 * width)
        assert f"{element}_Ka" in near
    windows = spectrum.estimate_background_windows(line_width=[5.0, 2.0])
    for intensity in spectrum.get_lines_intensity(background_windows=windows):
        assert float(np.asarray(intensity.data).ravel()[0]) > 0


def test_record_scan_and_write_mib_files_load_with_their_scan_shape(tmp_path):
    # the "(120|512,512) instead of (12,10|512,512)": MibWriter now stamps a line flyback
    from streamclust.simulators.recording import record_scan

    rec = record_scan(LamellaPhantom(scan_shape=(4, 5), seed=1), tmp_path / "s")
    s = hs.load(rec.mib)
    assert s.data.shape[:2] == (4, 5)
    np.testing.assert_array_equal(np.asarray(s.data), np.flip(read_mib(rec.mib).reshape(4, 5, 512, 512), -2))
