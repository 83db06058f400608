"""Standard denoising loss on data, in the network's own prediction space (pre-training)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Batch, StepContext, mse, register, uniform_int


@register("diffusion")
def diffusion(ctx: StepContext, batch: Batch) -> Tensor:
    """``|| f(x_t, t, c) - target ||^2`` with ``x_t = alpha_t x0 + sigma_t eps`` and ``t`` uniform;
    target is eps, v, x0 or the flow velocity ``eps - x0`` per the model's schedule."""
    if batch.x0 is None:
        raise ValueError("the diffusion objective needs clean latents; use an image or pool source")
    m, x0 = ctx.model, batch.x0
    zero = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
    t = uniform_int(ctx, zero, m.schedule.t_max)
    eps = ctx.randn(tuple(x0.shape))
    a, s = m.coeffs(t, x0)
    x_t = a * x0 + s * eps
    return mse(ctx.student(x_t, t, batch.cond), m.schedule.target(x0, eps, t))
