"""One TOML configuration for everything streamclust runs: detector, EDS, scan, engine, flags, outputs.

The configuration is a tree of frozen dataclasses, one per TOML table, each field with a documented
default. :func:`load_config` reads a file (or a mapping), validates every value and rejects unknown
keys with a "did you mean" hint; :meth:`Config.to_toml` prints the effective configuration (what
``streamclust config --show`` shows). Every socket defaults to ``127.0.0.1``: nothing listens on, or
connects to, the instrument network unless a configuration says so.

A value of ``"auto"`` (where allowed) is resolved from the scan size when the scan starts, by
:meth:`EngineSection.resolved` and :meth:`CentresSection.resolved_assess_every`.

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
import difflib
import json
import logging
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - declared in pyproject for Python 3.10
    import tomli as tomllib

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

AUTO = "auto"

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value, key or file that is not allowed; the message names the key and value."""


# -------------------------------------------------------------------------------------------------
# value checks: each returns the normalised value or raises ValueError("must be ...")
# -------------------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(lo: int | None = None, hi: int | None = None, auto: bool = False) -> Callable:
    def check(v):
        if auto and v == AUTO:
            return v
        if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = (f" >= {lo}" if hi is None else f" in {lo}..{hi}") if lo is not None else ""
            raise ValueError(f"must be an integer{rng}" + (' or "auto"' if auto else ""))
        return v
    return check


def _float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Callable:
    def check(v):
        ok = (_is_int(v) or isinstance(v, float)) and math.isfinite(v)
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v < hi if hi_open else v <= hi
        if not ok:
            parts = []
            if lo is not None:
                parts.append(f"{'>' if lo_open else '>='} {lo}")
            if hi is not None:
                parts.append(f"{'<' if hi_open else '<='} {hi}")
            raise ValueError("must be a number" + (" " + " and ".join(parts) if parts else ""))
        return float(v)
    return check


def _choice(*choices: str) -> Callable:
    def check(v):
        if v not in choices:
            raise ValueError("must be one of " + ", ".join(f'"{c}"' for c in choices))
        return v
    return check


def _elements(v):
    from streamclust.flags.stats import LINES_KEV

    if isinstance(v, str) or not isinstance(v, (list, tuple)) or len(v) < 2:
        raise ValueError("must be a list of at least two element symbols, e.g. [\"Fe\", \"Co\"]")
    unknown = [e for e in v if e not in LINES_KEV]
    if unknown:
        raise ValueError(f"unknown element(s) {unknown}; known: {sorted(LINES_KEV)}")
    return tuple(v)


def _bool(v):
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def _text(v):
    if not isinstance(v, str) or not v:
        raise ValueError("must be a non-empty string")
    return v


def _optional_text(v):
    # an empty string means "not set" (TOML has no null)
    if not isinstance(v, str):
        raise ValueError("must be a string (empty: not set)")
    return v


def _endpoint(v):
    if not isinstance(v, str) or not v.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError('must be a ZeroMQ endpoint such as "tcp://127.0.0.1:6343"')
    return v


def _pair(item: Callable) -> Callable:
    def check(v):
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise ValueError("must be a list of two values")
        try:
            return tuple(item(x) for x in v)
        except ValueError as exc:
            raise ValueError(f"must be a list of two values, each {exc}") from None
    return check


def _window(v):
    lo, hi = _pair(_float(0.0))(v)
    if not lo < hi:
        raise ValueError("must be [low, high] keV with low < high")
    return (lo, hi)


def _thresholds(v):
    if not isinstance(v, (list, tuple)) or not v:
        raise ValueError("must be a non-empty list of membership thresholds in [0, 1)")
    try:
        out = tuple(_float(0.0, 1.0, hi_open=True)(x) for x in v)
    except ValueError:
        raise ValueError("must be a non-empty list of membership thresholds in [0, 1)") from None
    return out


def _positive_or_auto(v):
    if v == AUTO:
        return v
    try:
        return _float(0.0, lo_open=True)(v)
    except ValueError:
        raise ValueError('must be a number > 0 or "auto"') from None


def _host_clusters(v):
    if not _is_int(v) or v < 0 or v == 1:
        raise ValueError("must be 0 (off) or an integer >= 2")
    return v


def _opt(default: Any, check: Callable, doc: str) -> Any:
    return field(default=default, metadata={"check": check, "doc": doc})


