"""One TOML configuration for everything streamclust runs: detector, EDS, scan, engine, flags, outputs.

The configuration is a tree of frozen dataclasses, one per TOML table, each field with a documented
default (:mod:`streamclust.params`). ``[engine]``, ``[centres]`` and ``[flags]`` are the components'
own parameter objects, declared next to their code (:class:`~streamclust.engine.params.EngineParams`,
:class:`~streamclust.engine.params.CentresParams`, :class:`~streamclust.flags.params.FlagParams`):
the engine and the flagger take them as they are, with the defaults written there once. :func:`load_config` reads a file (or a mapping), validates every value and rejects unknown
keys with a "did you mean" hint; :meth:`Config.to_toml` prints the effective configuration (what
``streamclust config --show`` shows). Every socket defaults to ``127.0.0.1``: nothing listens on, or
connects to, the instrument network unless a configuration says so.

A value of ``"auto"`` (where allowed) is resolved from the scan size when the scan starts, by
:meth:`EngineParams.for_scan` and :meth:`CentresParams.resolved_assess_every`.

Examples
--------
>>> cfg = load_config({"engine": {"n_clusters": 4}, "scan": {"shape": [32, 48]}})
>>> cfg.engine.n_clusters, cfg.scan.shape, cfg.detector.host
(4, (32, 48), '127.0.0.1')
>>> load_config({"engine": {"n_cluster": 4}})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
streamclust.app.config.ConfigError: [engine] unknown key 'n_cluster' (did you mean 'n_clusters'?); allowed: ...
>>> load_config({"engine": {"m": 0.5}})
Traceback (most recent call last):
...
streamclust.app.config.ConfigError: [engine] m = 0.5: must be a number > 1.0
>>> print(load_config({}).to_toml().splitlines()[0])
# streamclust configuration (effective values; defaults where not set)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - declared in pyproject for Python 3.10
    import tomli as tomllib

from streamclust.engine.params import CentresParams, EngineParams
from streamclust.flags.params import FlagParams
from streamclust.params import (AUTO, ParameterError, Params, boolean, choice, did_you_mean, endpoint, integer,
                                number, opt, optional_text, pair, positive_or_auto, text)

__all__ = [
    "ConfigError",
    "Config",
    "DetectorSection",
    "EDSSection",
    "ScanSection",
    "InstrumentSection",
    "EngineSection",
    "CentresSection",
    "FlagsSection",
    "EventsSection",
    "LiveViewSection",
    "ResultsSection",
    "LoggingSection",
    "load_config",
]

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value, key or file that is not allowed; the message names the key and value."""


# -------------------------------------------------------------------------------------------------
# sections
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DetectorSection(Params):
    """``[detector]``: the Merlin detector PC (data and control TCP ports)."""

    _section = "detector"

    host: str = opt("127.0.0.1", text, "Merlin PC address (data and control ports)")
    data_port: int = opt(6342, integer(1, 65535), "Merlin data port")
    control_port: int = opt(6341, integer(1, 65535), "Merlin control port")
    timeout: float = opt(10.0, number(0.0, lo_open=True),
                         "seconds of silence on a stream before the scan is declared incomplete")
    start_acquisition: bool = opt(False, boolean,
                                  "send CMD STARTACQUISITION on the control port once the data port is "
                                  "connected (false: the acquisition software starts the scan)")
    frame_shape: tuple = opt((512, 512), pair(integer(1)), "assembled frame shape [height, width]")


@dataclass(frozen=True)
class EDSSection(Params):
    """``[eds]``: the EDS spectrum stream (ZeroMQ, docs/wire-formats.md)."""

    _section = "eds"

    endpoint: str = opt("tcp://127.0.0.1:6343", endpoint, "EDS stream endpoint (connected to)")
    socket_type: str = opt("pull", choice("pull", "sub"),
                           '"pull" (lossless, PUSH sender) or "sub" (PUB sender, may drop)')
    channels: int = opt(2048, integer(2), "channels a spectrum has")
    energy_offset_kev: float = opt(0.0, number(), "centre of channel 0 (keV)")
    channel_width_kev: float = opt(0.01, number(0.0, lo_open=True), "channel width (keV)")


@dataclass(frozen=True)
class ScanSection(Params):
    """``[scan]``: the raster and how it is batched."""

    _section = "scan"

    shape: tuple = opt((64, 64), pair(integer(1)), "scan positions [rows, columns]")
    batch_size: int = opt(256, integer(1), "positions per joined batch (replay uses the same)")
    join_timeout_s: float = opt(2.0, number(0.0, lo_open=True),
                                "seconds an unpaired frame or spectrum waits for its partner")
    on_missing: str = opt("emit", choice("emit", "drop"),
                          "a half whose partner never comes: analyse it alone, or drop it (counted)")
    step_nm: float | str = opt(AUTO, positive_or_auto,
                               'scan step (nm) of the results\' scan axes; "auto": from the acquisition '
                               "header when it states one, else the axes count positions")


