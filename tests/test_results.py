"""The results file: contents, HyperSpy layout, checkpoint rate, failed writes leave the last file."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from streamclust.adapters.join import Batch
from streamclust.app.live import LiveAnalysis
from streamclust.results.writer import (
    LEGACY_RESULTS_NAME,
    RESULTS_NAME,
    ResultsWriter,
    ScanResult,
    find_results,
    flatten_counters,
    read_results,
    validate_results,
)
from streamclust.simulators.phantom import LamellaPhantom

SCAN = (16, 16)
N_CLUSTERS = 4
THRESHOLDS = (0.5, 0.75)
CONFIG = {"scan": {"shape": list(SCAN), "dwell_s": 0.0}, "n_clusters": N_CLUSTERS, "note": "test"}


def make_live(phantom) -> LiveAnalysis:
    return LiveAnalysis(phantom.scan_shape, phantom.frame_shape, phantom.energy_axis_kev,
                        n_clusters=N_CLUSTERS, thresholds=THRESHOLDS, random_state=0, assess_every=32,
                        engine_params={"warmup_positions": 32, "refresh_every": 64})


def feed(live, phantom, positions, batch=32) -> dict:
    """Joined batches straight from the phantom (the sockets are the crash test's business)."""
    counters = {"batches": 0, "positions_delivered": 0, "join": {"joined": 0, "frames_without_spectrum": 0}}
    for i in range(0, len(positions), batch):
        p = np.asarray(positions[i:i + batch], np.int64)
        ones = np.ones(p.size, bool)
        live.process(Batch(p, phantom.frames(p), phantom.spectra(p), ones, ones))
        counters["batches"] += 1
        counters["positions_delivered"] += int(p.size)
        counters["join"]["joined"] += int(p.size)
    return counters


def writer(path, phantom, **kw) -> ResultsWriter:
    kw.setdefault("checkpoint_every_s", 3600.0)
    kw.setdefault("config", CONFIG)
    return ResultsWriter(path, scan_shape=phantom.scan_shape, frame_shape=phantom.frame_shape,
                         energy_axis_kev=phantom.energy_axis_kev, n_clusters=N_CLUSTERS,
                         thresholds=THRESHOLDS, scan_id="test-scan", **kw)


@pytest.fixture(scope="module")
def phantom():
    return LamellaPhantom(scan_shape=SCAN, seed=2)


@pytest.fixture(scope="module")
def scanned(phantom, tmp_path_factory):
    """Half a scan checkpointed, then the whole scan finalised; both files kept."""
    d = tmp_path_factory.mktemp("results")
    live = make_live(phantom)
    live.engine.warm_up()
    n = phantom.n_positions
    w = writer(d / "scan.h5", phantom)
    counters = feed(live, phantom, range(n // 2))
    assert w.checkpoint(live.scan_result(counters))
    partial = d / "partial.h5"
    partial.write_bytes((d / "scan.h5").read_bytes())
    partial_state = {"memberships": live.engine.memberships_.copy(), "n_seen": live.n_seen,
                     "counters": json.loads(json.dumps(counters))}
    more = feed(live, phantom, range(n // 2, n))
    counters["batches"] += more["batches"]
    counters["positions_delivered"] += more["positions_delivered"]
    counters["join"]["joined"] += more["join"]["joined"]
    live.finish()
    truth = phantom.truth.labels
    path = w.finalize(live.scan_result(counters), extra={"ground_truth/labels": truth, "ground_truth/n_phases": 3})
    return {"path": path, "partial": partial, "partial_state": partial_state, "live": live,
            "counters": counters, "writer": w, "truth": truth}


def check_consistent(res: dict) -> None:
    """Invariants every results file holds, whatever its status."""
    a = res["attrs"]
    u = res["clustering"]["memberships"]
    n = a["n_positions"]
    assert u.shape[:2] == tuple(res["scan"]["attrs"]["scan_shape"]) and u.shape[0] * u.shape[1] == n
    seen = res["scan"]["seen"].reshape(-1)
    assert 0 <= a["positions_seen"] <= n and int(seen.sum()) == a["positions_seen"]
    finite = np.isfinite(u.reshape(n, -1))
    rows = finite.all(axis=1)
    assert np.array_equal(rows, finite.any(axis=1)), "a membership row is partly NaN"
    assert not (rows & ~seen).any(), "memberships for positions never seen"
    assert int(rows.sum()) == a["positions_clustered"] <= a["positions_seen"]
    np.testing.assert_allclose(u.reshape(n, -1)[rows].sum(axis=1), 1.0, atol=1e-4)
    lab = res["clustering"]["labels"].reshape(-1)
    assert np.array_equal(lab >= 0, rows)
    assert np.array_equal(lab[rows], np.argmax(u.reshape(n, -1)[rows], axis=1))
    assert res["counters"]["attrs"]["positions_seen"] == a["positions_seen"]
    assert validate_results(res) == []


def test_complete_file_holds_the_live_state(scanned, phantom):
    res = read_results(scanned["path"])
    live = scanned["live"]
    a = res["attrs"]
    assert a["status"] == "complete" and a["scan_id"] == "test-scan"
    assert a["positions_seen"] == phantom.n_positions == a["n_positions"]
    check_consistent(res)
    np.testing.assert_array_equal(res["clustering"]["memberships"],
                                  live.engine.memberships_.reshape(*SCAN, -1))
    np.testing.assert_array_equal(res["clustering"]["labels"].reshape(-1), live.engine.labels_)
    np.testing.assert_allclose(res["clustering"]["cluster_centers"], live.engine.cluster_centers_)
    assert res["clustering"]["attrs"]["n_components"] == live.engine.n_components_
    assert set(res["clustering"]["validity"]["attrs"]) == set(live.engine.validity_)
    cs = live.centres.centres()
    np.testing.assert_allclose(res["centres"]["eds"], cs.eds.astype(np.float32), equal_nan=True)
    np.testing.assert_allclose(res["centres"]["cbed"], cs.cbed.astype(np.float32), equal_nan=True)
    np.testing.assert_array_equal(res["centres"]["count"], cs.count)
    assert res["centres"]["fe_co_ratio"].shape == (len(THRESHOLDS), cs.eds.shape[1])
    assert np.isfinite(res["centres"]["fe_co_ratio"][cs.count > 0]).all()
    np.testing.assert_array_equal(res["scan"]["energy_axis_kev"], phantom.energy_axis_kev)
    np.testing.assert_array_equal(res["ground_truth"]["labels"], scanned["truth"])
    assert int(res["ground_truth"]["n_phases"]) == 3


def test_counters_config_versions_and_flags(scanned):
    res = read_results(scanned["path"])
    c = res["counters"]["attrs"]
    assert c["batches"] == scanned["counters"]["batches"]
    assert c["positions_delivered"] == scanned["counters"]["positions_delivered"] == 256
    assert c["join.joined"] == 256 and c["join.frames_without_spectrum"] == 0
    engine = scanned["live"].engine.stats_
    assert c["engine.refreshes"] == engine["refreshes"] and c["engine.positions"] == engine["positions"]
    assert "engine.seconds.pca" in c
    assert res["counters"]["parsed"]["ingest"]["join"]["joined"] == 256
    assert res["config"]["parsed"] == CONFIG
    assert res["config"]["attrs"]["scan.dwell_s"] == 0.0 and list(res["config"]["attrs"]["scan.shape"]) == [16, 16]
    v = res["versions"]["attrs"]
    for key in ("streamclust", "numpy", "numba", "h5py", "python"):
        assert isinstance(v[key], str) and v[key]
    summary = scanned["live"].flags_summary()
    assert res["flags"]["attrs"]["n_flags"] == len(summary) == len(res["flags"]["summary_parsed"])
    assert len(res["flags"]["log_parsed"]) == len(scanned["live"].flag_log)
    for row, s in zip(res["flags"]["summary_parsed"], summary):
        assert row["flag_id"] == s["flag_id"] and row["bbox"] == list(s["bbox"])
    assert res["flags"]["bbox"].shape == (len(summary), 4)


def test_checkpoint_is_a_complete_partial_file(scanned, phantom):
    res = read_results(scanned["partial"])
    st = scanned["partial_state"]
    assert res["attrs"]["status"] == "partial"
    assert res["attrs"]["positions_seen"] == st["n_seen"] == phantom.n_positions // 2
    check_consistent(res)
    np.testing.assert_array_equal(res["clustering"]["memberships"], st["memberships"].reshape(*SCAN, -1))
    assert res["counters"]["attrs"]["positions_delivered"] == st["counters"]["positions_delivered"]
    assert "ground_truth" not in res  # extras are final-only


def test_hyperspy_layout(scanned, phantom):
    with h5py.File(scanned["path"], "r") as f:
        assert f.attrs["file_format"] == "HyperSpy" and f.attrs["file_format_version"] == "3.1"
        exps = f["Experiments"]
        assert set(exps) == {"memberships", "labels", "centre_spectra", "centre_patterns"}
        for name, g in exps.items():
            data = g["data"]
            for i, size in enumerate(data.shape):
                ax = g[f"axis-{i}"].attrs
                assert int(ax["size"]) == size, (name, i)
                for key in ("name", "units", "navigate", "is_binned", "_type"):
                    assert key in ax, (name, i, key)
            assert f"axis-{data.ndim}" not in g
            assert g["metadata/General"].attrs["title"]
            assert g["metadata/Signal"].attrs["record_by"] in ("spectrum", "image")
            assert "original_metadata" in g
        # hard links: HyperSpy's view of the maps is the canonical data, not a copy
        assert exps["memberships/data"] == f["clustering/memberships"]
        assert exps["labels/data"] == f["clustering/labels"]
        # the centres: zero where empty (count 0 beside them), patterns in rosettasciio's orientation
        count = f["centres/count"][()]
        spectra, eds = exps["centre_spectra/data"][()], f["centres/eds"][()]
        assert not np.isnan(spectra).any()
        np.testing.assert_array_equal(spectra[count > 0], eds[count > 0])
        assert (spectra[count == 0] == 0).all()
        patterns, cbed = exps["centre_patterns/data"][()], f["centres/cbed"][()]
        np.testing.assert_array_equal(patterns[count > 0], np.flip(cbed, axis=-2)[count > 0])
        # every dataset HyperSpy reads is chunked (lazy loading needs it)
        assert all(g["data"].chunks is not None for g in exps.values())
        mem = exps["memberships"]
        assert [bool(mem[f"axis-{i}"].attrs["navigate"]) for i in range(3)] == [True, True, False]
        spec = exps["centre_spectra"]
        e = spec["axis-2"].attrs
        assert e["units"] == "keV" and bool(e["navigate"]) is False
        axis = e["offset"] + e["scale"] * np.arange(e["size"])
        np.testing.assert_allclose(axis, phantom.energy_axis_kev, atol=1e-9)
        thr = spec["axis-0"].attrs
        np.testing.assert_allclose(thr["offset"] + thr["scale"] * np.arange(thr["size"]), THRESHOLDS)
        assert spec["metadata/Signal"].attrs["signal_type"] == "EDS_TEM"


def test_checkpoint_rate_limit_and_force(tmp_path, phantom):
    live = make_live(phantom)
    feed(live, phantom, range(64))
    w = writer(tmp_path / "r.h5", phantom, checkpoint_every_s=3600.0)
    assert w.checkpoint(live.scan_result({})) is True
    assert w.checkpoint(live.scan_result({})) is False
    assert w.checkpoint(live.scan_result({}), force=True) is True
    assert w.n_checkpoints_ == 2 and w.last_write_["bytes"] == (tmp_path / "r.h5").stat().st_size
    assert read_results(tmp_path / "r.h5")["attrs"]["checkpoint"] == 2
    w.finalize(live.scan_result({}), status="partial")
    with pytest.raises(RuntimeError, match="finalised"):
        w.checkpoint(live.scan_result({}), force=True)


def test_before_the_first_position(tmp_path, phantom):
    live = make_live(phantom)
    w = writer(tmp_path / "empty.h5", phantom)
    w.finalize(live.scan_result({"merlin": {"frames_received": 0}}), status="aborted")
    res = read_results(tmp_path / "empty.h5")
    assert res["attrs"]["status"] == "aborted" and res["attrs"]["positions_seen"] == 0
    assert res["centres"]["attrs"]["available"] is False or res["centres"]["attrs"]["available"] == 0
    assert np.isnan(res["clustering"]["memberships"]).all()
    check_consistent(res)
    with h5py.File(tmp_path / "empty.h5", "r") as f:
        assert set(f["Experiments"]) == {"memberships", "labels"}


def test_a_failed_write_leaves_the_previous_file(tmp_path, phantom):
    live = make_live(phantom)
    feed(live, phantom, range(64))
    path = tmp_path / "r.h5"
    w = writer(path, phantom)
    w.checkpoint(live.scan_result({"batches": 2}), force=True)
    before = path.read_bytes()
    with pytest.raises(Exception):
        # "a" is a dataset, so "a/b" cannot be created: the write fails half-way through
        w.finalize(live.scan_result({"batches": 3}), extra={"a": np.zeros(3), "a/b": 1})
    assert path.read_bytes() == before
    assert read_results(path)["attrs"]["status"] == "partial"
    assert [p.name for p in tmp_path.iterdir()] == ["r.h5"]  # no temporary left


def test_validation(tmp_path, phantom):
    live = make_live(phantom)
    w = writer(tmp_path / "r.h5", phantom)
    with pytest.raises(ValueError, match="status"):
        w.finalize(live.scan_result({}), status="done")
    with pytest.raises(ValueError, match="clustering"):
        w.finalize(live.scan_result({}), extra={"clustering/memberships": np.zeros(3)})
    with pytest.raises(ValueError, match="scan_shape"):
        ResultsWriter(tmp_path / "x.h5", scan_shape=(8, 32), frame_shape=(512, 512),
                      energy_axis_kev=phantom.energy_axis_kev, n_clusters=4, thresholds=THRESHOLDS,
                      config={}, scan_id="x").checkpoint(live.scan_result({}))
    circular: dict = {}
    circular["self"] = circular
    with pytest.raises(ValueError, match="JSON"):
        writer(tmp_path / "y.h5", phantom, config=circular)
    with pytest.raises(FileNotFoundError):
        writer(tmp_path / "missing" / "r.h5", phantom)
    assert not (tmp_path / "r.h5").exists()


def test_stale_temporary_files_are_removed(tmp_path, phantom):
    stale = tmp_path / ".r.h5.12345.tmp"
    stale.write_bytes(b"half an HDF5 file")
    writer(tmp_path / "r.h5", phantom)
    assert not stale.exists()


def test_flatten_counters_keeps_every_value_attribute_ready():
    flat = flatten_counters({"merlin": {"dropped": {"truncated": 2}, "errors": [{"reason": "resync", "offset": 7}],
                                        "complete": False}, "empty": {}, "elapsed_s": np.float64(1.5)})
    assert flat["merlin.dropped.truncated"] == 2 and flat["merlin.complete"] is False
    assert json.loads(flat["merlin.errors"]) == [{"offset": 7, "reason": "resync"}]
    assert flat["empty"] == "{}" and type(flat["elapsed_s"]) is float


def test_validate_results_finds_broken_files(scanned, tmp_path):
    path = tmp_path / "broken.h5"
    path.write_bytes(scanned["partial"].read_bytes())
    assert validate_results(path) == []
    with h5py.File(path, "r+") as f:
        seen = f["scan/seen"][()]
        y, x = np.argwhere(~seen)[0]
        f["clustering/memberships"][y, x, :] = 1.0 / f["clustering/memberships"].shape[2]
        f.attrs["positions_seen"] = int(seen.sum()) + 1
    problems = validate_results(path)
    assert any("never seen" in p for p in problems)
    assert any("seen map holds" in p for p in problems)
    assert any("labels" in p for p in problems)


def _tem(path, name: str) -> dict:
    """``/Experiments/<name>/metadata/Acquisition_instrument/TEM`` as a flat dict (h5py only)."""
    out = {}
    with h5py.File(path, "r") as f:
        f[f"Experiments/{name}/metadata/Acquisition_instrument/TEM"].visititems(
            lambda key, obj: out.update({f"{key.replace('/', '.')}.{a}": v for a, v in obj.attrs.items()}))
        out.update(f[f"Experiments/{name}/metadata/Acquisition_instrument/TEM"].attrs)
    return out


def test_calibration_from_config_and_caller(tmp_path, phantom):
    live = make_live(phantom)
    feed(live, phantom, range(64))
    # nothing known: scan axes count positions, no beam energy (exspy would ask), pattern axes in pixels
    writer(tmp_path / "bare.hspy", phantom, config={}).finalize(live.scan_result({}))
    with h5py.File(tmp_path / "bare.hspy", "r") as f:
        assert f["Experiments/memberships/axis-0"].attrs["units"] == "position"
        ky = f["Experiments/centre_patterns/axis-2"].attrs
        assert ky["units"] == "px" and ky["scale"] == phantom.frame_shape[0] / f["centres/cbed"].shape[2]
        assert dict(f["instrument"].attrs) == {"pixel_size_um": 55.0}
    assert "beam_energy" not in _tem(tmp_path / "bare.hspy", "centre_spectra")
    # the configuration's [scan] and [instrument]; the caller's values win key by key; the camera
    # length gives mrad per pixel through the 55 um pixel
    cfg = {"scan": {"step_nm": 4.0}, "instrument": {"beam_energy_kev": 300.0, "dwell_s": "auto",
                                                    "camera_length_mm": 110.0, "mrad_per_px": "auto"}}
    writer(tmp_path / "cal.hspy", phantom, config=cfg, instrument={"dwell_s": 0.002, "beam_energy_kev": None},
           scan_step_nm=(2.0, 3.0)).finalize(live.scan_result({}))
    tem = _tem(tmp_path / "cal.hspy", "centre_patterns")
    assert tem["beam_energy"] == 300.0 and tem["dwell_time"] == 0.002 and tem["camera_length"] == 110.0
    assert tem["Detector.Diffraction.mrad_per_px"] == pytest.approx(55.0 / 110.0)
    with h5py.File(tmp_path / "cal.hspy", "r") as f:
        assert [f[f"Experiments/labels/axis-{i}"].attrs["scale"] for i in (0, 1)] == [2.0, 3.0]
        assert f["Experiments/labels/axis-0"].attrs["units"] == "nm"
        bin_y = phantom.frame_shape[0] / f["centres/cbed"].shape[2]
        assert f["Experiments/centre_patterns/axis-2"].attrs["scale"] == pytest.approx(0.5 * bin_y)
    assert _tem(tmp_path / "cal.hspy", "centre_spectra")["Detector.EDS.live_time"] == 0.002
    for bad in ({"beam_energy_kev": 0}, {"dwell_s": "fast"}, {"beam_energy": 200.0}):
        with pytest.raises(ValueError, match="instrument|beam_energy"):
            writer(tmp_path / "x.hspy", phantom, instrument=bad)
    with pytest.raises(ValueError, match="step_nm"):
        writer(tmp_path / "x.hspy", phantom, scan_step_nm=-1.0)


def test_the_old_name_and_a_folder_still_read(tmp_path, phantom):
    live = make_live(phantom)
    feed(live, phantom, range(64))
    writer(tmp_path / RESULTS_NAME, phantom).finalize(live.scan_result({}))
    assert find_results(tmp_path) == tmp_path / RESULTS_NAME
    # a caller still naming results.h5 reads results.hspy
    assert read_results(tmp_path / LEGACY_RESULTS_NAME)["attrs"]["scan_id"] == "test-scan"
    old = tmp_path / "old"
    old.mkdir()
    (old / LEGACY_RESULTS_NAME).write_bytes((tmp_path / RESULTS_NAME).read_bytes())
    assert find_results(old) == old / LEGACY_RESULTS_NAME
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="results.hspy"):
        find_results(tmp_path / "empty")


def test_the_writer_reads_a_scan_result_and_the_result_is_a_value(tmp_path, phantom):
    """The writer takes what a producer handed over and nothing else; a result taken mid-scan does
    not change when the analysis goes on (a checkpoint may be written while it does)."""
    live = make_live(phantom)
    w = writer(tmp_path / "r.hspy", phantom)
    with pytest.raises(TypeError, match="ScanResult"):
        w.checkpoint(live, force=True)
    feed(live, phantom, np.arange(96))
    r = live.scan_result({"batches": 3})
    assert r.n_clustered > 0 and not r.memberships.flags.writeable
    before = r.memberships.copy()
    feed(live, phantom, np.arange(96, phantom.n_positions))
    live.finish()
    np.testing.assert_array_equal(r.memberships, before)
    assert r.n_seen == 96 and live.scan_result().n_seen == phantom.n_positions
    w.finalize(r)
    got = read_results(tmp_path / "r.hspy")
    assert int(got["attrs"]["positions_seen"]) == 96
    np.testing.assert_array_equal(got["clustering"]["labels"].ravel(), r.labels)


def test_scan_result_refuses_what_does_not_fit_its_scan():
    with pytest.raises(ValueError, match="cover"):
        ScanResult(scan_shape=(2, 3), memberships=np.zeros((5, 2)), seen=np.zeros(6, bool))
    with pytest.raises(ValueError, match="seen"):
        ScanResult(scan_shape=(2, 3), memberships=np.zeros((6, 2)), seen=np.zeros(5, bool))
    with pytest.raises(ValueError, match="scan_shape"):
        ScanResult(scan_shape=(0, 3), memberships=np.zeros((0, 2)), seen=np.zeros(0, bool))