# -------------------------------------------------------------------------------------------------
# sections
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DetectorSection:
    """``[detector]``: the Merlin detector PC (data and control TCP ports)."""

    host: str = _opt("127.0.0.1", _text, "Merlin PC address (data and control ports)")
    data_port: int = _opt(6342, _int(1, 65535), "Merlin data port")
    control_port: int = _opt(6341, _int(1, 65535), "Merlin control port")
    timeout: float = _opt(10.0, _float(0.0, lo_open=True),
                          "seconds of silence on a stream before the scan is declared incomplete")
    start_acquisition: bool = _opt(False, _bool,
                                   "send CMD STARTACQUISITION on the control port once the data port is "
                                   "connected (false: the acquisition software starts the scan)")
    frame_shape: tuple = _opt((512, 512), _pair(_int(1)), "assembled frame shape [height, width]")


@dataclass(frozen=True)
class EDSSection:
    """``[eds]``: the EDS spectrum stream (ZeroMQ, docs/wire-formats.md)."""

    endpoint: str = _opt("tcp://127.0.0.1:6343", _endpoint, "EDS stream endpoint (connected to)")
    socket_type: str = _opt("pull", _choice("pull", "sub"),
                            '"pull" (lossless, PUSH sender) or "sub" (PUB sender, may drop)')
    channels: int = _opt(2048, _int(2), "channels a spectrum has")
    energy_offset_kev: float = _opt(0.0, _float(), "centre of channel 0 (keV)")
    channel_width_kev: float = _opt(0.01, _float(0.0, lo_open=True), "channel width (keV)")


@dataclass(frozen=True)
class ScanSection:
    """``[scan]``: the raster and how it is batched."""

    shape: tuple = _opt((64, 64), _pair(_int(1)), "scan positions [rows, columns]")
    batch_size: int = _opt(256, _int(1), "positions per joined batch (replay uses the same)")
    join_timeout_s: float = _opt(2.0, _float(0.0, lo_open=True),
                                 "seconds an unpaired frame or spectrum waits for its partner")
    on_missing: str = _opt("emit", _choice("emit", "drop"),
                           "a half whose partner never comes: analyse it alone, or drop it (counted)")
    step_nm: float | str = _opt(AUTO, _positive_or_auto,
                                'scan step (nm) of the results\' scan axes; "auto": from the acquisition '
                                "header when it states one, else the axes count positions")


@dataclass(frozen=True)
class InstrumentSection:
    """``[instrument]``: the microscope settings written into the results file's metadata (docs/results.md)."""

    beam_energy_kev: float = _opt(200.0, _float(0.0, lo_open=True),
                                  "accelerating voltage (kV); the simulator's 200 kV: set your microscope's")
    dwell_s: float | str = _opt(AUTO, _positive_or_auto,
                                'seconds a scan position; "auto": what the run knows (demo --dwell, the '
                                "acquisition), else not written")
    camera_length_mm: float | str = _opt(AUTO, _positive_or_auto,
                                         'camera length (mm); "auto": not written unless the run knows it')
    mrad_per_px: float | str = _opt(AUTO, _positive_or_auto,
                                    'detector pixel in mrad; "auto": pixel_size_um / camera_length_mm when '
                                    "the camera length is known, else the pattern axes count pixels")
    pixel_size_um: float = _opt(55.0, _float(0.0, lo_open=True), "detector pixel pitch (Medipix3: 55 um)")
    detector: str = _opt("Merlin (Medipix3)", _text, "diffraction detector name")
    eds_detector: str = _opt("EDS", _text, "EDS detector name")
    eds_resolution_mnka_ev: float = _opt(130.0, _float(0.0, lo_open=True),
                                         "EDS energy resolution at Mn K-alpha (eV), for exspy's line widths")