@dataclass(frozen=True)
class InstrumentSection(Params):
    """``[instrument]``: the microscope settings written into the results file's metadata (docs/results.md)."""

    _section = "instrument"

    beam_energy_kev: float = opt(200.0, number(0.0, lo_open=True),
                                 "accelerating voltage (kV); the simulator's 200 kV: set your microscope's")
    dwell_s: float | str = opt(AUTO, positive_or_auto,
                               'seconds a scan position; "auto": what the run knows (demo --dwell, the '
                               "acquisition), else not written")
    camera_length_mm: float | str = opt(AUTO, positive_or_auto,
                                        'camera length (mm); "auto": not written unless the run knows it')
    mrad_per_px: float | str = opt(AUTO, positive_or_auto,
                                   'detector pixel in mrad; "auto": pixel_size_um / camera_length_mm when '
                                   "the camera length is known, else the pattern axes count pixels")
    pixel_size_um: float = opt(55.0, number(0.0, lo_open=True), "detector pixel pitch (Medipix3: 55 um)")
    detector: str = opt("Merlin (Medipix3)", text, "diffraction detector name")
    eds_detector: str = opt("EDS", text, "EDS detector name")
    eds_resolution_mnka_ev: float = opt(130.0, number(0.0, lo_open=True),
                                        "EDS energy resolution at Mn K-alpha (eV), for exspy's line widths")


#: ``[engine]``, ``[centres]`` and ``[flags]`` are the components' own parameter objects (each
#: declared next to its component; the engine and the flagger take them as they are)
EngineSection = EngineParams
CentresSection = CentresParams
FlagsSection = FlagParams


@dataclass(frozen=True)
class EventsSection(Params):
    """``[events]``: where flag events go (docs/events.md)."""

    _section = "events"

    endpoint: str = opt("tcp://127.0.0.1:6344", endpoint,
                        "bind address of the event socket (the demo binds a free port unless set)")
    socket_type: str = opt("pub", choice("pub", "push"),
                           '"pub" for viewers (may drop), "push" for one lossless consumer')


@dataclass(frozen=True)
class LiveViewSection(Params):
    """``[liveview]``: the membership map served over HTTP while the scan runs (docs/liveview.md)."""

    _section = "liveview"

    enabled: bool = opt(False, boolean, "serve the live view (also --live)")
    host: str = opt("127.0.0.1", text, "address to bind")
    port: int = opt(0, integer(0, 65535), "0 picks a free port (the URL is printed)")
    followup_endpoint: str = opt("", optional_text, "the microscope's follow-up endpoint the page's follow-up button "
                                 "sends to (also --followup); empty: no follow-up control")
    followup_dwell_s: float = opt(0.1, number(0.0, lo_open=True), "dwell a follow-up acquisition asks for, "
                                  "seconds a position (also --followup-dwell)")
    action_token: str = opt("", optional_text, "token the page's actions need off loopback (also "
                            "$STREAMCLUST_ACTION_TOKEN); empty: made per scan when bound off loopback")


@dataclass(frozen=True)
class ResultsSection(Params):
    """``[results]``: the output folder and crash-safe checkpoints."""

    _section = "results"

    out_dir: str = opt("out/run", text, "folder of results.hspy, pictures and summary.json")
    checkpoint_every_s: float = opt(10.0, number(0.0, lo_open=True),
                                    "seconds between checkpoints of results.hspy during a scan")
    pictures: bool = opt(True, boolean, "draw the pictures (docs/results.md) at the end of the scan")


@dataclass(frozen=True)
class LoggingSection(Params):
    """``[logging]``: log level (-v / -vv on the command line raise it) and the progress display."""

    _section = "logging"

    level: str = opt("warning", choice("debug", "info", "warning", "error"), "log level")
    progress_every_s: float = opt(5.0, number(0.0, lo_open=True),
                                  "seconds between progress lines when stderr is not a terminal")


_SECTIONS: dict[str, type] = {
    "detector": DetectorSection,
    "eds": EDSSection,
    "scan": ScanSection,
    "instrument": InstrumentSection,
    "engine": EngineParams,
    "centres": CentresParams,
    "flags": FlagParams,
    "events": EventsSection,
    "liveview": LiveViewSection,
    "results": ResultsSection,
    "logging": LoggingSection,
}


