"""The cost of the first call of a function defined in a 2,000-file project (issue 17), on the local backend.

    .venv/bin/python benchmarks/code_travel.py [--files 2000] [--file-bytes 1500] [--reps 5]

It writes a project of ``--files`` Python files (a ``pyproject.toml``, one
package: the function's module imports a helper from a sibling module) in a
temporary directory, imports the function from there, and calls it with
``kt.fn(f).to(kt.Compute())`` from another working directory, as a user's
script would. Code travel then syncs the project (its nearest
``pyproject.toml`` marks it) to the pod kernel as source files and the pod
imports the module by name (:mod:`kt_jupyter.codesync`). Measured, in
seconds: a cold first call (a new compute: the pod kernel starts, then the
sync, then the call); on a warm pod kernel that has not seen the project, the
first call (the sync of every file, then the call) and then later calls
(median: the manifest is checked, nothing is sent), next to calls of an
installed function (no project to check); a call after one file of
the project changed (that file is sent, the module reloaded). 2,000 is the
most a project may have (:data:`kt_jupyter.codesync.MAX_FILES`).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Bytes of filler per generated module (a few functions' worth of code).
DEFAULT_FILE_BYTES = 1500


def write_project(root: Path, files: int, file_bytes: int) -> Path:
    """A project of ``files`` Python files: ``bigproj/__init__.py``, ``core.py``, ``helpers.py`` and fillers."""
    pkg = root / "bigproj"
    pkg.mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'bigproj'\nversion = '0'\n")
    (pkg / "__init__.py").write_text("")
    (pkg / "helpers.py").write_text("import math\n\nFACTOR = 3\n\n\n"
                                    "def helper(x):\n    return math.floor(x) * FACTOR\n")
    (pkg / "core.py").write_text("import os\n\nfrom .helpers import helper\n\n\n"
                                 "def work(x):\n    return os.getpid(), helper(x)\n")
    filler = "".join(f"\n\ndef f{i}(x):\n    return x + {i}\n" for i in range(file_bytes // 32))
    for i in range(files - 3):
        (pkg / f"mod_{i:04d}.py").write_text(f'"""Filler module {i}."""\n' + filler)
    return root


def main() -> None:
    """Run the measurements; print them as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--file-bytes", type=int, default=DEFAULT_FILE_BYTES)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kt-code-travel-") as tmp:
        tmp_path = Path(tmp)
        os.environ.update(KT_HOME=str(tmp_path / "kt_home"), KT_USERNAME="bench")
        project = write_project(tmp_path / "project", args.files, args.file_bytes)
        size = sum(p.stat().st_size for p in project.rglob("*.py"))
        workdir = tmp_path / "elsewhere"
        workdir.mkdir()
        os.chdir(workdir)
        sys.path.insert(0, str(project))

        import statistics as installed

        from bigproj import core

        import kt_jupyter as kt

        out: dict[str, float | int] = {"files": args.files, "project_bytes": size}
        t0 = time.perf_counter()
        pid, value = kt.fn(core.work, name="cold").to(kt.Compute(name="cold"))(2)
        out["cold_first_call_s"] = time.perf_counter() - t0  # pod kernel start + sync + call
        assert pid != os.getpid() and value == 6

        warm = kt.Compute(name="warm")
        t0 = time.perf_counter()
        kt.fn(installed.median, name="warm").to(warm)([1, 2, 3])  # the kernel starts; the project is not sent
        out["kernel_start_and_installed_call_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        remote = kt.fn(core.work, name="warm").to(warm)
        remote(2)
        out["warm_first_call_s"] = time.perf_counter() - t0  # the sync of every file + import + call
        later = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            remote(2)
            later.append(time.perf_counter() - t0)
        out["later_call_median_s"] = statistics.median(later)
        median = kt.fn(installed.median, name="warm").to(warm)
        baseline = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            median([1, 2, 3])
            baseline.append(time.perf_counter() - t0)
        out["installed_call_median_s"] = statistics.median(baseline)  # the same round trip, no project to check
        helpers = project / "bigproj" / "helpers.py"
        helpers.write_text(helpers.read_text().replace("FACTOR = 3", "FACTOR = 4"))
        t0 = time.perf_counter()
        _pid, value = remote(2)
        out["call_after_one_file_changed_s"] = time.perf_counter() - t0
        assert value == 8, value  # the edit is in effect
        for name in ("cold", "warm"):
            kt.fn(core.work, name=name).to(kt.Compute(name=name)).teardown()
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
