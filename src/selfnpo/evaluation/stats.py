"""Paired statistics for honest comparisons: bootstrap intervals, win rates, the minimum
detectable difference, KID and the Frechet distance.

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
    "frechet_ci",
    "frechet_distance",
    "kid",
    "kid_ci",
    "kid_comparison",
    "kid_diff_ci",
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


def _as_features(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a feature matrix [N, D], got shape {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 1:
        raise ValueError(f"{name}: need at least 2 rows and 1 feature, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or inf")
    return arr


def _mean_cov(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample mean and unbiased covariance (divisor N-1) of the rows of ``x``."""
    mu = x.mean(axis=0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root V diag(sqrt(w)) V^T of a symmetric PSD matrix via ``eigh``."""
    # Symmetrise and clip: rounding leaves asymmetry ~1e-16 and tiny negative eigenvalues.
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _frechet_from_stats(mu_x: np.ndarray, s_x: np.ndarray, mu_y: np.ndarray, s_y: np.ndarray) -> float:
    root_x = _sqrtm_psd(s_x)
    m = root_x @ s_y @ root_x
    w = np.linalg.eigvalsh((m + m.T) / 2.0)
    cross = np.sqrt(np.clip(w, 0.0, None)).sum()
    diff = mu_x - mu_y
    fd = float(diff @ diff + np.trace(s_x) + np.trace(s_y) - 2.0 * cross)
    # The exact value is >= 0; cancellation can leave -1e-12 for identical sets.
    return max(fd, 0.0)


def _check_dims(x: np.ndarray, y: np.ndarray) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: x has D={x.shape[1]}, y has D={y.shape[1]}")


def frechet_distance(x: ArrayLike, y: ArrayLike) -> float:
    """Frechet distance between Gaussians fitted to feature sets x [N, D] and y [M, D].

    FD = |mu_x - mu_y|^2 + tr(Sx) + tr(Sy) - 2 tr((Sx^{1/2} Sy Sx^{1/2})^{1/2}),
    with unbiased covariances and matrix square roots via ``eigh`` (the FID formula).
    """
    x_arr, y_arr = _as_features(x, "x"), _as_features(y, "y")
    _check_dims(x_arr, y_arr)
    return _frechet_from_stats(*_mean_cov(x_arr), *_mean_cov(y_arr))


def frechet_ci(
    x: ArrayLike, y: ArrayLike, n_boot: int = 100, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Frechet distance with a bias-shifted percentile bootstrap interval, resampling rows of x
    and y independently: ``(q_lo - b, q_hi - b)`` with ``b = mean(boot) - fd``.

    Resamples repeat rows, which inflates FD (the finite-sample bias, roughly tr(Sx)/N +
    tr(Sy)/M, grows), so a plain percentile interval sits above the estimate; shifting the
    bootstrap distribution by its mean excess keeps its spread and centres it on the estimate.
    Only FDs computed with equal N and M are comparable. Returns (fd, lo, hi); lo is clipped at 0.
    """
    _check_boot(n_boot, level)
    x_arr, y_arr = _as_features(x, "x"), _as_features(y, "y")
    _check_dims(x_arr, y_arr)
    fd = _frechet_from_stats(*_mean_cov(x_arr), *_mean_cov(y_arr))
    rng = np.random.default_rng(seed)
    boots = np.empty(int(n_boot), dtype=np.float64)
    for i in range(boots.size):
        xb = x_arr[rng.integers(0, x_arr.shape[0], x_arr.shape[0])]
        yb = y_arr[rng.integers(0, y_arr.shape[0], y_arr.shape[0])]
        boots[i] = _frechet_from_stats(*_mean_cov(xb), *_mean_cov(yb))
    q_lo, q_hi = _percentile_interval(boots, level)
    shift = float(boots.mean()) - fd
    return fd, max(0.0, q_lo - shift), q_hi - shift


# ---------------------------------------------------------------------------------------------
# Kernel inception distance (KID)


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The cubic polynomial kernel of Binkowski et al. (2018): k(x, y) = (x.y / D + 1)^3."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kid(x: ArrayLike, y: ArrayLike) -> float:
    """Kernel inception distance: the unbiased estimate of MMD^2 between the distributions of
    feature rows x [m, D] and y [n, D] under the cubic polynomial kernel,

        KID = sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (n(n-1))
              - 2 sum_{i,j} k(x_i, y_j) / (mn).

    Unlike the Frechet distance its expectation is the population MMD^2 whatever m and n: 0 for
    equal distributions (single estimates can be slightly negative), so values from runs with
    different numbers of images are comparable.
    """
    x_arr, y_arr = _as_features(x, "x"), _as_features(y, "y")
    _check_dims(x_arr, y_arr)
    ones_x, ones_y = np.ones(x_arr.shape[0]), np.ones(y_arr.shape[0])
    return float(_kid_weighted(x_arr, y_arr, ones_x[None], ones_y[None])[0])


def _within(k: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per row of the weights w [B, m]: the average of k over pairs of *distinct* rows,
    sum_{i!=j} w_i w_j k_ij / sum_{i!=j} w_i w_j. With w = 1 it is the U-statistic term; with
    multinomial bootstrap counts it never pairs a row with a copy of itself (which would add the
    large k(x, x) and bias the resampled estimate upwards)."""
    k0 = k - np.diag(np.diag(k))
    num = np.einsum("bi,bi->b", w @ k0, w)
    den = w.sum(1) ** 2 - (w * w).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _cross(k: np.ndarray, w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per row: sum_ij w_i v_j k_ij / (sum w sum v)."""
    return np.einsum("bi,bi->b", w @ k, v) / (w.sum(1) * v.sum(1))


def _kid_weighted(x: np.ndarray, y: np.ndarray, w: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (
        _within(_poly_kernel(x, x), w)
        + _within(_poly_kernel(y, y), v)
        - 2.0 * _cross(_poly_kernel(x, y), w, v)
    )


def _boot_counts(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """[n_boot, n] float64 multiplicities of n draws with replacement from n rows."""
    idx = rng.integers(0, n, size=(n_boot, n)) + (np.arange(n_boot) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def _chunks(n_boot: int, n: int) -> list[tuple[int, int]]:
    rows = max(1, _CHUNK_ENTRIES // max(n, 1) // 8)
    return [(s, min(n_boot, s + rows)) for s in range(0, n_boot, rows)]


def kid_ci(
    x: ArrayLike, y: ArrayLike, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """KID (:func:`kid`) with a percentile bootstrap interval resampling rows of x and of y
    independently; each resample is scored by the same unbiased formula over pairs of distinct
    original rows (a row and its copy are never paired). Returns (kid, lo, hi)."""
    _check_boot(n_boot, level)
    x_arr, y_arr = _as_features(x, "x"), _as_features(y, "y")
    _check_dims(x_arr, y_arr)
    kxx, kyy, kxy = _poly_kernel(x_arr, x_arr), _poly_kernel(y_arr, y_arr), _poly_kernel(x_arr, y_arr)
    rng = np.random.default_rng(seed)
    boots = np.empty(int(n_boot))
    for s, e in _chunks(int(n_boot), max(x_arr.shape[0], y_arr.shape[0])):
        w, v = _boot_counts(rng, x_arr.shape[0], e - s), _boot_counts(rng, y_arr.shape[0], e - s)
        boots[s:e] = _within(kxx, w) + _within(kyy, v) - 2.0 * _cross(kxy, w, v)
    lo, hi = _percentile_interval(boots[np.isfinite(boots)], level)
    return kid(x_arr, y_arr), lo, hi


def _kid_diff_boot(
    a: np.ndarray, b: np.ndarray, real: np.ndarray, n_boot: int, seed: int
) -> tuple[float, float, float, np.ndarray]:
    """KID(a, real), KID(b, real), their difference and its bootstrap replicates. Rows i of a and
    b are resampled together (one set of counts), rows of ``real`` independently; the real-real
    term is common to both and cancels."""
    kaa, kbb = _poly_kernel(a, a), _poly_kernel(b, b)
    kar, kbr = _poly_kernel(a, real), _poly_kernel(b, real)
    ones, ones_r = np.ones((1, a.shape[0])), np.ones((1, real.shape[0]))
    kid_a, kid_b = kid(a, real), kid(b, real)
    diff = float(
        (
            _within(kaa, ones)
            - _within(kbb, ones)
            - 2.0 * (_cross(kar, ones, ones_r) - _cross(kbr, ones, ones_r))
        )[0]
    )
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for s, e in _chunks(n_boot, max(a.shape[0], real.shape[0])):
        w, v = _boot_counts(rng, a.shape[0], e - s), _boot_counts(rng, real.shape[0], e - s)
        boots[s:e] = _within(kaa, w) - _within(kbb, w) - 2.0 * (_cross(kar, w, v) - _cross(kbr, w, v))
    return kid_a, kid_b, diff, boots[np.isfinite(boots)]


def _paired_features(a: ArrayLike, b: ArrayLike, real: ArrayLike) -> tuple[np.ndarray, ...]:
    a_arr, b_arr, r_arr = _as_features(a, "a"), _as_features(b, "b"), _as_features(real, "real")
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired feature sets need equal shapes, got {a_arr.shape} and {b_arr.shape}")
    _check_dims(a_arr, r_arr)
    return a_arr, b_arr, r_arr


def kid_diff_ci(
    a: ArrayLike, b: ArrayLike, real: ArrayLike, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """KID(a, real) - KID(b, real) with a percentile bootstrap interval; a and b are paired (row i
    of each comes from the same prompt and seed) and resampled with the same indices, ``real``
    independently. Negative means ``a`` is closer to the real images. Returns (diff, lo, hi)."""
    _check_boot(n_boot, level)
    _, _, diff, boots = _kid_diff_boot(*_paired_features(a, b, real), int(n_boot), seed)
    lo, hi = _percentile_interval(boots, level)
    return diff, lo, hi


def kid_comparison(
    a: ArrayLike, b: ArrayLike, real: ArrayLike, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """KID of a setting ``a`` and of its base ``b`` against ``real``, and the paired difference:
    ``{"n", "n_real", "kid", "base_kid", "diff": [d, lo, hi], "mde", "higher_is_better": False,
    "outcome"}``. ``mde`` is ``mde_factor(level) * sd(bootstrap differences)``, the bootstrap
    counterpart of :func:`min_detectable_diff`; lower KID is better."""
    _check_boot(n_boot, level)
    a_arr, b_arr, r_arr = _paired_features(a, b, real)
    kid_a, kid_b, diff, boots = _kid_diff_boot(a_arr, b_arr, r_arr, int(n_boot), seed)
    lo, hi = _percentile_interval(boots, level)
    return {
        "n": int(a_arr.shape[0]),
        "n_real": int(r_arr.shape[0]),
        "kid": kid_a,
        "base_kid": kid_b,
        "diff": [diff, lo, hi],
        "mde": float(mde_factor(level) * boots.std(ddof=1)) if boots.size > 1 else float("inf"),
        "higher_is_better": False,
        "outcome": outcome(lo, hi, higher_is_better=False),
    }
