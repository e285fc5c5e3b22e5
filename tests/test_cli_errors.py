"""A user's mistake at the command line: one line on stderr, a documented exit code (docs/cli.md).

Every case runs the real ``streamclust`` command in a subprocess, as a user would.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest

from streamclust.simulators.eds_recording import write_eds_recording
from streamclust.simulators.mib_encode import write_mib

CMD = [sys.executable, "-m", "streamclust.app.cli"]


def _run(*args, timeout=300):
    return subprocess.run(CMD + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def _error_line(done) -> str:
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, done.stderr  # one line, no traceback
    assert lines[0].startswith("streamclust: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """A small valid recording: 4 single-chip 12-bit frames and their spectra."""
    d = tmp_path_factory.mktemp("rec")
    frames = np.random.default_rng(0).integers(0, 4096, (4, 256, 256)).astype(np.uint16)
    write_mib(d / "scan", frames, counter_depth=12, layout="1x1", scan_shape=(2, 2))
    write_eds_recording(d / "scan_eds.h5", np.ones((4, 32), np.uint16), scan_shape=(2, 2),
                        energy_offset_kev=0.0, channel_width_kev=0.01, live_time_s=0.01)
    return d


def test_replay_of_a_corrupt_mib_is_one_line_with_the_offset(recording, tmp_path):
    data = bytearray((recording / "scan.mib").read_bytes())
    record = len(data) // 4
    data[2 * record:2 * record + 4] = b"XXXX"  # the third frame's magic
    bad = tmp_path / "scan.mib"
    bad.write_bytes(bytes(data))
    (tmp_path / "scan_eds.h5").write_bytes((recording / "scan_eds.h5").read_bytes())
    done = _run("replay", bad, "--out", tmp_path / "out", "--quiet")
    assert done.returncode == 4
    line = _error_line(done)
    assert str(bad) in line and f"byte offset {2 * record}" in line and "b'MQ1,'" in line
    # with -v the traceback is there for whoever debugs it
    verbose = _run("replay", bad, "--out", tmp_path / "out", "--quiet", "-v")
    assert verbose.returncode == 4 and "Traceback" in verbose.stderr


def test_replay_of_a_missing_file_or_empty_folder(tmp_path):
    done = _run("replay", tmp_path / "nothere.mib")
    assert done.returncode == 4
    assert "no such file or folder" in _error_line(done)
    done = _run("replay", tmp_path)
    assert done.returncode == 4
    assert "expected one .mib file in the folder, found 0" in _error_line(done)


def test_replay_of_a_file_that_is_not_an_eds_recording(recording, tmp_path):
    junk = tmp_path / "junk_eds.h5"
    junk.write_bytes(b"not hdf5 at all")
    done = _run("replay", recording / "scan.mib", junk, "--out", tmp_path / "out", "--quiet")
    assert done.returncode == 4
    line = _error_line(done)
    assert str(junk) in line and "not an HDF5 file" in line


def test_run_with_no_detector_listening(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "run.toml"
    cfg.write_text('[detector]\ntimeout = 1.0\n[scan]\nshape = [8, 8]\n[engine]\nwarmup_positions = 16\n'
                   '[results]\npictures = false\n[events]\nendpoint = "tcp://127.0.0.1:0"\n')
    done = _run("run", "--config", cfg, "--data-port", port, "--out", tmp_path / "out", "--quiet")
    assert done.returncode == 5
    line = _error_line(done)
    assert f"127.0.0.1:{port}" in line and "Connection refused" in line and "--data-port" in line


def test_usage_errors_keep_click_exit_code_2(tmp_path):
    done = _run("replay", "--no-such-option")
    assert done.returncode == 2 and "Traceback" not in done.stderr
