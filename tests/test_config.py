"""The TOML configuration: defaults, round trip, and errors that name the key, the value and what is allowed."""

from __future__ import annotations

import inspect
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from streamclust.app.config import Config, ConfigError, EngineSection, FlagsSection, load_config
from streamclust.engine.params import CentresParams, EngineParams
from streamclust.flags.params import FlagParams

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_loopback_and_round_trip_through_toml():
    cfg = load_config()
    assert cfg.detector.host == "127.0.0.1" and cfg.liveview.host == "127.0.0.1"
    for endpoint in (cfg.eds.endpoint, cfg.events.endpoint):
        assert endpoint.startswith("tcp://127.0.0.1:")
    text = cfg.to_toml()
    again = load_config(tomllib.loads(text))
    assert again == cfg
    assert load_config(tomllib.loads(cfg.to_toml(comments=False))) == cfg


def test_file_values_are_read_and_marked_explicit(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[engine]\nn_clusters = 4\nwarmup_positions = 300\n[scan]\nshape = [20, 30]\n'
                    '[events]\nendpoint = "tcp://127.0.0.1:7000"\nsocket_type = "push"\n')
    cfg = load_config(path)
    assert cfg.engine.n_clusters == 4 and cfg.scan.shape == (20, 30)
    assert cfg.events.socket_type == "push"
    assert {"engine.n_clusters", "scan.shape", "events.endpoint"} <= cfg.explicit
    assert "engine.m" not in cfg.explicit
    assert cfg.source == str(path)
    shown = cfg.to_toml()
    assert "n_clusters = 4" in shown and "shape = [20, 30]" in shown


@pytest.mark.parametrize("data, message", [
    ({"engine": {"n_cluster": 4}}, "[engine] unknown key 'n_cluster' (did you mean 'n_clusters'?)"),
    ({"engnie": {}}, "unknown table [engnie] (did you mean 'engine'?)"),
    ({"engine": {"n_clusters": 1}}, "[engine] n_clusters = 1: must be an integer >= 2"),
    ({"engine": {"n_clusters": "six"}}, '[engine] n_clusters = "six": must be an integer >= 2'),
    ({"engine": {"n_clusters": True}}, "[engine] n_clusters = true: must be an integer >= 2"),
    ({"engine": {"m": 1.0}}, "[engine] m = 1.0: must be a number > 1.0"),
    ({"engine": {"warmup_positions": "soon"}}, '[engine] warmup_positions = "soon": must be an integer >= 2 or "auto"'),
    ({"engine": {"pca_method": "svd"}}, '[engine] pca_method = "svd": must be one of "sketch", "exact"'),
    ({"engine": {"energy_window_kev": [10.0, 0.2]}}, "[engine] energy_window_kev = [10.0, 0.2]: must be [low, high]"),
    ({"engine": {"host_clusters": 1}}, "[engine] host_clusters = 1: must be 0 (off) or an integer >= 2"),
    ({"detector": {"data_port": 70000}}, "[detector] data_port = 70000: must be an integer in 1..65535"),
    ({"eds": {"endpoint": "127.0.0.1:6343"}}, '[eds] endpoint = "127.0.0.1:6343": must be a ZeroMQ endpoint'),
    ({"eds": {"socket_type": "sub2"}}, '[eds] socket_type = "sub2": must be one of "pull", "sub"'),
    ({"scan": {"shape": [64]}}, "[scan] shape = [64]: must be a list of two values"),
    ({"scan": {"shape": [64, 0]}}, "[scan] shape = [64, 0]: must be a list of two values, each must be an integer >= 1"),
    ({"centres": {"thresholds": [0.5, 1.0]}}, "[centres] thresholds = [0.5, 1.0]: must be a non-empty list"),
    ({"liveview": {"enabled": "yes"}}, '[liveview] enabled = "yes": must be true or false'),
    ({"logging": {"level": "loud"}}, '[logging] level = "loud": must be one of "debug", "info", "warning", "error"'),
    ({"flags": {"min_fraction": 0.3}}, "[flags] min_fraction = 0.3: must be below max_fraction (0.25)"),
    ({"engine": {"n_clusters": 6, "warmup_positions": 4}}, "[engine] warmup_positions = 4: must be at least n_clusters (6)"),
    ({"engine": {"warmup_positions": 600}, "scan": {"shape": [16, 16]}},
     "[engine] warmup_positions = 600: must be at most the scan's 256 positions"),
    ({"engine": 3}, "[engine] must be a table of keys"),
    ({"scan": {"step_nm": 0}}, '[scan] step_nm = 0: must be a number > 0 or "auto"'),
    ({"scan": {"step_nm": "fine"}}, '[scan] step_nm = "fine": must be a number > 0 or "auto"'),
    ({"instrument": {"beam_energy_kev": -200}}, "[instrument] beam_energy_kev = -200: must be a number > 0.0"),
    ({"instrument": {"mrad_per_px": "0.15"}}, '[instrument] mrad_per_px = "0.15": must be a number > 0 or "auto"'),
])
def test_errors_name_key_value_and_what_is_allowed(data, message):
    with pytest.raises(ConfigError) as info:
        load_config(data)
    assert message in str(info.value)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[engine]\nn_clusters = \n")
    with pytest.raises(ConfigError, match=r"bad\.toml is not valid TOML.*line 2"):
        load_config(bad)


