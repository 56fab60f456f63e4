"""Line and bar charts as inline SVG: plots a report can embed without loading anything.

No plotting library: a run report must open from disk, offline, on a
hospital workstation, and the few chart kinds it needs (lines over rounds,
ROC and calibration curves) are simple.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
           "#17becf", "#7f7f7f", "#bcbd22")

Series = tuple[Sequence[float], Sequence[float]]


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * step >= raw:
            step *= factor
            break
    first = math.ceil(low / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step + 1e-9) + 1)]


def _frame(title: str, width: int, height: int, left: int, top: int, plot_w: float,
           plot_h: float, y_ticks: Sequence[float], sy: Callable[[float], float]) -> list[str]:
    """The opening of a chart: the svg element, its title, the plot's frame and the
    horizontal grid lines with their tick labels."""
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}">',
             f'<text x="{left}" y="18" class="title">{escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>']
    for t in y_ticks:
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" '
                     f'class="grid"/><text x="{left - 6}" y="{sy(t) + 4:.1f}" '
                     f'class="tick" text-anchor="end">{t:g}</text>')
    return parts


def line_chart(series: Mapping[str, Series], *, title: str, x_label: str, y_label: str,
               y_range: tuple[float, float] | None = None,
               x_range: tuple[float, float] | None = None, diagonal: bool = False,
               errors: Mapping[str, Sequence[float]] | None = None,
               colours: Mapping[str, str] | None = None,
               levels: Mapping[str, float] | None = None,
               width: int = 520, height: int = 320) -> str:
    """An SVG line chart, one coloured line (with points) per series, legend on the right.

    Parameters
    ----------
    series : mapping
        Label -> (xs, ys); non-finite points are skipped.
    y_range, x_range : (low, high), optional
        Axis ranges (default: the data's).
    diagonal : bool
        Draw the dashed y = x line (ROC chance level, perfect calibration).
    errors : mapping, optional
        Label -> half-length of a vertical error bar at each point of that series.
    colours : mapping, optional
        Label -> colour, so that one site keeps its colour across charts (`colour_map`);
        other series take the palette in order.
    levels : mapping, optional
        Text -> y value of a dashed horizontal line drawn across the plot and labelled
        (a budget's cap).
    """
    left, right, top, bottom = 56, 150, 30, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    errors = errors or {}
    points = {k: [(float(x), float(y), float(e)) for x, y, e in
                  zip(*v, errors.get(k, [0.0] * len(v[0])), strict=True)
                  if math.isfinite(float(x)) and math.isfinite(float(y))]
              for k, v in series.items()}
    xs = [x for p in points.values() for x, _, _ in p] or [0.0, 1.0]
    levels = levels or {}
    ys = ([y - e for p in points.values() for _, y, e in p]
          + [y + e for p in points.values() for _, y, e in p]
          + [v for v in levels.values() if math.isfinite(v)]) or [0.0, 1.0]
    x0, x1 = x_range or (min(xs), max(xs))
    y0, y1 = y_range or (min(ys), max(ys))
    if x1 <= x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 <= y0:
        y0, y1 = y0 - 0.05, y1 + 0.05

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts = _frame(title, width, height, left, top, plot_w, plot_h, _ticks(y0, y1), sy)
    for t in _ticks(x0, x1):
        parts.append(f'<text x="{sx(t):.1f}" y="{top + plot_h + 16}" class="tick" '
                     f'text-anchor="middle">{t:g}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" class="label" '
                 f'text-anchor="middle">{escape(x_label)}</text>')
    parts.append(f'<text transform="translate(14 {top + plot_h / 2:.1f}) rotate(-90)" '
                 f'class="label" text-anchor="middle">{escape(y_label)}</text>')
    if diagonal:
        low, high = max(x0, y0), min(x1, y1)
        parts.append(f'<line x1="{sx(low):.1f}" y1="{sy(low):.1f}" x2="{sx(high):.1f}" '
                     f'y2="{sy(high):.1f}" class="diagonal"/>')
    for text, value in levels.items():
        if math.isfinite(value) and y0 <= value <= y1:
            # Labelled at the left, above the line: lines over rounds start low there.
            parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(value):.1f}" '
                         f'y2="{sy(value):.1f}" class="level"/><text x="{left + 4}" '
                         f'y="{sy(value) - 5:.1f}" class="level-label">{escape(text)}</text>')
    palette = iter(c for c in PALETTE if c not in set((colours or {}).values()))
    for i, (label, p) in enumerate(points.items()):
        colour = (colours or {}).get(label) or next(palette, PALETTE[i % len(PALETTE)])
        if p:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in p)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                         f'stroke-width="2"/>')
            if len(p) <= 60:
                parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>'
                          for x, y, _ in p]
            parts += [f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{sy(y - e):.1f}" '
                      f'y2="{sy(y + e):.1f}" stroke="{colour}" class="errorbar"/>'
                      for x, y, e in p if e > 0 and math.isfinite(e)]
        ly = top + 14 + 18 * i
        parts.append(f'<line x1="{left + plot_w + 12}" x2="{left + plot_w + 30}" y1="{ly - 4}" '
                     f'y2="{ly - 4}" stroke="{colour}" stroke-width="3"/>'
                     f'<text x="{left + plot_w + 36}" y="{ly}" class="legend">'
                     f'{escape(label[:18])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def colour_map(labels: Sequence[str]) -> dict[str, str]:
    """One palette colour per label, in order (the palette repeats past its length)."""
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}


def bar_chart(groups: Mapping[str, Mapping[str, float]], *, title: str, y_label: str,
              y_range: tuple[float, float] = (0.0, 1.0),
              levels: Mapping[str, float] | None = None,
              width: int = 520, height: int = 320) -> str:
    """An SVG grouped bar chart: one group per key of `groups`, one coloured bar per series.

    Parameters
    ----------
    groups : mapping
        Group label (on the x axis) -> series label -> value; non-finite values are
        left out (no bar), and each bar carries its value as text.
    levels : mapping, optional
        Text -> y value of a dashed reference line (0.5 for an AUC: chance).
    """
    left, right, top, bottom = 56, 150, 30, 60
    plot_w, plot_h = width - left - right, height - top - bottom
    y0, y1 = y_range
    series = list(dict.fromkeys(k for values in groups.values() for k in values))
    colours = colour_map(series)

    def sy(y: float) -> float:
        return top + (1 - (min(max(y, y0), y1) - y0) / (y1 - y0)) * plot_h

    parts = _frame(title, width, height, left, top, plot_w, plot_h, _ticks(y0, y1), sy)
    parts.append(f'<text transform="translate(14 {top + plot_h / 2:.1f}) rotate(-90)" '
                 f'class="label" text-anchor="middle">{escape(y_label)}</text>')
    slot = plot_w / max(len(groups), 1)
    bar = slot * 0.8 / max(len(series), 1)
    for g, (group, values) in enumerate(groups.items()):
        x = left + g * slot + slot * 0.1
        for k, name in enumerate(series):
            value = values.get(name, math.nan)
            if not math.isfinite(value):
                continue
            bx = x + k * bar
            parts.append(f'<rect x="{bx:.1f}" y="{sy(value):.1f}" width="{bar * 0.9:.1f}" '
                         f'height="{sy(y0) - sy(value):.1f}" fill="{colours[name]}">'
                         f'<title>{escape(group)}: {escape(name)} {value:.3g}</title></rect>'
                         f'<text x="{bx + bar * 0.45:.1f}" y="{sy(value) - 3:.1f}" '
                         f'class="tick" text-anchor="middle">{value:.2f}</text>')
        parts.append(f'<text x="{left + g * slot + slot / 2:.1f}" y="{top + plot_h + 16}" '
                     f'class="tick" text-anchor="middle">{escape(group[:24])}</text>')
    for text, value in (levels or {}).items():
        # Labelled right of the plot, below the legend: bars would hide it inside.
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(value):.1f}" '
                     f'y2="{sy(value):.1f}" class="level"/><text x="{left + plot_w + 12}" '
                     f'y="{sy(value) + 4:.1f}" class="level-label">{escape(text)}</text>')
    for i, name in enumerate(series):
        ly = top + 14 + 18 * i
        parts.append(f'<rect x="{left + plot_w + 12}" y="{ly - 9}" width="18" height="10" '
                     f'fill="{colours[name]}"/><text x="{left + plot_w + 36}" y="{ly}" '
                     f'class="legend">{escape(name[:18])}</text>')
    parts.append("</svg>")
    return "".join(parts)
