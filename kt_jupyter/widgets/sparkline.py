"""Sparklines as small inline SVG (pure: numbers in, markup out; no widget, no JavaScript)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

#: Default size of a sparkline, in CSS pixels.
SPARK_WIDTH_PX = 120
SPARK_HEIGHT_PX = 22


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def sparkline_points(values: Sequence[float | None], width: float, height: float,
                     vmax: float | None = None, pad: float = 2.0) -> list[tuple[float, float]]:
    """Screen coordinates of ``values`` in a ``width`` x ``height`` box (y grows down).

    The scale runs from 0 to ``vmax`` (default: the largest value), so a flat
    idle line sits at the bottom instead of filling the box. Missing values
    (None, NaN) are skipped.
    """
    vals = _finite(values)
    if not vals:
        return []
    top = vmax if vmax is not None and vmax > 0 else max(max(vals), 1e-9)
    n = len(vals)
    step = (width - 2 * pad) / (n - 1) if n > 1 else 0.0
    inner_h = height - 2 * pad
    points = []
    for i, v in enumerate(vals):
        frac = min(max(v / top, 0.0), 1.0)
        x = pad + i * step if n > 1 else width - pad
        points.append((round(x, 1), round(pad + inner_h * (1.0 - frac), 1)))
    return points


def sparkline_svg(values: Sequence[float | None], *, width: int = SPARK_WIDTH_PX, height: int = SPARK_HEIGHT_PX,
                  vmax: float | None = None, color: str = "#1a73e8", title: str = "") -> str:
    """An inline ``<svg>`` sparkline: a line, a light area under it and a dot on the latest value.

    With no values it draws an empty baseline, so layouts do not jump when
    the first sample arrives.
    """
    pts = sparkline_points(values, width, height, vmax)
    base_y = height - 2
    head = (f'<svg class="kt-spark" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" style="vertical-align:middle">')
    parts = [head]
    if title:
        parts.append(f"<title>{escape(title)}</title>")
    parts.append(f'<line x1="2" y1="{base_y}" x2="{width - 2}" y2="{base_y}" stroke="#ccc" stroke-width="1"/>')
    if pts:
        line = " ".join(f"{x},{y}" for x, y in pts)
        if len(pts) > 1:
            area = f"{pts[0][0]},{base_y} {line} {pts[-1][0]},{base_y}"
            parts.append(f'<polygon points="{area}" fill="{color}" fill-opacity="0.15" stroke="none"/>')
            parts.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.5" '
                         'stroke-linejoin="round" stroke-linecap="round"/>')
        x, y = pts[-1]
        parts.append(f'<circle cx="{x}" cy="{y}" r="2" fill="{color}"/>')
    parts.append("</svg>")
    return "".join(parts)
