"""The live panel of one compute (status, metrics, logs) and the functions the magics call.

:func:`show_status` is ``%kt status``: a live panel in a notebook, text
elsewhere. :func:`launch_reporter` is an ``on_event`` callback for
``connection.connect``: the first launch event shows the panel (phase
'launching', the events as they come), which then follows the compute.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable

from .frontend import current_parent, display_widget, widgets_available
from .monitor import ComputeMonitor, monitor_for
from .textfallback import status_text


def _panel_class() -> Any:
    import ipywidgets as W

    from .logs import LogView
    from .metrics import MetricsView
    from .status import StatusView

    class ComputePanel(W.VBox):
        """Status line, metric sparklines and the log of one compute, kept live by its monitor."""

        def __init__(self, monitor: ComputeMonitor, **kw: Any) -> None:
            self.monitor = monitor
            self.status_view = StatusView(monitor.status)
            self.metrics_view = MetricsView(monitor.metrics, layout=W.Layout(margin="2px 0 4px 0"))
            self.log_view = LogView(monitor.logs)
            super().__init__([self.status_view, self.metrics_view, self.log_view],
                             layout=W.Layout(border="1px solid var(--jp-border-color2, #ddd)",
                                             padding="6px 12px 8px 12px", max_width="900px"), **kw)
            self.add_class("kt-panel")
            monitor.acquire()

        def close(self) -> None:
            """Close the views; the monitor stops when no panel uses it any more."""
            if getattr(self, "_kt_closed", False):
                return
            self._kt_closed = True
            for view in (self.status_view, self.metrics_view, self.log_view):
                view.close()
            self.monitor.release()
            super().close()

    return ComputePanel


_PANEL: Any = None


def compute_panel(monitor: ComputeMonitor) -> Any:
    """A new panel widget on ``monitor`` (it starts the monitor)."""
    global _PANEL
    if _PANEL is None:
        _PANEL = _panel_class()
    return _PANEL(monitor)


def show_status(name: str, backend: str = "local") -> Any:
    """``%kt status``: a live panel where widgets work, else the status as text.

    Raises NotFoundError (from the backend) when there is no such compute.
    Returns the panel, or None for text.
    """
    monitor = monitor_for(name, backend)
    if not monitor.alive:
        monitor.refresh()
    if not widgets_available():
        print(status_text(monitor.status, monitor.metrics))
        if not monitor.alive:
            monitor.stop()
        return None
    panel = compute_panel(monitor)
    display_widget(panel, status_text(monitor.status, monitor.metrics))
    return panel


_LAUNCH_WORDS = ("starting", "launch", "pulling", "schedul", "creating")


def is_launch_event(text: str) -> bool:
    """Whether an ``on_event`` message is about starting a kernel (not a notice about a running one)."""
    first = text.strip().splitlines()[0].lower() if text.strip() else ""
    return any(word in first for word in _LAUNCH_WORDS)


class LaunchReporter:
    """``on_event`` for a launch: shows the compute's panel at the first event, then adds each event to it."""

    def __init__(self, name: str, backend: str = "local") -> None:
        self.name = name
        self.backend = backend
        self.panel: Any = None
        self.monitor: ComputeMonitor | None = None
        self._parent = current_parent()
        self._lock = threading.Lock()

    def __call__(self, text: str) -> None:
        with self._lock:
            if self.monitor is None and not is_launch_event(text):
                print(f"[kt] {text}", file=sys.stderr)  # a notice, not a launch: no panel for it
                return
            if self.monitor is None:
                self.monitor = monitor_for(self.name, self.backend)
                self.monitor.status.phase = "launching"
                self.monitor.status.add_event(text)
                self.panel = compute_panel(self.monitor)
                display_widget(self.panel, f"[kt] {text}", parent=self._parent)
                return
        self.monitor.status.add_event(text)
        self.monitor.poke()


def launch_reporter(name: str, backend: str = "local") -> Callable[[str], None]:
    """The ``on_event`` callback for launching compute ``name``: a live panel, or ``[kt] ...`` lines on stderr."""
    if widgets_available():
        return LaunchReporter(name, backend)
    return lambda text: print(f"[kt] {text}", file=sys.stderr)
