"""The ``streamclust`` command line."""

from __future__ import annotations

import json
import logging
import signal
import threading

import click

logger = logging.getLogger(__name__)


@click.group()
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug")
def main(verbose: int) -> None:
    """streamclust: live correlated 4D-STEM + EDS clustering."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--out", "out_dir", default="out/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="sample seed of the phantom")
@click.option("--scan", "scan", default=64, show_default=True, help="scan positions a side (square scan)")
@click.option("--clusters", default=6, show_default=True)
@click.option("--dwell", default=0.0, show_default=True, help="seconds a position (0 = as fast as possible)")
def demo(out_dir: str, seed: int, scan: int, clusters: int, dwell: float) -> None:
    """Simulated live scan end to end: results.h5, pictures and summary.json in OUT."""
    from streamclust.demo import run_demo

    with click.progressbar(length=scan * scan, label="scan positions") as bar:
        last = [0]

        def progress(done: int, total: int) -> None:
            bar.update(done - last[0])
            last[0] = done

        summary = run_demo(out_dir, seed=seed, scan_shape=(scan, scan), n_clusters=clusters,
                           dwell_s=dwell, progress=progress)
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
@click.option("--seed", default=0, show_default=True)
@click.option("--scan", default=128, show_default=True, help="scan positions a side")
@click.option("--host", default="127.0.0.1", show_default=True, help="interface to bind (loopback by default)")
@click.option("--data-port", default=6342, show_default=True)
@click.option("--control-port", default=6341, show_default=True)
@click.option("--eds-port", default=6343, show_default=True)
@click.option("--dwell", default=0.01, show_default=True, help="seconds a position (0 = as fast as possible)")
@click.option("--counter-depth", default=12, show_default=True, type=click.Choice(["1", "6", "12", "24"]))
@click.option("--raw", is_flag=True, help="raw R64 pixel format (FILEFORMAT 2)")
@click.option("--triggered", is_flag=True, help="wait for CMD,STARTACQUISITION instead of starting on connect")
def simulate(seed, scan, host, data_port, control_port, eds_port, dwell, counter_depth, raw, triggered) -> None:
    """The simulated microscope alone, for other software to connect to; prints its endpoints."""
    from streamclust.simulators.microscope import MicroscopeConfig, SimulatedMicroscope
    from streamclust.simulators.phantom import LamellaPhantom

    phantom = LamellaPhantom(scan_shape=(scan, scan), seed=seed, counter_depth=int(counter_depth))
    config = MicroscopeConfig(host=host, data_port=data_port, control_port=control_port, eds_port=eds_port,
                              dwell_s=dwell, counter_depth=int(counter_depth), raw=raw, headless=not triggered)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with SimulatedMicroscope(phantom, config) as scope:
        click.echo(json.dumps(scope.endpoints))
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":  # pragma: no cover
    main()
