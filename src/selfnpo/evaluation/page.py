"""A self-contained evaluation report: report.html, metrics.json and grid.png.

The HTML needs nothing but a browser: images are base64 PNG data URIs, plots are inline SVG
(:mod:`selfnpo.evaluation.plots`), and there is no script. Every piece of text that came from a
user (titles, prompts, cells, series names) goes through ``html.escape``, since prompts are
arbitrary strings. Each file is written atomically, so a crash never leaves a half-written
report where the previous one was.
"""

from __future__ import annotations

import base64
import io
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..io import atomic_path, atomic_write_text
from .plots import Bars, Heatmap, Plot, esc, format_number, svg_bar_chart, svg_heatmap, svg_line_plot


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
    head = "".join(f"<th>{esc(c)}</th>" for c in table.columns)
    rows = []
    for row in table.rows:
        cells = []
        for v in row:
            numeric = isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_)
            cls = ' class="num"' if numeric else ""
            cells.append(f"<td{cls}>{esc(format_number(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f"<h2>{esc(table.title)}</h2>\n<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody>\n</table>"
    )


def _grid_html(grid: Grid, scale: int = 4) -> str:
    """A labelled HTML table of tiles; each tile is a native-size PNG shown upscaled, pixelated."""
    _, _, h, w, _ = grid.images.shape
    head = "<tr><th></th>" + "".join(f"<th>{esc(c)}</th>" for c in grid.col_labels) + "</tr>"
    rows = [head]
    for i, rl in enumerate(grid.row_labels):
        cells = [f'<th scope="row">{esc(rl)}</th>']
        for j, cl in enumerate(grid.col_labels):
            uri = _data_uri(Image.fromarray(np.ascontiguousarray(grid.images[i, j])))
            cells.append(
                f'<td><img class="tile" src="{uri}" width="{w * scale}" height="{h * scale}" '
                f'alt="{esc(f"{rl} / {cl}")}"></td>'
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<h2>{esc(grid.title)}</h2>\n<table class="grid">\n' + "\n".join(rows) + "\n</table>"


def render_html(report: Report) -> str:
    """The whole self-contained report page as a string (no scripts, no external resources)."""
    body = [f"<h1>{esc(report.title)}</h1>"]
    body += [f"<p>{esc(p)}</p>" for p in report.paragraphs]
    body += [_table_html(t) for t in report.tables]
    body += [f"<figure>{svg_line_plot(p)}</figure>" for p in report.plots]
    body += [f"<figure>{svg_heatmap(h)}</figure>" for h in report.heatmaps]
    body += [f"<figure>{svg_bar_chart(b)}</figure>" for b in report.bars]
    body += [_grid_html(g, g.scale) for g in report.grids]
    if report.metrics:
        body.append(f"<h2>Metrics</h2>\n<pre>{esc(metrics_json(report.metrics))}</pre>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(report.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
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
