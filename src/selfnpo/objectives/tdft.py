"""Truncated diffusion fine-tuning (Self-NPO eqs. 13-17)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import SelfNPOError
from ..options import opt
from ..param import forward_noise, renoise
from ..sampling import ddim_rollout, top
from ..schedules import ddim_grid
from .base import Batch, StepContext, register, regression_loss, uniform_int


def start_state(
    ctx: StepContext, batch: Batch, grid: Tensor, shape: tuple[int, ...]
) -> tuple[Tensor, Tensor]:
    """``(x_{t'}, p')``: data noised to a uniformly drawn position ``p'`` of ``grid`` (level
    ``t' = grid[p']``, eq. 14), or pure noise at its top level ``T - 1`` (eq. 13)."""
    dev = ctx.generator.device
    if batch.x0 is None:
        return ctx.randn(shape), top(grid, shape[0], dev)
    idx = (ctx.rand(shape[0]).to(dev) * len(grid)).floor().long().clamp(max=len(grid) - 1)
    a, s = ctx.model.coeffs(grid[idx], batch.x0)
    return forward_noise(batch.x0, ctx.randn(shape), a, s), idx


@dataclass
class RolloutConfig:
    """The teacher rollout and the regression of TDFT (and of the full-simulation baseline)."""

    k_steps: int = opt(5, "K: teacher DDIM steps from t' to t (t = t' - K*T/grid_steps, clamped at 0)")
    rollout_guidance: float = opt(
        -1.0, "w: paper guidance weight of the teacher rollout (-1 = unconditional only; g = w+1)"
    )
    authors_cond_pass: bool = opt(
        False,
        "compute the conditional teacher pass even when w = -1 and discard it (authors' cost)",
    )
    loss: str = opt(
        "pseudo_huber", "regression loss on x0: pseudo_huber or l2", choices=("pseudo_huber", "l2")
    )
    huber_c: float = opt(1e-3, "pseudo-Huber constant c")

    def check(self) -> None:
        if self.k_steps < 1:
            raise SelfNPOError("--k-steps must be >= 1")
        if self.k_steps > self.grid_steps:
            raise SelfNPOError(f"--k-steps {self.k_steps} is larger than the grid ({self.grid_steps})")
        if not self.huber_c > 0:
            raise SelfNPOError("--huber-c must be > 0")


@register("tdft", configs=(RolloutConfig,))
def tdft(ctx: StepContext, batch: Batch) -> Tensor:
    """Self-NPO TDFT loss per sample.

    1. ``x_{t'}`` from :func:`start_state`; 2. ``K`` teacher DDIM steps with guidance ``w`` to
    ``x_t``; 3. target ``x_{t->0}`` by Tweedie (eq. 12); 4. ``s`` uniform on ``(t, T-1]`` and
    ``x_s`` by re-noising the state (eq. 16); 5. regress the student's x0 at ``(x_s, s, c)`` on
    the target (eq. 17), pseudo-Huber or L2.
    """
    cfg, m = ctx.config, ctx.model
    shape = m.latent_shape(len(batch.prompts), cfg.resolution)
    grid = ddim_grid(cfg.grid_steps, m.num_train_timesteps).to(ctx.generator.device)
    x_tp, p_prime = start_state(ctx, batch, grid, shape)
    f = ctx.guided_teacher(batch.cond, cfg.rollout_guidance)
    x_t, t = ddim_rollout(m, f, x_tp, p_prime, cfg.k_steps, grid)
    with torch.no_grad():
        target = m.x0_of(f(x_t, t), x_t, t)
    s = uniform_int(ctx, t + 1, m.schedule.t_max)
    a_t, sig_t = m.coeffs(t, x_t)
    a_s, sig_s = m.coeffs(s, x_t)
    x_s = renoise(x_t, a_t, sig_t, a_s, sig_s, ctx.randn(shape))
    x0_pred = m.x0_of(ctx.student(x_s, s, batch.cond), x_s, s)
    return regression_loss(x0_pred, target, cfg.loss, cfg.huber_c)
