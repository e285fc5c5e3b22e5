"""The ``streamclust`` command line: demo, run, replay, simulate, bench, config.

Every command takes ``--config FILE`` (docs/configuration.md); ``-v``/``-vv`` (before or after the
command) raise the log level above ``[logging] level``. Scan commands show a one-line progress
display on stderr (``--quiet`` turns it off; when stderr is not a terminal a plain line is written
every ``[logging] progress_every_s``) and, with ``--live``, serve the live view and print its URL.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path

import click

from streamclust.app.config import Config, ConfigError, load_config

logger = logging.getLogger(__name__)

#: exit codes (docs/cli.md): a script can tell a user's mistake from a broken recording, an
#: unreachable instrument, a scan that ended short and a bug
EXIT_OK = 0
EXIT_ERROR = 1  # unexpected: a bug (the one line says so; -v shows the traceback)
EXIT_USAGE = 2  # click's own: an unknown option, a bad value, a missing argument or file
EXIT_PARTIAL = 3  # the scan ended short (results written with status "partial")
EXIT_BAD_INPUT = 4  # a file that cannot be read: missing, damaged, not the expected format
EXIT_UNREACHABLE = 5  # the instrument or a socket cannot be reached or bound
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)

_verbose = 0  # the -v count of this invocation: tracebacks are shown only with -v


class CliError(click.ClickException):
    """A user-facing error: one line on stderr (what, where, what to do) and its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"streamclust: error: {self.format_message()}", err=True)


def describe_error(exc: BaseException, *, where: str = "") -> CliError:
    """The one-line :class:`CliError` for an exception that reached the command line."""
    import socket

    from streamclust.adapters.errors import ProtocolError

    at = f"{where}: " if where else ""
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return CliError(f"no such file or folder: {exc.filename or exc}; check the path", EXIT_BAD_INPUT)
    if isinstance(exc, ProtocolError):
        return CliError(f"{at}{exc}; the file is damaged, incomplete or not in the expected format "
                        "(docs/merlin-format.md, docs/wire-formats.md)", EXIT_BAD_INPUT)
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)):
        return CliError(f"cannot reach {where or 'the instrument'}: {exc}; is it running and listening "
                        "there? (check --host / --data-port / --eds)", EXIT_UNREACHABLE)
    if isinstance(exc, OSError):
        return CliError(f"{at}{exc.strerror or exc}"
                        f"{f' ({exc.filename})' if exc.filename else ''}; check the path and its "
                        "permissions", EXIT_BAD_INPUT)
    try:
        import zmq

        if isinstance(exc, zmq.ZMQError):
            return CliError(f"ZeroMQ socket error{f' ({where})' if where else ''}: {exc}; is the "
                            "endpoint valid and free?", EXIT_UNREACHABLE)
    except ImportError:  # pragma: no cover - pyzmq is a dependency
        pass
    return CliError(f"unexpected {type(exc).__name__}: {exc}{f' ({where})' if where else ''}; run "
                    "again with -v for the traceback and report it", EXIT_ERROR)


