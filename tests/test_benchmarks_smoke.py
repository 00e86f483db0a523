"""A quick run of the benchmark command, so it never rots.

No timing is asserted (a loaded CI box makes any figure slower, and a ratio of
two timings can flip): what is asserted is that every section ran and
reported. The properties behind the figures are asserted by the benchmark
itself as it runs (an unchanged rerun sends 0 bytes and skips the array), so a
regression there fails this run too.
"""

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
        capture_output=True, text=True, timeout=600, env=dict(os.environ, KT_HOME=str(kt_home)), check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for key in ("round_trip", "round_trip_held", "transfers", "first_transfer", "unchanged_rerun", "hot_reload",
                "cold_start", "fn_call", "workers"):
        assert key in results, key
    assert set(results["workers"]["2"]) == {"all_ranks_ready_s", "round_trip"}  # the N-worker rows ran
    assert "8 MiB torch tensor" in results["transfers"]
    assert "| %%kt (kt_jupyter) |" in proc.stdout and "ipyparallel" in proc.stdout
    assert "| first transfer into a new pod kernel" in proc.stdout
    rerun = results["unchanged_rerun"]
    assert rerun["first_runs"] > 0 and rerun["reruns"] > 0  # the benchmark checked each rerun sent nothing


def test_cell_path_breakdown_quick_run(tmp_path):
    """benchmarks/cell_path.py: both processes' timestamps are there for every step of every cell, in order (it
    raises when a step is missing), and the steps of a cell fit inside the cell."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cell_path.py"), "--cells", "20", "--gap-ms", "0", "--json"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, KT_HOME=str(tmp_path / "kt-home")),
        check=False, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    steps = result["steps"]
    assert list(steps) == ["c_sn0", "p_dr", "p_parsed", "p_q0", "p_q1", "p_run0", "p_uc0", "p_uc1", "p_sn0", "c_dr",
                           "c_er", "c_got", "c_t1"]
    # one clock for both processes: every step of every cell comes after the one before it (a write's bytes
    # may arrive before the writer's call returns, so intervals start where the write starts)
    assert all(s["p50_us"] >= 0 for s in steps.values()), steps
    assert max(s["p50_us"] for s in steps.values()) <= result["total"]["p50_us"]
    assert set(result["writes"]) == {"c_sn1", "p_sn1"}
    assert result["local pass"]["p50_us"] > 0 and result["no-op cell magic"]["p50_us"] > 0


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py, the script a GPU machine runs (a CUDA result back as a CPU tensor, NVML metrics in
    the panel, a tensor's push and pull against torch's copies), runs its steps here with ``--device cpu``: a
    %%kt result comes back as a CPU tensor, the panel's model gets samples (without GPU rows), every row reports."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--size-mib", "8",
         "--reps", "1", "--busy-s", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, KT_HOME=str(tmp_path / "kt-home")),
        check=False, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["checks"]["result comes back as a CPU tensor"]["ok"]
    metrics = results["checks"]["metrics (dry run: no GPU rows expected)"]
    assert metrics["ok"] and metrics["detail"]["samples"] >= 2
    assert all(cpu and cpu != "-" for cpu in metrics["detail"]["cpu"])  # each sample reached the panel's model
    assert set(results["rows"]) == {"push", "push_to_gpu", "pull_from_gpu"}
    assert all(row["MBps"] > 0 for row in results["rows"].values())
    assert set(results["torch_copies_MBps"]) == {"h2d_pageable", "h2d_pinned", "d2h_pageable"}
    assert len(results["rerun_mentioning_pulled_gpu_tensor_ms"]) >= 3
