"""Guidance rules: small pure functions of the unconditional and conditional outputs and the time.

Each rule maps ``(uncond, cond, t)`` (network outputs [B, ...] of the negative and positive
branch, and the time or noise level of each sample) to the guided output. The negative branch
may be any denoiser (the base model, a Self-NPO offset, a negative prompt), so every rule
combines with every offset. ``scale`` is diffusers' ``guidance_scale`` g (the papers' w + 1);
every rule returns ``cond`` at g = 1. Arithmetic is done in float32 at least (float64 stays
float64) and the result is cast back to the inputs' dtype.

Which parameterisation a rule expects is the rule's own (its docstring says it): CFG and the
interval work on any; rescale and APG were defined on x0 / v predictions; CFG-Zero* on flow
velocities. Convert with :mod:`selfnpo.param` before and after.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apg", "cfg", "cfg_rescale", "cfg_zero_star", "guidance_interval"]


def _f(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] broadcastable against ``like``."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def _dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def _norm(x: Tensor) -> Tensor:
    """Per-sample L2 norm over all other axes, [B, 1, ..., 1]."""
    return torch.linalg.vector_norm(x, dim=_dims(x), keepdim=True)


def cfg(uncond: Tensor, cond: Tensor, t=None, scale: float = 7.5) -> Tensor:
    """Classifier-free guidance (Ho & Salimans, 2022): ``uncond + g (cond - uncond)``."""
    u, c = _f(uncond), _f(cond)
    return (u + scale * (c - u)).to(cond.dtype)


def cfg_rescale(uncond: Tensor, cond: Tensor, t=None, scale: float = 7.5, phi: float = 0.7) -> Tensor:
    """CFG rescale (Lin et al., 2024, eqs. 15-16): match the guided output's std to ``cond``'s.

    ``x_cfg = cfg(...)``, ``x_re = x_cfg * std(cond) / std(x_cfg)`` (std per sample over all
    other axes), output ``phi x_re + (1 - phi) x_cfg``; ``phi = 0`` is plain CFG. Defined on
    v / x0 predictions (diffusers also applies it to eps).
    """
    c = _f(cond)
    x = _f(cfg(_f(uncond), c, t, scale))
    ratio = c.std(dim=_dims(c), keepdim=True) / x.std(dim=_dims(x), keepdim=True).clamp_min(1e-12)
    return (phi * x * ratio + (1.0 - phi) * x).to(cond.dtype)


def guidance_interval(
    uncond: Tensor,
    cond: Tensor,
    t,
    scale: float = 7.5,
    t_lo: float = float("-inf"),
    t_hi: float = float("inf"),
) -> Tensor:
    """Guidance in a limited interval (Kynkäänniemi et al., 2024): CFG where ``t_lo < t <= t_hi``,
    the conditional output alone elsewhere.

    ``t`` (a number or [B]) and the bounds share one clock: the paper states them as noise levels
    sigma (e.g. (0.28, 5.42] for EDM2); diffusers timesteps work as well. The default interval
    covers every step, which is plain CFG.
    """
    t = torch.as_tensor(t, device=cond.device, dtype=torch.float64)
    inside = (t > t_lo) & (t <= t_hi)
    guided = cfg(uncond, cond, t, scale)
    if inside.ndim == 0:
        return guided if bool(inside) else cond
    return torch.where(_per_sample(inside, cond), guided, cond)


def apg(
    uncond: Tensor,
    cond: Tensor,
    t=None,
    scale: float = 7.5,
    eta: float = 0.0,
    norm_threshold: float = 0.0,
    momentum: float = 0.0,
    running: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Adaptive projected guidance (Sadat et al., 2025, Algorithm 1) on denoised (x0) predictions.

    ``d = cond - uncond``; with momentum, ``d <- d + momentum * running`` (the paper uses
    momentum < 0, e.g. -0.5); with ``norm_threshold`` r > 0, ``d <- d min(1, r / |d|)``; then
    ``d = d_par + d_orth`` against ``cond`` and the output is ``cond + (g - 1)(d_orth + eta d_par)``.
    Returns ``(guided, running)``; pass ``running`` back at the next step. ``eta = 1``, no
    threshold and no momentum is plain CFG.
    """
    c, d = _f(cond), _f(cond) - _f(uncond)
    if momentum and running is not None:
        d = d + momentum * running.to(d.dtype)
    running = d
    if norm_threshold > 0:
        norm = _norm(d).clamp_min(1e-12)
        d = d * torch.clamp(norm_threshold / norm, max=1.0)
    # The projection is done in float64, as the paper's code does.
    unit = c.double() / _norm(c.double()).clamp_min(1e-12)
    par = ((d.double() * unit).sum(dim=_dims(d), keepdim=True) * unit).to(d.dtype)
    update = (d - par) + eta * par
    return (c + (scale - 1.0) * update).to(cond.dtype), running


def optimized_scale(uncond: Tensor, cond: Tensor) -> Tensor:
    """CFG-Zero*'s ``s* = <cond, uncond> / |uncond|^2`` per sample, shape [B, 1, ..., 1]."""
    u, c = _f(uncond).flatten(1), _f(cond).flatten(1)
    s = (u * c).sum(1) / ((u * u).sum(1) + 1e-8)
    return _per_sample(s, cond)


def cfg_zero_star(
    uncond: Tensor,
    cond: Tensor,
    t=None,
    scale: float = 7.5,
    step: int = 0,
    zero_init_steps: int = 0,
    use_optimized_scale: bool = True,
) -> Tensor:
    """CFG-Zero* (Fan et al., 2025) for flow-matching velocities.

    ``s* uncond + g (cond - s* uncond)`` with the optimised scale :func:`optimized_scale`, and a
    zero velocity for the first ``zero_init_steps`` solver steps (``step`` counts from 0).
    Without the optimised scale (s* = 1) and with no zero-init steps this is plain CFG.
    """
    if step < zero_init_steps:
        return torch.zeros_like(cond)
    u, c = _f(uncond), _f(cond)
    s = optimized_scale(u, c) if use_optimized_scale else 1.0
    return (s * u + scale * (c - s * u)).to(cond.dtype)