@dataclass(frozen=True)
class EngineSection:
    """``[engine]``: the streaming engine parameters a user tunes (docs/engine.md)."""

    n_clusters: int = _opt(6, _int(2), "fuzzy clusters")
    m: float = _opt(1.2, _float(1.0, lo_open=True), "FCM fuzzifier (docs/fcm.md)")
    bin_factor: int = _opt(8, _int(1), "frame sum-binning (512 x 512 -> 64 x 64 at 8)")
    energy_window_kev: tuple = _opt((0.2, 10.0), _window, "EDS energy window [low, high] keV")
    rebin: int = _opt(2, _int(1), "EDS channels summed into one feature")
    warmup_positions: int | str = _opt(AUTO, _int(2, auto=True),
                                       '"auto": min(512, positions / 4)')
    refresh_every: int | str = _opt(AUTO, _int(1, auto=True),
                                    'fewest positions between refreshes; "auto": 256')
    refresh_growth: float = _opt(0.25, _float(0.0), "a refresh also waits until the positions seen grew by "
                                                      "this fraction (amortised O(1) a position; 0: off)")
    max_components: int = _opt(20, _int(1), "cap of the explained-variance rule")
    min_explained_ratio: float = _opt(0.01, _float(0.0, 1.0, lo_open=True, hi_open=True),
                                      "the 1 % rule")
    basis_rank: int = _opt(128, _int(2), "coordinates kept per position (and PCA sketch rank)")
    pca_method: str = _opt("sketch", _choice("sketch", "exact"), "StreamingPCA accumulator")
    store: str = _opt("auto", _choice("auto", "counts", "full", "basis"),
                      "per-position representation (docs/engine.md)")
    final_n_init: int = _opt(10, _int(1), "k-means++ restarts of the final re-fit")
    final_pca_sample: int = _opt(8192, _int(0), "stored positions the final PCA read-out is taken from "
                                                 "(0: the streaming sketch's)")
    drift_threshold: float = _opt(20.0, _float(0.0), "Page-Hinkley threshold of the new-material test that "
                                                     "refreshes early (0: off)")
    drift_min_gap: int = _opt(256, _int(1), "positions after a refresh before a drift may trigger another")
    host_clusters: int = _opt(6, _host_clusters,
                              "sub-clusters of the host phase (0: single level; docs/host-refinement.md)")
    host_threshold: float = _opt(0.9, _float(0.0, 1.0, lo_open=True, hi_open=True),
                                 "host membership a position needs to shape the level-2 space")
    host_min_positions: int = _opt(256, _int(1), "host positions needed before the level-2 model is built")
    host_sample_size: int = _opt(4096, _int(16), "host positions the level-2 statistics and PCA use")
    host_min_components: int = _opt(5, _int(1), "floor of the 1 % rule at level 2")
    host_refit_growth: float = _opt(0.5, _float(0.0), "host growth that re-fits the level-2 space")
    host_overlap: float = _opt(0.1, _float(0.0, 1.0), "level-1 clusters sharing this fuzzy overlap of positions "
                                                      "with the host join it (a film split by thickness)")
    host_mixing: float = _opt(0.5, _float(0.0, 1.0), "level-1 clusters intermixed with the host position by position "
                                                      "(this fraction of each touches the other) join it; 0: off")
    host_merge_effect: float = _opt(0.05, _float(0.0, 0.99), "level-2 clusters whose element-line shares differ "
                                                              "by less than this (or not significantly) are one "
                                                              "composition, shown as one region; 0: off")
    host_merge_elements: tuple = _opt(("Fe", "Co"), _elements, "the K-alpha lines the merge compares")
    host_spatial: bool = _opt(True, _bool, "the final level-2 memberships weighted by their 3 x 3 neighbourhood's "
                                           "(spatial fuzzy C-means step); needs the scan shape")
    host_pooling: bool = _opt(True, _bool, "live level-2 clustering on 3 x 3 neighbourhood means (the final "
                                           "one per position); needs the scan shape")
    spill: str = _opt("auto", _text, "where the position store lives: auto (a temporary file when larger than "
                                     "256 MiB), off (RAM), or a folder")
    kernel_threads: int = _opt(1, _int(0), "threads of the engine's Numba kernels (0: one per core); 1 leaves "
                                           "the other core to the receiver")
    random_state: int = _opt(0, _int(0), "seed of every random choice (same seed, same result)")

    def resolved(self, n_positions: int) -> dict:
        """The :class:`~streamclust.engine.streaming.StreamingEngine` keyword arguments for a scan of ``n_positions``."""
        n = int(n_positions)
        kw = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "n_clusters"}
        if kw["warmup_positions"] == AUTO:
            kw["warmup_positions"] = max(int(self.n_clusters), min(512, n // 4))
        if kw["refresh_every"] == AUTO:
            # refreshes are where a new phase gets its cluster: every 256 positions early in a scan
            # (docs/events.md: flag timing; 512 flagged 3 of 9 phantoms late or never), then at
            # refresh_growth steps of the positions seen, whatever the scan size (a fraction of the
            # scan, n / 16, made 22 refreshes cost 44 s of a 256 x 256 scan's 131 s)
            kw["refresh_every"] = 256
        kw["energy_window_kev"] = tuple(kw["energy_window_kev"])
        # a key the installed engine does not know (an older engine) is left out, with a warning
        import inspect

        from streamclust.engine.streaming import StreamingEngine

        accepted = inspect.signature(StreamingEngine).parameters
        for key in [k for k in kw if k not in accepted]:
            logger.warning("[engine] %s is not a parameter of this StreamingEngine; ignored", key)
            del kw[key]
        return kw


@dataclass(frozen=True)
class CentresSection:
    """``[centres]``: thresholded cluster-centre signals and how often flags are assessed."""

    thresholds: tuple = _opt((0.5, 0.75), _thresholds, "membership thresholds of the centre signals")
    assess_every: int | str = _opt(AUTO, _int(1, auto=True),
                                   'positions between flag assessments without a refresh; '
                                   '"auto": max(128, positions / 32)')

    def resolved_assess_every(self, n_positions: int) -> int:
        return max(128, int(n_positions) // 32) if self.assess_every == AUTO else int(self.assess_every)


@dataclass(frozen=True)
class FlagsSection:
    """``[flags]``: :class:`~streamclust.flags.flagger.SecondPhaseFlagger` parameters (docs/events.md)."""

    min_fraction: float = _opt(0.002, _float(0.0, 1.0), "smallest cluster fraction of the scanned positions")
    max_fraction: float = _opt(0.25, _float(0.0, 1.0, lo_open=True), "largest cluster fraction")
    min_positions: int = _opt(8, _int(1), "smallest cluster (positions)")
    membership_threshold: float = _opt(0.5, _float(0.0, 1.0, hi_open=True), "membership counted as inside")
    min_component_size: int = _opt(4, _int(1), "smallest connected component counted")
    coherence: float = _opt(0.5, _float(0.0, 1.0), "fraction of the cluster inside counted components")
    max_extent: float = _opt(0.5, _float(0.0, 1.0, lo_open=True), "largest component span (scan fraction)")
    max_open: float = _opt(0.2, _float(0.0, 1.0), "largest unscanned fraction of a component's ring")
    min_block_distance: float = _opt(0.6, _float(0.0), "cross-fitted separation needed in the CBED block")
    min_eds_distance: float = _opt(1.0, _float(0.0), "cross-fitted separation needed in the EDS block")
    eds_shape_only: bool = _opt(False, _bool, "EDS separation ignores overall intensity (thickness)")
    raise_after: int = _opt(2, _int(1), "consecutive passing updates before a flag is raised")
    retract_after: int = _opt(2, _int(1), "consecutive failing updates before it is retracted")
    hysteresis: float = _opt(0.8, _float(0.0, 1.0, lo_open=True), "relaxation of an active flag's criteria")
    match_overlap: float = _opt(0.3, _float(0.0, 1.0), "position overlap that keeps a flag id")
    max_listed_positions: int = _opt(4096, _int(0), "positions listed in one event")
    neighbour_size_ratio: float = _opt(2.0, _float(0.0), "the neighbouring cluster must be this many times larger")
    embedded_only: bool = _opt(True, _bool, "count only components that do not touch the scan frame")
    max_band_rows: int = _opt(3, _int(0), "components within this many rows spanning max_extent of the width "
                                          "are one band (an interface), not inclusions; 0: off")
    min_contiguity: float = _opt(0.5, _float(0.0, 1.0), "fraction of the flagged positions' scanned "
                                                        "8-neighbours in the same cluster")
    min_ring_share: float = _opt(0.25, _float(0.0, 1.0), "a cluster holding this share of the ring "
                                                         "(and at least the candidate's size) must be distinct too")
    min_matrix_share: float = _opt(0.95, _float(0.0, 1.0), "share of the ring in the matrix (the host's "
                                                           "sub-clusters) an inclusion needs")
    distances_for_all: bool = _opt(False, _bool, "measure every cluster's block distances, not only those "
                                                 "passing the other tests (diagnostics; slower)")
    method: str = _opt("rules", _choice("rules", "test"), "rules: block distances and raise_after; test: "
                                                          "composition and pattern hypothesis tests at alpha")
    alpha: float = _opt(0.01, _float(0.0, 1.0, lo_open=True, hi_open=True),
                        "method = test: false-alarm probability per scan (spent over the looks)")
    min_effect: float = _opt(0.05, _float(0.0, 1.0), "method = test: least change of an element line's share "
                                                     "of the line counts")
    matrix_radius: int = _opt(3, _int(1), "method = test: the matrix a candidate is tested against lies "
                                          "within this many positions")
    elements: tuple = _opt(("Fe", "Co"), _elements, "method = test: elements whose K-alpha line proportions "
                                                  "are tested (dilution by another layer leaves them unchanged)")


@dataclass(frozen=True)
class EventsSection:
    """``[events]``: where flag events go (docs/events.md)."""

    endpoint: str = _opt("tcp://127.0.0.1:6344", _endpoint,
                         "bind address of the event socket (the demo binds a free port unless set)")
    socket_type: str = _opt("pub", _choice("pub", "push"),
                            '"pub" for viewers (may drop), "push" for one lossless consumer')


@dataclass(frozen=True)
class LiveViewSection:
    """``[liveview]``: the membership map served over HTTP while the scan runs (docs/liveview.md)."""

    enabled: bool = _opt(False, _bool, "serve the live view (also --live)")
    host: str = _opt("127.0.0.1", _text, "address to bind")
    port: int = _opt(0, _int(0, 65535), "0 picks a free port (the URL is printed)")
    followup_endpoint: str = _opt("", _optional_text, "the microscope's follow-up endpoint the page's follow-up button "
                                             "sends to (also --followup); empty: no follow-up control")
    followup_dwell_s: float = _opt(0.1, _float(0.0, lo_open=True), "dwell a follow-up acquisition asks for, "
                                                                   "seconds a position (also --followup-dwell)")
    action_token: str = _opt("", _optional_text, "token the page's actions need off loopback (also "
                                        "$STREAMCLUST_ACTION_TOKEN); empty: made per scan when bound off loopback")


@dataclass(frozen=True)
class ResultsSection:
    """``[results]``: the output folder and crash-safe checkpoints."""

    out_dir: str = _opt("out/run", _text, "folder of results.hspy, pictures and summary.json")
    checkpoint_every_s: float = _opt(10.0, _float(0.0, lo_open=True),
                                     "seconds between checkpoints of results.hspy during a scan")
    pictures: bool = _opt(True, _bool, "draw the pictures (docs/results.md) at the end of the scan")


@dataclass(frozen=True)
class LoggingSection:
    """``[logging]``: log level (-v / -vv on the command line raise it) and the progress display."""

    level: str = _opt("warning", _choice("debug", "info", "warning", "error"), "log level")
    progress_every_s: float = _opt(5.0, _float(0.0, lo_open=True),
                                   "seconds between progress lines when stderr is not a terminal")


_SECTIONS: dict[str, type] = {
    "detector": DetectorSection,
    "eds": EDSSection,
    "scan": ScanSection,
    "instrument": InstrumentSection,
    "engine": EngineSection,
    "centres": CentresSection,
    "flags": FlagsSection,
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
    engine: EngineSection = field(default_factory=EngineSection)
    centres: CentresSection = field(default_factory=CentresSection)
    flags: FlagsSection = field(default_factory=FlagsSection)
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
                         for f in fields(sec)}
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
            for f in fields(sec):
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


def _did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _build_section(name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{name}] must be a table of keys, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"[{name}] unknown key {key!r}{_did_you_mean(key, known)}; "
                              f"allowed: {', '.join(known)}")
        try:
            kwargs[key] = known[key].metadata["check"](value)
        except ValueError as exc:
            shown = _toml_value(value) if _simple(value) else repr(value)
            raise ConfigError(f"[{name}] {key} = {shown}: {exc}") from None
    return cls(**kwargs)


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
            raise ConfigError(f"unknown table [{name}]{_did_you_mean(name, _SECTIONS)}; "
                              f"allowed: {', '.join(f'[{s}]' for s in _SECTIONS)}")
        sections[name] = _build_section(name, _SECTIONS[name], values)
        explicit.update(f"{name}.{k}" for k in values)
    cfg = Config(**sections, explicit=frozenset(explicit), source=origin)
    _cross_checks(cfg)
    return cfg