class _Main(click.Group):
    """The command group: any exception a command lets through becomes one line and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("streamclust: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except Exception as exc:
            err = describe_error(exc)
            if _verbose or (ctx.params.get("verbose") or 0):
                import traceback

                traceback.print_exception(exc, file=sys.stderr)
            raise err from None


def _friendly(where: str, exc: BaseException) -> CliError:
    """``describe_error`` with the traceback on stderr when -v was given."""
    if _verbose:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    return describe_error(exc, where=where)

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _load(ctx: click.Context, param: click.Parameter, value: str | None) -> Config:
    try:
        return load_config(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def _setup_logging(ctx: click.Context, cfg: Config, verbose: int) -> None:
    global _verbose
    verbose = max(verbose, (ctx.find_root().params.get("verbose") or 0))
    _verbose = verbose
    level = min(_LEVELS[cfg.logging.level], logging.WARNING - 10 * min(verbose, 2)) if verbose else \
        _LEVELS[cfg.logging.level]
    root = logging.getLogger()
    root.setLevel(level)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


def config_option(f):
    """``--config FILE`` (validated when parsed) and ``-v``."""
    f = click.option("-v", "--verbose", count=True, help="-v info, -vv debug (above [logging] level)")(f)
    return click.option("--config", "cfg", type=click.Path(dir_okay=False), default=None,
                        callback=_load, help="TOML configuration (docs/configuration.md)")(f)


def scan_options(f):
    """Options of the commands that run a scan."""
    f = click.option("--quiet", "-q", is_flag=True, help="no progress display")(f)
    return click.option("--live", is_flag=True, help="serve the live view (URL printed); also [liveview]")(f)


@click.group(cls=_Main)
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug")
@click.version_option(package_name="streamclust")
def main(verbose: int) -> None:
    """streamclust: live correlated 4D-STEM + EDS clustering."""
    global _verbose
    _verbose = verbose  # per invocation (several may run in one process, e.g. under CliRunner)


# -------------------------------------------------------------------------------------------------
# shared pieces of the scan commands
# -------------------------------------------------------------------------------------------------
def _progress(cfg: Config, quiet: bool, total: int, scan_shape):
    from streamclust.app.progress import ProgressDisplay

    return ProgressDisplay(total, scan_shape, enabled=not quiet, every_s=cfg.logging.progress_every_s)


#: environment variable holding the live view's action token (a secret: not on the command line,
#: where any user of the machine can read it in the process list)
ACTION_TOKEN_ENV = "STREAMCLUST_ACTION_TOKEN"


def action_token(cfg: Config) -> str | None:
    """The live view's action token: ``$STREAMCLUST_ACTION_TOKEN``, else ``[liveview] action_token``
    (when the configuration has one); bound off loopback without either, a random one for this
    scan (acting there is otherwise refused); None on loopback (no token needed)."""
    import secrets

    from streamclust.adapters.security import is_loopback

    token = os.environ.get(ACTION_TOKEN_ENV) or cfg.liveview.action_token or None
    if token is None and not is_loopback(cfg.liveview.host):
        token = secrets.token_urlsafe(18)  # 144 bits
    return token


def _liveview_factory(cfg: Config, live_flag: bool, stack: ExitStack, *, followup_endpoint: str | None = None,
                      followup_dwell_s: float | None = None):
    """A factory the session calls with the scan shape and cluster count, or None.

    The view can act on flags (docs/liveview.md, "Acting on a flag"): ``followup_endpoint``
    (``--followup``, else ``[liveview] followup_endpoint``) is the
    microscope's follow-up endpoint. Bound off loopback, acting needs a token: ``$STREAMCLUST_ACTION_TOKEN``
    (or ``[liveview] action_token``), else a random one made for this scan; the printed URL then
    carries it in its fragment (``#token=...``, never sent in a request line).
    """
    if not (live_flag or cfg.liveview.enabled):
        return None
    lv = cfg.liveview
    endpoint = followup_endpoint or lv.followup_endpoint or None
    dwell = followup_dwell_s if followup_dwell_s is not None else lv.followup_dwell_s

    def make(scan_shape, n_clusters, title):
        from streamclust.adapters.security import is_loopback
        from streamclust.app.liveview import LiveView

        exposed = not is_loopback(lv.host)
        view_token = action_token(cfg)
        view = LiveView(host=lv.host, port=lv.port, scan_shape=scan_shape, n_clusters=n_clusters, title=title,
                        followup_endpoint=endpoint, action_token=view_token,
                        **({"followup_dwell_s": float(dwell)} if dwell is not None else {})).start()
        stack.callback(view.stop)
        # the token goes only to this terminal, in the fragment a browser keeps to itself
        fragment = f"#token={view_token}" if exposed and view_token else ""
        click.echo(f"live view: {view.url}{fragment}", err=True)
        if endpoint:
            click.echo(f"live view: follow-ups go to {endpoint}", err=True)
        return view

    return make


@contextmanager
def _stop_on_sigterm():
    """An event set by SIGTERM while the block runs (the previous handler is restored after)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def _echo_summary(summary: dict, out_dir) -> None:
    click.echo(
        f"{summary['frames_received']} frames received, {summary['frames_processed']} processed, "
        f"{summary['frames_dropped']} dropped in {summary['elapsed_s']:.1f} s "
        f"({summary['frames_per_s']} frames/s)"
    )
    for flag in summary["flags"]:
        click.echo(f"second-phase flag {flag['flag_id']}: cluster {flag['cluster']}, score {flag['score']:.2f}, "
                   f"raised at {100 * flag['scan_fraction_at_first_flag']:.0f} % of the scan, bbox {flag['bbox']}")
    if not summary["flags"]:
        click.echo("no second-phase flag raised")
    if summary.get("status", "complete") != "complete":
        click.echo(f"scan status: {summary['status']}")
    lv = summary.get("liveview")
    if lv and any(lv.values()):
        click.echo(f"live view: {lv['followups']} follow-up(s) done, {lv['followups_failed']} failed, "
                   f"{lv['judgements']} flag(s) dismissed (stored in the results file under liveview/)")
    rec = summary.get("recording")
    if rec is not None:
        click.echo(f"recorded {rec['frames_recorded']} frames and {rec['spectra_recorded']} spectra to "
                   f"{rec['folder']} ({rec['frames_not_recorded']} frames, {rec['spectra_not_recorded']} "
                   f"spectra NOT recorded{'; ' + rec['error'] if rec.get('error') else ''})")
    click.echo(f"results and summary.json in {out_dir}")


# -------------------------------------------------------------------------------------------------
# commands
# -------------------------------------------------------------------------------------------------
@main.command()
@click.option("--out", "out_dir", default="out/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="sample seed of the phantom")
@click.option("--scan", "scan", default=64, show_default=True, type=click.IntRange(4),
              help="scan positions a side (square scan)")
@click.option("--clusters", default=None, type=click.IntRange(2), help="clusters (default: [engine] n_clusters, 6)")
@click.option("--dwell", default=0.0, show_default=True, type=click.FloatRange(0.0),
              help="seconds a position (0 = as fast as possible)")
@click.option("--inclusions", default=None, type=click.IntRange(0),
              help="second-phase inclusions in the phantom (0 = a single-phase control sample)")
@click.option("--dose", default=1.0, show_default=True, type=click.FloatRange(0.0, min_open=True),
              help="beam current, a multiple of the phantom's default")
@click.option("--simulator", default="process", show_default=True, type=click.Choice(["process", "thread"]),
              help="run the simulated microscope in its own process or in threads of this one")
@scan_options
@config_option
@click.pass_context
def demo(ctx, out_dir: str, seed: int, scan: int, clusters: int | None, dwell: float, inclusions: int | None,
         dose: float, simulator: str, live: bool, quiet: bool, cfg: Config, verbose: int) -> None:
    """Simulated live scan end to end: results.hspy, pictures and summary.json in OUT."""
    from streamclust.app.demo import run_demo

    _setup_logging(ctx, cfg, verbose)
    # only what was asked for is passed on: run_demo keeps its own defaults otherwise
    sample = {k: v for k, v in (("inclusions", inclusions), ("dose", dose if dose != 1.0 else None))
              if v is not None}
    with ExitStack() as stack:
        summary = run_demo(out_dir, seed=seed, scan_shape=(scan, scan), n_clusters=clusters, dwell_s=dwell,
                           progress=_progress(cfg, quiet, scan * scan, (scan, scan)), config=cfg,
                           liveview=_liveview_factory(cfg, live, stack), simulator=simulator, **sample)
    f1 = summary["second_phase_f1"]
    click.echo(
        f"{summary['frames_received']} frames received, {summary['frames_processed']} processed, "
        f"{summary['frames_dropped']} dropped in {summary['elapsed_s']:.1f} s "
        f"({summary['frames_per_s']} frames/s ingest)"
    )
    click.echo("second-phase F1 against the phantom's truth: "
               + ", ".join(f"{k} {v:.2f}" for k, v in f1.items()))
    click.echo(f"live engine vs offline reference on the same scan: ARI {summary['ari_live_vs_offline']:.2f}")
    for flag in summary["flags"]:
        click.echo(f"second-phase flag {flag['flag_id']}: cluster {flag['cluster']}, score {flag['score']:.2f}, "
                   f"raised at {100 * flag['scan_fraction_at_first_flag']:.0f} % of the scan, bbox {flag['bbox']}")
    if not summary["flags"]:
        click.echo("no second-phase flag raised")
    click.echo(f"results, pictures and summary.json in {out_dir}")


@main.command()
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="output folder (default: [results] out_dir)")
@click.option("--host", default=None, help="Merlin PC (default: [detector] host)")
@click.option("--data-port", default=None, type=click.IntRange(1, 65535), help="default: [detector] data_port")
@click.option("--control-port", default=None, type=click.IntRange(1, 65535), help="default: [detector] control_port")
@click.option("--eds", "eds_endpoint", default=None, help="EDS ZeroMQ endpoint (default: [eds] endpoint)")
@click.option("--scan", "scan_shape", default=None, type=(click.IntRange(1), click.IntRange(1)),
              help="scan shape ROWS COLS (default: [scan] shape)")
@click.option("--start", is_flag=True, default=None,
              help="send STARTACQUISITION once connected ([detector] start_acquisition)")
@click.option("--record", default=None, type=click.Path(file_okay=False),
              help="also record the raw scan into this folder (MIB + .hdr + EDS), as it arrives")
@click.option("--beam-energy", default=200.0, show_default=True, type=click.FloatRange(0.0, min_open=True),
              help="beam energy (keV) written into the EDS recording's metadata")
@click.option("--followup", "followup_endpoint", default=None, metavar="ENDPOINT",
              help="the microscope's follow-up endpoint: the live view's 'follow up' acts there")
@click.option("--followup-dwell", default=None, type=click.FloatRange(0.0, min_open=True),
              help="default dwell (s) of a follow-up from the live view [0.1]")
@scan_options
@config_option
@click.pass_context
def run(ctx, out_dir, host, data_port, control_port, eds_endpoint, scan_shape, start, record, beam_energy,
        followup_endpoint, followup_dwell, live, quiet, cfg: Config, verbose: int) -> None:
    """Analyse a scan from a real instrument: Merlin data/control ports + the EDS ZeroMQ stream."""
    from streamclust.app.run import run_scan

    try:
        cfg = cfg.override("detector", host=host, data_port=data_port, control_port=control_port,
                           start_acquisition=start)
        cfg = cfg.override("eds", endpoint=eds_endpoint)
        cfg = cfg.override("scan", shape=list(scan_shape) if scan_shape else None)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    _setup_logging(ctx, cfg, verbose)
    out = out_dir or cfg.results.out_dir
    ny, nx = cfg.scan.shape
    with ExitStack() as stack:
        import socket

        import zmq

        stop = stack.enter_context(_stop_on_sigterm())
        try:
            summary = run_scan(cfg, out, progress=_progress(cfg, quiet, ny * nx, (ny, nx)),
                               liveview=_liveview_factory(cfg, live, stack, followup_endpoint=followup_endpoint,
                                                          followup_dwell_s=followup_dwell),
                               stop=stop, record=record,
                               beam_energy_kev=beam_energy)
        except (ConnectionError, TimeoutError, socket.gaierror) as exc:
            raise _friendly(f"the instrument (Merlin data port {cfg.detector.host}:{cfg.detector.data_port}, "
                            f"EDS {cfg.eds.endpoint})", exc) from None
        except zmq.ZMQError as exc:
            raise _friendly(f"[events] endpoint {cfg.events.endpoint}, [eds] endpoint {cfg.eds.endpoint}",
                            exc) from None
    _echo_summary(summary, out)
    if summary["status"] != "complete":
        sys.exit(EXIT_PARTIAL)


@main.command()
@click.argument("source", type=click.Path())
@click.argument("eds_h5", required=False, type=click.Path())
@click.option("--out", "out_dir", default="out/replay", show_default=True, type=click.Path(file_okay=False))
@click.option("--dask", "dask", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="replay on Dask distributed: a scheduler address, or alone for a local cluster")
@scan_options
@config_option
@click.pass_context
def replay(ctx, source, eds_h5, out_dir, dask, live, quiet, cfg: Config, verbose: int) -> None:
    """Replay a recorded scan through the live pipeline, as fast as it goes.

    SOURCE is a recording folder (``streamclust simulate/run --record DIR``) or a ``.mib`` file;
    EDS_H5 its EDS recording (found beside the ``.mib`` when omitted).
    """
    from streamclust.adapters.recording import RecordingNotFound, find_recording

    _setup_logging(ctx, cfg, verbose)
    try:
        mib, eds_h5 = find_recording(source, eds_h5)
    except RecordingNotFound as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    if dask is not None:
        try:
            import distributed  # noqa: F401  (an optional dependency: only --dask needs it)
        except ImportError as exc:
            raise click.ClickException(f"--dask needs dask[distributed]: {exc}") from None
        from streamclust.distributed.dask_replay import replay_dask
        from streamclust.app.replay import dask_config

        try:
            summary = replay_dask(str(mib), str(eds_h5), out_dir, scheduler=None if dask == "local" else dask,
                                  config=dask_config(cfg))
        except (OSError, ValueError) as exc:
            raise _friendly(f"{mib}", exc) from None
        click.echo(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))},
                              default=str))
        click.echo(f"results in {out_dir}")
        return
    from streamclust.adapters.errors import ProtocolError
    from streamclust.app.replay import replay_scan

    with ExitStack() as stack:
        try:
            summary = replay_scan(mib, eds_h5, out_dir, config=cfg, progress=_progress(cfg, quiet, 0, None),
                                  liveview=_liveview_factory(cfg, live, stack))
        except ProtocolError as exc:
            # the EDS reader names its file in the message; the MIB reader gives offset and frame
            where = "" if str(eds_h5) in str(exc) else str(mib)
            raise _friendly(where, exc) from None
        except OSError as exc:
            raise _friendly(str(mib), exc) from None
    _echo_summary(summary, out_dir)
    if summary.get("status", "complete") != "complete":
        sys.exit(EXIT_PARTIAL)


