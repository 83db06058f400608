"""Diffusion-DPO (positive offset eta) and Diffusion-NPO by reversed pairs (negative offset).

Diffusion-DPO's loss per pair (Wallace et al., eq. 14, with ``T * omega(lambda_t)`` folded into
beta), on a shared timestep ``t`` and noise ``eps``:

    model_diff = ||eps_w - f_theta(x_w,t)||^2 - ||eps_l - f_theta(x_l,t)||^2
    ref_diff   = ||eps_w - f_ref(x_w,t)||^2   - ||eps_l - f_ref(x_l,t)||^2
    loss       = -log sigmoid(z)

with ``z = -0.5 * beta * (model_diff - ref_diff)`` (convention ``original``, the Diffusion-DPO
code; the default) or ``z = beta * (ref_diff - model_diff)`` (convention ``diffusers``, the
diffusers example: twice as strong at the same beta). Diffusion-NPO trains its negative offset
with the same loss and winner and loser swapped (``dpo_npo``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..conditioning import Cond
from ..errors import SelfNPOError
from ..options import opt
from ..param import forward_noise, target_for
from .base import Batch, StepContext, mse, register, uniform_int

CONVENTIONS = ("original", "diffusers")


def dpo_logit(
    model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float, convention: str = "original"
) -> Tensor:
    """The DPO logit ``z`` from per-sample denoising errors of model and reference (winner, loser)."""
    model_diff, ref_diff = model_w - model_l, ref_w - ref_l
    if convention == "original":
        return -0.5 * beta * (model_diff - ref_diff)
    if convention == "diffusers":
        return beta * (ref_diff - model_diff)
    raise ValueError(f"unknown DPO beta convention {convention!r}; use one of {', '.join(CONVENTIONS)}")


def dpo_loss(
    model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float, convention: str = "original"
) -> Tensor:
    """Per-pair Diffusion-DPO loss ``-log sigmoid(z)`` (see the module docstring)."""
    return -F.logsigmoid(dpo_logit(model_w, model_l, ref_w, ref_l, beta, convention))


def _dpo(ctx: StepContext, batch: Batch, reverse: bool) -> Tensor:
    if batch.x0 is None or batch.x0_l is None:
        raise ValueError("DPO objectives need preference pairs; pass --pairs")
    m = ctx.model
    x_w, x_l = (batch.x0_l, batch.x0) if reverse else (batch.x0, batch.x0_l)
    n = x_w.shape[0]
    zero = torch.zeros(n, dtype=torch.long, device=x_w.device)
    t = uniform_int(ctx, zero, m.schedule.t_max)
    eps = ctx.randn(tuple(x_w.shape))  # one noise and one t per pair, shared by winner and loser
    a, s = m.coeffs(t, x_w)
    x_t = torch.cat([forward_noise(x_w, eps, a, s), forward_noise(x_l, eps, a, s)])
    tt, cond = torch.cat([t, t]), Cond.cat([batch.cond, batch.cond])
    target = torch.cat(
        [target_for(x_w, eps, a, s, m.prediction_type), target_for(x_l, eps, a, s, m.prediction_type)]
    )
    err = mse(ctx.student(x_t, tt, cond), target)
    with torch.no_grad():
        ref = mse(ctx.teacher(x_t, tt, cond), target)
    cfg = ctx.config
    return dpo_loss(err[:n], err[n:], ref[:n], ref[n:], cfg.dpo_beta, cfg.dpo_beta_convention)


@dataclass
class DPOConfig:
    """Diffusion-DPO and Diffusion-NPO on preference pairs (and DDSPO's DPO beta)."""

    dpo_beta: float = opt(5000.0, "Diffusion-DPO beta (strength of the KL regularisation)")
    dpo_beta_convention: str = opt(
        "original",
        "how beta enters the DPO loss: original (-0.5*beta*(model_diff - ref_diff), the Diffusion-DPO "
        "code) or diffusers (beta*(ref_diff - model_diff), twice as strong at equal beta)",
        choices=("original", "diffusers"),
    )

    def check(self) -> None:
        if not self.dpo_beta > 0:
            raise SelfNPOError("--dpo-beta must be > 0")


@register("dpo", configs=(DPOConfig,), reference=True, pairs=True)
def dpo(ctx: StepContext, batch: Batch) -> Tensor:
    """Diffusion-DPO on (winner, loser) pairs: trains a positive offset eta."""
    return _dpo(ctx, batch, reverse=False)


@register("dpo_npo", configs=(DPOConfig,), reference=True, pairs=True)
def dpo_npo(ctx: StepContext, batch: Batch) -> Tensor:
    """Diffusion-NPO: Diffusion-DPO with winner and loser swapped; trains a negative offset delta."""
    return _dpo(ctx, batch, reverse=True)
