"""A self-contained evaluation report: report.html, metrics.json and grid.png.

The HTML needs nothing but a browser: images are base64 PNG data URIs, plots are inline SVG, and
there is no script. Every piece of text that came from a user (titles, prompts, cells, series
names) goes through ``html.escape``, since prompts are arbitrary strings. Each file is written
atomically, so a crash never leaves a half-written report where the previous one was.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..io import atomic_path, atomic_write_text

__all__ = [
    "Bars",
    "Grid",
    "Heatmap",
    "Plot",
    "Report",
    "Table",
    "format_ci",
    "format_number",
    "grid_image",
    "metrics_json",
    "render_html",
    "svg_bar_chart",
    "svg_heatmap",
    "svg_line_plot",
    "write_report",
]

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


@dataclass
class Table:
    """A titled table; ``rows`` hold strings or numbers, one entry per column."""

    title: str
    columns: list[str]
    rows: list[list[str | float]]

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(
                    f"table {self.title!r}: row {i} has {len(row)} cells, expected {len(self.columns)}"
                )


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
class Grid:
    """An image grid: ``images`` is uint8 [R, C, H, W, 3], rows and columns labelled; tiles are
    shown ``scale`` times their size."""

    title: str
    row_labels: list[str]
    col_labels: list[str]
    images: np.ndarray
    scale: int = 4

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images)
        shape = self.images.shape
        if self.images.dtype != np.uint8 or self.images.ndim != 5 or shape[-1] != 3:
            raise ValueError(
                f"grid {self.title!r}: images must be uint8 [R, C, H, W, 3], got {self.images.dtype} {shape}"
            )
        if shape[0] != len(self.row_labels) or shape[1] != len(self.col_labels):
            raise ValueError(
                f"grid {self.title!r}: {shape[0]}x{shape[1]} images but "
                f"{len(self.row_labels)} row and {len(self.col_labels)} column labels"
            )


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


@dataclass
class Report:
    """Everything a report shows; ``metrics`` goes to metrics.json verbatim (made JSON-safe)."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    grids: list[Grid] = field(default_factory=list)
    heatmaps: list[Heatmap] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    bars: list[Bars] = field(default_factory=list)


def _esc(text: object) -> str:
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


# ---------------------------------------------------------------------------------------------
# Images