def test_auto_values_resolve_from_the_scan_size():
    e = load_config().engine
    kw = e.resolved(64 * 64)
    assert kw["warmup_positions"] == 512 and kw["refresh_every"] == 256
    kw = e.resolved(256 * 256)
    # a count, not a fraction of the scan: the geometric refresh_growth bounds the cost instead
    assert kw["warmup_positions"] == 512 and kw["refresh_every"] == 256 and kw["refresh_growth"] == 0.25
    assert e.resolved(16)["warmup_positions"] == e.n_clusters  # never below the cluster count
    assert load_config().centres.resolved_assess_every(64 * 64) == 128
    fixed = load_config({"engine": {"refresh_every": 1000}}).engine.resolved(4096)
    assert fixed["refresh_every"] == 1000


def test_the_engine_section_is_the_engine_s_own_parameters():
    """One source: ``[engine]`` is the engine's parameter object, the engine takes it as it is and
    its signature carries no second copy of a default."""
    from streamclust.engine.streaming import StreamingEngine

    cfg = load_config({"engine": {"n_clusters": 3, "host_clusters": 0, "bin_factor": 4}})
    assert type(cfg.engine) is EngineParams is EngineSection
    eng = StreamingEngine(64 * 64, cfg.engine, frame_shape=(16, 16), n_channels=64)
    assert eng.params == cfg.engine.for_scan(64 * 64)
    assert (eng.n_clusters, eng.host_clusters, eng.warmup_positions, eng.refresh_every) == (3, 0, 512, 256)
    # keyword overrides of the same object, checked as the file's values are
    eng = StreamingEngine(64 * 64, cfg.engine, frame_shape=(16, 16), n_channels=64, n_clusters=4)
    assert eng.n_clusters == eng.params.n_clusters == 4 and eng.bin_factor == 4
    with pytest.raises(ValueError, match=r"\[engine\] m = 0.5: must be a number > 1.0"):
        StreamingEngine(100, m=0.5)
    with pytest.raises(TypeError, match="did you mean 'n_clusters'"):
        StreamingEngine(100, n_cluster=3)
    names = {f.name for f in fields(EngineParams)}
    assert not names & set(inspect.signature(StreamingEngine).parameters)
    # every [engine] key is a field, and every field the configuration leaves out is the Python API's
    assert set(cfg.as_dict()["engine"]) == {f.name for f in EngineParams.toml_fields()} < names


