"""`streamclust bench` without a comparator: says what is missing and how to install it, exits non-zero.

The comparator (scikit-fuzzy for bench_fcm.py) is made unimportable in the *child's environment*:
a directory first on its PYTHONPATH holds a ``skfuzzy`` package whose import fails, as a broken or
absent install would. Our code runs as it is (no mocking).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def env_without_skfuzzy(tmp_path):
    shadow = tmp_path / "shadow" / "skfuzzy"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("No module named \'skfuzzy\' (hidden by the test)")\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(shadow.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run(args, env, tmp_path):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_bench_json_names_the_missing_comparator_and_fails(env_without_skfuzzy, tmp_path):
    proc = _run(["-m", "streamclust.app.cli", "bench", "--json", "--quick", "--only", "bench_fcm.py"],
                env_without_skfuzzy, tmp_path)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "scikit-fuzzy" in proc.stderr and "pip install" in proc.stderr
    merged = json.loads(proc.stdout.strip().splitlines()[-1])
    assert merged["fcm_speedup_vs_skfuzzy"] is None
    (err,) = [e for e in merged["errors"] if e["script"] == "bench_fcm.py"]
    assert err["missing"] == ["scikit-fuzzy"] and "pip install" in err["error"]


def test_run_all_plain_mode_fails_without_the_comparator(env_without_skfuzzy, tmp_path):
    proc = _run(["benchmarks/run_all.py", "--out", str(tmp_path / "bench"), "--quick", "bench_fcm.py"],
                env_without_skfuzzy, tmp_path)
    assert proc.returncode == 1
    assert "bench_fcm.py not run" in proc.stderr and "scikit-fuzzy" in proc.stderr and "pip install" in proc.stderr


def test_bench_fcm_itself_says_what_is_missing(env_without_skfuzzy, tmp_path):
    proc = _run(["benchmarks/bench_fcm.py", "speed", "--sizes", "1000", "--iters", "2"], env_without_skfuzzy, tmp_path)
    assert proc.returncode != 0
    assert "scikit-fuzzy is not installed" in proc.stderr and "pip install" in proc.stderr
