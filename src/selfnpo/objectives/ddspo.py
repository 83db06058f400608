"""DDSPO: Diffusion-DPO in score space with the frozen reference's predictions as targets.

DDSPO (eq. 6) is Diffusion-DPO's loss with the forward-process noise targets ``eps_w, eps_l``
replaced by score targets ``eps*_w, eps*_l`` of a winning and a losing denoising policy. With a
frozen reference and a degraded prompt ``c-`` (eq. 7), on shared ``t`` and forward noise:

    eps*_w = f_ref(x_t^w, t, c)     (the preferred policy: the reference under the prompt)
    eps*_l = f_ref(x_t^l, t, c-)    (the dispreferred one: the reference under the degraded prompt)

and the student is always conditioned on ``c``. The reference's own error on the winning branch is
then zero. Targets live in the network's prediction space (eps or v). Losing images ``x_0^l``:

- ``paired``: the reference's samples under ``c-``, generated on the fly like the pool (DDIM,
  ``pool_guidance_scale``); a preference source's losers are used when the batch has them;
- ``unpaired`` ("Not-paired", sec. 4.4): the batch's other images (a roll by one) with ``c-``;
- ``random_positive`` (sec. 4.4): the other images with their own prompts as ``c-``.

``ddspo_npo`` swaps the two branches, so the offset learns the degraded direction; it is meant
as the negative branch of NPO guidance (Diffusion-NPO's recipe applied to DDSPO).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ..conditioning import Cond
from ..degrade import Degrader, degrade_prompt, get_degrader
from ..errors import SelfNPOError
from ..options import opt
from ..param import forward_noise, target_for
from ..sampling import ddim_sample
from ..schedules import ddim_grid
from .base import Batch, StepContext, mse, register, uniform_int
from .dpo import DPOConfig, dpo_loss


def ddspo_loss(
    pred_w: Tensor,
    pred_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    target_w: Tensor,
    target_l: Tensor,
    beta: float,
    convention: str = "original",
) -> Tensor:
    """Per-sample DDSPO loss (eq. 6): Diffusion-DPO on the errors of student ``pred`` and
    reference ``ref`` predictions against score targets; eq. 7 is ``target_w = ref_w``.

    With the forward noise as targets this is exactly Diffusion-DPO's loss (eq. 4).
    """
    return dpo_loss(
        mse(pred_w, target_w),
        mse(pred_l, target_l),
        mse(ref_w, target_w),
        mse(ref_l, target_l),
        beta,
        convention,
    )


@functools.lru_cache(maxsize=8)
def _degrader(spec: str, low: float, high: float) -> Degrader:
    if spec == "random_removal":
        return functools.partial(degrade_prompt, low=low, high=high)
    return get_degrader(spec)


def _encode(ctx: StepContext, prompts: list[str], device: torch.device) -> Cond:
    """Conditioning without the model's prompt cache (degraded prompts are mostly unique)."""
    return ctx.model.encode(prompts, cache=False).to(device)


def reference_sample(ctx: StepContext, cond: Cond, steps: int) -> Tensor:
    """Clean latents drawn from the reference (the frozen teacher) under ``cond``: DDIM with
    guidance ``pool_guidance_scale``, as the self-generated pool is made."""
    c, m = ctx.config, ctx.model
    f = ctx.guided_teacher(cond, c.pool_guidance_scale - 1.0)
    noise = ctx.randn(m.latent_shape(len(cond), c.resolution or None))
    grid = ddim_grid(steps or c.grid_steps, m.num_train_timesteps).to(noise.device)
    return ddim_sample(m, f, noise, grid)


def _losers(ctx: StepContext, batch: Batch, x_w: Tensor) -> tuple[Tensor, list[str]]:
    """``(x_0^l, c-)`` for the configured variant."""
    c = ctx.config
    roll = list(range(1, len(batch.prompts))) + [0]
    if c.ddspo_variant == "random_positive":
        return x_w[roll], [batch.prompts[i] for i in roll]
    degrade = _degrader(c.ddspo_degrade, c.ddspo_remove_low, c.ddspo_remove_high)
    neg = [degrade(p, ctx.generator) for p in batch.prompts]
    if c.ddspo_variant == "unpaired":
        return x_w[roll], neg
    if batch.x0_l is not None:
        return batch.x0_l, neg
    return reference_sample(ctx, _encode(ctx, neg, x_w.device), c.ddspo_loser_steps), neg


