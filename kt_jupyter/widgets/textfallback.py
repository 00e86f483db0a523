"""Plain-text forms of the widgets, for terminal IPython and frontends without widgets (pure: models in, text out)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from .log_model import LogModel
from .models import MetricsModel, StatusModel, format_age, phase_word

_LABEL_W = 10


def status_lines(status: StatusModel, metrics: MetricsModel | None = None) -> list[str]:
    """``compute 'train' (local): ready`` and aligned detail lines, then one line per metric row."""
    head = f"compute {status.name!r} ({status.backend}): {status.phase_label}"
    if status.detail and status.phase in ("stopped", "failed"):
        head += f" - {status.detail.splitlines()[0]}"
    lines = [head]
    for label, value in status.fields():
        lines.append(f"  {label + ':':<{_LABEL_W}} {value}")
    if status.phase == "launching" and status.events:
        lines.append(f"  {'events:':<{_LABEL_W}} " + f"\n  {'':<{_LABEL_W}} ".join(status.events[-6:]))
    if metrics is not None:
        for row in metrics.rows:
            lines.append(f"  {row['label'].lower() + ':':<{_LABEL_W}} {row['current']}")
        if metrics.error and not metrics.rows:
            lines.append(f"  {'metrics:':<{_LABEL_W}} unavailable ({metrics.error})")
    return lines


def status_text(status: StatusModel, metrics: MetricsModel | None = None) -> str:
    """:func:`status_lines` joined."""
    return "\n".join(status_lines(status, metrics))


def log_text(logs: LogModel, last: int | None = None) -> str:
    """The visible log lines (the last ``last`` of them) and the hint."""
    lines = [text for _level, text, _cell in logs.visible]
    if last is not None:
        lines = lines[-last:]
    return "\n".join(lines + [f"[kt] {logs.hint}"])


def computes_table(rows: Iterable[Any], now: float | None = None) -> str:
    """Computes (KernelInfo-like rows) as an aligned table, in the words of every other view."""
    now = time.time() if now is None else now
    rows = list(rows)
    if not rows:
        return "no computes running; a %%kt cell starts one"
    out = [f"{'NAME':<20} {'BACKEND':<11} {'PHASE':<10} {'AGE':>10}  WHERE"]
    for r in rows:
        age = format_age(now - r.started) if getattr(r, "started", 0) else "-"
        out.append(f"{r.name:<20} {r.backend:<11} {phase_word(r.phase):<10} {age:>10}  {r.where}")
    return "\n".join(out)


def picker_text(default_line: str, rows: Iterable[Any], errors: Iterable[str] = ()) -> str:
    """What ``%kt pick`` prints without widgets: the default compute, how to change it, what runs."""
    lines = [f"default compute: {default_line}",
             "change it with `%kt config key=value ...` (e.g. `%kt config name=train gpus=1`),",
             "or pass options to a cell (`%%kt --name train --memory 4Gi`); `%kt down NAME` stops one.",
             "", computes_table(rows)]
    lines += [f"[kt] {e}" for e in errors]
    return "\n".join(lines)
