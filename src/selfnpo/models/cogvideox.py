"""Adapter for CogVideoX text-to-video (``CogVideoXPipeline``, ``CogVideoXTransformer3DModel``).

CogVideoX is variance-preserving with v-prediction on a rescaled, zero-terminal-SNR schedule
(``CogVideoXDDIMScheduler`` / ``CogVideoXDPMScheduler``: ``snr_shift_scale`` changes
``alphas_cumprod``), so :class:`selfnpo.schedules.VPSchedule` reads ``alphas_cumprod`` from the
scheduler itself; the transformer takes the integer level. Latents are ``[B, F, C, H, W]`` (frames
before channels), scaled by ``vae.config.scaling_factor``. CogVideoX 5B and 1.5 add 3-D rotary
position embeddings, rebuilt here for every call from the latent size as the pipeline builds them.
The pipeline runs CFG as one batched keyword call on ``cat([negative, positive])`` (inside
``cache_context("cond_uncond")``); its negative is the empty prompt's T5 embeddings by default.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..conditioning import Cond
from ..errors import SelfNPOError
from .sd import DiffusionModel


class CogVideoXModel(DiffusionModel):
    """CogVideoX behind the denoiser contract; ``unet`` is the ``CogVideoXTransformer3DModel``."""

    def __init__(
        self, pipe, uncond_mode: str = "auto", resolution: int | None = None, frames: int | None = None
    ) -> None:
        self.resolution = resolution
        super().__init__(pipe, "empty" if uncond_mode == "auto" else uncond_mode)
        self.is_sdxl = False
        self.frames = frames or int(self.unet.config.sample_frames)  # the pipeline's default (49)
        if self.schedule.prediction_type == "flow":
            raise ValueError(f"CogVideoX needs its VP scheduler, got {type(pipe.scheduler).__name__}")

    # ---- geometry: video latents [B, F, C, H, W] ---------------------------------------------
    @property
    def vae_scale(self) -> int:
        return int(self.pipe.vae_scale_factor_spatial)

    def default_resolution(self) -> int:
        # the pipeline's default is sample_height x sample_width (480 x 720); training is square
        return self.resolution or int(self.unet.config.sample_height) * self.vae_scale

    def latent_shape(self, batch: int, resolution: int | None = None) -> tuple[int, ...]:
        res = resolution or self.default_resolution()
        f = (self.frames - 1) // self.pipe.vae_scale_factor_temporal + 1
        p_t = self.unet.config.get("patch_size_t")
        if p_t and f % p_t:  # CogVideoX 1.5 pads the latent frames to whole temporal patches
            f += p_t - f % p_t
        side = res // self.vae_scale
        return (batch, f, int(self.unet.config.in_channels), side, side)

    # ---- conditioning -----------------------------------------------------------------------
    @torch.no_grad()
    def _encode_one(self, prompt: str) -> Cond:
        emb, _ = self.pipe.encode_prompt(
            prompt=prompt,
            do_classifier_free_guidance=False,
            max_sequence_length=int(self.unet.config.max_text_seq_length),
            device=self.device,
        )
        return Cond(emb.float().cpu())

    def uncond(self, batch: int) -> Cond:
        """Empty prompt (the pipeline's negative when none is given), or zero embeddings."""
        return self.empty_or_zeros(batch)

    def _forward(self, net: nn.Module, x: Tensor, time: Tensor, c: Cond) -> Tensor:
        """``CogVideoXPipeline``'s keyword call, with its rotary embeddings when the model has them."""
        rotary = None
        if self.unet.config.use_rotary_positional_embeddings:
            h, w = x.shape[-2] * self.vae_scale, x.shape[-1] * self.vae_scale
            rotary = self.pipe._prepare_rotary_positional_embeddings(h, w, x.shape[1], x.device)
        return net(
            hidden_states=x,
            encoder_hidden_states=c.embeds,
            timestep=time.to(x.device),
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]

    # ---- latents <-> videos -----------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        raise SelfNPOError(
            "CogVideoX trains on its own samples (--source self) or noise; image folders are not read"
        )

    def decode_latents_grad(self, latents: Tensor) -> Tensor:
        """Scaled latents ``[B, F, C, h, w]`` -> video ``[B, 3, frames, H, W]`` in [-1, 1]."""
        vae = self.pipe.vae
        lat = latents.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor
        video = vae.decode(lat.to(vae.device, vae.dtype)).sample.float()
        return video + (video.clamp(-1, 1) - video).detach()
