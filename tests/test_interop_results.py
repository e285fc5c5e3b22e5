"""The results file in HyperSpy, rosettasciio and exspy: plain and lazy ``hs.load``, calibrated axes and
metadata, maps and centres equal to what was written, patterns in rosettasciio's orientation, and
exspy finding Fe and Co K-alpha in a centre spectrum from the file's own metadata.

Needs the ``interop`` extra (hyperspy, rosettasciio, exspy); skipped with the reason otherwise. The
scan is a phantom recorded as a real ``.mib`` file (simulators/recording.py), read back by our reader
for the analysis and by rosettasciio for the comparison of the centre patterns.
"""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest

hs = pytest.importorskip("hyperspy.api", reason="hyperspy is not installed (pip install -e '.[interop]')")
pytest.importorskip("rsciio", reason="rosettasciio is not installed (pip install -e '.[interop]')")
exspy = pytest.importorskip("exspy", reason="exspy is not installed (pip install -e '.[interop]')")

from exspy.utils.eds import get_xray_lines_near_energy  # noqa: E402

from streamclust.adapters.join import Batch  # noqa: E402
from streamclust.adapters.mib import read_mib  # noqa: E402
from streamclust.engine.centres import fe_co_lines  # noqa: E402
from streamclust.app.live import LiveAnalysis  # noqa: E402
from streamclust.results.writer import RESULTS_NAME, ResultsWriter, read_results, validate_results  # noqa: E402
from streamclust.simulators.phantom import LamellaPhantom  # noqa: E402
from streamclust.simulators.recording import record_scan  # noqa: E402

SCAN = (16, 16)
STEP_NM = 2.5
MRAD_PER_PX = 0.15  # the phantom's detector calibration
THRESHOLDS = (0.5, 0.75)
#: float32 storage of float64 means: a few float32 ulps
RTOL32 = 4 * float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A recorded phantom scan analysed from its .mib file, and the results file written for it."""
    d = tmp_path_factory.mktemp("interop")
    ph = LamellaPhantom(scan_shape=SCAN, seed=2)
    rec = record_scan(ph, d / "scan")
    frames = read_mib(rec.mib)
    spectra = ph.spectra(np.arange(ph.n_positions))
    live = LiveAnalysis(ph.scan_shape, ph.frame_shape, ph.energy_axis_kev, n_clusters=4, thresholds=THRESHOLDS,
                        random_state=0, assess_every=32,
                        engine_params={"warmup_positions": 32, "refresh_every": 64})
    for i in range(0, ph.n_positions, 32):
        p = np.arange(i, i + 32)
        ones = np.ones(p.size, bool)
        live.process(Batch(p, frames[p], spectra[p], ones, ones))
    live.finish()
    config = {"scan": {"shape": list(SCAN), "step_nm": STEP_NM},
              "instrument": {"beam_energy_kev": 200.0, "dwell_s": ph.dwell_s, "mrad_per_px": MRAD_PER_PX,
                             "detector": "Merlin (simulated)"}}
    path = d / RESULTS_NAME
    ResultsWriter(path, scan_shape=ph.scan_shape, frame_shape=ph.frame_shape, energy_axis_kev=ph.energy_axis_kev,
                  n_clusters=4, thresholds=THRESHOLDS, config=config, scan_id="interop-scan",
                  source=str(rec.mib)).finalize(live.scan_result({"batches": ph.n_positions // 32}))
    with h5py.File(path, "r") as f:
        written = {name: f[name][()] for name in ("clustering/memberships", "clustering/labels", "centres/eds",
                                                 "centres/cbed", "centres/count")}
    return {"path": path, "rec": rec, "phantom": ph, "written": written, "spectra": spectra}


def _load(path, **kw) -> dict:
    """``hs.load(path)`` as ``{name: signal}``; the names are the groups' (hs.load keeps their order)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # HyperSpy 2.5's own deprecations
        signals = hs.load(path, **kw)
    with h5py.File(path, "r") as f:
        names = list(f["Experiments"])
    assert len(signals) == len(names)
    out = dict(zip(names, signals))
    for name, s in out.items():
        assert s.metadata.General.title.startswith("interop-scan"), name  # the name-to-signal match holds
    return out


