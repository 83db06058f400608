"""SVG charts of the evaluation report: line plots with interval bands, grouped bars with
whiskers and heat maps, each a self-contained inline ``<svg>`` whose text is HTML-escaped."""

from __future__ import annotations

import html
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


@dataclass
class Plot:
    """Line plot; each series is a list of (x, y, lo, hi) points, lo/hi bounding a shaded band."""

    title: str
    xlabel: str
    ylabel: str
    series: dict[str, list[tuple[float, float, float, float]]]

    def __post_init__(self) -> None:
        for name, points in self.series.items():
            for p in points:
                if len(p) != 4:
                    raise ValueError(f"plot {self.title!r}, series {name!r}: points are (x, y, lo, hi)")


@dataclass
class Bars:
    """Horizontal grouped bars with intervals: one group per entry of ``groups``, one bar per
    series; ``series[name][i]`` is (value, lo, hi) for group i. ``reference`` draws a dashed line
    (e.g. 0.5 for win rates)."""

    title: str
    xlabel: str
    groups: list[str]
    series: dict[str, list[tuple[float, float, float]]]
    x_range: tuple[float, float] = (0.0, 1.0)
    reference: float | None = None

    def __post_init__(self) -> None:
        for name, values in self.series.items():
            if len(values) != len(self.groups) or any(len(v) != 3 for v in values):
                raise ValueError(f"bars {self.title!r}, series {name!r}: need one (value, lo, hi) per group")


@dataclass
class Heatmap:
    """A matrix of numbers over two axes, drawn as coloured cells with each value written in.

    ``values[i][j]`` belongs to row ``rows[i]`` and column ``cols[j]``; NaN marks a missing cell.
    Darker is better: ``higher_is_better=False`` for distances.
    """

    title: str
    row_label: str
    col_label: str
    rows: list[str]
    cols: list[str]
    values: list[list[float]]
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if len(self.values) != len(self.rows) or any(len(r) != len(self.cols) for r in self.values):
            raise ValueError(
                f"heatmap {self.title!r}: values must be {len(self.rows)} rows of {len(self.cols)} numbers"
            )


def esc(text: object) -> str:
    """``text`` for HTML or SVG, quotes included (prompts are arbitrary strings)."""
    return html.escape(str(text), quote=True)


def format_number(value: object) -> str:
    """Cell text: ints as is, floats to 4 significant digits, NaN as 'n/a', others via str()."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isnan(v):
            return "n/a"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4g}" if v != 0 else "0"
    return str(value)


def format_ci(mean: float, lo: float, hi: float) -> str:
    """'mean [lo, hi]' for a table cell, e.g. from :func:`~selfnpo.evaluation.stats.paired_diff_ci`."""
    return f"{format_number(mean)} [{format_number(lo)}, {format_number(hi)}]"


def _svg_head(title: str, width: int, height: int) -> list[str]:
    """The opening tag of a chart, its title (for screen readers) and the title drawn on top."""
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" font-family="sans-serif">',
        f"<title>{esc(title)}</title>",
        f'<text x="{width / 2:.1f}" y="15" font-size="13" text-anchor="middle">{esc(title)}</text>',
    ]


def _finite_points(points: list[tuple[float, float, float, float]]) -> list[tuple[float, ...]]:
    """Points sorted by x, dropping non-finite x or y; a non-finite lo/hi collapses to y."""
    out = []
    for x, y, lo, hi in points:
        x, y, lo, hi = float(x), float(y), float(lo), float(hi)
        if math.isfinite(x) and math.isfinite(y):
            out.append((x, y, lo if math.isfinite(lo) else y, hi if math.isfinite(hi) else y))
    return sorted(out)


def _padded_range(values: list[float], pad: float) -> tuple[float, float]:
    """[min, max] widened by ``pad`` of its span; a single value gets a unit-scaled window."""
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    span = hi - lo
    if span <= 1e-12 * max(1.0, abs(lo), abs(hi)):
        d = 0.5 * max(1.0, abs(lo))
        return lo - d, hi + d
    return lo - pad * span, hi + pad * span


def _nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Ticks at multiples of 1, 2 or 5 x 10^k inside [lo, hi], about ``target`` of them."""
    raw = (hi - lo) / target
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    ticks = []
    k = math.ceil(lo / step - 1e-9)
    while k * step <= hi + 1e-9 * step:
        # k * step (not a running sum) keeps 0.1 + 0.2 style rounding out of the labels.
        ticks.append(0.0 if k == 0 else k * step)
        k += 1
    return ticks