def _parse_fault(ctx, param, values):
    """``KIND:SEQ`` (``stall:SEQ:SECONDS``, ``garbage:SEQ:BYTES``) -> Fault."""
    from streamclust.simulators.merlin import FAULT_KINDS, Fault

    faults = []
    for text in values:
        parts = text.split(":")
        try:
            kind, at = parts[0], int(parts[1])
            extra = {}
            if len(parts) > 2:
                extra = {"stall": {"seconds": float(parts[2])}, "garbage": {"n_bytes": int(parts[2])}}[kind]
            faults.append(Fault(kind, at, **extra))
        except (IndexError, KeyError, ValueError) as exc:
            raise click.BadParameter(f"{text!r}: expected KIND:SEQ with KIND one of {', '.join(FAULT_KINDS)} "
                                     f"(stall:SEQ:SECONDS, garbage:SEQ:BYTES) ({exc})", ctx=ctx,
                                     param=param) from None
    return tuple(faults)


@main.command()
@click.option("--seed", default=0, show_default=True)
@click.option("--scan", default=128, show_default=True, help="scan positions a side")
@click.option("--from", "from_", default=None, type=click.Path(),
              help="serve this recording (a folder or a .mib, with or without its EDS file) instead of the phantom")
@click.option("--host", default="127.0.0.1", show_default=True, help="interface to bind (loopback by default)")
@click.option("--data-port", default=6342, show_default=True)
@click.option("--control-port", default=6341, show_default=True)
@click.option("--eds-port", default=6343, show_default=True)
@click.option("--dwell", default=None, type=click.FloatRange(0.0),
              help="seconds a position, 0 = as fast as possible [default: 0.01; with --from the recording's]")