def test_plain_hs_load_opens_four_calibrated_signals(scan):
    sigs = _load(scan["path"])  # no reader, no file_format: the .hspy extension names HyperSpy's reader
    assert set(sigs) == {"memberships", "labels", "centre_spectra", "centre_patterns"}
    mem, lab = sigs["memberships"], sigs["labels"]
    assert mem.axes_manager.navigation_shape == (SCAN[1], SCAN[0])
    for ax in (*mem.axes_manager.navigation_axes, *lab.axes_manager.signal_axes):
        assert ax.units == "nm" and ax.scale == STEP_NM and ax.offset == 0.0
    tem = mem.metadata.Acquisition_instrument.TEM
    assert tem.beam_energy == 200.0 and tem.dwell_time == scan["phantom"].dwell_s
    assert tem.acquisition_mode == "STEM"
    assert mem.metadata.General.original_filename == scan["rec"].mib.name
    assert mem.metadata.Streamclust.scan_id == "interop-scan"
    assert mem.metadata.Streamclust.source == str(scan["rec"].mib)
    # the maps pixel-exact against what was written (h5py)
    np.testing.assert_array_equal(mem.data, scan["written"]["clustering/memberships"])
    np.testing.assert_array_equal(lab.data, scan["written"]["clustering/labels"])
    # HyperSpy's (x, y) navigation indexes the file's (y, x) rows
    y, x = 3, 11
    np.testing.assert_array_equal(mem.inav[x, y].data, scan["written"]["clustering/memberships"][y, x])


def test_lazy_load_gives_the_same_data(scan):
    eager = _load(scan["path"])
    lazy = _load(scan["path"], lazy=True)
    for name, s in lazy.items():
        assert s._lazy, name
        s.compute()
        np.testing.assert_array_equal(s.data, eager[name].data)
        assert s.axes_manager.signal_shape == eager[name].axes_manager.signal_shape


def test_centre_spectra_are_eds_tem_in_kev_and_empty_centres_are_zero(scan):
    s = _load(scan["path"])["centre_spectra"]
    assert isinstance(s, exspy.signals.EDSTEMSpectrum)
    e = s.axes_manager.signal_axes[0]
    assert e.units == "keV" and e.is_binned
    np.testing.assert_allclose(e.axis, scan["phantom"].energy_axis_kev, rtol=0, atol=1e-9)
    eds = s.metadata.Acquisition_instrument.TEM.Detector.EDS
    assert eds.live_time == scan["phantom"].dwell_s and eds.energy_resolution_MnKa == 130.0
    count = scan["written"]["centres/count"]
    np.testing.assert_array_equal(s.metadata.Streamclust.positions_above_threshold, count)
    assert (count == 0).any(), "the scan was meant to leave a centre empty (host sub-clusters never built)"
    written = scan["written"]["centres/eds"]
    assert not np.isnan(s.data).any()
    assert (s.data[count == 0] == 0).all()
    np.testing.assert_array_equal(s.data[count > 0], written[count > 0])
    np.testing.assert_array_equal(s.metadata.Streamclust.empty, count == 0)


