"""Barriers for tests: a cell on a pod kernel waits for a file the test creates, the test for a condition.

Both waits have a deadline, so a broken test fails (or ends) instead of hanging;
neither is a sleep standing in for "long enough".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Code for a cell: wait until the file named by the cell's global ``go`` exists (60 s at most).
WAIT_FOR_GO = ("import os as _os, time as _time\n"
               "_deadline = _time.monotonic() + 60\n"
               "while not _os.path.exists(go) and _time.monotonic() < _deadline:\n    _time.sleep(0.005)\n")


def wait_until(condition: Callable[[], Any], timeout_s: float = 15.0, what: str = "condition",
               poll_s: float = 0.01) -> Any:
    """``condition()``'s first true value; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        time.sleep(poll_s)


def wait_for_file(path: Path, timeout_s: float = 60.0) -> None:
    """Return once ``path`` exists (a cell on the pod created it)."""
    wait_until(path.exists, timeout_s, f"{path.name} created")
