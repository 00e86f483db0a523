"""The status line of a compute: phase badge, name, backend, activity, where, resources, age; startup events."""

from __future__ import annotations

from html import escape
from typing import Any

import ipywidgets as W

from .frontend import ModelView
from .models import RUNNING_TEXT, StatusModel

#: Badge colours per phase (background); text is white.
PHASE_COLORS = {"launching": "#8e6c00", "ready": "#137333", "stopped": "#5f6368", "failed": "#c5221f"}
#: Colour of "running a cell" (the activity of a ready kernel).
RUNNING_COLOR = "#1a73e8"

FONT = "font-family: var(--jp-ui-font-family, system-ui, sans-serif); font-size: 12.5px; line-height: 1.6;"
FG1 = "var(--jp-ui-font-color1, #1f1f1f)"
FG2 = "var(--jp-ui-font-color2, #5f6368)"


#: Styles the views share, scoped to kt classes (a <style> in a hidden HTML widget; no custom JS).
KT_CSS = """<style>
.kt-compact .jupyter-button, .kt-compact .jupyter-widget-toggle-button {
  height: 24px; line-height: 22px; font-size: 12px; padding: 0 8px; }
.kt-invalid input { border-color: #c5221f !important; box-shadow: 0 0 0 1px #c5221f inset; }
.kt-nowrap, .kt-nowrap * { white-space: nowrap; }
</style>"""


def style_widget() -> W.HTML:
    """A hidden widget carrying :data:`KT_CSS` (put one in each top-level view)."""
    return W.HTML(KT_CSS, layout=W.Layout(display="none"))


def phase_badge(phase: str, label: str) -> str:
    """An HTML pill for a phase (``data-kt-phase`` lets tests and styles find it)."""
    color = PHASE_COLORS.get(phase, "#5f6368")
    dot = "◌" if phase == "launching" else "●"
    return (f'<span class="kt-phase" data-kt-phase="{escape(phase)}" style="display:inline-block; '
            f'background:{color}; color:#fff; border-radius:9px; padding:0 8px; font-size:11.5px; '
            f'font-weight:600; line-height:18px; white-space:nowrap">{dot} {escape(label)}</span>')


def _field_html(label: str, value: str) -> str:
    if label == "activity":  # says itself what it is: 'running a cell', 'idle 3m 20s'
        style = f"color:{RUNNING_COLOR}; font-weight:600" if value == RUNNING_TEXT else f"color:{FG1}"
        return (f'<span class="kt-field" data-kt-field="activity" style="white-space:nowrap; {style}">'
                f'{escape(value)}</span>')
    return (f'<span class="kt-field" data-kt-field="{label}" style="white-space:nowrap">'
            f'<span style="color:{FG2}">{label}</span> <span style="color:{FG1}">{escape(value)}</span></span>')


def status_html(model: StatusModel) -> str:
    """The status line, the resources under it, and (launching or failed) the startup events, as HTML.

    Fields are separated by spaces so a narrow cell wraps between them, never inside one.
    """
    sep = f' <span style="color:{FG2}">·</span> '
    fields = dict(model.fields())
    resources = fields.pop("resources", "")
    head = (f'{phase_badge(model.phase, model.phase_label)} '
            f'<b class="kt-name" style="color:{FG1}; margin-left:2px">{escape(model.name)}</b> '
            f'<span style="color:{FG2}">{escape(model.backend)}</span>')
    line = head + "".join(sep + _field_html(label, value) for label, value in fields.items())
    parts = [f'<div class="kt-status" style="{FONT} color:{FG1}">{line}</div>']
    if resources:
        parts.append(f'<div class="kt-resources" style="{FONT} font-size:11.5px; line-height:1.4; color:{FG2}">'
                     f'<span class="kt-field" data-kt-field="resources">{escape(resources)}</span></div>')
    if model.detail and model.phase in ("stopped", "failed"):
        color = PHASE_COLORS["failed"] if model.phase == "failed" else FG2
        parts.append(f'<div class="kt-detail" style="{FONT} color:{color}; white-space:pre-wrap">'
                     f'{escape(model.detail)}</div>')
    if model.events and model.phase in ("launching", "failed"):
        items = "".join(f"<div>› {escape(e)}</div>" for e in model.events[-6:])
        parts.append(f'<div class="kt-events" style="{FONT} font-size:11.5px; line-height:1.45; color:{FG2}; '
                     f'margin:2px 0 0 4px">{items}</div>')
    return "".join(parts)


class StatusView(ModelView, W.HTML):
    """Draws a StatusModel; redraws whenever it changes."""

    def __init__(self, model: StatusModel, **kw: Any) -> None:
        super().__init__(value=status_html(model), **kw)
        self.add_class("kt-status-view")
        self.watch(model)

    def _redraw(self, _change: Any = None) -> None:
        self.value = status_html(self.model)