def grid_image(grid: Grid, scale: int = 4, gap: int = 2) -> Image.Image:
    """All tiles, nearest-neighbour upscaled by ``scale``, ``gap`` white pixels between them.

    Size: width C*W*scale + (C-1)*gap, height R*H*scale + (R-1)*gap.
    """
    if scale < 1 or gap < 0:
        raise ValueError(f"scale must be >= 1 and gap >= 0, got scale={scale}, gap={gap}")
    r, c, h, w, _ = grid.images.shape
    th, tw = h * scale, w * scale
    canvas = np.full((r * th + (r - 1) * gap, c * tw + (c - 1) * gap, 3), 255, dtype=np.uint8)
    # np.repeat along both axes is exact nearest-neighbour upscaling (no resampling blur).
    tiles = grid.images.repeat(scale, axis=2).repeat(scale, axis=3)
    for i in range(r):
        for j in range(c):
            y, x = i * (th + gap), j * (tw + gap)
            canvas[y : y + th, x : x + tw] = tiles[i, j]
    return Image.fromarray(canvas)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(img: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(_png_bytes(img)).decode("ascii")


# ---------------------------------------------------------------------------------------------
# SVG plots


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
        parts.append(f'<text x="{x + 21:.1f}" y="{y}" font-size="11">{_esc(name)}</text>')
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
            f"{_esc(_tick_label(t))}</text>"
        )
    for t in _nice_ticks(*yr):
        y = sy(t)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(
            f'<text x="{left - 5}" y="{y + 3:.1f}" font-size="10" text-anchor="end">'
            f"{_esc(_tick_label(t))}</text>"
        )
    parts.append(
        f'<text x="{(left + right) / 2:.1f}" y="{height - 6}" font-size="11" '
        f'text-anchor="middle">{_esc(plot.xlabel)}</text>'
    )
    parts.append(
        f'<text x="12" y="{(top + bottom) / 2:.1f}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 12 {(top + bottom) / 2:.1f})">{_esc(plot.ylabel)}</text>'
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
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" font-family="sans-serif">',
        f"<title>{_esc(plot.title)}</title>",
        f'<text x="{width / 2:.1f}" y="15" font-size="13" text-anchor="middle">{_esc(plot.title)}</text>',
    ]
    parts += _legend_svg(layout, 34)
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
    plot = Plot(bars.title, bars.xlabel, "", {})
    sx, _ = _scales(box, bars.x_range, (0.0, 1.0))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" font-family="sans-serif">',
        f"<title>{_esc(bars.title)}</title>",
        f'<text x="{width / 2:.1f}" y="15" font-size="13" text-anchor="middle">{_esc(bars.title)}</text>',
    ]
    parts += _legend_svg(layout, 34)
    parts += _axes_svg(box, bars.x_range, (0.0, 1.0), plot, height)[:1]
    for t in _nice_ticks(*bars.x_range):
        x = sx(t)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#eee"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{bottom + 15}" font-size="10" text-anchor="middle">{_esc(_tick_label(t))}</text>'
        )
    parts.append(
        f'<text x="{(left + box[2]) / 2:.1f}" y="{height - 6}" font-size="11" text-anchor="middle">'
        f"{_esc(bars.xlabel)}</text>"
    )
    lo_x = bars.x_range[0]
    for i, group in enumerate(bars.groups):
        y0 = top + i * group_h + 5
        parts.append(
            f'<text x="{left - 5}" y="{y0 + group_h / 2 - 2:.1f}" font-size="11" text-anchor="end">{_esc(group)}</text>'
        )
        for k, name in enumerate(names):
            v, lo, hi = (float(x) for x in bars.series[name][i])
            if not math.isfinite(v):
                continue
            colour, y = _PALETTE[k % len(_PALETTE)], y0 + k * bar_h
            x0, x1 = sx(lo_x), sx(v)
            parts.append(
                f'<rect x="{min(x0, x1):.1f}" y="{y}" width="{abs(x1 - x0):.1f}" height="{bar_h - 2}" '
                f'fill="{colour}" fill-opacity="0.75"><title>{_esc(name)}: {_esc(format_ci(v, lo, hi))}</title></rect>'
            )
            if math.isfinite(lo) and math.isfinite(hi):
                ym = y + (bar_h - 2) / 2
                parts.append(
                    f'<line x1="{sx(lo):.1f}" y1="{ym:.1f}" x2="{sx(hi):.1f}" y2="{ym:.1f}" stroke="#222"/>'
                )
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


def svg_heatmap(hm: Heatmap, cell_w: int = 64, cell_h: int = 30) -> str:
    """An inline SVG heat map: one cell per value with the number written in it, axes labelled."""
    vals = np.asarray(hm.values, dtype=np.float64).reshape(len(hm.rows), len(hm.cols))
    finite = vals[np.isfinite(vals)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    left = 30 + 7 * max((len(r) for r in hm.rows), default=1)
    top = 44 + 14
    width = max(left + cell_w * len(hm.cols) + 10, 7 * len(hm.title) + 20)
    height = top + cell_h * len(hm.rows) + 34
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" font-family="sans-serif">',
        f"<title>{_esc(hm.title)}</title>",
        f'<text x="{width / 2:.1f}" y="15" font-size="13" text-anchor="middle">{_esc(hm.title)}</text>',
        f'<text x="{left + cell_w * len(hm.cols) / 2:.1f}" y="34" font-size="11" '
        f'text-anchor="middle">{_esc(hm.col_label)}</text>',
        f'<text x="12" y="{top + cell_h * len(hm.rows) / 2:.1f}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 12 {top + cell_h * len(hm.rows) / 2:.1f})">{_esc(hm.row_label)}</text>',
    ]
    for j, c in enumerate(hm.cols):
        x = left + (j + 0.5) * cell_w
        parts.append(f'<text x="{x:.1f}" y="{top - 5}" font-size="10" text-anchor="middle">{_esc(c)}</text>')
    for i, r in enumerate(hm.rows):
        y = top + i * cell_h
        parts.append(
            f'<text x="{left - 5}" y="{y + cell_h / 2 + 3:.1f}" font-size="10" text-anchor="end">{_esc(r)}</text>'
        )
        for j in range(len(hm.cols)):
            v = float(vals[i, j])
            x = left + j * cell_w
            if math.isfinite(v):
                t = (v - lo) / (hi - lo) if hi > lo else 0.5
                t = t if hm.higher_is_better else 1.0 - t
                fill, ink = _cell_colour(t), ("#fff" if t > 0.55 else "#000")
            else:
                fill, ink = "#ddd", "#666"
            parts.append(
                f'<rect x="{x}" y="{y}" width="{cell_w}" height="{cell_h}" fill="{fill}" stroke="#fff"/>'
            )
            parts.append(
                f'<text x="{x + cell_w / 2:.1f}" y="{y + cell_h / 2 + 4:.1f}" font-size="11" '
                f'text-anchor="middle" fill="{ink}">{_esc(format_number(v))}</text>'
            )
    note = "darker = better" + ("" if hm.higher_is_better else " (lower)")
    parts.append(f'<text x="{left}" y="{height - 8}" font-size="10" fill="#555">{_esc(note)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# metrics.json


def _jsonable(obj: Any) -> Any:
    """A JSON-safe copy: numpy scalars/arrays to Python, NaN/inf to None, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        # JSON has no NaN/inf; null says "not available" to every parser.
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"metrics: cannot store {type(obj).__name__} in JSON: {obj!r}")


def metrics_json(metrics: dict[str, Any]) -> str:
    """Pretty-printed, strictly valid JSON (``allow_nan=False``) of ``metrics``."""
    return json.dumps(_jsonable(metrics), indent=2, allow_nan=False, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.grid td, table.grid th { border: none; padding: 2px; font-size: 12px; font-weight: normal; }
table.grid th { max-width: 12em; overflow-wrap: anywhere; }
img.tile { image-rendering: pixelated; display: block; }
figure { margin: 0.5em 0 1.5em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
"""


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in table.columns)
    rows = []
    for row in table.rows:
        cells = []
        for v in row:
            numeric = isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_)
            cls = ' class="num"' if numeric else ""
            cells.append(f"<td{cls}>{_esc(format_number(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f"<h2>{_esc(table.title)}</h2>\n<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody>\n</table>"
    )


