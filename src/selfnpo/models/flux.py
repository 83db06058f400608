"""Adapter for Flux.1-dev (``FluxPipeline``, ``FluxTransformer2DModel``).

Flux is a rectified-flow model like SD3, with three differences that live here:

- latents are *packed*: the pipeline's ``[B, C, H, W]`` VAE latents become ``[B, H/2 * W/2, 4C]``
  tokens (``_pack_latents``), with per-token position ids (``img_ids``, ``txt_ids``). The training
  loop works in the packed space (a permutation of Gaussian noise is Gaussian noise) on square
  images, so a sequence of ``L`` tokens is a ``sqrt(L) x sqrt(L)`` grid.
- the time shift depends on the resolution (``use_dynamic_shifting``): ``mu`` is linear in ``L``
  as ``FluxPipeline`` computes it, so the schedule is built for the training resolution.
- Flux.1-dev is *guidance-distilled*: the CFG weight enters as an embedding (``guidance``), and its
  pipeline runs no negative branch unless true CFG is asked for (``true_cfg_scale > 1`` and a
  negative prompt); then it makes a second, separate transformer call for the negative prompt.
  Both of its calls get the same guidance embedding (the ``guidance_scale`` argument); training
  uses :attr:`FluxModel.guidance` (3.5, the pipeline's default) for every prediction.

FLUX.1-schnell (timestep-distilled, no guidance embedding) samples in a few steps without CFG, so
there is no negative branch for an offset to act on: it is refused.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..conditioning import Cond
from ..errors import SelfNPOError
from ..schedules import schedule_for
from .sd import DiffusionModel


def check_flux(pipe) -> None:
    """One-line refusal of timestep-distilled Flux models (no guidance embedding)."""
    if not pipe.transformer.config.get("guidance_embeds", False):
        raise SelfNPOError(
            "timestep-distilled Flux (FLUX.1-schnell type, no guidance embedding) samples without CFG, "
            "so there is no negative branch for an offset; use a guidance-distilled model (FLUX.1-dev)"
        )


class FluxModel(DiffusionModel):
    """Flux.1-dev behind the denoiser contract; ``unet`` is the ``FluxTransformer2DModel``."""

    guidance = 3.5  # the guidance embedding of every training prediction (FluxPipeline's default)

    def __init__(self, pipe, uncond_mode: str = "auto", resolution: int | None = None) -> None:
        check_flux(pipe)
        self.resolution = resolution
        super().__init__(pipe, "empty" if uncond_mode == "auto" else uncond_mode)
        self.is_sdxl = False
        if self.schedule.prediction_type != "flow":
            raise ValueError(f"Flux needs a flow-matching scheduler, got {type(pipe.scheduler).__name__}")

    def make_schedule(self, scheduler):
        """The flow schedule with the time shift of the training resolution's token count."""
        return schedule_for(scheduler, image_seq_len=self.seq_len(self.default_resolution()))

    # ---- geometry: packed tokens ------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)  # 4 x the VAE's channels (2x2 packing)

    def default_resolution(self) -> int:
        return self.resolution or self.pipe.default_sample_size * self.vae_scale

    def seq_len(self, resolution: int) -> int:
        side = resolution // (self.vae_scale * 2)
        return side * side

    def latent_shape(self, batch: int, resolution: int | None = None) -> tuple[int, ...]:
        return (batch, self.seq_len(resolution or self.default_resolution()), self.latent_channels)

    def _side(self, x: Tensor) -> int:
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise SelfNPOError(f"Flux training uses square images; got {x.shape[1]} latent tokens")
        return side

    # ---- conditioning -----------------------------------------------------------------------
    @torch.no_grad()
    def _encode_one(self, prompt: str) -> Cond:
        emb, pooled, _ = self.pipe.encode_prompt(prompt=prompt, prompt_2=None, device=self.device)
        return Cond(emb.float().cpu(), {"pooled_projections": pooled.float().cpu()})

    def uncond(self, batch: int) -> Cond:
        """Empty prompt (the negative prompt true CFG gets by default here), or zero embeddings."""
        return self.empty_or_zeros(batch)

    def _forward(self, net: nn.Module, x: Tensor, time: Tensor, c: Cond) -> Tensor:
        """``FluxPipeline``'s keyword call: ``timestep = sigma`` (the pipeline's ``t / 1000``)."""
        side = self._side(x)
        img_ids = self.pipe._prepare_latent_image_ids(x.shape[0], side, side, x.device, x.dtype)
        txt_ids = torch.zeros(c.embeds.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = torch.full((x.shape[0],), self.guidance, device=x.device, dtype=torch.float32)
        return net(
            hidden_states=x,
            timestep=(time / 1000).to(x.device, x.dtype),
            guidance=guidance,
            pooled_projections=c.added["pooled_projections"],
            encoder_hidden_states=c.embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]

    # ---- latents <-> images -----------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        lat = super().encode_images(images)  # [B, C, H, W], shifted and scaled
        b, ch, h, w = lat.shape
        return self.pipe._pack_latents(lat, b, ch, h, w)

    def decode_latents_grad(self, latents: Tensor) -> Tensor:
        res = self._side(latents) * 2 * self.vae_scale
        return super().decode_latents_grad(self.pipe._unpack_latents(latents, res, res, self.vae_scale))