def test_the_flags_section_is_the_flagger_s_own_parameters():
    from streamclust.flags.flagger import SecondPhaseFlagger

    cfg = load_config({"flags": {"min_positions": 5, "method": "test"}})
    assert type(cfg.flags) is FlagParams is FlagsSection
    flagger = SecondPhaseFlagger(cfg.flags)
    assert flagger.params == cfg.flags and (flagger.min_positions, flagger.method) == (5, "test")
    assert SecondPhaseFlagger(cfg.flags, min_positions=6).min_positions == 6
    assert SecondPhaseFlagger().params == FlagParams()
    assert not {f.name for f in fields(FlagParams)} & set(inspect.signature(SecondPhaseFlagger).parameters)
    with pytest.raises(ValueError, match=r"\[flags\] hysteresis = 0.0"):
        SecondPhaseFlagger(hysteresis=0.0)


def test_the_dask_replay_takes_its_defaults_from_the_components():
    dask_replay = pytest.importorskip("streamclust.distributed.dask_replay")
    rc = dask_replay.ReplayConfig()
    engine, centres = EngineParams(), CentresParams()
    shared = {f.name for f in fields(rc)} & {f.name for f in fields(engine)} - {"pca_method", "sketch_rank"}
    assert {"n_clusters", "m", "host_clusters", "final_pca_sample", "random_state"} <= shared
    for name in shared:
        assert getattr(rc, name) == getattr(engine, name), name
    assert rc.thresholds == centres.thresholds and rc.flag_params == FlagParams()
    with pytest.raises(ValueError, match=r"\[engine\] host_clusters = 1"):
        dask_replay.ReplayConfig(host_clusters=1).validate()
    # built from the components' objects, it is what `streamclust replay --dask` maps key by key
    from streamclust.app.replay import dask_config

    cfg = load_config({"engine": {"n_clusters": 4, "m": 1.4, "host_clusters": 0}, "centres": {"thresholds": [0.6]},
                       "flags": {"min_positions": 5}})
    built = dask_replay.ReplayConfig.from_params(cfg.engine, cfg.centres, cfg.flags)
    assert built == dask_replay.ReplayConfig.from_any(dask_config(cfg))
    assert (built.n_clusters, built.thresholds, built.flag_params.min_positions) == (4, (0.6,), 5)


def test_override_validates_and_marks_explicit():
    cfg = load_config().override("engine", n_clusters=3, m=None)
    assert cfg.engine.n_clusters == 3 and "engine.n_clusters" in cfg.explicit and "engine.m" not in cfg.explicit
    with pytest.raises(ConfigError, match=r"\[engine\] n_clusters = 1"):
        load_config().override("engine", n_clusters=1)


def test_example_file_is_valid_and_documents_every_key():
    example = ROOT / "examples" / "streamclust.toml"
    cfg = load_config(example)
    text = example.read_text()
    for section, values in Config().as_dict().items():
        assert f"[{section}]" in text, section
        for key in values:
            assert f"{key} =" in text, f"{section}.{key}"
    assert cfg.detector.host == "127.0.0.1"


def test_calibration_values_round_trip_and_reach_the_results_writer():
    cfg = load_config({"scan": {"step_nm": 2}, "instrument": {"camera_length_mm": 110, "beam_energy_kev": 300}})
    assert cfg.scan.step_nm == 2.0 and cfg.instrument.camera_length_mm == 110.0
    assert cfg.instrument.mrad_per_px == "auto" and cfg.instrument.dwell_s == "auto"
    assert load_config(tomllib.loads(cfg.to_toml())) == cfg
    from streamclust.results.writer import _calibration

    cal = _calibration(cfg.as_dict(), None, None)  # what ResultsWriter states from config.as_dict()
    assert cal["step_nm"] == (2.0, 2.0) and cal["beam_energy_kev"] == 300.0
    assert cal["mrad_per_px"] == pytest.approx(55.0 / 110.0) and "dwell_s" not in cal
