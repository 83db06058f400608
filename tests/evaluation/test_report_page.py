"""The report page is pinned: the same input gives the same HTML, byte for byte."""

import math
from pathlib import Path

import numpy as np

from selfnpo.evaluation.page import Grid, Report, Table, render_html
from selfnpo.evaluation.plots import Bars, Heatmap, Plot

GOLDEN = Path(__file__).parent / "data" / "report_page.html"


def small_report(grids: bool = False) -> Report:
    """Every element of a page, with text that needs escaping and values that are not finite."""
    series = {
        "base <b>": [(0, 0.1, 0.0, 0.2), (1, 0.3, 0.2, 0.4), (2, math.nan, 0, 1)],
        "npo & co": [(0, 0.2, 0.1, 0.25), (1, 0.35, math.inf, 0.5), (3, 0.4, 0.3, 0.5)],
    }
    bars = {"a": [(0.6, 0.5, 0.7), (0.4, 0.3, 0.55)], "b 'quoted'": [(0.5, 0.45, 0.52), (math.nan, 0, 1)]}
    images = np.arange(2 * 3 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 3, 2, 2, 3)
    return Report(
        title='Report "x" <y>',
        paragraphs=["first & second", "<script>alert(1)</script>"],
        tables=[Table("t", ["name", "value", "ok"], [["a<", 1.23456789, True], ["b", math.nan, 3]])],
        plots=[Plot("curve", "step", "reward", series), Plot("one point", "x", "y", {"s": [(1, 2, 2, 2)]})],
        heatmaps=[
            Heatmap("hm", "beta", "g", ["0", "0.5"], ["1.5", "3"], [[0.1, 0.2], [math.nan, -0.3]]),
            Heatmap("kid", "beta", "g", ["0"], ["1"], [[0.01]], higher_is_better=False),
        ],
        bars=[Bars("win", "rate", ["g1", "g2 <x>"], bars, reference=0.5)],
        grids=[Grid("samples", ["r0", "r1"], ["c0", "c1", "c2"], images, scale=2)] if grids else [],
        metrics={"a": 1, "b": [0.5, math.nan], "c": {"d": "e<f>"}},
    )


def test_the_page_is_byte_identical_to_the_pinned_one():
    assert render_html(small_report()) == GOLDEN.read_text(encoding="utf-8")


def test_grids_are_rendered_as_data_uris_of_the_tiles():
    page = render_html(small_report(grids=True))
    assert page.count('<img class="tile" src="data:image/png;base64,') == 6
    assert page.startswith(render_html(small_report()).split("<h2>Metrics</h2>")[0])
