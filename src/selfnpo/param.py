"""Parameterisation conversions between eps / v / x0 / flow velocity / score (pure functions).

All functions take per-sample coefficients already broadcastable against ``x_t`` (see
:func:`selfnpo.schedules.expand_like`). ``alpha**2 + sigma**2 = 1`` is assumed only where noted
(the v conversions); flow conversions assume ``alpha = 1 - sigma``; the rest (eps, x0, score,
:func:`ddim_step`, :func:`renoise`) hold for any Gaussian path ``x_t = alpha x0 + sigma eps``.
"""

from __future__ import annotations

from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def eps_to_x0(x_t: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Tweedie x0 from an eps prediction: ``x0 = (x_t - sigma * eps) / alpha`` (Self-NPO eq. 2/12)."""
    return (x_t - sigma * eps) / alpha


def x0_to_eps(x_t: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``eps = (x_t - alpha * x0) / sigma``."""
    return (x_t - alpha * x0) / sigma


def v_to_x0(x_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``x0 = alpha * x_t - sigma * v`` for ``v = alpha * eps - sigma * x0`` (VP schedules)."""
    return alpha * x_t - sigma * v


def v_to_eps(x_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``eps = sigma * x_t + alpha * v`` (VP schedules)."""
    return sigma * x_t + alpha * v


def x0_eps_to_v(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``v = alpha * eps - sigma * x0``."""
    return alpha * eps - sigma * x0


def flow_to_x0(x_t: Tensor, velocity: Tensor, sigma: Tensor) -> Tensor:
    """Rectified flow ``x_t = (1 - sigma) x0 + sigma eps``, ``velocity = eps - x0``: ``x0 = x_t - sigma * v``."""
    return x_t - sigma * velocity


def flow_to_eps(x_t: Tensor, velocity: Tensor, sigma: Tensor) -> Tensor:
    """Rectified flow: ``eps = x_t + (1 - sigma) * v``."""
    return x_t + (1.0 - sigma) * velocity


def x0_eps_to_flow(x0: Tensor, eps: Tensor) -> Tensor:
    """Flow-matching velocity target ``v = d x_t / d sigma = eps - x0``."""
    return eps - x0


def eps_to_score(eps: Tensor, sigma: Tensor) -> Tensor:
    """``grad log p(x_t) = -eps / sigma``."""
    return -eps / sigma


def score_to_x0(x_t: Tensor, score: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Tweedie's formula ``x0 = (x_t + sigma**2 * score) / alpha`` (Self-NPO eq. 2)."""
    return (x_t + sigma**2 * score) / alpha


def to_x0(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """Network output of a diffusers ``prediction_type`` -> x0 estimate."""
    if prediction_type == "epsilon":
        return eps_to_x0(x_t, pred, alpha, sigma)
    if prediction_type == "v_prediction":
        return v_to_x0(x_t, pred, alpha, sigma)
    if prediction_type == "sample":
        return pred
    if prediction_type == "flow":
        return flow_to_x0(x_t, pred, sigma)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; use one of {PREDICTION_TYPES}")


def to_eps(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """Network output of a diffusers ``prediction_type`` -> eps estimate."""
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return v_to_eps(x_t, pred, alpha, sigma)
    if prediction_type == "sample":
        return x0_to_eps(x_t, pred, alpha, sigma)
    if prediction_type == "flow":
        return flow_to_eps(x_t, pred, sigma)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; use one of {PREDICTION_TYPES}")


def target_for(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """Regression target of standard diffusion training in the network's own space."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return x0_eps_to_v(x0, eps, alpha, sigma)
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow":
        return x0_eps_to_flow(x0, eps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; use one of {PREDICTION_TYPES}")


def forward_noise(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Forward noising ``x_t = alpha_t x0 + sigma_t eps`` (Self-NPO eq. 2; a flow path has
    ``alpha = 1 - sigma``)."""
    return alpha * x0 + sigma * eps


def ddim_step(x0: Tensor, eps: Tensor, alpha_next: Tensor, sigma_next: Tensor) -> Tensor:
    """Deterministic DDIM update to the next level: ``x_next = alpha' * x0 + sigma' * eps``.

    On a flow path (``alpha = 1 - sigma``) this is exactly the Euler step of the velocity ODE,
    ``x_next = x_t + (sigma' - sigma) * v``, so one rollout serves both kinds of schedule. It is
    the forward noising of the estimate ``x0`` with the estimated noise ``eps``.
    """
    return forward_noise(x0, eps, alpha_next, sigma_next)


def ddim_step_eta(
    x0: Tensor, eps: Tensor, alpha_next: Tensor, sigma_next: Tensor, eta: Tensor | float, noise: Tensor
) -> Tensor:
    """R0's stochastic DDIM step (R0 eq. 3.2): ``x_next = alpha' x0 + sigma' (eta eps + sqrt(1 - eta^2) z)``.

    ``eta`` (in [0, 1], a float or broadcastable per sample) weighs the predicted noise: ``eta = 1`` is
    :func:`ddim_step`, ``eta = 0`` replaces the noise by the fresh draw ``noise``.
    """
    if isinstance(eta, Tensor):
        keep = (1.0 - eta**2).clamp_min(0).sqrt()
    else:
        keep = (1.0 - eta * eta) ** 0.5
    return alpha_next * x0 + sigma_next * (eta * eps + keep * noise)


def renoise(
    x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor, noise: Tensor
) -> Tensor:
    """Re-noise the *state* from level t to a noisier level s (Self-NPO eq. 16).

    ``x_s = (alpha_s / alpha_t) x_t + sqrt(sigma_s^2 - sigma_t^2 alpha_s^2 / alpha_t^2) eps``.
    Requires ``nsr_s >= nsr_t`` and ``alpha_t > 0``; the variance is clamped at 0 against rounding.
    Needs no ``alpha^2 + sigma^2 = 1``: it serves VP and flow schedules alike (``alpha_s = 0``, the
    flow's pure-noise level, gives ``x_s = sigma_s * eps``).
    """
    ratio = alpha_s / alpha_t
    var = (sigma_s**2 - (sigma_t * ratio) ** 2).clamp_min(0.0)
    return ratio * x_t + var.sqrt() * noise
