"""Progress bars of transfers (bytes, rate, ETA) and launches (spinner, events, elapsed time).

:class:`TransferReporter` is the ``on_progress(direction, done, total)``
callback the magic passes to ``run_cell`` / ``pull``. It is called from the
client's network thread: a bar is created for the first transfer big enough
to show and displayed into the cell that was running when the reporter was
made.
"""

from __future__ import annotations

import threading
from html import escape
from typing import Any

import ipywidgets as W

from ..render import PROGRESS_MIN_BYTES
from .frontend import CURRENT, ModelView, current_parent, display_widget
from .models import ProgressModel
from .status import FG1, FONT


class ProgressView(ModelView, W.HBox):
    """A bar and one line of text (bytes, rate, ETA; or a launch's spinner and events) drawn from a ProgressModel."""

    redraw_on = ("text", "finished", "failed")

    def __init__(self, model: ProgressModel, **kw: Any) -> None:
        self.model = model
        self.bar = W.FloatProgress(value=0.0, min=0.0, max=1.0, bar_style="info",
                                   layout=W.Layout(width="180px", height="16px", margin="0 10px 0 0"))
        self.label = W.HTML(layout=W.Layout(margin="0"))
        self.bar.add_class("kt-progress-bar")
        self.label.add_class("kt-progress-text")
        super().__init__([self.bar, self.label], layout=W.Layout(align_items="center"), **kw)
        self.add_class("kt-progress")
        self.watch(model)

    def _redraw(self, _change: Any = None) -> None:
        m = self.model
        if m.kind == "launch":
            self.bar.layout.display = "none"  # no total to measure a launch against: a spinner, then a mark
            mark = ('<i class="fa fa-circle-o-notch fa-spin"></i>' if not m.finished
                    else '<span style="color:#c5221f">✗</span>' if m.failed
                    else '<span style="color:#137333">✓</span>')
            mark = f'<span style="margin-right:6px">{mark}</span>'
        else:
            frac = m.fraction
            self.bar.value = 1.0 if frac is None else frac
            self.bar.bar_style = "danger" if m.failed else ("success" if m.finished else "info")
            mark = ""
        color = "#c5221f" if m.failed else FG1
        self.label.value = (f'<span style="{FONT} color:{color}; font-variant-numeric:tabular-nums; '
                            f'white-space:nowrap">{mark}{escape(m.text)}</span>')



class TransferReporter:
    """``on_progress(direction, done, total)`` that shows one bar per transfer (push / pull) in the cell."""

    def __init__(self, min_bytes: int = PROGRESS_MIN_BYTES, parent: Any = CURRENT) -> None:
        self.min_bytes = min_bytes
        self.models: dict[str, ProgressModel] = {}
        self._parent = current_parent() if parent is CURRENT else parent
        self._lock = threading.Lock()

    def __call__(self, direction: str, done: int, total: int) -> None:
        if total < self.min_bytes:
            return
        with self._lock:
            model = self.models.get(direction)
            if model is None or model.finished:
                model = self.models[direction] = ProgressModel(start_done=done, kind="transfer", label=direction)
                display_widget(ProgressView(model), f"[kt] {direction} of {total} bytes", parent=self._parent)
        model.update(done, total)

    def stop(self, why: str) -> None:
        """Bars of transfers that will not finish (a Ctrl-C, a failure) turn red and say why."""
        with self._lock:
            for model in self.models.values():
                if not model.finished:
                    model.finish(error=why)