def ddspo_objective(
    ctx: StepContext, batch: Batch, reverse: bool = False, noise_targets: bool = False
) -> Tensor:
    """DDSPO per sample (eq. 7); ``reverse`` swaps the branches (``ddspo_npo``).

    ``noise_targets`` (or ``ddspo_targets = noise``) uses the forward noise as targets, which is
    Diffusion-DPO on the pairs (DDSPO sec. 3.2, "Diffusion DPO as a special case"); the batch's
    own losing latents are then used when it has them.
    """
    c, m = ctx.config, ctx.model
    if c.ddspo_variant != "paired" and len(batch.prompts) < 2:
        raise SelfNPOError(f"--ddspo-variant {c.ddspo_variant} needs --batch-size >= 2")
    if batch.x0 is None:
        with torch.no_grad():
            x_w = reference_sample(ctx, batch.cond, 0)
    else:
        x_w = batch.x0
    n = x_w.shape[0]
    # one t and one noise per pair, shared by both branches, drawn as Diffusion-DPO draws them
    t = uniform_int(ctx, torch.zeros(n, dtype=torch.long, device=x_w.device), m.schedule.t_max)
    eps = ctx.randn(tuple(x_w.shape))
    noise_targets = noise_targets or c.ddspo_targets == "noise"
    with torch.no_grad():
        x_l, neg = (
            (batch.x0_l, None) if batch.x0_l is not None and noise_targets else _losers(ctx, batch, x_w)
        )
    a, s = m.coeffs(t, x_w)
    x_tw, x_tl = forward_noise(x_w, eps, a, s), forward_noise(x_l, eps, a, s)
    x_t, tt, cond = torch.cat([x_tw, x_tl]), torch.cat([t, t]), Cond.cat([batch.cond, batch.cond])
    pred = ctx.student(x_t, tt, cond)
    with torch.no_grad():
        ref = ctx.teacher(x_t, tt, cond)
        if noise_targets:
            target_w = target_for(x_w, eps, a, s, m.prediction_type)
            target_l = target_for(x_l, eps, a, s, m.prediction_type)
        else:
            target_w, target_l = ref[:n], ctx.teacher(x_tl, t, _encode(ctx, neg, x_w.device))
    pw, pl, rw, rl = pred[:n], pred[n:], ref[:n], ref[n:]
    if reverse:
        pw, pl, rw, rl, target_w, target_l = pl, pw, rl, rw, target_l, target_w
    beta = c.ddspo_beta or c.dpo_beta
    return ddspo_loss(pw, pl, rw, rl, target_w, target_l, beta, c.dpo_beta_convention)


@dataclass
class DDSPOConfig:
    """DDSPO (objectives ddspo, ddspo_npo); its DPO beta defaults to ``--dpo-beta``."""

    ddspo_variant: str = opt(
        "paired",
        "ddspo: where the losing images come from: paired (the reference's samples under c-, made on "
        "the fly; the paper's main setting), unpaired (other prompts' images of the batch with c-; "
        "'Not-paired'), random_positive (other prompts' images with their own prompts as c-)",
        choices=("paired", "unpaired", "random_positive"),
    )
    ddspo_degrade: str = opt(
        "random_removal",
        "ddspo: prompt degradation c -> c-: random_removal, a .jsonl/.tsv file of rewrites (e.g. an "
        "LLM's) or module:function",
    )
    ddspo_remove_low: float = opt(0.4, "ddspo random_removal: smallest fraction of tokens removed")
    ddspo_remove_high: float = opt(0.7, "ddspo random_removal: largest fraction of tokens removed")
    ddspo_targets: str = opt(
        "reference",
        "ddspo: score targets: reference (eq. 7) or noise (the forward noise: Diffusion-DPO on the same "
        "(c, c-) pairs, the paper's D-DPO baseline)",
        choices=("reference", "noise"),
    )
    ddspo_beta: float = opt(0.0, "ddspo: DPO beta of the score-space loss (0 = use --dpo-beta)")
    ddspo_loser_steps: int = opt(
        0, "ddspo paired: DDIM steps for the losing images under c- (0 = --grid-steps, like the pool)"
    )

    def check(self) -> None:
        if not 0.0 <= self.ddspo_remove_low <= self.ddspo_remove_high <= 1.0:
            raise SelfNPOError("--ddspo-remove-low/high must satisfy 0 <= low <= high <= 1")
        if self.ddspo_beta < 0:
            raise SelfNPOError("--ddspo-beta must be >= 0")
        if (
            self.objective in ("ddspo", "ddspo_npo")
            and self.ddspo_variant != "paired"
            and self.batch_size < 2
        ):
            raise SelfNPOError(f"--ddspo-variant {self.ddspo_variant} needs --batch-size >= 2")
        if not 0 <= self.ddspo_loser_steps <= 1000:
            raise SelfNPOError("--ddspo-loser-steps must be in 0..1000")


@register("ddspo", configs=(DDSPOConfig, DPOConfig), reference=True)
def ddspo(ctx: StepContext, batch: Batch) -> Tensor:
    """DDSPO (eq. 7): follow the reference under ``c``, move away from it under ``c-`` (a positive offset)."""
    return ddspo_objective(ctx, batch)


@register("ddspo_npo", configs=(DDSPOConfig, DPOConfig), reference=True)
def ddspo_npo(ctx: StepContext, batch: Batch) -> Tensor:
    """DDSPO with the branches swapped: the offset learns the degraded direction (a negative offset)."""
    return ddspo_objective(ctx, batch, reverse=True)
