"""A quick run of the benchmark command, so it never rots (its figures are not asserted as targets)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_command_quick_run(tmp_path, kt_home):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, KT_HOME=str(kt_home)),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for key in ("round_trip", "transfers", "unchanged_rerun", "hot_reload", "cold_start", "fn_call"):
        assert key in results, key
    assert "| %%kt (kt_jupyter) |" in proc.stdout and "ipyparallel" in proc.stdout
    assert results["unchanged_rerun"]["ratio"] < 1.0