@click.option("--counter-depth", default="12", show_default=True, type=click.Choice(["1", "6", "12", "24"]),
              help="(phantom; a recording is served in its own)")
@click.option("--raw", is_flag=True, help="raw R64 pixel format (FILEFORMAT 2; phantom only)")
@click.option("--triggered", is_flag=True, help="wait for CMD,STARTACQUISITION instead of starting on connect")
@click.option("--fault", "faults", multiple=True, callback=_parse_fault, metavar="KIND:SEQ",
              help="damage frame SEQ: truncate, corrupt_header, drop, skip, stall:SEQ:S, garbage:SEQ:N (repeatable)")
@click.option("--eds-drop", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="probability an EDS message is dropped")
@click.option("--record", default=None, type=click.Path(file_okay=False),
              help="write the simulated scan to this folder (MIB + .hdr + EDS) and exit, serving nothing")
@config_option
@click.pass_context
def simulate(ctx, seed, scan, from_, host, data_port, control_port, eds_port, dwell, counter_depth, raw,
             triggered, faults, eds_drop, record, cfg: Config, verbose: int) -> None:
    """The simulated microscope alone, for other software to connect to; prints its endpoints.

    With --from DIR it serves a recording over the same protocols. With --record DIR it writes
    the phantom's scan as a recording instead (what the Merlin and EDS software would have saved),
    for ``streamclust replay DIR``.
    """
    from streamclust.simulators.microscope import MicroscopeConfig, SimulatedMicroscope
    from streamclust.simulators.phantom import LamellaPhantom

    _setup_logging(ctx, cfg, verbose)
    with ExitStack() as stack:
        if from_ is not None:
            from streamclust.adapters.errors import ProtocolError
            from streamclust.adapters.recording import RecordingNotFound, find_recording
            from streamclust.simulators.recorded import RecordedScan

            try:
                mib, eds = find_recording(from_, require_eds=False)
                source = stack.enter_context(RecordedScan(mib, eds))
            except RecordingNotFound as exc:
                raise CliError(str(exc), EXIT_BAD_INPUT) from None
            except (ProtocolError, OSError) as exc:
                raise _friendly(str(from_), exc) from None
            depth, raw = source.counter_depth, source.raw
            dwell = source.dwell_s if dwell is None else dwell
        else:
            source = LamellaPhantom(scan_shape=(scan, scan), seed=seed, counter_depth=int(counter_depth))
            depth = int(counter_depth)
            dwell = 0.01 if dwell is None else dwell
        if record is not None:
            if from_ is not None:
                raise click.UsageError("--record writes the phantom's scan; it does not combine with --from")
            from streamclust.simulators.record_live import record_phantom

            try:
                stats = record_phantom(source, record)
            except OSError as exc:
                raise _friendly(str(record), exc) from None
            click.echo(json.dumps(stats))
            return
        config = MicroscopeConfig(host=host, data_port=data_port, control_port=control_port, eds_port=eds_port,
                                  dwell_s=dwell, counter_depth=depth, raw=raw, headless=not triggered,
                                  merlin_faults=faults, eds_faults={"drop": eds_drop} if eds_drop else {})
        try:
            scope = stack.enter_context(SimulatedMicroscope(source, config))
        except OSError as exc:
            raise _friendly(f"{host} ports {data_port}/{control_port}/{eds_port}", exc) from None
        stop = stack.enter_context(_stop_on_sigterm())
        click.echo(json.dumps(scope.endpoints))
        sys.stdout.flush()
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass


