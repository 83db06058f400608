"""DDIM-type rollouts used by training objectives (user-facing generation reuses diffusers).

Timesteps are per sample (``t`` has shape ``[B]``) so that one batch can hold states at
different noise levels. Levels are the schedule's integer training levels; coefficients and
conversions come from ``model.schedule`` (through ``coeffs`` / ``x0_of`` / ``eps_of``), so the same
rollout is DDIM on a VP schedule and the Euler step of the velocity ODE on a flow schedule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .guidance import BoundDenoiser
from .models.sd import DiffusionModel
from .param import ddim_step


@torch.no_grad()
def ddim_rollout(
    model: DiffusionModel, f: BoundDenoiser, x: Tensor, t: Tensor, steps: int, stride: int
) -> tuple[Tensor, Tensor]:
    """``steps`` deterministic DDIM steps of ``stride`` timesteps from ``(x, t)``, clamped at 0.

    Returns ``(x_t_end, t_end)``. A sample already at 0 stays where it is.
    """
    for _ in range(steps):
        if not bool((t > 0).any()):  # every sample already at 0: further steps change nothing
            break
        t_next = (t - stride).clamp_min(0)
        pred = f(x, t)
        x0, eps = model.x0_of(pred, x, t), model.eps_of(pred, x, t)
        a, s = model.coeffs(t_next, x)
        x = torch.where((t_next < t).reshape(-1, *([1] * (x.ndim - 1))), ddim_step(x0, eps, a, s), x)
        t = t_next
    return x, t


@torch.no_grad()
def ddim_sample(model: DiffusionModel, f: BoundDenoiser, noise: Tensor, grid: Tensor) -> Tensor:
    """Full deterministic DDIM from ``grid[-1]`` down the ascending ``grid`` to an x0 estimate."""
    return ddim_sample_grad(model, f, noise, grid, grad_steps=0)


def ddim_sample_grad(
    model: DiffusionModel, f: BoundDenoiser, noise: Tensor, grid: Tensor, grad_steps: int
) -> Tensor:
    """:func:`ddim_sample` with gradients through the last ``grad_steps`` network calls only
    (DRaFT-K truncated backpropagation); earlier steps run without a graph."""
    x = noise
    ts = grid.flip(0).tolist()
    for i, t_cur in enumerate(ts):
        with torch.set_grad_enabled(i >= len(ts) - grad_steps):
            t = torch.full((x.shape[0],), t_cur, device=x.device, dtype=torch.long)
            pred = f(x, t)
            x0 = model.x0_of(pred, x, t)
            if i + 1 == len(ts):
                return x0
            eps = model.eps_of(pred, x, t)
            a, s = model.coeffs(torch.full_like(t, ts[i + 1]), x)
            x = ddim_step(x0, eps, a, s)
    return x
