"""The live panel of one compute: status line, metric sparklines and log, kept fresh by its monitor.

A cell that launches a compute shows it through :class:`LaunchReporter`
(the ``on_event`` callback of ``connection.connect``): the first launch
event displays the panel in phase 'launching' with the events as they come;
it then follows the compute: ready, running a cell or idle, until it stops.

A distributed compute (``%%kt --workers N``) is shown by :class:`GroupPanel`:
one row per worker (rank), each with its own status line and its own CPU,
memory and GPU sparklines, from a monitor per rank kernel (``NAME-rR``).
"""

from __future__ import annotations

import threading
from html import escape
from typing import Any

import ipywidgets as W

from ..render import show_notice
from .frontend import CURRENT, current_parent, display_widget
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


class GroupPanel(W.VBox):
    """Every worker of a distributed compute: a header, then per rank its status line and its own sparklines."""

    def __init__(self, name: str, title: str, monitors: list[ComputeMonitor], **kw: Any) -> None:
        self.name = name
        self.monitors = monitors
        self.status_views = [StatusView(m.status) for m in monitors]
        self.metrics_views = [MetricsView(m.metrics, layout=W.Layout(margin="0 0 4px 12px")) for m in monitors]
        header = W.HTML(f'<div class="kt-group-title"><b>{escape(name)}</b>: {escape(title)}</div>')
        rows = [W.VBox([status, metrics], layout=W.Layout(margin="2px 0"))
                for status, metrics in zip(self.status_views, self.metrics_views)]
        super().__init__([style_widget(), header, *rows],
                         layout=W.Layout(border="1px solid var(--jp-border-color2, #ddd)",
                                         padding="6px 12px 8px 12px", max_width="900px"), **kw)
        self.add_class("kt-panel")
        self.add_class("kt-group-panel")
        for monitor in monitors:
            monitor.acquire()

    def close(self) -> None:
        """Close the views; each rank's monitor stops when no panel uses it any more."""
        if getattr(self, "_kt_closed", False):
            return
        self._kt_closed = True
        for view in self.status_views + self.metrics_views:
            view.close()
        for monitor in self.monitors:
            monitor.release()
        super().close()


def group_monitors(rank_names: list[str], backend: str, handles: list[Any] | None = None) -> list[ComputeMonitor]:
    """A monitor per rank kernel, each refreshed once (NotFoundError when a rank does not exist); ``handles``: the
    group's own handle on each rank, where the backend's ``find`` does not know rank kernels (Kubernetes)."""
    monitors = [monitor_for(rank, backend) for rank in rank_names]
    for rank, monitor in enumerate(monitors):
        if handles is not None and rank < len(handles):
            monitor.find_handle = lambda _name, handle=handles[rank]: handle
        if not monitor.alive:
            monitor.refresh(logs=False)
    return monitors


def show_group_panel(name: str, title: str, rank_names: list[str], backend: str,
                     handles: list[Any] | None = None) -> GroupPanel:
    """Display a :class:`GroupPanel` of ``name``'s workers in the current cell (each rank's text fallback)."""
    panel = GroupPanel(name, title, group_monitors(rank_names, backend, handles))
    text = "\n".join([f"{name}: {title}"] + [status_text(m.status, m.metrics) for m in panel.monitors])
    display_widget(panel, text)
    return panel


def show_panel(monitor: ComputeMonitor) -> ComputePanel:
    """Display a new panel on ``monitor`` in the current cell (its text form for widget-less frontends)."""
    panel = ComputePanel(monitor)
    display_widget(panel, status_text(monitor.status, monitor.metrics))
    return panel


class LaunchReporter:
    """``on_event`` for a launch: shows the compute's panel at the first event, then adds each event to it."""

    def __init__(self, name: str, backend: str = "local", parent: Any = CURRENT) -> None:
        self.name = name
        self.backend = backend
        self.panel: ComputePanel | None = None
        self.monitor: ComputeMonitor | None = None
        self._parent = current_parent() if parent is CURRENT else parent
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