@dataclass(frozen=True)
class Config:
    """The whole configuration: one attribute per TOML table.

    ``explicit`` holds the dotted keys the user set (``"events.endpoint"``...), so a command can
    tell a default from a choice (the demo binds its event socket on a free port unless told).
    ``source`` is the file it came from, if any.
    """

    detector: DetectorSection = field(default_factory=DetectorSection)
    eds: EDSSection = field(default_factory=EDSSection)
    scan: ScanSection = field(default_factory=ScanSection)
    instrument: InstrumentSection = field(default_factory=InstrumentSection)
    engine: EngineParams = field(default_factory=EngineParams)
    centres: CentresParams = field(default_factory=CentresParams)
    flags: FlagParams = field(default_factory=FlagParams)
    events: EventsSection = field(default_factory=EventsSection)
    liveview: LiveViewSection = field(default_factory=LiveViewSection)
    results: ResultsSection = field(default_factory=ResultsSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    explicit: frozenset = field(default=frozenset(), compare=False)
    source: str | None = field(default=None, compare=False)

    def override(self, section: str, **values: Any) -> Config:
        """A copy with ``values`` set in ``section`` (validated like file values; None = leave as is)."""
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return self
        merged = self.as_dict()
        merged[section].update(values)
        new = load_config(merged)
        return dataclasses.replace(new, explicit=self.explicit | {f"{section}.{k}" for k in values},
                                   source=self.source)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """``{section: {key: value}}`` with tuples as lists (JSON- and TOML-ready)."""
        out = {}
        for name in _SECTIONS:
            sec = getattr(self, name)
            out[name] = {f.name: (list(v) if isinstance(v := getattr(sec, f.name), tuple) else v)
                         for f in sec.toml_fields()}
        return out

    def to_toml(self, *, comments: bool = True) -> str:
        """The effective configuration as TOML (loads back to an equal :class:`Config`)."""
        lines = ["# streamclust configuration (effective values; defaults where not set)"]
        if self.source:
            lines.append(f"# read from {self.source}")
        for name, cls in _SECTIONS.items():
            sec = getattr(self, name)
            lines.append("")
            if comments:
                lines.append("# " + cls.__doc__.splitlines()[0].replace("``", ""))
            lines.append(f"[{name}]")
            for f in sec.toml_fields():
                value = _toml_value(getattr(sec, f.name))
                doc = f"  # {f.metadata['doc']}" if comments else ""
                lines.append(f"{f.name} = {value}{doc}")
        return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, int):
        return str(v)
    return json.dumps(str(v))  # a TOML basic string is a JSON string for our values


def _build_section(name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{name}] must be a table of keys, got {values!r}")
    known = {f.name: f for f in cls.toml_fields()}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"[{name}] unknown key {key!r}{did_you_mean(key, known)}; "
                              f"allowed: {', '.join(known)}")
        try:
            kwargs[key] = known[key].metadata["check"](value)
        except ValueError as exc:
            shown = _toml_value(value) if _simple(value) else repr(value)
            raise ConfigError(f"[{name}] {key} = {shown}: {exc}") from None
    try:
        return cls(**kwargs)
    except ParameterError as exc:  # every key was checked above; a component's own check still reads as the file's
        raise ConfigError(str(exc)) from None


def _simple(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str, list, tuple))


def _cross_checks(cfg: Config) -> None:
    n = cfg.scan.shape[0] * cfg.scan.shape[1]
    e = cfg.engine
    if e.warmup_positions != AUTO and e.warmup_positions < e.n_clusters:
        raise ConfigError(f"[engine] warmup_positions = {e.warmup_positions}: must be at least "
                          f"n_clusters ({e.n_clusters})")
    if e.warmup_positions != AUTO and "scan.shape" in cfg.explicit and e.warmup_positions > n:
        raise ConfigError(f"[engine] warmup_positions = {e.warmup_positions}: must be at most the scan's "
                          f"{n} positions ([scan] shape = {list(cfg.scan.shape)})")
    if cfg.flags.min_fraction >= cfg.flags.max_fraction:
        raise ConfigError(f"[flags] min_fraction = {cfg.flags.min_fraction}: must be below max_fraction "
                          f"({cfg.flags.max_fraction})")
    if e.max_components > e.basis_rank:
        raise ConfigError(f"[engine] max_components = {e.max_components}: must be at most basis_rank "
                          f"({e.basis_rank})")


def load_config(source: str | Path | Mapping | None = None) -> Config:
    """Read and validate a configuration.

    Parameters
    ----------
    source : path, mapping or None
        A TOML file, an already parsed mapping (``{"engine": {"n_clusters": 4}}``), or None for the
        defaults. Every table and key is optional.

    Raises
    ------
    ConfigError
        Unreadable or malformed TOML (with the file name and TOML's line and column), an unknown
        table or key (with the closest known name), a value of the wrong type or range (naming the
        table, key, value and what is allowed).
    """
    origin = None
    if source is None:
        data: Mapping = {}
    elif isinstance(source, Mapping):
        data = source
    else:
        origin = str(source)
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"configuration file {origin} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"configuration file {origin} cannot be read: {exc}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {origin} is not valid TOML: {exc}") from None
    sections = {}
    explicit = set()
    for name, values in data.items():
        if name not in _SECTIONS:
            raise ConfigError(f"unknown table [{name}]{did_you_mean(name, _SECTIONS)}; "
                              f"allowed: {', '.join(f'[{s}]' for s in _SECTIONS)}")
        sections[name] = _build_section(name, _SECTIONS[name], values)
        explicit.update(f"{name}.{k}" for k in values)
    cfg = Config(**sections, explicit=frozenset(explicit), source=origin)
    _cross_checks(cfg)
    return cfg
