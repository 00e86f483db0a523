"""The static checks CI enforces: ruff and mypy over kt_jupyter and pod_kernel, configured in pyproject.toml.

Both come with the ``test`` extra (``./dev test`` installs them). A finding fails the test with the checker's own
report; fix the code (or, for a rule that fights deliberate code, say why in pyproject.toml's config).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: What the checks cover (mypy's list is ``[tool.mypy] files`` in pyproject.toml).
PACKAGES = ("kt_jupyter", "pod_kernel")
#: mypy over both packages: about 45 s from a cold cache on a loaded 2-core box, a few seconds warm.
MYPY_TIMEOUT_S = 600
RUFF_TIMEOUT_S = 120


def _check(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=timeout_s)


def test_ruff_finds_nothing():
    done = _check(["ruff", "check", "--output-format", "concise", *PACKAGES], RUFF_TIMEOUT_S)
    assert done.returncode == 0, f"ruff check {' '.join(PACKAGES)}:\n{done.stdout}{done.stderr}"


def test_mypy_finds_nothing():
    done = _check(["mypy"], MYPY_TIMEOUT_S)
    assert done.returncode == 0, f"mypy ({' '.join(PACKAGES)}):\n{done.stdout[-20000:]}{done.stderr[-5000:]}"
