"""Widgets of kt_jupyter: a live status/metrics/logs panel per compute, a compute picker, progress bars.

Built from stock ipywidgets with traitlets models (``models.py``,
``picker_model.py``) that views only draw. Every entry point here falls back
to plain text where widgets cannot show (terminal IPython, no ipywidgets,
``KT_WIDGETS=0``), and imports ipywidgets only when it will use them.

Entry points for the magics:

- :func:`show_status` (``%kt status``)
- :func:`show_picker` (``%kt pick``)
- :func:`launch_reporter` (``on_event`` of ``connection.connect``)
- :func:`transfer_reporter` (``on_progress`` of ``run_cell`` / ``pull``)
"""

from __future__ import annotations

from typing import Any

from .frontend import widgets_available
from .panel import launch_reporter, show_status
from .progress import transfer_reporter

__all__ = ["launch_reporter", "show_picker", "show_status", "transfer_reporter", "widgets_available"]


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
