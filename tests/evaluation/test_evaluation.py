"""Evaluation statistics checked exactly against closed forms, and the report checked for escaping,
valid JSON, image sizes and atomic writes."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfnpo.evaluation import page, plots
from selfnpo.evaluation.page import Grid, Report, Table, grid_image, write_report
from selfnpo.evaluation.plots import Plot, svg_line_plot
from selfnpo.evaluation.realism import frechet_ci, frechet_distance, kid, kid_ci, kid_comparison, kid_diff_ci
from selfnpo.evaluation.stats import (
    bootstrap_mean_ci,
    mde_factor,
    min_detectable_diff,
    outcome,
    paired_comparison,
    paired_diff_ci,
    win_rate,
)

BAD = '<script>alert(1)</script> & "x"'


def _exact_gaussian(rng: np.random.Generator, n: int, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """n rows whose sample mean and (N-1) sample covariance are exactly ``mean`` and ``cov``."""
    z = rng.normal(size=(n, mean.size))
    z -= z.mean(axis=0)
    white = np.linalg.cholesky(z.T @ z / (n - 1))
    z = np.linalg.solve(white, z.T).T  # sample covariance now exactly I
    return z @ np.linalg.cholesky(cov).T + mean


def _random_rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


# ---------------------------------------------------------------------------------------------
# Frechet distance


def test_frechet_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(200, 6))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_frechet_exact_for_commuting_covariances():
    # Sx = Q diag(a) Q^T, Sy = Q diag(b) Q^T: FD = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(1)
    d = 5
    q = _random_rotation(rng, d)
    a, b = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    mu_x, mu_y = rng.normal(size=d), rng.normal(size=d)
    x = _exact_gaussian(rng, 50, mu_x, q @ np.diag(a) @ q.T)
    y = _exact_gaussian(rng, 80, mu_y, q @ np.diag(b) @ q.T)
    expected = np.sum((mu_x - mu_y) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)


def test_frechet_general_covariances_and_symmetry():
    # tr((Sx^1/2 Sy Sx^1/2)^1/2) = sum sqrt(eig(Sx Sy)): an independent route to the cross term.
    rng = np.random.default_rng(2)
    d = 4
    m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    sx, sy = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)
    mu = rng.normal(size=d)
    x = _exact_gaussian(rng, 40, np.zeros(d), sx)
    y = _exact_gaussian(rng, 60, mu, sy)
    cross = np.sqrt(np.linalg.eigvals(sx @ sy).real).sum()
    expected = mu @ mu + np.trace(sx) + np.trace(sy) - 2 * cross
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(y, x) == pytest.approx(frechet_distance(x, y), rel=1e-10)


def test_frechet_large_samples_shifted_mean_is_shift_squared():
    rng = np.random.default_rng(3)
    d, n = 3, 20_000
    l = rng.normal(size=(d, d))
    shift = np.array([1.0, -1.0, 1.0])
    x = rng.normal(size=(n, d)) @ l.T
    y = rng.normal(size=(n, d)) @ l.T + shift
    # Finite-sample bias is O(d/n) relative to tr(S), well under this tolerance.
    assert frechet_distance(x, y) == pytest.approx(shift @ shift, abs=0.15)


def test_frechet_ci_is_reproducible_and_excludes_zero_for_a_real_shift():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 3))
    y = rng.normal(size=(300, 3)) + 1.0
    fd, lo, hi = frechet_ci(x, y, n_boot=50, seed=7)
    assert fd == pytest.approx(frechet_distance(x, y))
    assert 0 < lo <= hi
    assert lo < fd * 1.5 and hi > fd * 0.5
    assert frechet_ci(x, y, n_boot=50, seed=7) == (fd, lo, hi)


# ---------------------------------------------------------------------------------------------
# Bootstrap intervals and win rates


def test_bootstrap_ci_contains_mean_shrinks_and_is_reproducible():
    rng = np.random.default_rng(5)
    small, large = rng.normal(2.0, 1.0, 50), rng.normal(2.0, 1.0, 5000)
    m, lo, hi = bootstrap_mean_ci(small)
    assert m == pytest.approx(small.mean()) and lo < m < hi
    m2, lo2, hi2 = bootstrap_mean_ci(large)
    assert lo2 < m2 < hi2
    # Width ~ 2 * 1.96 / sqrt(n): 100x the data gives about a 10x narrower interval.
    assert (hi2 - lo2) < (hi - lo) / 5
    assert bootstrap_mean_ci(small, seed=3) == bootstrap_mean_ci(small, seed=3)
    assert bootstrap_mean_ci(small, level=0.5)[2] - bootstrap_mean_ci(small, level=0.5)[1] < hi - lo


def test_bootstrap_ci_coverage_is_roughly_nominal():
    rng = np.random.default_rng(6)
    hits = 0
    for i in range(200):
        _, lo, hi = bootstrap_mean_ci(rng.normal(0.0, 1.0, 40), n_boot=400, seed=i)
        hits += lo <= 0.0 <= hi
    assert 0.86 <= hits / 200 <= 0.99


def test_win_rate_identical_larger_ties_and_bools():
    x = np.random.default_rng(7).normal(size=100)
    assert win_rate(x, x) == (0.5, 0.5, 0.5)
    assert win_rate(x + 1e-3, x) == (1.0, 1.0, 1.0)
    assert win_rate(x, x + 1e-3)[0] == 0.0
    rate, lo, hi = win_rate([True, True, False, False], [False, True, True, False])
    assert rate == 0.5 and 0.0 <= lo <= rate <= hi <= 1.0
    assert win_rate([3, 2, 1, 1], [1, 2, 3, 0])[0] == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_paired_diff_sign_and_pairing_beats_unpaired():
    rng = np.random.default_rng(8)
    prompt_effect = rng.normal(0.0, 5.0, 200)  # shared by both methods on the same prompt
    b = prompt_effect + rng.normal(0.0, 0.1, 200)
    a = b + 0.1 + rng.normal(0.0, 0.1, 200)
    d, lo, hi = paired_diff_ci(a, b)
    assert d == pytest.approx(np.mean(a - b)) and 0 < lo < d < hi
    d2, lo2, hi2 = paired_diff_ci(b, a)
    assert d2 == pytest.approx(-d) and hi2 < 0
    # Unpaired intervals for a and b overlap heavily; only pairing resolves the 0.1 gain.
    _, _, a_hi = bootstrap_mean_ci(a)
    _, b_lo, _ = bootstrap_mean_ci(b)
    assert b_lo < a_hi


# ---------------------------------------------------------------------------------------------
# Paired comparison and minimum detectable difference


def test_paired_interval_covers_a_known_shift():
    # a = b + 0.3 + noise on the same prompts: the paired interval should cover 0.3 in about 95%
    # of runs and exclude 0 (the shift is far above the MDE of n = 60 pairs).
    rng = np.random.default_rng(20)
    hits = excl = 0
    for i in range(200):
        b = rng.normal(0.0, 5.0, 60)
        a = b + 0.3 + rng.normal(0.0, 0.4, 60)
        c = paired_comparison(a, b, n_boot=400, seed=i)
        hits += c["diff"][1] <= 0.3 <= c["diff"][2]
        excl += c["outcome"] == "better"
        assert c["n"] == 60 and c["diff"][0] == pytest.approx(np.mean(a - b))
    assert 0.88 <= hits / 200 <= 0.99
    assert excl == 200


def test_mde_is_2_8_standard_errors_and_scales_as_one_over_sqrt_n():
    assert mde_factor() == pytest.approx(1.959964 + 0.841621, abs=1e-5)
    pattern = np.array([-1.0, 0.5, 2.0, -0.25])
    small, large = np.tile(pattern, 25), np.tile(pattern, 400)  # n = 100 and 1600, same shape
    for d in (small, large):
        assert min_detectable_diff(d) == pytest.approx(
            mde_factor() * d.std(ddof=1) / np.sqrt(d.size), rel=1e-12
        )
    ratio = min_detectable_diff(large) / min_detectable_diff(small)
    assert ratio == pytest.approx(0.25, rel=0.01)  # 16x the pairs: a 4x smaller MDE
    assert min_detectable_diff([1.0]) == float("inf")
    # Every pair tied: 0 unless a resolution says what one disagreeing pair would be worth.
    assert min_detectable_diff(np.zeros(64)) == 0.0
    assert min_detectable_diff(np.zeros(64), resolution=1.0) == pytest.approx(mde_factor() / 64)


def test_mde_power_is_about_80_percent():
    # A true shift equal to the MDE is detected in about 80% of runs.
    rng = np.random.default_rng(21)
    n, sd = 80, 1.0
    shift = mde_factor() * sd / np.sqrt(n)
    found = sum(
        paired_comparison(rng.normal(shift, sd, n), np.zeros(n), n_boot=400, seed=i)["outcome"] == "better"
        for i in range(300)
    )
    assert 0.70 <= found / 300 <= 0.90


def test_paired_comparison_lower_is_better_and_outcomes():
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 3.0, 4.0, 5.0])
    c = paired_comparison(a, b, higher_is_better=False)
    assert c["outcome"] == "better" and c["win_rate"][0] == 1.0 and c["diff"][0] == -1.0
    assert paired_comparison(a, b)["outcome"] == "worse"
    assert outcome(-0.1, 0.2) == "no detectable difference"
    assert outcome(0.1, 0.2, higher_is_better=False) == "worse"


# ---------------------------------------------------------------------------------------------
# KID


def test_kid_matches_the_u_statistic_written_out():
    rng = np.random.default_rng(22)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(9, 3)) + 0.5

    def k(u, v):
        return (u @ v / 3 + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    assert kid(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    assert kid(x, y) == pytest.approx(kid(y, x), rel=1e-12)


def test_kid_is_unbiased_for_equal_distributions_and_does_not_drift_with_n():
    # Mean over replicates ~0 at every n, while the Frechet distance's mean falls like 1/n.
    rng = np.random.default_rng(23)
    d = 8
    means, fds = {}, {}
    for n in (12, 48, 192):
        reps = 400 if n < 192 else 100
        vals = [kid(rng.normal(size=(n, d)), rng.normal(size=(n, d))) for _ in range(reps)]
        se = np.std(vals, ddof=1) / np.sqrt(reps)
        means[n] = np.mean(vals)
        assert abs(means[n]) < 3.5 * se
        fds[n] = np.mean(
            [frechet_distance(rng.normal(size=(n, d)), rng.normal(size=(n, d))) for _ in range(30)]
        )
    assert fds[12] > 3 * fds[192]


def test_kid_grows_with_a_mean_shift_and_its_interval_excludes_zero():
    rng = np.random.default_rng(24)
    d, n = 6, 300
    real = rng.normal(size=(n, d))
    values = [kid(rng.normal(size=(n, d)) + s, real) for s in (0.0, 0.25, 0.5, 1.0)]
    assert values == sorted(values) and values[-1] > 10 * abs(values[0])
    est, lo, hi = kid_ci(rng.normal(size=(n, d)) + 0.5, real, n_boot=200, seed=1)
    assert 0 < lo <= est <= hi
    x = rng.normal(size=(50, d))
    assert kid_ci(x, real, n_boot=50, seed=3) == kid_ci(x, real, n_boot=50, seed=3)


def test_kid_paired_difference():
    rng = np.random.default_rng(25)
    d, n = 6, 200
    real = rng.normal(size=(500, d))
    base = rng.normal(size=(n, d))
    worse = base + 0.6  # same rows moved away from the real distribution
    c = kid_comparison(worse, base, real, n_boot=300, seed=0)
    assert c["diff"][0] == pytest.approx(kid(worse, real) - kid(base, real), rel=1e-9)
    assert c["kid"] == pytest.approx(kid(worse, real)) and c["base_kid"] == pytest.approx(kid(base, real))
    assert c["diff"][1] > 0 and c["outcome"] == "worse" and c["mde"] < c["diff"][0]
    assert c["n"] == n and c["n_real"] == 500
    # A setting identical to its base: difference exactly 0, interval [0, 0].
    assert kid_diff_ci(base, base, real, n_boot=50) == (0.0, 0.0, 0.0)
    # Sharing the resample makes the paired interval narrower than the two separate ones.
    near = base + 0.02 * rng.normal(size=base.shape)
    _, lo, hi = kid_diff_ci(near, base, real, n_boot=300)
    _, lo_a, hi_a = kid_ci(near, real, n_boot=300)
    assert hi - lo < 0.5 * (hi_a - lo_a)
    with pytest.raises(ValueError):
        kid_comparison(base[:10], base, real)


@pytest.mark.parametrize(
    "call",
    [
        lambda: bootstrap_mean_ci([]),
        lambda: paired_diff_ci([], []),
        lambda: paired_diff_ci([1.0, 2.0], [1.0]),
        lambda: win_rate([1, 2, 3], [1, 2]),
        lambda: win_rate([], []),
        lambda: bootstrap_mean_ci([1.0, float("nan")]),
        lambda: bootstrap_mean_ci([1.0], n_boot=0),
        lambda: bootstrap_mean_ci([1.0], level=1.0),
        lambda: frechet_distance(np.zeros((0, 3)), np.zeros((5, 3))),
        lambda: frechet_distance(np.zeros((5, 3)), np.zeros((5, 4))),
        lambda: frechet_ci(np.zeros((1, 3)), np.zeros((5, 3))),
        lambda: kid(np.zeros((5, 3)), np.zeros((5, 4))),
        lambda: kid(np.zeros((1, 3)), np.zeros((5, 3))),
        lambda: kid_ci(np.zeros((5, 3)), np.zeros((5, 3)), n_boot=0),
        lambda: paired_comparison([1.0, 2.0], [1.0]),
    ],
)
def test_invalid_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


# ---------------------------------------------------------------------------------------------
# Report


def _report(n_rows: int = 2, n_cols: int = 3, grids: bool = True) -> Report:
    images = np.random.default_rng(9).integers(0, 256, (n_rows, n_cols, 8, 6, 3), dtype=np.uint8)
    rows = [BAD] + [f"prompt {i}" for i in range(1, n_rows)]
    return Report(
        title="Self-NPO " + BAD,
        paragraphs=["Prompt: " + BAD],
        tables=[Table("Accuracy " + BAD, ["prompt", "base", "npo"], [[BAD, 0.5, np.float32(0.625)]])],
        plots=[Plot(BAD, "scale " + BAD, "acc", {BAD: [(1.0, 0.5, 0.4, 0.6), (2.0, 0.7, 0.6, 0.8)]})],
        grids=[Grid(BAD, rows, ["base", "npo", BAD][:n_cols], images)] if grids else [],
        metrics={
            "acc": np.float64(0.5),
            "fd": float("nan"),
            "inf": np.inf,
            "n": np.int64(3),
            "ci": (np.float32(0.25), 0.5, 0.75),
            "per_prompt": np.array([1.0, 2.0]),
        },
    )


def test_report_escapes_all_user_text(tmp_path):
    html_text = write_report(_report(), tmp_path)["html"].read_text(encoding="utf-8")
    assert BAD not in html_text
    assert "<script" not in html_text.lower()
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;x&quot;"
    # Title, paragraph, table title and cell, plot, grid row label: all present, all escaped.
    assert html_text.count(escaped) >= 6


def test_svg_is_well_formed_and_escaped():
    plot = Plot(
        BAD,
        "x",
        "y",
        {
            BAD: [(0.0, 1.0, 0.5, 1.5), (1.0, float("nan"), 0, 1), (2.0, 2.0, 1.5, 2.5)],
            "flat": [(0.0, 1.0, 1.0, 1.0)],
        },
    )
    svg = svg_line_plot(plot)
    root = ET.fromstring(svg)  # raises on unescaped markup
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert BAD in texts  # the parser decodes the escaped title back to the original
    assert root.find("{http://www.w3.org/2000/svg}polygon") is not None
    ET.fromstring(svg_line_plot(Plot("empty", "x", "y", {})))


def test_metrics_json_round_trips_with_nan_as_null(tmp_path):
    paths = write_report(_report(), tmp_path)
    with open(paths["metrics"], encoding="utf-8") as f:
        metrics = json.load(f)
    assert metrics == {
        "acc": 0.5,
        "fd": None,
        "inf": None,
        "n": 3,
        "ci": [0.25, 0.5, 0.75],
        "per_prompt": [1.0, 2.0],
    }
    with pytest.raises(TypeError):
        page.metrics_json({"x": object()})


def test_grid_png_has_expected_size(tmp_path):
    paths = write_report(_report(n_rows=2, n_cols=3), tmp_path)
    with Image.open(paths["grid"]) as img:
        # width C*W*scale + (C-1)*gap, height R*H*scale + (R-1)*gap with W=6, H=8, scale=4, gap=2.
        assert img.size == (3 * 6 * 4 + 2 * 2, 2 * 8 * 4 + 1 * 2)
        assert img.mode == "RGB"
        tile = np.asarray(img)[:32, :24]
    expected = _report().grids[0].images[0, 0].repeat(4, axis=0).repeat(4, axis=1)
    np.testing.assert_array_equal(tile, expected)
    assert grid_image(_report().grids[0], scale=1).size == (3 * 6 + 4, 2 * 8 + 2)


def test_crash_mid_write_leaves_previous_report_intact(tmp_path, monkeypatch):
    write_report(_report(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def half_then_crash(self: Path, data: str, *args, **kwargs):
        with open(self, "w", encoding="utf-8") as f:
            f.write(data[: len(data) // 2])
        raise OSError("disk full")

    new = _report()
    new.title, new.metrics = "changed", {"acc": 0.9}
    monkeypatch.setattr(Path, "write_text", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        write_report(new, tmp_path)
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after.keys() == {"report.html", "metrics.json", "grid.png"}  # no temp files left over
    assert after["report.html"] == before["report.html"]
    assert after["metrics.json"] == before["metrics.json"]


def test_stale_grid_is_removed_and_bad_shapes_rejected(tmp_path):
    write_report(_report(), tmp_path)
    paths = write_report(_report(grids=False), tmp_path)
    assert "grid" not in paths and not (tmp_path / "grid.png").exists()
    with pytest.raises(ValueError):
        Grid("g", ["a"], ["b"], np.zeros((1, 2, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError):
        Grid("g", ["a"], ["b"], np.zeros((1, 1, 4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        Table("t", ["a", "b"], [[1.0]])
    assert math.isclose(float(plots.format_number(np.float64(0.123456))), 0.1235)
    assert plots.format_number(float("nan")) == "n/a"