def _tick_label(v: float) -> str:
    return f"{v:.6g}"


def _legend_layout(names: list[str], width: int, left: int) -> list[tuple[str, float, int]]:
    """(name, x, line) per series, wrapping lines at the plot width (text width estimated)."""
    out, x, line = [], float(left), 0
    for name in names:
        item = 22 + 6.5 * len(name) + 14
        if x + item > width and x > left:
            x, line = float(left), line + 1
        out.append((name, x, line))
        x += item
    return out


def _legend_svg(layout: list[tuple[str, float, int]], top: int) -> list[str]:
    parts = []
    for k, (name, x, line) in enumerate(layout):
        colour = _PALETTE[k % len(_PALETTE)]
        y = top + 14 * line
        parts.append(
            f'<rect x="{x:.1f}" y="{y - 8}" width="16" height="8" fill="{colour}" '
            f'fill-opacity="0.35" stroke="{colour}"/>'
        )
        parts.append(f'<text x="{x + 21:.1f}" y="{y}" font-size="11">{esc(name)}</text>')
    return parts


_Box = tuple[float, float, float, float]  # left, top, right, bottom in SVG pixels
_Scale = Callable[[float], float]


def _scales(box: _Box, xr: tuple[float, float], yr: tuple[float, float]) -> tuple[_Scale, _Scale]:
    """Data -> pixel maps; y is flipped because SVG y grows downwards."""
    left, top, right, bottom = box

    def sx(v: float) -> float:
        return left + (v - xr[0]) / (xr[1] - xr[0]) * (right - left)

    def sy(v: float) -> float:
        return bottom - (v - yr[0]) / (yr[1] - yr[0]) * (bottom - top)

    return sx, sy


def _axes_svg(
    box: _Box, xr: tuple[float, float], yr: tuple[float, float], plot: Plot, height: int
) -> list[str]:
    """Frame, ticks with labels and grid lines, axis labels."""
    left, top, right, bottom = box
    sx, sy = _scales(box, xr, yr)
    parts = [
        f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" '
        'fill="none" stroke="#444"/>'
    ]
    for t in _nice_ticks(*xr):
        x = sx(t)
        parts.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" stroke="#444"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{bottom + 15}" font-size="10" text-anchor="middle">'
            f"{esc(_tick_label(t))}</text>"
        )
    for t in _nice_ticks(*yr):
        y = sy(t)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(
            f'<text x="{left - 5}" y="{y + 3:.1f}" font-size="10" text-anchor="end">'
            f"{esc(_tick_label(t))}</text>"
        )
    parts.append(
        f'<text x="{(left + right) / 2:.1f}" y="{height - 6}" font-size="11" '
        f'text-anchor="middle">{esc(plot.xlabel)}</text>'
    )
    parts.append(
        f'<text x="12" y="{(top + bottom) / 2:.1f}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 12 {(top + bottom) / 2:.1f})">{esc(plot.ylabel)}</text>'
    )
    return parts


def _series_svg(points: list[tuple[float, ...]], colour: str, sx: _Scale, sy: _Scale) -> list[str]:
    """The lo-hi band (a polygon: hi forwards, lo backwards), the line and point markers."""
    if not points:
        return []
    band = [(sx(p[0]), sy(p[3])) for p in points] + [(sx(p[0]), sy(p[2])) for p in reversed(points)]
    line = " ".join(f"{sx(p[0]):.1f},{sy(p[1]):.1f}" for p in points)
    parts = [
        '<polygon points="'
        + " ".join(f"{x:.1f},{y:.1f}" for x, y in band)
        + f'" fill="{colour}" fill-opacity="0.18" stroke="none"/>',
        f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="1.8"/>',
    ]
    parts += [f'<circle cx="{sx(p[0]):.1f}" cy="{sy(p[1]):.1f}" r="2.5" fill="{colour}"/>' for p in points]
    return parts


