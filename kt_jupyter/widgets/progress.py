"""Progress of transfers (bytes, rate, ETA) and launches (events, elapsed), as widgets or text.

:func:`transfer_reporter` returns the ``on_progress(direction, done, total)``
callback the magic passes to ``run_cell``/``pull``: a widget bar in a
notebook, :class:`kt_jupyter.render.TransferProgress` text elsewhere. It is
called from the client's network thread; the bar is created on the first
transfer big enough to show and displayed into the cell that was running
when the reporter was made.
"""

from __future__ import annotations

import threading
from html import escape
from typing import Any, Callable

from ..render import PROGRESS_MIN_BYTES, TransferProgress
from .frontend import current_parent, display_widget, widgets_available
from .models import ProgressModel

ProgressCallback = Callable[[str, int, int], None]


def _view_class() -> Any:
    import ipywidgets as W

    from .status import FG1, FONT

    class ProgressView(W.HBox):
        """A bar and one line of text (bytes, rate, ETA; or launch events) drawn from a ProgressModel."""

        def __init__(self, model: ProgressModel, **kw: Any) -> None:
            self.model = model
            self.bar = W.FloatProgress(value=0.0, min=0.0, max=1.0, bar_style="info",
                                       layout=W.Layout(width="180px", height="16px", margin="0 10px 0 0"))
            self.label = W.HTML(layout=W.Layout(margin="0"))
            self.bar.add_class("kt-progress-bar")
            self.label.add_class("kt-progress-text")
            super().__init__([self.bar, self.label], layout=W.Layout(align_items="center"), **kw)
            self.add_class("kt-progress")
            model.observe(self._redraw, names=["text", "finished", "failed"])
            self._redraw()

        def _redraw(self, _change: Any = None) -> None:
            m = self.model
            frac = m.fraction
            if m.kind == "launch" and not m.finished:
                self.bar.layout.display = "none"
                spin = '<i class="fa fa-circle-o-notch fa-spin" style="margin-right:6px"></i>'
            else:
                self.bar.layout.display = None
                self.bar.value = 1.0 if frac is None else frac
                spin = ""
            self.bar.bar_style = "danger" if m.failed else ("success" if m.finished else "info")
            color = "#c5221f" if m.failed else FG1
            self.label.value = (f'<span style="{FONT} color:{color}; font-variant-numeric:tabular-nums">'
                                f'{spin}{escape(m.text)}</span>')

        def close(self) -> None:
            """Stop observing the model, then close."""
            if getattr(self, "_kt_closed", False):
                return
            self._kt_closed = True
            try:
                self.model.unobserve(self._redraw, names=["text", "finished", "failed"])
            except ValueError:
                pass
            super().close()

    return ProgressView


_VIEW: Any = None


def progress_view(model: ProgressModel) -> Any:
    """A widget drawing ``model`` (ipywidgets imported on first use)."""
    global _VIEW
    if _VIEW is None:
        _VIEW = _view_class()
    return _VIEW(model)


class TransferReporter:
    """``on_progress(direction, done, total)`` that shows one bar per direction (push/pull) in the cell."""

    def __init__(self, min_bytes: int = PROGRESS_MIN_BYTES) -> None:
        self.min_bytes = min_bytes
        self.models: dict[str, ProgressModel] = {}
        self._parent = current_parent()
        self._lock = threading.Lock()

    def __call__(self, direction: str, done: int, total: int) -> None:
        if total < self.min_bytes:
            return
        with self._lock:
            model = self.models.get(direction)
            if model is None or model.finished:
                model = self.models[direction] = ProgressModel(kind="transfer", label=direction)
                display_widget(progress_view(model), f"[kt] {direction} of {total} bytes", parent=self._parent)
        model.update(done, total)


def transfer_reporter(min_bytes: int = PROGRESS_MIN_BYTES) -> ProgressCallback:
    """The progress callback for this environment: widget bars in a notebook, a text line elsewhere."""
    if widgets_available():
        return TransferReporter(min_bytes)
    return TransferProgress(min_bytes=min_bytes)
