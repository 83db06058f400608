"""Adapter for Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``, ``SD3Transformer2DModel``).

SD3 is a rectified-flow model: ``x_t = (1 - sigma) x0 + sigma eps``, the transformer predicts the
velocity ``eps - x0`` and takes ``timestep = sigma * 1000``, where ``sigma`` is the time-shifted
level of its ``FlowMatchEulerDiscreteScheduler`` (shift 3.0 for SD3 and SD3.5). All of that lives
in :class:`selfnpo.schedules.FlowSchedule`; this adapter only knows SD3's text encoders and call.

Conditioning: ``encode_prompt`` of the three encoders (two CLIP, optional T5) gives the joint
sequence ``[B, 77 + L_t5, D]`` and pooled CLIP projections ``[B, P]``. The unconditional input
is the empty prompt, which is what the pipeline uses as its negative when none is given.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..conditioning import Cond
from .sd import DiffusionModel


class SD3Model(DiffusionModel):
    """SD3 behind the denoiser contract; ``unet`` is the ``SD3Transformer2DModel``."""

    def __init__(self, pipe, uncond_mode: str = "auto") -> None:
        super().__init__(pipe, "empty" if uncond_mode == "auto" else uncond_mode)
        self.is_sdxl = False
        if self.schedule.prediction_type != "flow":
            raise ValueError(f"SD3 needs a flow-matching scheduler, got {type(pipe.scheduler).__name__}")

    @torch.no_grad()
    def _encode_one(self, prompt: str) -> Cond:
        emb, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return Cond(emb.float().cpu(), {"pooled_projections": pooled.float().cpu()})

    def uncond(self, batch: int) -> Cond:
        """Empty prompt (the pipeline's default negative), or all-zero embeddings."""
        return self.empty_or_zeros(batch)

    def _forward(self, net: nn.Module, x: Tensor, time: Tensor, c: Cond) -> Tensor:
        """The keyword call of ``StableDiffusion3Pipeline.__call__``; ``time`` is ``sigma * 1000``."""
        return net(
            hidden_states=x,
            timestep=time.to(x.device),
            encoder_hidden_states=c.embeds,
            pooled_projections=c.added["pooled_projections"],
            return_dict=False,
        )[0]
