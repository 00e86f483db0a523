"""The live panel of one compute: status line, metric sparklines and log, kept fresh by its monitor.

A cell that launches a compute shows it through :class:`LaunchReporter`
(the ``on_event`` callback of ``connection.connect``): the first launch
event displays the panel in phase 'launching' with the events as they come;
it then follows the compute: ready, running a cell or idle, until it stops.
"""

from __future__ import annotations

import threading
from typing import Any

import ipywidgets as W

from ..render import show_notice
from .frontend import current_parent, display_widget
from .logs import LogView
from .metrics import MetricsView
from .models import is_launch_event
from .monitor import ComputeMonitor, monitor_for
from .status import StatusView, style_widget
from .textfallback import status_text


class ComputePanel(W.VBox):
    """Status line, metric sparklines and the log of one compute; the monitor runs while a panel is open."""

    def __init__(self, monitor: ComputeMonitor, **kw: Any) -> None:
        self.monitor = monitor
        self.status_view = StatusView(monitor.status)
        self.metrics_view = MetricsView(monitor.metrics, layout=W.Layout(margin="2px 0 4px 0"))
        self.log_view = LogView(monitor.logs)
        super().__init__([style_widget(), self.status_view, self.metrics_view, self.log_view],
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


def show_panel(monitor: ComputeMonitor) -> ComputePanel:
    """Display a new panel on ``monitor`` in the current cell (its text form for widget-less frontends)."""
    panel = ComputePanel(monitor)
    display_widget(panel, status_text(monitor.status, monitor.metrics))
    return panel


class LaunchReporter:
    """``on_event`` for a launch: shows the compute's panel at the first event, then adds each event to it."""

    def __init__(self, name: str, backend: str = "local") -> None:
        self.name = name
        self.backend = backend
        self.panel: ComputePanel | None = None
        self.monitor: ComputeMonitor | None = None
        self._parent = current_parent()
        self._lock = threading.Lock()

    def __call__(self, text: str) -> None:
        with self._lock:
            if self.monitor is None and not is_launch_event(text):
                show_notice(text)  # a notice, not a launch: no panel for it
                return
            if self.monitor is None:
                self.monitor = monitor_for(self.name, self.backend, new_kernel=True)  # never an older kernel's
                self.monitor.status.phase = "launching"
                self.monitor.status.add_event(text)
                self.panel = ComputePanel(self.monitor)
                display_widget(self.panel, f"[kt] {text}", parent=self._parent)
                return
        self.monitor.status.add_event(text)
        self.monitor.poke()
