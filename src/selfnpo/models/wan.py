"""Adapter for Wan 2.1 text-to-video (``WanPipeline``, ``WanTransformer3DModel``).

Wan is a rectified-flow model on video latents ``[B, C, F, H, W]`` (``F = (frames - 1) / 4 + 1``)
of its causal VAE, normalised per channel by ``latents_mean`` / ``latents_std``. Its scheduler is
``UniPCMultistepScheduler`` on flow sigmas (``flow_shift``; 3.0 at 480p, 5.0 at 720p) or
``FlowMatchEulerDiscreteScheduler``; either way :class:`selfnpo.schedules.FlowSchedule` and the
transformer takes ``sigma * 1000``. The pipeline runs CFG as two separate transformer calls, the
unconditional one inside ``transformer.cache_context("uncond")``, with the negative prompt's T5
embeddings (the empty prompt by default).

Wan 2.2 A14B splits denoising between two experts (``transformer`` for high noise,
``transformer_2`` below ``boundary_ratio``); each would need its own offset, which is not
implemented, so such pipelines are refused. Wan 2.2 TI2V-5B (one transformer) runs as Wan 2.1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..conditioning import Cond
from ..errors import SelfNPOError
from .sd import DiffusionModel


def check_wan(pipe) -> None:
    """One-line refusal of two-expert Wan 2.2 pipelines."""
    if getattr(pipe, "transformer_2", None) is not None or pipe.config.get("boundary_ratio") is not None:
        raise SelfNPOError(
            "Wan 2.2 with two experts (transformer_2 / boundary_ratio) is not supported: each expert "
            "would need its own offset; use Wan 2.1 or a single-transformer Wan 2.2 model"
        )
    if pipe.transformer is None:
        raise SelfNPOError("WanPipeline without a transformer is not supported")


class WanModel(DiffusionModel):
    """Wan 2.1 behind the denoiser contract; ``unet`` is the ``WanTransformer3DModel``."""

    MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default for prompts (encode_prompt's is 226)

    def __init__(
        self, pipe, uncond_mode: str = "auto", resolution: int | None = None, frames: int | None = None
    ) -> None:
        check_wan(pipe)
        self.resolution = resolution
        super().__init__(pipe, "empty" if uncond_mode == "auto" else uncond_mode)
        self.is_sdxl = False
        self.frames = frames or 81  # WanPipeline's default
        if self.schedule.prediction_type != "flow":
            raise ValueError(f"Wan needs a flow scheduler, got {type(pipe.scheduler).__name__}")

    # ---- geometry: video latents ------------------------------------------------------------
    @property
    def vae_scale(self) -> int:
        return int(self.pipe.vae_scale_factor_spatial)

    def default_resolution(self) -> int:
        return self.resolution or 480  # WanPipeline's default is 480 x 832; training uses square frames

    def latent_shape(self, batch: int, resolution: int | None = None) -> tuple[int, ...]:
        res = resolution or self.default_resolution()
        f = (self.frames - 1) // self.pipe.vae_scale_factor_temporal + 1
        return (batch, int(self.unet.config.in_channels), f, res // self.vae_scale, res // self.vae_scale)

    # ---- conditioning -----------------------------------------------------------------------
    @torch.no_grad()
    def _encode_one(self, prompt: str) -> Cond:
        emb, _ = self.pipe.encode_prompt(
            prompt=prompt,
            do_classifier_free_guidance=False,
            max_sequence_length=self.MAX_SEQUENCE_LENGTH,
            device=self.device,
        )
        return Cond(emb.float().cpu())

    def uncond(self, batch: int) -> Cond:
        """Empty prompt (the pipeline's negative when none is given), or zero embeddings."""
        return self.empty_or_zeros(batch)

    def _forward(self, net: nn.Module, x: Tensor, time: Tensor, c: Cond) -> Tensor:
        """``WanPipeline``'s keyword call; ``time`` is ``sigma * 1000``."""
        return net(
            hidden_states=x,
            timestep=time.to(x.device),
            encoder_hidden_states=c.embeds,
            return_dict=False,
        )[0]

    # ---- latents <-> videos -----------------------------------------------------------------
    def _norm(self, like: Tensor) -> tuple[Tensor, Tensor]:
        cfg, shape = self.pipe.vae.config, (1, -1, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean).view(shape).to(like.device, torch.float32)
        std = torch.tensor(cfg.latents_std).view(shape).to(like.device, torch.float32)
        return mean, std

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        raise SelfNPOError(
            "Wan trains on its own samples (--source self) or noise; image folders are not read"
        )

    def decode_latents_grad(self, latents: Tensor) -> Tensor:
        """Normalised latents ``[B, C, F, h, w]`` -> video ``[B, 3, frames, H, W]`` in [-1, 1]."""
        vae = self.pipe.vae
        mean, std = self._norm(latents)
        video = vae.decode((latents.float() * std + mean).to(vae.device, vae.dtype)).sample.float()
        return video + (video.clamp(-1, 1) - video).detach()
