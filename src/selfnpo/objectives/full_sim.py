"""Full-simulation baseline (Self-NPO eqs. 10-11): sample to x0, then diffusion fine-tuning."""

from __future__ import annotations

import torch
from torch import Tensor

from ..param import forward_noise
from ..sampling import ddim_sample
from ..schedules import ddim_grid
from .base import Batch, StepContext, register, regression_loss, uniform_int
from .tdft import RolloutConfig


@register("full_sim", configs=(RolloutConfig,))
def full_sim(ctx: StepContext, batch: Batch) -> Tensor:
    """Teacher samples ``x0`` over the whole grid with guidance ``w`` (eq. 10); the student
    regresses it from ``x_t = alpha_t x0 + sigma_t eps`` at a uniform ``t`` (eq. 11)."""
    cfg, m = ctx.config, ctx.model
    shape = m.latent_shape(len(batch.prompts), cfg.resolution)
    f = ctx.guided_teacher(batch.cond, cfg.rollout_guidance)
    grid = ddim_grid(cfg.grid_steps, m.num_train_timesteps).to(ctx.generator.device)
    x0 = ddim_sample(m, f, ctx.randn(shape), grid)
    zero = torch.zeros(shape[0], dtype=torch.long, device=x0.device)
    t = uniform_int(ctx, zero, m.schedule.t_max)
    a, s = m.coeffs(t, x0)
    x_t = forward_noise(x0, ctx.randn(shape), a, s)
    x0_pred = m.x0_of(ctx.student(x_t, t, batch.cond), x_t, t)
    return regression_loss(x0_pred, x0, cfg.loss, cfg.huber_c)
