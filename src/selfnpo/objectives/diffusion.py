"""Standard denoising loss on data, in the network's own prediction space (pre-training)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import SelfNPOError
from ..options import opt
from ..param import forward_noise
from .base import Batch, StepContext, mse, register, uniform_int


@dataclass
class DiffusionConfig:
    """Plain diffusion fine-tuning."""

    snr_gamma: float = opt(
        0.0, "diffusion objective: min-SNR-gamma loss weight min(SNR, gamma)/SNR (Hang et al. 2023; 0 = off)"
    )

    def check(self) -> None:
        if not 0.0 <= self.snr_gamma < float("inf"):
            raise SelfNPOError("--snr-gamma must be a finite number >= 0")


@register("diffusion", configs=(DiffusionConfig,))
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
    x_t = forward_noise(x0, eps, a, s)
    loss = mse(ctx.student(x_t, t, batch.cond), m.schedule.target(x0, eps, t))
    gamma = getattr(ctx.config, "snr_gamma", 0.0)
    w = min_snr_weight(a.flatten(), s.flatten(), gamma, m.schedule.prediction_type) if gamma > 0 else None
    return loss if w is None else loss * w


def min_snr_weight(alpha: Tensor, sigma: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma weight of each sample's loss in the network's own prediction space.

    With ``SNR = alpha^2 / sigma^2`` the x0-space weight ``min(SNR, gamma)`` (Hang et al. 2023, eq. 6)
    is multiplied by ``(d x0 / d output)^2``: ``1 / SNR`` for epsilon, ``sigma^2`` for v (VP, where it
    equals ``1 / (SNR + 1)``) and for flow velocity (``x0 = x_t - sigma v``), 1 for sample prediction.
    """
    snr = (alpha.double() / sigma.double()) ** 2
    w = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        w = w / snr
    elif prediction_type in ("v_prediction", "flow"):
        w = w * sigma.double() ** 2
    return w.float()
