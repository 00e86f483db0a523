"""A live, bounded view of a pod kernel's log: a level filter, a cell-output switch (off) and a clear button."""

from __future__ import annotations

from html import escape
from typing import Any

import ipywidgets as W
from traitlets import link

from .frontend import ModelView
from .log_model import LOG_LEVELS, LogModel
from .status import FG1, FG2, FONT

LEVEL_COLORS = {"WARNING": "#b06000", "ERROR": "#c5221f", "CRITICAL": "#c5221f", "DEBUG": FG2}
#: Height of the log box.
LOG_BOX_HEIGHT_PX = 168
#: How a line of cell output looks when shown (the cell shows it already).
CELL_LINE_STYLE = f"color:{FG2}; border-left:2px solid var(--jp-border-color2, #ccc); padding-left:6px;"


def log_html(model: LogModel) -> str:
    """The visible lines in a scroll box that stays at the bottom (newest) as lines arrive.

    ``flex-direction: column-reverse`` makes the browser keep the scroll
    position at the end, with no JavaScript.
    """
    rows = []
    for level, text, cell in model.visible:
        color = LEVEL_COLORS.get(level)
        style = (CELL_LINE_STYLE if cell else "") + (f" color:{color};" if color else "")
        cls = "kt-log-line kt-log-cell" if cell else "kt-log-line"  # cell output: quieter, behind a bar
        attr = f' style="{style.strip()}"' if style else ""
        rows.append(f'<span class="{cls}" data-kt-level="{level}"{attr}>{escape(text) or " "}</span>')
    empty = "only cell output so far (hidden)" if model.hidden_cell_lines else "no log lines yet"
    body = "\n".join(rows) if rows else f'<span style="color:{FG2}">{empty}</span>'
    mono = "font-family: var(--jp-code-font-family, ui-monospace, monospace); font-size: 11.5px; line-height: 1.45;"
    return (f'<div class="kt-log-box" style="display:flex; flex-direction:column-reverse; overflow:auto; '
            f'max-height:{LOG_BOX_HEIGHT_PX}px; border:1px solid var(--jp-border-color2, #e0e0e0); '
            f'border-radius:4px; background:var(--jp-layout-color1, #fff)">'
            f'<pre class="kt-log" style="{mono} color:{FG1}; margin:0; padding:4px 8px; flex:none; '
            f'white-space:pre-wrap; word-break:break-all">{body}</pre></div>')


class LogView(ModelView, W.VBox):
    """Toolbar (level filter, clear, what is shown) over the log box."""

    redraw_on = ("visible", "hint")

    def __init__(self, model: LogModel, **kw: Any) -> None:
        self.model = model
        self.level = W.ToggleButtons(
            options=list(LOG_LEVELS), value=model.level, tooltips=[f"{lv} and above" for lv in LOG_LEVELS],
            style={"button_width": "78px"}, layout=W.Layout(width="auto", margin="0 8px 0 0"))
        self.level.add_class("kt-log-level")
        level_link = link((model, "level"), (self.level, "value"))
        self.cell_output = W.ToggleButton(value=model.show_cell_output, description="Cell output", icon="terminal",
                                          tooltip="also show what cells printed (each cell shows it already)",
                                          layout=W.Layout(width="auto", margin="0 8px 0 0"))
        self.cell_output.add_class("kt-log-cell-output")
        cell_link = link((model, "show_cell_output"), (self.cell_output, "value"))
        self.clear = W.Button(description="Clear", icon="eraser", tooltip="forget the lines shown so far",
                              layout=W.Layout(width="72px", margin="0 10px 0 0"))
        self.clear.add_class("kt-log-clear")
        self.clear.on_click(lambda _b: model.clear())
        self.hint = W.HTML(self._hint_html())
        self.box = W.HTML(log_html(model), layout=W.Layout(width="auto"))
        self.box.add_class("kt-log-view")
        title = W.HTML(f'<span style="{FONT} color:{FG1}; font-weight:600">Log</span>',
                       layout=W.Layout(width="34px", margin="0 4px 0 0"))
        bar = W.HBox([title, self.level, self.cell_output, self.clear, self.hint],
                     layout=W.Layout(align_items="center", flex_flow="row wrap", margin="0 0 3px 0"))
        bar.add_class("kt-compact")
        super().__init__([bar, self.box], **kw)
        self.watch(model, [level_link, cell_link])

    def _hint_html(self) -> str:
        return f'<span class="kt-log-hint" style="{FONT} color:{FG2}">{escape(self.model.hint)}</span>'

    def _redraw(self, change: Any = None) -> None:
        """Show what changed (everything for ``change`` None)."""
        if change is None or change["name"] == "visible":
            self.box.value = log_html(self.model)
        if change is None or change["name"] != "visible":
            self.hint.value = self._hint_html()
