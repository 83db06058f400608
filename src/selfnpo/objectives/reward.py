"""Differentiable-reward fine-tuning (DRaFT-K) and its Diffusion-NPO twin with ``R_NPO = 1 - R``.

The student samples from noise with deterministic DDIM (``reward_steps`` steps, guidance
``reward_guidance`` with the student in both branches); gradients flow through the last
``reward_grad_steps`` network calls and the VAE decoder into the reward, and the loss is
``-R(x_0, c)`` (Clark et al., DRaFT-K). ``reward_npo`` maximises ``1 - R`` instead, which is
Diffusion-NPO's reward-based recipe for a negative offset (Diffusion-NPO, "Reward-based NPO").
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..errors import SelfNPOError
from ..guidance import guided
from ..options import opt
from ..rewards import npo_reward, reward_factory
from ..sampling import sample
from ..schedules import ddim_grid
from .base import Batch, StepContext, get_spec, register


def sample_with_grad(ctx: StepContext, batch: Batch) -> Tensor:
    """Decoded images ``[B, 3, H, W]`` of the student's guided DDIM rollout, differentiable in
    the student's weights through the last ``reward_grad_steps`` steps."""
    c, m = ctx.config, ctx.model
    unc = m.uncond(len(batch.cond)).to(batch.cond.embeds.device)
    f = guided(ctx.student, batch.cond, unc, c.reward_guidance)
    noise = ctx.randn(m.latent_shape(len(batch.prompts), c.resolution))
    grid = ddim_grid(c.reward_steps, m.num_train_timesteps).to(noise.device)
    x0 = sample(m, f, noise, grid, grad_calls=c.reward_grad_steps)
    return m.decode_latents_grad(x0)


def _reward_loss(ctx: StepContext, batch: Batch, npo: bool) -> Tensor:
    if ctx.reward is None:
        raise ValueError("reward objectives need a reward; the training loop sets it from --reward")
    r = npo_reward(ctx.reward) if npo else ctx.reward
    return -r(sample_with_grad(ctx, batch), batch.prompts)


@dataclass
class RewardConfig:
    """Differentiable-reward fine-tuning (DRaFT-K) with R or 1 - R; ``reward`` also serves R0."""

    reward: str = opt(
        "world",
        "reward model: a registered or published name ('world' = the embedded world's) or module:attr "
        "(selfnpo.rewards)",
    )
    reward_steps: int = opt(10, "reward objectives: DDIM steps of the sampling rollout")
    reward_grad_steps: int = opt(1, "reward objectives: K of DRaFT-K, gradient through the last K steps")
    reward_guidance: float = opt(7.5, "reward objectives: guidance scale g of the rollout (1 = no CFG)")

    def check(self) -> None:
        if self.reward_steps < 1:
            raise SelfNPOError("--reward-steps must be >= 1")
        if not 1 <= self.reward_grad_steps <= self.reward_steps:
            raise SelfNPOError("--reward-grad-steps must be in 1..--reward-steps")
        if not self.reward_guidance >= 1.0:
            raise SelfNPOError("--reward-guidance must be >= 1")
        if get_spec(self.objective).uses_reward:
            reward_factory(self.reward)  # an unknown reward is reported before the model loads


@register("reward", configs=(RewardConfig,), reference=True, uses_reward=True, prompts_only=True)
def reward(ctx: StepContext, batch: Batch) -> Tensor:
    """DRaFT-K: maximise ``R`` of the student's own samples (a positive offset)."""
    return _reward_loss(ctx, batch, npo=False)


@register("reward_npo", configs=(RewardConfig,), reference=True, uses_reward=True, prompts_only=True)
def reward_npo(ctx: StepContext, batch: Batch) -> Tensor:
    """Reward-based Diffusion-NPO: maximise ``1 - R`` (a negative offset delta)."""
    return _reward_loss(ctx, batch, npo=True)
