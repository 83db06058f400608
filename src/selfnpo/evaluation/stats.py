"""Paired statistics for honest comparisons: bootstrap intervals, win rates and the minimum
detectable difference (KID and the Frechet distance: :mod:`selfnpo.evaluation.realism`).

Everything is float64 numpy. Intervals are percentile bootstrap intervals with a fixed seed, so a
report is reproducible bit for bit. Paired comparisons resample *pairs* (same prompt, same seed),
which removes the prompt-to-prompt variance that both methods share.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "MDE_POWER",
    "bootstrap_mean_ci",
    "mde_factor",
    "outcome",
    "min_detectable_diff",
    "paired_comparison",
    "paired_diff_ci",
    "win_rate",
]

# Bootstrap index matrices are drawn in chunks of about this many entries, so memory stays
# bounded (n_boot * n int64 indices would be 800 MB for n_boot=1000, n=1e5).
_CHUNK_ENTRIES = 1 << 22


def _as_1d(values: ArrayLike, name: str) -> np.ndarray:
    """A non-empty, finite 1-D array (any numeric or bool dtype, not yet converted)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name}: empty input, need at least one value")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected bool, int or float values, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or inf")
    return arr


def _as_pair(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a_arr, b_arr = _as_1d(a, "a"), _as_1d(b, "b")
    if a_arr.shape != b_arr.shape:
        raise ValueError(
            f"paired samples need equal lengths, got len(a)={a_arr.size} and len(b)={b_arr.size}"
        )
    return a_arr, b_arr


def _check_boot(n_boot: int, level: float) -> None:
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def _percentile_interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` interval of the bootstrap distribution: quantiles (1-level)/2, (1+level)/2."""
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _bootstrap_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement, same size) of the float64 vector ``x``."""
    rng = np.random.default_rng(seed)
    n = x.size
    rows = max(1, _CHUNK_ENTRIES // n)
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = x[idx].mean(axis=1)
    return out


def _mean_ci(x: np.ndarray, n_boot: int, level: float, seed: int) -> tuple[float, float, float]:
    _check_boot(n_boot, level)
    x = x.astype(np.float64)
    lo, hi = _percentile_interval(_bootstrap_means(x, int(n_boot), seed), level)
    return float(x.mean()), lo, hi


def bootstrap_mean_ci(
    values: ArrayLike, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Sample mean ``mean(x)`` and its percentile bootstrap interval.

    Each of ``n_boot`` resamples draws ``n`` values with replacement; (lo, hi) are the
    (1-level)/2 and (1+level)/2 quantiles of the resample means. Returns (mean, lo, hi).
    """
    return _mean_ci(_as_1d(values, "values"), n_boot, level, seed)


def paired_diff_ci(
    a: ArrayLike, b: ArrayLike, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean paired difference ``mean(a_i - b_i)`` with a bootstrap interval over pairs.

    Resampling pairs i keeps a_i and b_i together, so variance shared by a pair (the prompt, the
    seed) cancels. Positive means ``a`` is larger. Returns (mean_diff, lo, hi).
    """
    a_arr, b_arr = _as_pair(a, b)
    return _mean_ci(a_arr.astype(np.float64) - b_arr.astype(np.float64), n_boot, level, seed)


def win_rate(
    a: ArrayLike, b: ArrayLike, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Fraction of pairs where ``a_i > b_i``, ties counting 1/2, with a paired bootstrap interval.

    rate = (#{a_i > b_i} + 0.5 #{a_i == b_i}) / n. Works for bool (e.g. "prompt satisfied"),
    int and float scores. Returns (rate, lo, hi); 0.5 means no difference.
    """
    a_arr, b_arr = _as_pair(a, b)
    # Compare in the original dtypes: casting large ints to float64 first could invent ties.
    score = (a_arr > b_arr).astype(np.float64) + 0.5 * (a_arr == b_arr)
    return _mean_ci(score, n_boot, level, seed)


# ---------------------------------------------------------------------------------------------
# Minimum detectable difference and the full paired comparison

# The MDE is the true mean difference that a two-sided test at level 1 - ``level`` would detect
# with this probability.
MDE_POWER = 0.8


def mde_factor(level: float = 0.95, power: float = MDE_POWER) -> float:
    """``z_{(1+level)/2} + z_power``: 1.960 + 0.842 = 2.802 for level 0.95 and power 0.8."""
    if not 0.0 < level < 1.0 or not 0.0 < power < 1.0:
        raise ValueError(f"level and power must lie in (0, 1), got level={level}, power={power}")
    z = NormalDist()
    return z.inv_cdf((1.0 + level) / 2.0) + z.inv_cdf(power)


def min_detectable_diff(
    diffs: ArrayLike, level: float = 0.95, power: float = MDE_POWER, resolution: float | None = None
) -> float:
    """Minimum detectable difference of a paired run: ``mde_factor(level, power) * sd(d) / sqrt(n)``.

    ``d`` are the per-pair differences and ``sd`` their sample standard deviation (divisor n-1),
    so sd/sqrt(n) is the standard error of their mean. A true mean difference of this size is
    found (its interval excludes 0) in ``power`` of runs of this size; a smaller true effect will
    usually read "no detectable difference". It shrinks as 1/sqrt(n). ``inf`` for n < 2.

    When every pair ties (sd = 0) the data cannot tell how large a real effect would have to be;
    with ``resolution`` (the smallest possible nonzero difference, 1 for 0/1 scores) the MDE is
    then that of a run where one pair differed by ``resolution``, about 2.8 * resolution / n;
    without it, 0.
    """
    d = _as_1d(diffs, "diffs").astype(np.float64)
    n = d.size
    if n < 2:
        return float("inf")
    sd = d.std(ddof=1)
    if sd == 0.0 and resolution:
        sd = float(resolution) / np.sqrt(n)  # sd of n-1 zeros and one +-resolution, to O(1/n)
    return float(mde_factor(level, power) * sd / np.sqrt(n))


def paired_comparison(
    a: ArrayLike,
    b: ArrayLike,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    higher_is_better: bool = True,
    resolution: float | None = None,
) -> dict:
    """Everything a table needs about ``a`` vs its base ``b`` on the same prompts and seeds.

    Returns ``{"n", "mean", "base_mean", "diff": [d, lo, hi], "win_rate": [r, lo, hi], "mde",
    "higher_is_better", "outcome"}``: ``diff`` from :func:`paired_diff_ci`, ``win_rate`` from
    :func:`win_rate` (a win is a_i > b_i, or a_i < b_i when lower is better), ``mde`` from
    :func:`min_detectable_diff` (with ``resolution``), and ``outcome`` "better", "worse" or "no detectable difference",
    decided only by whether the interval of the difference excludes 0.
    """
    a_arr, b_arr = _as_pair(a, b)
    diff = paired_diff_ci(a_arr, b_arr, n_boot=n_boot, level=level, seed=seed)
    wins = (
        win_rate(a_arr, b_arr, n_boot, seed, level)
        if higher_is_better
        else win_rate(b_arr, a_arr, n_boot, seed, level)
    )
    d = a_arr.astype(np.float64) - b_arr.astype(np.float64)
    return {
        "n": int(a_arr.size),
        "mean": float(a_arr.astype(np.float64).mean()),
        "base_mean": float(b_arr.astype(np.float64).mean()),
        "diff": list(diff),
        "win_rate": list(wins),
        "mde": min_detectable_diff(d, level, resolution=resolution),
        "higher_is_better": bool(higher_is_better),
        "outcome": outcome(diff[1], diff[2], higher_is_better),
    }


def outcome(lo: float, hi: float, higher_is_better: bool = True) -> str:
    """ "better" / "worse" when the interval [lo, hi] of (setting - base) excludes 0, otherwise
    "no detectable difference"."""
    if lo > 0.0 or hi < 0.0:
        return "better" if (lo > 0.0) == higher_is_better else "worse"
    return "no detectable difference"
