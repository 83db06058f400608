"""Realism of a set of images against real ones, from classifier features: KID (whose expected
value does not depend on the number of images) with bootstrap intervals, paired differences of
KID, and the Frechet distance (biased in n; kept for reference).

Float64 numpy, fixed-seed percentile bootstrap intervals, as :mod:`selfnpo.evaluation.stats`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from .stats import _CHUNK_ENTRIES, _check_boot, _percentile_interval, mde_factor, outcome

__all__ = ["frechet_ci", "frechet_distance", "kid", "kid_ci", "kid_comparison", "kid_diff_ci"]


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
