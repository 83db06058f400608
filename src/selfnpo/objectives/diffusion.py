"""Standard denoising loss on data, in the network's own prediction space (pre-training)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..param import target_for
from .base import Batch, StepContext, mse, register, uniform_int


@register("diffusion")
def diffusion(ctx: StepContext, batch: Batch) -> Tensor:
    """``|| f(x_t, t, c) - target ||^2`` with ``x_t = alpha_t x0 + sigma_t eps`` and ``t`` uniform;
    target is eps, v or x0 per the model's ``prediction_type``."""
    if batch.x0 is None:
        raise ValueError("the diffusion objective needs clean latents; use an image or pool source")
    m, x0 = ctx.model, batch.x0
    zero = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
    t = uniform_int(ctx, zero, m.num_train_timesteps - 1)
    eps = ctx.randn(tuple(x0.shape))
    a, s = m.coeffs(t, x0)
    x_t = a * x0 + s * eps
    loss = mse(ctx.student(x_t, t, batch.cond), target_for(x0, eps, a, s, m.prediction_type))
    gamma = getattr(ctx.config, "snr_gamma", 0.0)
    return loss * min_snr_weight(a.flatten(), s.flatten(), gamma, m.prediction_type) if gamma > 0 else loss


def min_snr_weight(alpha: Tensor, sigma: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma weight of each sample's loss in the network's own prediction space.

    With ``SNR = alpha^2 / sigma^2`` the x0-space weight ``min(SNR, gamma)`` (Hang et al. 2023, eq. 6)
    becomes ``min(SNR, gamma) / SNR`` for epsilon, ``min(SNR, gamma) / (SNR + 1)`` for v and
    ``min(SNR, gamma)`` for sample prediction.
    """
    snr = (alpha.double() / sigma.double()) ** 2
    w = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        w = w / snr
    elif prediction_type == "v_prediction":
        w = w / (snr + 1.0)
    return w.float()