def _grid_html(grid: Grid, scale: int = 4) -> str:
    """A labelled HTML table of tiles; each tile is a native-size PNG shown upscaled, pixelated."""
    _, _, h, w, _ = grid.images.shape
    head = "<tr><th></th>" + "".join(f"<th>{_esc(c)}</th>" for c in grid.col_labels) + "</tr>"
    rows = [head]
    for i, rl in enumerate(grid.row_labels):
        cells = [f'<th scope="row">{_esc(rl)}</th>']
        for j, cl in enumerate(grid.col_labels):
            uri = _data_uri(Image.fromarray(np.ascontiguousarray(grid.images[i, j])))
            cells.append(
                f'<td><img class="tile" src="{uri}" width="{w * scale}" height="{h * scale}" '
                f'alt="{_esc(f"{rl} / {cl}")}"></td>'
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<h2>{_esc(grid.title)}</h2>\n<table class="grid">\n' + "\n".join(rows) + "\n</table>"


def render_html(report: Report) -> str:
    """The whole self-contained report page as a string (no scripts, no external resources)."""
    body = [f"<h1>{_esc(report.title)}</h1>"]
    body += [f"<p>{_esc(p)}</p>" for p in report.paragraphs]
    body += [_table_html(t) for t in report.tables]
    body += [f"<figure>{svg_line_plot(p)}</figure>" for p in report.plots]
    body += [f"<figure>{svg_heatmap(h)}</figure>" for h in report.heatmaps]
    body += [f"<figure>{svg_bar_chart(b)}</figure>" for b in report.bars]
    body += [_grid_html(g, g.scale) for g in report.grids]
    if report.metrics:
        body.append(f"<h2>Metrics</h2>\n<pre>{_esc(metrics_json(report.metrics))}</pre>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_esc(report.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """Write report.html, metrics.json and grid.png (the first grid, if any) into ``out_dir``.

    Everything is rendered in memory first, then each file is replaced atomically, so a failure
    leaves every previous file whole. Returns {"html", "metrics"[, "grid"]} -> path.
    """
    out = Path(out_dir)
    page = render_html(report)
    metrics = metrics_json(report.metrics)
    png = _png_bytes(grid_image(report.grids[0], report.grids[0].scale)) if report.grids else None
    out.mkdir(parents=True, exist_ok=True)
    paths = {"html": out / "report.html", "metrics": out / "metrics.json"}
    if png is not None:
        paths["grid"] = out / "grid.png"
        with atomic_path(paths["grid"]) as tmp:
            tmp.write_bytes(png)
    atomic_write_text(paths["metrics"], metrics)
    atomic_write_text(paths["html"], page)
    if png is None:
        # A grid.png left from an earlier run would silently pass as this run's samples.
        (out / "grid.png").unlink(missing_ok=True)
    return paths
