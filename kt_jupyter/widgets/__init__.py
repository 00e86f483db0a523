"""Widgets of kt_jupyter: a live status/metrics/logs panel per compute, a compute picker, progress bars.

Stock ipywidgets drawing traitlets models (``models.py``, ``log_model.py``,
``picker_model.py``) that hold all the state and logic. The entry points
below choose for the environment: widgets in JupyterLab, Notebook 7 and VS
Code; plain text in terminal IPython, without ipywidgets, or with
``KT_WIDGETS=0``. ipywidgets is imported only when widgets will be shown.

- :func:`show_status` - ``%kt status``
- :func:`show_picker` - ``%kt pick``
- :func:`launch_reporter` - ``on_event`` of ``connection.connect`` (a cell that launches a compute)
- :func:`transfer_reporter` - ``on_progress`` of ``run_cell`` / ``pull``
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..render import PROGRESS_MIN_BYTES, ProgressReporter, TransferProgress, show_notice
from .frontend import CURRENT, current_parent, widgets_available

__all__ = ["Deferred", "launch_reporter", "show_picker", "show_status", "transfer_reporter", "widgets_available"]


def show_status(name: str, backend: str = "local") -> Any:
    """``%kt status``: a live panel (status, metrics, logs) where widgets work, else the status as text.

    Raises NotFoundError when there is no such compute. Returns the panel, or None for text.
    """
    from .monitor import monitor_for
    from .textfallback import status_text

    monitor = monitor_for(name, backend)
    if not monitor.alive:
        monitor.refresh()
    if not widgets_available():
        print(status_text(monitor.status, monitor.metrics))
        if not monitor.alive:
            monitor.stop()
        return None
    from .panel import show_panel

    return show_panel(monitor)


def show_picker() -> Any:
    """``%kt pick``: the compute picker, filled in from the default compute; text where widgets cannot show.

    Returns the picker widget, or None when it printed text.
    """
    from .. import connection as conn_mod
    from .picker_model import PickerModel
    from .textfallback import picker_text

    model = PickerModel.from_compute(conn_mod.default_compute())
    model.refresh_running()
    text = picker_text(model.line, model.running, model.list_errors)
    if not widgets_available():
        print(text)
        return None
    from .picker import show_picker_widget

    return show_picker_widget(model, text)


def launch_reporter(name: str, backend: str = "local", parent: Any = CURRENT) -> Callable[[str], None]:
    """``on_event`` for launching compute ``name``: a live panel in the cell (the cell of ``parent``, a parent
    header; by default the one running now), else ``[kt] ...`` lines (muted in a notebook; warnings such as
    "its variables are lost" on stderr)."""
    if widgets_available():
        from .panel import LaunchReporter

        return LaunchReporter(name, backend, parent)
    return show_notice


def transfer_reporter(min_bytes: int = PROGRESS_MIN_BYTES, parent: Any = CURRENT) -> ProgressReporter:
    """``on_progress(direction, done, total)``: progress bars in a notebook (in the cell of ``parent``, by
    default the one running now), a text line elsewhere."""
    if widgets_available():
        from .progress import TransferReporter

        return TransferReporter(min_bytes, parent)
    return TransferProgress(min_bytes=min_bytes)


class Deferred:
    """A reporter made on its first call, not before (most cells launch nothing and move nothing big): ``make``
    gets the parent header of the cell running when this was made (``parent``, by default now), so what it shows
    lands in that cell, whichever thread calls it."""

    def __init__(self, make: Callable[[Any], Callable[..., None]], parent: Any = CURRENT) -> None:
        self._make = make
        self._parent = current_parent() if parent is CURRENT else parent
        self._made: Callable[..., None] | None = None
        self._lock = threading.Lock()

    def __call__(self, *args: Any) -> None:
        made = self._made
        if made is None:
            with self._lock:
                if self._made is None:
                    self._made = self._make(self._parent)
                made = self._made
        made(*args)

    def stop(self, why: str) -> None:
        """What was made (a transfer reporter) stops its unfinished transfers, saying why."""
        stop = getattr(self._made, "stop", None)
        if stop is not None:
            stop(why)
