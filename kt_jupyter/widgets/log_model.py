"""A pod kernel's log as the logs view keeps it: bounded, each line's level known, filtered (pure state).

The log holds the kernel's own lines (timestamped server events, and
whatever reaches its stdout/stderr directly: a crash's last words, a
subprocess) and a copy of every cell's output, which the pod kernel marks
with :data:`pod_kernel.logfile.CELL_MARKER` at the start of each line. The
notebook shows cell output in the cell already, so the panel hides those
lines unless asked (``show_cell_output``); unmarked lines always show.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import Any

from traitlets import Bool, CaselessStrEnum, HasTraits, Int, TraitError, Tuple, Unicode, observe, validate

from pod_kernel.logfile import CELL_MARKER

#: Filter choices, least to most severe.
LOG_LEVELS = ("INFO", "WARNING", "ERROR")
_LEVEL_RANK = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
_LEVEL_WORDS = {"DEBUG": "DEBUG", "INFO": "INFO", "WARN": "WARNING", "WARNING": "WARNING", "ERROR": "ERROR",
                "CRITICAL": "CRITICAL", "FATAL": "CRITICAL", "E": "ERROR", "W": "WARNING", "I": "INFO"}
# "2024-05-01 12:00:00,123 INFO name: ...", "[ERROR] ...", "WARNING: ...", klog's "E0501 12:00:00 ..."
_PREFIX_RE = re.compile(r"^(?:\S+\s+){0,2}\[?(DEBUG|INFO|WARN|WARNING|ERROR|CRITICAL|FATAL)\]?[:\s]")
_KLOG_RE = re.compile(r"^([EWI])\d{4} \d\d:\d\d:\d\d")
_EXC_LINE_RE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Warning)\b")


def classify_line(line: str, previous: str = "INFO") -> str:
    """The level of one log line: its prefix's level, or the previous line's for a traceback's
    continuation (indented lines, 'Traceback', 'SomeError: ...'); plain output counts as INFO."""
    m = _PREFIX_RE.match(line) or _KLOG_RE.match(line)
    if m:
        return _LEVEL_WORDS[m.group(1)]
    if previous in ("WARNING", "ERROR", "CRITICAL") and (
            line[:1].isspace() or _EXC_LINE_RE.match(line)
            or line.startswith(("Traceback", "During handling", "The above exception"))):
        return previous
    return "INFO"


def split_cell_marker(line: str) -> tuple[str, bool]:
    """``(text, True)`` for a line of cell output (the marker taken off), ``(line, False)`` for any other."""
    if line.startswith(CELL_MARKER):
        return line[len(CELL_MARKER):], True
    if line == CELL_MARKER.rstrip():  # an empty line of cell output, its trailing space lost on the way
        return "", True
    return line, False


def level_passes(level: str, threshold: str) -> bool:
    """Whether a line of ``level`` shows under the filter ``threshold`` (INFO shows everything)."""
    return _LEVEL_RANK.get(level, 20) >= _LEVEL_RANK[threshold] or threshold == "INFO"


def new_lines_since(previous: list[str], current: list[str]) -> list[str]:
    """The lines of a fresh tail ``current`` that come after the tail ``previous`` we already have.

    For backends that only answer "the last N lines": the longest suffix of
    ``previous`` that is a prefix of ``current`` is the overlap. With no
    overlap every line is new (the log moved on by more than N lines).
    """
    if not previous:
        return list(current)
    for k in range(min(len(previous), len(current)), 0, -1):
        if previous[-k:] == current[:k]:
            return list(current[k:])
    return list(current)


class LogModel(HasTraits):
    """The recent part of a pod kernel's log, bounded, with a level filter; cell output hidden unless asked."""

    compute_name = Unicode(help="Compute whose log this is (named in the 'show all' hint).")
    max_lines = Int(400, help="Lines kept; older ones are dropped (all of them: `%kt logs NAME --tail 0`).")
    lines = Tuple(help="Kept lines as (level, text, from_cell) triples, oldest first (cell marker taken off).")
    level = CaselessStrEnum(LOG_LEVELS, default_value="INFO", help="Show lines at this level and above (any case).")
    show_cell_output = Bool(False, help="Whether the cells' output (shown in the cells already) is shown too.")
    visible = Tuple(help="The kept lines that pass the filters, as (level, text, from_cell).")
    hidden_cell_lines = Int(0, help="Kept lines of cell output that the filter hides.")
    dropped = Int(0, help="Lines no longer kept (dropped for the bound, or cleared).")
    older = Bool(False, help="Whether the log has older lines than any this model ever saw.")
    hint = Unicode(help="One line saying what is shown and how to see all of it.")

    def __init__(self, **kw: Any) -> None:
        self._lock = threading.RLock()
        self._partial = ""
        self._previous = {False: "INFO", True: "INFO"}  # level of the latest line from the kernel, from cells
        super().__init__(**kw)
        self._refresh()

    @validate("max_lines")
    def _valid_max_lines(self, proposal: Any) -> int:
        if proposal["value"] < 1:
            raise TraitError("max_lines must be at least 1")
        return proposal["value"]

    def append_text(self, text: str) -> None:
        """Add raw log text; a last line without its newline waits for the rest."""
        with self._lock:
            text = self._partial + text.replace("\r\n", "\n")
            parts = text.split("\n")
            self._partial = parts.pop()
            self._add(parts)

    def append_lines(self, lines: Iterable[str]) -> None:
        """Add complete lines."""
        with self._lock:
            self._add(list(lines))

    def _add(self, new: list[str]) -> None:
        if not new:
            return
        prev = self._previous  # a traceback continues the lines of its own source (cell or kernel)
        tagged = []
        for line in new:
            text, cell = split_cell_marker(line)
            prev[cell] = classify_line(text, prev[cell])
            tagged.append((prev[cell], text, cell))
        kept = self.lines + tuple(tagged)
        over = max(0, len(kept) - self.max_lines)
        with self.hold_trait_notifications():
            self.dropped += over
            self.lines = kept[over:]

    def clear(self) -> None:
        """Forget the kept lines (new ones keep arriving)."""
        with self._lock, self.hold_trait_notifications():
            self.dropped += len(self.lines)
            self.lines = ()

    @observe("lines", "level", "show_cell_output", "dropped", "older", "compute_name", "max_lines")
    def _on_change(self, change: Any) -> None:
        if change["name"] == "max_lines" and len(self.lines) > self.max_lines:
            with self._lock:
                over = len(self.lines) - self.max_lines
                self.dropped += over
                self.lines = self.lines[over:]
            return
        self._refresh()

    def _refresh(self) -> None:
        with self._lock:  # a filter change in one thread and lines from another: the last one wins whole
            passing = [item for item in self.lines if level_passes(item[0], self.level)]
            self.visible = tuple(item for item in passing if self.show_cell_output or not item[2])
            self.hidden_cell_lines = len(passing) - len(self.visible)
            shown = len(self.visible)
            what = f"{shown} line{'s' if shown != 1 else ''}" + ("" if self.level == "INFO" else f" at {self.level}+")
            if self.hidden_cell_lines:
                what += f" · {self.hidden_cell_lines} of cell output hidden"
            if self.dropped or self.older:
                name = self.compute_name or "NAME"
                self.hint = f"{what} (keeps the last {self.max_lines}); `%kt logs {name} --tail 0` shows all"
            else:
                self.hint = what