def svg_line_plot(plot: Plot, width: int = 420, height: int = 280) -> str:
    """An inline SVG line chart: axes with tick labels, a legend, and a lo-hi band per series."""
    names = list(plot.series)
    series = {n: _finite_points(plot.series[n]) for n in names}
    pts = [p for s in series.values() for p in s]
    xr = _padded_range([p[0] for p in pts], 0.03)
    yr = _padded_range([v for p in pts for v in p[1:]], 0.06)
    layout = _legend_layout(names, width - 8, 56)
    n_lines = 1 + max((line for _, _, line in layout), default=-1)
    box = (56.0, 24.0 + 14 * n_lines + 6, width - 12.0, height - 40.0)
    left, top, right, bottom = box
    sx, sy = _scales(box, xr, yr)
    parts = _svg_head(plot.title, width, height) + _legend_svg(layout, 34)
    parts += _axes_svg(box, xr, yr, plot, height)
    for k, name in enumerate(names):
        parts += _series_svg(series[name], _PALETTE[k % len(_PALETTE)], sx, sy)
    if not pts:
        parts.append(
            f'<text x="{(left + right) / 2:.1f}" y="{(top + bottom) / 2:.1f}" '
            'font-size="12" text-anchor="middle" fill="#888">no data</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _bars_frame(bars: Bars, box: _Box, sx: _Scale, height: int) -> list[str]:
    """The frame, vertical grid lines with tick labels, and the x label of a bar chart."""
    left, right = box[0], box[2]
    top, bottom = int(box[1]), int(box[3])  # whole pixels, written as such
    parts = _axes_svg(box, bars.x_range, (0.0, 1.0), Plot(bars.title, bars.xlabel, "", {}), height)[:1]
    for t in _nice_ticks(*bars.x_range):
        x = sx(t)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#eee"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{bottom + 15}" font-size="10" text-anchor="middle">{esc(_tick_label(t))}</text>'
        )
    parts.append(
        f'<text x="{(left + right) / 2:.1f}" y="{height - 6}" font-size="11" text-anchor="middle">'
        f"{esc(bars.xlabel)}</text>"
    )
    return parts


def _bar_group(bars: Bars, i: int, y0: float, bar_h: int, sx: _Scale) -> list[str]:
    """The bars (value from the left end of the range) and whiskers of group ``i``."""
    parts = []
    for k, name in enumerate(bars.series):
        v, lo, hi = (float(x) for x in bars.series[name][i])
        if not math.isfinite(v):
            continue
        colour, y = _PALETTE[k % len(_PALETTE)], y0 + k * bar_h
        x0, x1 = sx(bars.x_range[0]), sx(v)
        parts.append(
            f'<rect x="{min(x0, x1):.1f}" y="{y}" width="{abs(x1 - x0):.1f}" height="{bar_h - 2}" '
            f'fill="{colour}" fill-opacity="0.75"><title>{esc(name)}: {esc(format_ci(v, lo, hi))}</title></rect>'
        )
        if math.isfinite(lo) and math.isfinite(hi):
            ym = y + (bar_h - 2) / 2
            parts.append(
                f'<line x1="{sx(lo):.1f}" y1="{ym:.1f}" x2="{sx(hi):.1f}" y2="{ym:.1f}" stroke="#222"/>'
            )
    return parts


