"""The TOML configuration: defaults, round trip, and errors that name the key, the value and what is allowed."""

from __future__ import annotations

import inspect
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from streamclust.app.config import Config, ConfigError, EngineSection, FlagsSection, load_config

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


def test_engine_keys_are_streaming_engine_parameters_with_the_same_defaults():
    from streamclust.engine.streaming import StreamingEngine

    params = inspect.signature(StreamingEngine).parameters
    for f in fields(EngineSection):
        assert f.name in params, f.name
        if f.default not in ("auto",) and f.name != "random_state":
            default = params[f.name].default
            assert f.default == (tuple(default) if isinstance(default, (list, tuple)) else default), f.name


def test_flags_section_matches_the_flagger_signature_and_defaults():
    from streamclust.flags.flagger import SecondPhaseFlagger

    params = {k: p.default for k, p in inspect.signature(SecondPhaseFlagger).parameters.items()}
    assert {f.name: f.default for f in fields(FlagsSection)} == params


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
