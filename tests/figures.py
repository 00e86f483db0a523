"""Figures the reliability, load and fuzzing tests measure, for the issue note.

Tests call :func:`record`; the figures of the running session are written
at once to ``test-artifacts/reliability.json`` (so a partial run still
leaves its figures), and ``conftest.py`` prints them at the end of the
session.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
REPORT = ARTIFACTS / "reliability.json"

#: What this pytest session recorded: section -> key -> value.
recorded: dict[str, dict[str, Any]] = {}


def record(section: str, key: str, value: Any) -> None:
    """Remember one figure, and rewrite the report file with this session's figures so far."""
    recorded.setdefault(section, {})[key] = value
    ARTIFACTS.mkdir(exist_ok=True)
    tmp = REPORT.with_suffix(".tmp")
    tmp.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    tmp.replace(REPORT)


def bump(section: str, key: str, by: int = 1) -> None:
    """Add ``by`` to a counted figure (faults survived, frames fuzzed ...)."""
    record(section, key, int(recorded.get(section, {}).get(key, 0)) + by)


def summary_lines() -> list[str]:
    """This session's figures, one line each (with the total of faults survived first)."""
    lines = []
    faults = recorded.get("faults", {})
    survived = [v for k, v in faults.items() if k.endswith(("_survived", "_noticed", "_retried"))]
    if survived:
        lines.append(f"faults.TOTAL_SURVIVED = {sum(survived)}")
    for section in sorted(recorded):
        for key, value in sorted(recorded[section].items()):
            lines.append(f"{section}.{key} = {value}")
    return lines
