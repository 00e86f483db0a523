"""How a remote cell's output shows up in the notebook: streams, displays, results, progress."""

from __future__ import annotations

import sys
import time
from typing import Any

from .quantities import format_bytes

#: Transfers smaller than this show no progress line.
PROGRESS_MIN_BYTES = 8 << 20


class RemoteResult:
    """The value of a remote cell's last expression, shown as the cell's Out[] like a local one."""

    def __init__(self, data: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        self.data = data
        self.metadata = metadata or {}

    def _repr_mimebundle_(self, include=None, exclude=None):
        return self.data, self.metadata

    def __repr__(self) -> str:
        return self.data.get("text/plain", "<remote result>")


def show_output(msg: dict[str, Any]) -> None:
    """Render one output message of a remote cell in the current cell (call from its thread)."""
    kind = msg["type"]
    if kind == "stream":
        stream = sys.stderr if msg.get("name") == "stderr" else sys.stdout
        stream.write(msg["text"])
        stream.flush()
    elif kind == "display":
        from IPython.display import publish_display_data

        kwargs: dict[str, Any] = {}
        if msg.get("transient"):
            kwargs["transient"] = msg["transient"]
        if msg.get("update"):
            kwargs["update"] = True
        publish_display_data(msg.get("data", {}), msg.get("metadata") or None, **kwargs)
    elif kind == "clear_output":
        from IPython.display import clear_output

        clear_output(wait=bool(msg.get("wait")))
    elif kind == "notice":
        print(f"[kt] {msg.get('text', '')}", file=sys.stderr)


class TransferProgress:
    """A one-line progress report (bytes, rate, ETA) for transfers over a few MB."""

    def __init__(self, stream=None, min_bytes: int = PROGRESS_MIN_BYTES) -> None:
        self.stream = stream or sys.stderr
        self.min_bytes = min_bytes
        self._start: dict[str, float] = {}
        self._last_draw = 0.0

    def __call__(self, direction: str, done: int, total: int) -> None:
        if total < self.min_bytes:
            return
        now = time.perf_counter()
        start = self._start.setdefault(direction, now)
        finished = done >= total
        if not finished and now - self._last_draw < 0.2:
            return
        self._last_draw = now
        elapsed = max(now - start, 1e-6)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else 0.0
        line = (f"\r[kt] {direction} {format_bytes(done)} / {format_bytes(total)}"
                f"  {format_bytes(rate)}/s" + ("" if finished else f"  ETA {eta:.0f} s"))
        self.stream.write(line + ("\n" if finished else ""))
        self.stream.flush()
        if finished:
            self._start.pop(direction, None)
