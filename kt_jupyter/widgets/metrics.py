"""Live resource charts: CPU %, memory, per-GPU utilisation and memory, as sparklines with current values."""

from __future__ import annotations

from html import escape
from typing import Any

import ipywidgets as W

from .frontend import ModelView
from .models import MetricsModel
from .sparkline import sparkline_svg
from .status import FG1, FG2, FONT

#: Line colour per kind of row.
ROW_COLORS = {"cpu": "#1a73e8", "rss": "#9334e6", "util": "#137333", "mem": "#e37400"}


def _color(key: str) -> str:
    if key.startswith("gpu"):
        return ROW_COLORS["util" if key.endswith("_util") else "mem"]
    return ROW_COLORS.get(key, "#1a73e8")


def metrics_html(model: MetricsModel) -> str:
    """One small card per row: label and current value over a sparkline."""
    if not model.rows:
        note = model.error or "waiting for the first sample…"
        return f'<div class="kt-metrics" style="{FONT} color:{FG2}">{escape(note)}</div>'
    cards = []
    for row in model.rows:
        svg = sparkline_svg(row["values"], vmax=row["vmax"], color=_color(row["key"]),
                            title=row.get("title") or row["label"])
        cards.append(
            f'<div class="kt-metric" data-kt-key="{escape(row["key"])}" style="min-width:128px">'
            f'<div style="display:flex; justify-content:space-between; gap:8px; white-space:nowrap">'
            f'<span style="color:{FG2}">{escape(row["label"])}</span>'
            f'<span class="kt-metric-value" style="color:{FG1}; font-variant-numeric:tabular-nums">'
            f'{escape(row["current"])}</span></div>{svg}</div>')
    foot = ""
    if model.error:
        foot = f'<div style="color:{FG2}; font-size:11px">last sample failed: {escape(model.error)}</div>'
    rate = f"every {model.interval_s:g} s" if model.interval_s else ""
    title = f' title="{samples_title(model)} {rate}"'
    return (f'<div class="kt-metrics" style="{FONT} display:flex; flex-wrap:wrap; gap:4px 18px"{title}>'
            + "".join(cards) + "</div>" + foot)


def samples_title(model: MetricsModel) -> str:
    """Tooltip text: how many samples, how often."""
    return f"{model.samples} sample{'s' if model.samples != 1 else ''}"


class MetricsView(ModelView, W.HTML):
    """Draws a MetricsModel; redraws on each sample."""

    redraw_on = ("rows", "error")

    def __init__(self, model: MetricsModel, **kw: Any) -> None:
        super().__init__(value=metrics_html(model), **kw)
        self.add_class("kt-metrics-view")
        self.watch(model)

    def _redraw(self, _change: Any = None) -> None:
        self.value = metrics_html(self.model)
