"""R0 and R0+: a K-step generator from the score network, trained by regularised reward maximisation.

Generator (R0 eq. 3.2), on the trailing DDIM grid ``t_K > ... > t_1`` with ``x_K = z``:

    x0_k   = Tweedie estimate of the student at (x_k, t_k, c)     (no CFG inside the generator)
    x_{k-1} = alpha_{k-1} * x0_k + sigma_{k-1} * (eta_k * eps_theta + sqrt(1 - eta_k^2) * eps)

and the output is the last ``x0_1``. ``eta = 1`` is deterministic DDIM (R0's convention, the
opposite of the DDIM paper's). During training ``eta_k ~ U[0, 1]`` per step and sample (eq. 3.4).

Loss (Algorithm 1; eq. 3.5): each reward's gradient with respect to the generated latent is
normalised to unit norm per sample and weighted, ``-sum_i w_i R_i(x) / sg(||dR_i/dx||)``; the
implicit CFG reward ``log p_ref(c | x_t)`` of the frozen reference at ``x_t ~ q(x_t | x)`` (its
gradient is ``alpha_t * (eps_u - eps_c) / sigma_t``) is normalised the same way; plus
``w_reg * ||W - W_0||^2`` (eq. 3.3). The reported loss value is ``-sum_i w_i R_i + w_reg * reg``;
its gradient is the normalised one.

R0+ (eqs. 4.1-4.2): ``k`` uniform on ``1..K`` per batch; the first ``k - 1`` generator steps run
without gradient and the rewards score the Tweedie estimate of the ``k``-th network call.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import SelfNPOError
from ..guidance import guided
from ..options import opt
from ..param import forward_noise
from ..rewards import Reward, get_reward, reward_factory
from ..sampling import sample
from ..schedules import ddim_grid
from .base import Batch, StepContext, register, uniform_int
from .reward import RewardConfig

# noise levels of the implicit CFG reward: t ~ U[CFG_T_LOW * T, CFG_T_HIGH * T]
CFG_T_LOW, CFG_T_HIGH = 0.02, 0.98


def parse_rewards(spec: str, default: str) -> list[tuple[str, float]]:
    """``"name:weight,name:weight"`` -> ``[(name, weight)]``; empty -> ``[(default, 1.0)]``.

    A name may itself be ``module:attr`` (see :func:`selfnpo.rewards.get_reward`): the weight is
    the part after the last colon when that part is a number, otherwise the weight is 1.
    """
    if not spec.strip():
        return [(default, 1.0)]
    out = []
    for item in spec.split(","):
        name, sep, w = item.strip().rpartition(":")
        try:
            weight = float(w) if sep else 1.0
        except ValueError:
            if "." not in name:  # a bad weight, not a module:attr reward
                raise SelfNPOError(
                    f"--r0-rewards: bad weight in {item.strip()!r} (use name:weight)"
                ) from None
            name, weight = item.strip(), 1.0
        if not sep:
            name = w
        if not name or weight < 0:
            raise SelfNPOError(f"--r0-rewards: bad entry {item.strip()!r} (use name:weight, weight >= 0)")
        out.append((name, weight))
    return out


def normalise_reward_grads(
    grads: Sequence[Tensor], weights: Sequence[float], normalise: bool = True
) -> Tensor:
    """``sum_i w_i g_i / ||g_i||`` with per-sample L2 norms (eq. 3.5); ``sum_i w_i g_i`` if not
    ``normalise``. A zero gradient contributes nothing."""
    total = torch.zeros_like(grads[0])
    for g, w in zip(grads, weights, strict=True):
        if normalise:
            norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
            g = g / norm.reshape(-1, *([1] * (g.ndim - 1)))
        total = total + w * g
    return total


def ascent_surrogate(x: Tensor, direction: Tensor) -> Tensor:
    """Per-sample ``-<x, sg(direction)>``: its gradient with respect to ``x`` is ``-direction``."""
    return -(x * direction.detach()).flatten(1).sum(1)


@functools.lru_cache(maxsize=8)
def _named_reward(name: str, device: str) -> Reward:
    return get_reward(name, device)


def _rewards(ctx: StepContext) -> list[tuple[Reward, float]]:
    c = ctx.config
    out = []
    for name, w in parse_rewards(c.r0_rewards, c.reward):
        r = ctx.reward if (name == c.reward and ctx.reward is not None) else None
        out.append((r or _named_reward(name, str(ctx.generator.device)), w))
    return out


@torch.no_grad()
def cfg_reward_grad(ctx: StepContext, batch: Batch, x: Tensor) -> Tensor:
    """Gradient of the implicit CFG reward ``log p_ref(c | x_t)``, ``x_t = alpha_t x + sigma_t eps``,
    with respect to ``x``: ``alpha_t * (eps_u - eps_c) / sigma_t`` of the frozen reference."""
    m, n = ctx.model, x.shape[0]
    T = m.num_train_timesteps
    low = torch.full((n,), int(CFG_T_LOW * T), dtype=torch.long, device=x.device)
    t = uniform_int(ctx, low, int(CFG_T_HIGH * T))
    a, s = m.coeffs(t, x)
    x_t = forward_noise(x, ctx.randn(tuple(x.shape)), a, s)
    unc = m.uncond(n).to(x.device)
    eps_c = m.eps_of(ctx.teacher(x_t, t, batch.cond), x_t, t)
    eps_u = m.eps_of(ctx.teacher(x_t, t, unc), x_t, t)
    return a * (eps_u - eps_c) / s


def r0_loss(ctx: StepContext, batch: Batch, x: Tensor) -> Tensor:
    """Per-sample R0 loss of generated latents ``x`` (Algorithm 1, lines 5-14; see the module docstring)."""
    c, m = ctx.config, ctx.model
    xd = x.detach().requires_grad_(True)
    grads, weights, value = [], [], torch.zeros(x.shape[0], device=x.device)
    with torch.enable_grad():
        images = m.decode_latents_grad(xd)
        for reward, w in _rewards(ctx):
            r = reward(images, batch.prompts)
            grads.append(torch.autograd.grad(r.sum(), xd, retain_graph=True)[0])
            weights.append(w)
            value = value + w * r.detach().float()
    if c.r0_cfg_weight > 0:
        grads.append(cfg_reward_grad(ctx, batch, x.detach()))
        weights.append(c.r0_cfg_weight)
    surrogate = ascent_surrogate(x, normalise_reward_grads(grads, weights, not c.r0_raw_grads))
    loss = -value + (surrogate - surrogate.detach())
    if c.r0_reg_weight > 0:
        if ctx.offset is None:
            raise SelfNPOError("r0 weight regularisation needs the trained offset in the step context")
        loss = loss + c.r0_reg_weight * ctx.offset.sq_norm()
    return loss


def _generate(ctx: StepContext, batch: Batch, plus: bool) -> Tensor:
    c, m = ctx.config, ctx.model
    n, K = len(batch.prompts), c.r0_steps
    z = ctx.randn(m.latent_shape(n, c.resolution or None))
    grid = ddim_grid(K, m.num_train_timesteps).to(z.device)
    if c.r0_fixed_eta:
        etas = torch.full((K, n), c.r0_eta)
    else:
        etas = ctx.rand(K * n).reshape(K, n).float()
    calls = int(ctx.rand_shared(1).item() * K) + 1 if plus else K

    f = guided(ctx.student, batch.cond)  # the conditional student alone (R0 trains without CFG)
    return sample(m, f, z, grid, grad_calls=1 if plus else calls, calls=calls, etas=etas, randn=ctx.randn)


@dataclass
class R0Config:
    """R0 and R0+ (objectives r0, r0_plus): a few-step generator trained on rewards alone."""

    r0_rewards: str = opt(
        "", "r0: weighted rewards 'name:weight,name:weight' (empty = --reward with weight 1)"
    )
    r0_steps: int = opt(4, "r0: K, steps of the generator (eq. 3.2) during training")
    r0_cfg_weight: float = opt(1.0, "r0: weight of the implicit CFG reward (0 = off)")
    r0_reg_weight: float = opt(1.0, "r0: weight of the weight regularisation ||W - W_0||^2 (eq. 3.3)")
    r0_raw_grads: bool = opt(
        False, "r0: sum the weighted raw reward gradients instead of normalising each to unit norm (eq. 3.5)"
    )
    r0_fixed_eta: bool = opt(
        False, "r0: train with --r0-eta at every step instead of eta ~ U[0, 1] (eq. 3.4)"
    )
    r0_eta: float = opt(1.0, "r0: the fixed eta of --r0-fixed-eta (1 = deterministic DDIM)")

    def check(self) -> None:
        if not 1 <= self.r0_steps <= 1000:
            raise SelfNPOError("--r0-steps must be in 1..1000")
        if self.r0_cfg_weight < 0:
            raise SelfNPOError("--r0-cfg-weight must be >= 0")
        if self.r0_reg_weight < 0:
            raise SelfNPOError("--r0-reg-weight must be >= 0")
        if not 0.0 <= self.r0_eta <= 1.0:
            raise SelfNPOError("--r0-eta must be in [0, 1]")
        if self.objective in ("r0", "r0_plus"):
            for name, _ in parse_rewards(self.r0_rewards, self.reward):
                reward_factory(name)


@register("r0", configs=(R0Config, RewardConfig), reference=True, uses_reward=True, prompts_only=True)
def r0(ctx: StepContext, batch: Batch) -> Tensor:
    """R0 (Algorithm 1): rewards of the K-step generator's output, backpropagated through all K steps."""
    return r0_loss(ctx, batch, _generate(ctx, batch, plus=False))


@register("r0_plus", configs=(R0Config, RewardConfig), reference=True, uses_reward=True, prompts_only=True)
def r0_plus(ctx: StepContext, batch: Batch) -> Tensor:
    """R0+ (eqs. 4.1-4.2): rewards of a random intermediate estimate ``x0^(k)``, one step with gradient."""
    return r0_loss(ctx, batch, _generate(ctx, batch, plus=True))
