"""Noise schedules as pure functions of tensors.

Forward process (docs/notation.md): ``x_t = alpha_t * x_0 + sigma_t * eps``. For the Stable
Diffusion family ``alpha_t = sqrt(alphas_cumprod[t])`` and ``sigma_t = sqrt(1 - alphas_cumprod[t])``
with integer ``t`` in ``0..T-1``; larger ``t`` is noisier.
"""

from __future__ import annotations

import torch
from torch import Tensor


def alpha_sigma(alphas_cumprod: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(alpha_t, sigma_t)`` for integer timesteps ``t`` (any shape), in fp32 or better.

    Coefficients are computed in the precision of ``alphas_cumprod`` promoted to at least fp32,
    on ``t``'s device, so that fp16 networks never see fp16 schedule arithmetic.
    """
    ac = alphas_cumprod.to(device=t.device)
    if ac.dtype not in (torch.float32, torch.float64):
        ac = ac.float()
    a2 = ac[t.long()]
    return a2.sqrt(), (1.0 - a2).sqrt()


def nsr(alpha: Tensor, sigma: Tensor) -> Tensor:
    """Noise-to-signal ratio ``sigma_t / alpha_t``; strictly increasing in ``t``."""
    return sigma / alpha


def ddim_grid(num_steps: int, num_train_timesteps: int = 1000) -> Tensor:
    """Ascending 'trailing' DDIM grid, e.g. 25 steps of 1000 -> ``[39, 79, ..., 999]``."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"grid steps must be in 1..{num_train_timesteps}, got {num_steps}")
    stride = num_train_timesteps / num_steps
    return (torch.arange(1, num_steps + 1, dtype=torch.float64) * stride).round().long() - 1


def grid_stride(num_steps: int, num_train_timesteps: int = 1000) -> int:
    """Timesteps between two neighbours of :func:`ddim_grid` (40 for 25 of 1000)."""
    return num_train_timesteps // num_steps


def expand_like(c: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample coefficient ``[B]`` to broadcast against ``x`` ``[B, ...]``."""
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))
