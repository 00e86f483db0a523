"""Running %%kt cells in IPython's test shell, for tests."""

from __future__ import annotations

from typing import Any


def run(ip: Any, code: str) -> Any:
    """Run a cell; re-raise its error so tests see failures; return its result."""
    result = ip.run_cell(code)
    if result.error_before_exec is not None:
        raise result.error_before_exec
    if result.error_in_exec is not None:
        raise result.error_in_exec
    return result.result
