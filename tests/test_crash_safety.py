"""Crash safety of the results file: kill -9 mid-scan, and an aborted scan.

The kill test runs a real scan in a child process (simulated microscope over 127.0.0.1 sockets,
acquire_scan, LiveAnalysis, ResultsWriter checkpointing after every batch) and SIGKILLs it mid-scan
at a random moment after a checkpoint, so some kills land in the middle of the next checkpoint's
write. Whatever the moment, the file must open, say "partial" and be consistent.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from streamclust.app.acquisition import acquire_scan
from streamclust.app.live import LiveAnalysis
from streamclust.results.writer import ResultsWriter, read_results, validate_results
from streamclust.simulators.microscope import MicroscopeConfig, SimulatedMicroscope
from streamclust.simulators.phantom import LamellaPhantom

CHILD = textwrap.dedent('''
    import sys
    from streamclust.app.acquisition import acquire_scan
    from streamclust.app.live import LiveAnalysis
    from streamclust.results.writer import ResultsWriter
    from streamclust.simulators.microscope import MicroscopeConfig, SimulatedMicroscope
    from streamclust.simulators.phantom import LamellaPhantom

    path, dwell = sys.argv[1], float(sys.argv[2])
    ph = LamellaPhantom(scan_shape=(24, 24), seed=1)
    live = LiveAnalysis(ph.scan_shape, ph.frame_shape, ph.energy_axis_kev, n_clusters=4, random_state=0,
                        assess_every=32,
                        engine_params={"warmup_positions": 32, "refresh_every": 64})
    live.engine.warm_up()
    writer = ResultsWriter(path, scan_shape=ph.scan_shape, frame_shape=ph.frame_shape,
                           energy_axis_kev=ph.energy_axis_kev, n_clusters=4, thresholds=(0.5, 0.75),
                           config={"dwell_s": dwell}, scan_id="crash", checkpoint_every_s=0.0)
    counters = {"batches": 0, "positions_delivered": 0}

    def on_batch(batch):
        live.process(batch)
        counters["batches"] += 1
        counters["positions_delivered"] += len(batch.positions)
        if writer.checkpoint(live.scan_result(counters)):
            print("checkpoint", writer.n_checkpoints_, live.n_seen, flush=True)

    cfg = MicroscopeConfig(data_port=0, control_port=0, eds_port=0, dwell_s=dwell)
    with SimulatedMicroscope(ph, cfg) as scope:
        report = acquire_scan(scope.merlin.data_address, scope.eds.endpoint, ph.n_positions, on_batch,
                              batch_size=16)
    live.finish()
    writer.finalize(live.scan_result(report.as_dict()), status="complete" if report.complete else "aborted")
    print("done", flush=True)
''')


def run_and_kill(tmp_path, after_checkpoints: int, delay_s: float, dwell_s: float = 0.01):
    script = tmp_path / "scan_child.py"
    script.write_text(CHILD)
    path = tmp_path / "results.h5"
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(dwell_s)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.split())
            if line.startswith("checkpoint") and int(line.split()[1]) >= after_checkpoints:
                time.sleep(delay_s)
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"child ended with {proc.returncode}: {err[-2000:]}"
    assert ["done"] not in lines, "the scan finished before the kill: nothing was tested"
    last = [ln for ln in lines if ln and ln[0] == "checkpoint"][-1]
    return path, int(last[1]), int(last[2])


def check_killed_file(path, n_checkpoint: int, seen_at_checkpoint: int) -> dict:
    res = read_results(path)  # it opens: the rename is atomic, the target is always whole
    assert res["attrs"]["status"] == "partial"
    assert validate_results(res) == []
    n = res["attrs"]["n_positions"]
    # everything up to the last checkpoint the child reported (or the next, if its rename landed)
    assert res["attrs"]["checkpoint"] >= n_checkpoint
    assert seen_at_checkpoint <= res["attrs"]["positions_seen"] < n
    assert res["counters"]["attrs"]["positions_delivered"] >= res["attrs"]["positions_seen"]
    assert res["counters"]["attrs"]["batches"] >= 1
    return res


def test_kill_minus_9_mid_scan_leaves_a_readable_partial_file(tmp_path):
    rng = random.Random()
    path, n_cp, seen = run_and_kill(tmp_path, after_checkpoints=3, delay_s=rng.uniform(0.0, 0.05))
    res = check_killed_file(path, n_cp, seen)
    assert np.isfinite(res["clustering"]["memberships"]).any()  # past warm-up: real memberships


@pytest.mark.slow
@pytest.mark.parametrize("delay_s", [0.0, 0.002, 0.005, 0.01, 0.02, 0.04])
def test_kill_at_many_moments(tmp_path, delay_s):
    path, n_cp, seen = run_and_kill(tmp_path, after_checkpoints=2, delay_s=delay_s)
    check_killed_file(path, n_cp, seen)


def test_abort_mid_scan_gives_an_aborted_consistent_file(tmp_path):
    ph = LamellaPhantom(scan_shape=(16, 16), seed=0)
    live = LiveAnalysis(ph.scan_shape, ph.frame_shape, ph.energy_axis_kev, n_clusters=4, random_state=0,
                        assess_every=32,
                        engine_params={"warmup_positions": 32, "refresh_every": 64})
    live.engine.warm_up()
    path = tmp_path / "aborted.h5"
    writer = ResultsWriter(path, scan_shape=ph.scan_shape, frame_shape=ph.frame_shape,
                           energy_axis_kev=ph.energy_axis_kev, n_clusters=4, thresholds=(0.5, 0.75),
                           config={"abort_after": 64}, scan_id="abort", checkpoint_every_s=0.2)
    delivered = {"positions_delivered": 0}
    cfg = MicroscopeConfig(data_port=0, control_port=0, eds_port=0, dwell_s=0.01)
    with SimulatedMicroscope(ph, cfg) as scope:
        def on_batch(batch):
            live.process(batch)
            delivered["positions_delivered"] += len(batch.positions)
            writer.checkpoint(live.scan_result(delivered))

        def operator():
            # the operator (or the microscope) stops the scan at position 200 of 256 by the scan
            # clock, whatever the analysis is doing: the frames after it are never sent (an abort
            # from the analysis side raced the scan on a loaded machine: the analysis reached its
            # 64th position after the 2.56 s scan had sent every frame)
            run = scope.clock.wait_for_run(timeout=60)
            if run is not None and scope.clock.wait_for(run, 200, timeout=60):
                scope.clock.abort()

        threading.Thread(target=operator, daemon=True, name="operator").start()
        report = acquire_scan(scope.merlin.data_address, scope.eds.endpoint, ph.n_positions, on_batch,
                              batch_size=16, timeout_s=1.0, join_timeout_s=0.5)
    assert report.complete is False
    live.finish()
    writer.finalize(live.scan_result(report.as_dict()), status="complete" if report.complete else "aborted")

    res = read_results(path)
    assert validate_results(res) == []
    a, c = res["attrs"], res["counters"]["attrs"]
    assert a["status"] == "aborted"
    assert 64 <= a["positions_seen"] <= ph.n_positions  # spectra may all be in: EDS is not back-pressured
    assert a["positions_seen"] == live.n_seen == c["positions_delivered"] == report.positions_delivered
    assert c["merlin.complete"] is False or c["merlin.complete"] == 0
    assert 64 <= c["merlin.frames_received"] < ph.n_positions
    assert c["join.positions_with_frame"] == c["merlin.frames_received"]
    # every position is accounted for: seen here, or counted as never seen by the joiner
    assert a["positions_seen"] == ph.n_positions - c["join.positions_without_any"]
    seen = res["scan"]["seen"]
    assert int(seen.sum()) == a["positions_seen"]
    clustered = np.isfinite(res["clustering"]["memberships"]).all(axis=2)
    assert clustered.sum() > 0 and not (clustered & ~seen).any()