def svg_bar_chart(bars: Bars, width: int = 640, bar_h: int = 12) -> str:
    """An inline SVG of horizontal grouped bars, each with its interval as a whisker."""
    names = list(bars.series)
    left = 20 + min(260, 7 * max((len(g) for g in bars.groups), default=1))
    layout = _legend_layout(names, width - 8, left)
    top = 34 + 14 * (1 + max((line for _, _, line in layout), default=-1))
    group_h = bar_h * max(1, len(names)) + 10
    bottom = top + group_h * len(bars.groups)
    height = bottom + 40
    box = (float(left), float(top), width - 16.0, float(bottom))
    sx, _ = _scales(box, bars.x_range, (0.0, 1.0))
    parts = (
        _svg_head(bars.title, width, height) + _legend_svg(layout, 34) + _bars_frame(bars, box, sx, height)
    )
    for i, group in enumerate(bars.groups):
        y0 = top + i * group_h + 5
        parts.append(
            f'<text x="{left - 5}" y="{y0 + group_h / 2 - 2:.1f}" font-size="11" text-anchor="end">{esc(group)}</text>'
        )
        parts += _bar_group(bars, i, y0, bar_h, sx)
    if bars.reference is not None:
        x = sx(bars.reference)
        parts.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#000" stroke-dasharray="4 3"/>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _cell_colour(t: float) -> str:
    """White (t=0, worst) to dark blue (t=1, best)."""
    lo, hi = (247, 251, 255), (8, 69, 148)
    return "#" + "".join(f"{round(a + t * (b - a)):02x}" for a, b in zip(lo, hi, strict=True))


def _heatmap_cell(
    hm: Heatmap, v: float, x: int, y: int, lo: float, hi: float, cell: tuple[int, int]
) -> list[str]:
    """One cell: coloured by its place between ``lo`` and ``hi`` (grey if missing), value written in."""
    cell_w, cell_h = cell
    if math.isfinite(v):
        t = (v - lo) / (hi - lo) if hi > lo else 0.5
        t = t if hm.higher_is_better else 1.0 - t
        fill, ink = _cell_colour(t), ("#fff" if t > 0.55 else "#000")
    else:
        fill, ink = "#ddd", "#666"
    return [
        f'<rect x="{x}" y="{y}" width="{cell_w}" height="{cell_h}" fill="{fill}" stroke="#fff"/>',
        f'<text x="{x + cell_w / 2:.1f}" y="{y + cell_h / 2 + 4:.1f}" font-size="11" '
        f'text-anchor="middle" fill="{ink}">{esc(format_number(v))}</text>',
    ]


def svg_heatmap(hm: Heatmap, cell_w: int = 64, cell_h: int = 30) -> str:
    """An inline SVG heat map: one cell per value with the number written in it, axes labelled."""
    vals = np.asarray(hm.values, dtype=np.float64).reshape(len(hm.rows), len(hm.cols))
    finite = vals[np.isfinite(vals)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    left = 30 + 7 * max((len(r) for r in hm.rows), default=1)
    top = 44 + 14
    width = max(left + cell_w * len(hm.cols) + 10, 7 * len(hm.title) + 20)
    height = top + cell_h * len(hm.rows) + 34
    mid_y = top + cell_h * len(hm.rows) / 2
    parts = _svg_head(hm.title, width, height) + [
        f'<text x="{left + cell_w * len(hm.cols) / 2:.1f}" y="34" font-size="11" '
        f'text-anchor="middle">{esc(hm.col_label)}</text>',
        f'<text x="12" y="{mid_y:.1f}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 12 {mid_y:.1f})">{esc(hm.row_label)}</text>',
    ]
    for j, c in enumerate(hm.cols):
        x = left + (j + 0.5) * cell_w
        parts.append(f'<text x="{x:.1f}" y="{top - 5}" font-size="10" text-anchor="middle">{esc(c)}</text>')
    for i, r in enumerate(hm.rows):
        y = top + i * cell_h
        parts.append(
            f'<text x="{left - 5}" y="{y + cell_h / 2 + 3:.1f}" font-size="10" text-anchor="end">{esc(r)}</text>'
        )
        for j in range(len(hm.cols)):
            parts += _heatmap_cell(hm, float(vals[i, j]), left + j * cell_w, y, lo, hi, (cell_w, cell_h))
    note = "darker = better" + ("" if hm.higher_is_better else " (lower)")
    parts.append(f'<text x="{left}" y="{height - 8}" font-size="10" fill="#555">{esc(note)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
