"""The paper-style table, the win-rate figure and the HTML report of ``selfnpo compare``.

Every setting is compared with the first one image by image (same prompt, same seed): the mean
paired difference with a 95% bootstrap interval over pairs, and the win rate (ties count 1/2)
with its interval (:mod:`selfnpo.evaluation.stats`).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from ..evaluation.page import Grid, Report, Table, write_report
from ..evaluation.plots import Bars, format_ci, format_number, svg_bar_chart
from ..evaluation.stats import paired_diff_ci, win_rate
from ..io import atomic_write_text
from .settings import Setting

TILE = 112  # largest tile side in the report's grid (8 columns and the labels fit the page)


def paired_table(
    settings: list[Setting], rows: list[list[dict]], names: list[str], n_boot: int
) -> list[dict]:
    """One dict per setting: n, and per metric its mean, paired difference and win rate vs the first."""
    table = []
    for s, r in zip(settings, rows, strict=True):
        row = {"setting": s.label, "n": len(r)}
        for m in names:
            a = np.array([x[m] for x in r], dtype=np.float64)
            b = np.array([x[m] for x in rows[0]], dtype=np.float64)
            d, w = paired_diff_ci(a, b, n_boot=n_boot), win_rate(a, b, n_boot=n_boot)
            row |= {f"{m}_mean": float(a.mean())}
            row |= dict(zip((f"{m}_diff", f"{m}_diff_lo", f"{m}_diff_hi"), d, strict=True))
            row |= dict(zip((f"{m}_win", f"{m}_win_lo", f"{m}_win_hi"), w, strict=True))
        table.append(row)
    return table


def table_csv(table: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(table)
    return buf.getvalue()


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_cells(table: list[dict], names: list[str]) -> tuple[list[str], list[list]]:
    """Columns and cells of the printed table: per metric the mean, the difference against the
    first setting and the win rate, each with its interval; the world's Frechet distance (a
    per-set number, lower is better) when there is one."""
    fd = "world_frechet" in table[0]
    columns = ["setting", "n"]
    for m in names:
        columns += [f"{m} mean", f"{m} diff [95% CI]", f"{m} win rate [95% CI]"]
    columns += ["world Frechet [95% CI] (lower is better)"] if fd else []
    cells = []
    for i, r in enumerate(table):
        line = [r["setting"], r["n"]]
        for m in names:
            line.append(r[f"{m}_mean"])
            if i == 0:
                line += ["reference", "reference"]
            else:
                line.append(format_ci(r[f"{m}_diff"], r[f"{m}_diff_lo"], r[f"{m}_diff_hi"]))
                line.append(format_ci(r[f"{m}_win"], r[f"{m}_win_lo"], r[f"{m}_win_hi"]))
        if fd:
            line.append(format_ci(r["world_frechet"], r["world_frechet_lo"], r["world_frechet_hi"]))
        cells.append(line)
    return columns, cells


def table_markdown(table: list[dict], names: list[str]) -> str:
    """The printed table as markdown."""
    columns, cells = table_cells(table, names)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for line in cells:
        lines.append("| " + " | ".join(_md_cell(format_number(c)) for c in line) + " |")
    return "\n".join(lines) + "\n"


def win_rate_bars(table: list[dict], names: list[str]) -> Bars:
    """Win rate of every setting but the first against the first, per metric, with intervals."""
    ref = table[0]["setting"]
    return Bars(
        f"Win rate against {ref} (same prompt and seed; 95% bootstrap intervals)",
        "win rate",
        [r["setting"] for r in table[1:]],
        {m: [(r[f"{m}_win"], r[f"{m}_win_lo"], r[f"{m}_win_hi"]) for r in table[1:]] for m in names},
        reference=0.5,
    )


def _tile(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        if max(im.size) > TILE:
            im = im.resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(im)


def image_grid(settings: list[Setting], folders: list[Path], rows: list[list[dict]], k: int) -> Grid | None:
    """Rows: settings; columns: the first image of the first ``k`` prompts (same seed in a column)."""
    firsts: dict[str, dict] = {}
    for r in rows[0]:
        firsts.setdefault(r["prompt"], r)
    cols = list(firsts.values())[:k]
    if not cols:
        return None
    with Image.open(folders[0] / cols[0]["file"]) as im:
        side = max(im.size)
    size = min(side, TILE)
    tiles = np.stack([np.stack([_tile(f / c["file"], size) for c in cols]) for f in folders])
    return Grid(
        "Samples (rows: settings; columns: prompts, same seed per column)",
        [s.label for s in settings],
        [c["prompt"] for c in cols],
        tiles,
        scale=max(1, TILE // size),
    )


def write_outputs(cfg, out: Path, settings, folders, rows, table, names) -> dict[str, Path]:
    """table.csv, table.md, winrates.svg, report.html, metrics.json, grid.png."""
    paths = {"csv": out / "table.csv", "md": out / "table.md", "svg": out / "winrates.svg"}
    atomic_write_text(paths["csv"], table_csv(table))
    atomic_write_text(paths["md"], table_markdown(table, names))
    bars = [win_rate_bars(table, names)] if names and len(table) > 1 else []
    if bars:
        atomic_write_text(paths["svg"], svg_bar_chart(bars[0]) + "\n")
    else:
        paths["svg"].unlink(missing_ok=True)
    columns, cells = table_cells(table, names)
    grid = image_grid(settings, folders, rows, cfg.grid_prompts)
    n_prompts = len(rows[0]) // cfg.num_images_per_prompt
    paragraphs = [
        f"Model {cfg.model}; {n_prompts} prompts x {cfg.num_images_per_prompt} images, seeds from "
        f"{cfg.seed}; {cfg.steps} steps; guidance scale g = {cfg.guidance_scale:g}.",
        f"Every setting is compared with the first ({settings[0].label}) image by image: paired "
        "difference of the means and win rate (ties count 1/2), with 95% bootstrap intervals over pairs.",
    ]
    if not names:
        paragraphs.append("No metric was computed: name reward models with --models.")
    report = Report(
        "selfnpo compare",
        paragraphs,
        [Table("Settings compared with the first", columns, cells)],
        grids=[grid] if grid is not None else [],
        bars=bars,
        metrics={
            "config": asdict(cfg),
            "settings": [{"label": s.label, **s.key()} for s in settings],
            "folders": [str(f) for f in folders],
            "table": table,
        },
    )
    paths |= write_report(report, out)
    atomic_write_text(out / "table.json", json.dumps(table, indent=2))
    return paths
