"""Paired statistics for honest comparisons: bootstrap intervals, win rates, Frechet distance.

Everything is float64 numpy. Intervals are percentile bootstrap intervals with a fixed seed, so a
report is reproducible bit for bit. Paired comparisons resample *pairs* (same prompt, same seed),
which removes the prompt-to-prompt variance that both methods share.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "bootstrap_mean_ci",
    "frechet_ci",
    "frechet_distance",
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