def test_centre_patterns_match_rosettasciio_loading_the_same_mib(scan):
    pat = _load(scan["path"])["centre_patterns"]
    assert pat.metadata.Signal.signal_type == "electron_diffraction"
    t, k, h, w = pat.data.shape
    fh, fw = scan["phantom"].frame_shape
    by, bx = fh // h, fw // w
    for ax, factor in zip(pat.axes_manager.signal_axes, (bx, by)):  # HyperSpy lists kx first
        assert ax.units == "mrad" and ax.scale == pytest.approx(MRAD_PER_PX * factor, rel=1e-12)
        assert ax.axis[ax.size // 2 - 1] == pytest.approx(-ax.axis[ax.size // 2])  # 0 at the centre
    diff = pat.metadata.Acquisition_instrument.TEM.Detector.Diffraction
    assert diff.detector_name == "Merlin (simulated)" and diff.mrad_per_px == MRAD_PER_PX
    # the centres from first principles: rosettasciio's frames, binned, weighted by the file's memberships
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        raw = hs.load(scan["rec"].mib)
    frames = np.asarray(raw.data, np.float64).reshape(-1, fh, fw)
    binned = frames.reshape(-1, h, by, w, bx).sum(axis=(2, 4))
    u = scan["written"]["clustering/memberships"].reshape(frames.shape[0], -1).astype(np.float64)
    count = scan["written"]["centres/count"]
    asymmetric = 0
    for i, thr in enumerate(THRESHOLDS):
        for c in range(k):
            wgt = np.where(u[:, c] > thr, u[:, c], 0.0)
            if count[i, c] == 0:
                assert wgt.sum() == 0 and (pat.data[i, c] == 0).all()
                continue
            expect = np.tensordot(wgt, binned, axes=1) / wgt.sum()
            np.testing.assert_allclose(pat.data[i, c], expect, rtol=RTOL32, atol=RTOL32 * expect.max())
            asymmetric += not np.allclose(expect, np.flip(expect, axis=0), rtol=0.01)
    assert asymmetric, "every centre is up-down symmetric: the orientation check could not fail"


def test_exspy_finds_fe_and_co_k_alpha_from_the_file_alone(scan):
    spectra = _load(scan["path"])["centre_spectra"]
    e_axis = scan["phantom"].energy_axis_kev
    count = scan["written"]["centres/count"]
    # the Fe-bearing centres by our own line measurement (Fe K-alpha 10 sigma above background)
    fe_bearing = [c for c in range(count.shape[1]) if count[0, c] > 0
                  and float(fe_co_lines(spectra.data[0, c] * count[0, c], e_axis).snr_fe) > 10]
    assert fe_bearing, "no centre holds Fe: the phantom's matrix is Co2FeSi"
    for c in fe_bearing:
        s = spectra.inav[c, 0]
        # peak finding knows nothing of the sample; the line table names what is at each peak
        peaks = s.find_peaks1D_ohaver(maxpeakn=30)[0]
        found = set()
        for p in peaks:
            near = get_xray_lines_near_energy(float(p["position"]), width=0.1, only_lines=("Ka",))
            found.update(near[:1])
        assert {"Fe_Ka", "Co_Ka"} <= found, (c, sorted(found))
        # exspy's model needs the beam energy (its upper end): the file states it, nobody sets it
        s.add_elements(["Fe", "Co"])
        s.add_lines()
        assert set(s.metadata.Sample.xray_lines) == {"Fe_Ka", "Co_Ka"}
        m = s.create_model()
        m.fit()
        net = {i.metadata.Sample.xray_lines[0]: float(i.data[0]) for i in m.get_lines_intensity()}
        assert net["Fe_Ka"] > 0 and net["Co_Ka"] > 0, net
    # without the file's beam energy, exspy stops: the test above depends on the metadata
    bare = spectra.inav[fe_bearing[0], 0].deepcopy()
    del bare.metadata.Acquisition_instrument.TEM.beam_energy
    bare.add_elements(["Fe", "Co"])
    with pytest.raises(AttributeError, match="beam energy is not defined"):
        bare.create_model()


def test_our_readers_still_read_the_file(scan):
    res = read_results(scan["path"].parent)  # a folder: results.hspy found
    assert validate_results(res) == []
    assert read_results(scan["path"].with_name("results.h5"))["attrs"]["scan_id"] == "interop-scan"
    assert res["instrument"]["attrs"]["beam_energy_kev"] == 200.0
    np.testing.assert_array_equal(res["scan"]["attrs"]["step_nm"], [STEP_NM, STEP_NM])


def test_a_file_before_the_first_position_loads_as_two_signals(scan, tmp_path):
    ph = scan["phantom"]
    live = LiveAnalysis(ph.scan_shape, ph.frame_shape, ph.energy_axis_kev, n_clusters=4, thresholds=THRESHOLDS)
    path = tmp_path / RESULTS_NAME
    ResultsWriter(path, scan_shape=ph.scan_shape, frame_shape=ph.frame_shape, energy_axis_kev=ph.energy_axis_kev,
                  n_clusters=4, thresholds=THRESHOLDS, config={},
                  scan_id="interop-scan").checkpoint(live.scan_result({}))
    sigs = _load(path)
    assert set(sigs) == {"memberships", "labels"}
    assert np.isnan(sigs["memberships"].data).all() and (sigs["labels"].data == -1).all()
    assert sigs["memberships"].axes_manager.navigation_axes[0].units == "position"  # no step known
    assert "beam_energy" not in sigs["memberships"].metadata.Acquisition_instrument.TEM