def benchmarks_dir() -> Path:
    """The source tree's ``benchmarks/`` (beside the package); ClickException when not there."""
    import streamclust

    here = Path(streamclust.__file__).resolve().parent.parent / "benchmarks"
    if not (here / "run_all.py").is_file():
        raise click.ClickException(
            f"no benchmarks/ beside the streamclust package (looked in {here}): the benchmarks ship "
            "with the source tree, not the installed package; run from a clone (pip install -e .)")
    return here


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print one merged JSON object (last stdout line)")
@click.option("--quick", is_flag=True, help="small sizes (a smoke run)")
@click.option("--only", multiple=True, help="only this script (repeatable), e.g. bench_ingest.py")
@config_option
@click.pass_context
def bench(ctx, as_json: bool, quick: bool, only: tuple, cfg: Config, verbose: int) -> None:
    """Run the benchmarks one after the other; each figure against its baseline in the same run."""
    _setup_logging(ctx, cfg, verbose)
    here = benchmarks_dir()
    cmd = [sys.executable, str(here / "run_all.py"), *(["--json"] if as_json else []),
           *(["--quick"] if quick else []), *only]
    env = dict(os.environ)
    env.setdefault("NUMBA_NUM_THREADS", "1")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE if as_json else None, text=True)
    if as_json:
        lines = [ln for ln in (proc.stdout or "").splitlines() if ln.strip()]
        if not lines:
            raise click.ClickException(f"benchmarks/run_all.py printed nothing (exit {proc.returncode})")
        click.echo(lines[-1])
    if proc.returncode:
        sys.exit(proc.returncode)


@main.command("config")
@click.option("--show", is_flag=True, default=True, help="print the effective configuration as TOML")
@click.option("--plain", is_flag=True, help="without the comments")
@config_option
@click.pass_context
def config_cmd(ctx, show: bool, plain: bool, cfg: Config, verbose: int) -> None:
    """Print the effective configuration (defaults merged with --config FILE) as TOML."""
    _setup_logging(ctx, cfg, verbose)
    click.echo(cfg.to_toml(comments=not plain), nl=False)


if __name__ == "__main__":  # pragma: no cover
    main()
