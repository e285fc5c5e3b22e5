"""The CI rule of tests/conftest.py: where the real recordings are, a skipped real-file test fails.

Each case runs pytest in a child process on a small test directory holding a copy of our
conftest.py, so the hook under test is the real one, with the environment a CI runner would set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

SAMPLE = '''
import pytest

def test_mib_real_files_roundtrip():
    pytest.skip("real recording not found under ../shared/data")

def test_unrelated_optional_feature():
    pytest.skip("chromium not installed")

def test_runs():
    assert True
'''


@pytest.fixture
def suite(tmp_path):
    d = tmp_path / "suite"
    d.mkdir()
    shutil.copy(HERE / "conftest.py", d / "conftest.py")
    (d / "test_sample.py").write_text(SAMPLE)
    return d


def _pytest(suite: Path, *, ci: str | None, shared: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["STREAMCLUST_SHARED_DATA"] = str(shared)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-o", "addopts=",
                           str(suite)], cwd=suite, env=env, capture_output=True, text=True, timeout=120)


def test_on_ci_with_shared_data_a_real_file_skip_fails(suite, tmp_path):
    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    proc = _pytest(suite, ci="true", shared=shared)
    assert proc.returncode == 1, proc.stdout
    assert "1 failed, 1 passed, 1 skipped" in proc.stdout
    assert "FAILED" in proc.stdout and "test_mib_real_files_roundtrip" in proc.stdout
    assert "skipped on CI although" in proc.stdout


@pytest.mark.parametrize("ci, with_data", [(None, True), ("true", False), ("false", True)])
def test_elsewhere_a_skip_stays_a_skip(suite, tmp_path, ci, with_data):
    shared = tmp_path / "shared" / "data"
    if with_data:
        shared.mkdir(parents=True)
    proc = _pytest(suite, ci=ci, shared=shared)
    assert proc.returncode == 0, proc.stdout
    assert "1 passed, 2 skipped" in proc.stdout
