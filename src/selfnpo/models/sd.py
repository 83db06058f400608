"""Adapter from a diffusers Stable-Diffusion-family pipeline to the denoiser contract.

Every sampler, guidance rule and objective in selfnpo only calls ``model.predict(x_t, t, cond)``
(raw network output in ``model.prediction_type``) and the schedule helpers here. SD1.5-type
pipelines (one CLIP text encoder) and SDXL-type pipelines (two text encoders, pooled embeddings,
size/crop micro-conditioning) differ only in :meth:`DiffusionModel.encode` and
:meth:`DiffusionModel.uncond`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..conditioning import Cond
from ..param import to_eps, to_x0
from ..schedules import alpha_sigma, expand_like


class DiffusionModel:
    """A UNet, its text encoders and its training schedule, behind one small interface."""

    CACHE_SIZE = 8192  # prompts whose encodings are kept (oldest dropped first)

    def __init__(self, pipe, uncond_mode: str = "auto") -> None:
        self.pipe = pipe
        self.unet: nn.Module = pipe.unet
        sched = pipe.scheduler.config
        if getattr(pipe.scheduler, "alphas_cumprod", None) is None:
            raise ValueError(f"scheduler {type(pipe.scheduler).__name__} has no alphas_cumprod")
        self.alphas_cumprod: Tensor = pipe.scheduler.alphas_cumprod.double().clone()
        self.prediction_type: str = sched.get("prediction_type", "epsilon")
        self.num_train_timesteps: int = int(sched.get("num_train_timesteps", 1000))
        self.is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
        if uncond_mode == "auto":
            zeros = self.is_sdxl and pipe.config.get("force_zeros_for_empty_prompt", False)
            uncond_mode = "zeros" if zeros else "empty"
        self.uncond_mode = uncond_mode
        self._cache: dict[str, Cond] = {}
        self.nfe = 0  # network evaluations (samples x passes), for cost accounting

    # ---- geometry -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.unet.config.in_channels)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def default_resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size) * self.vae_scale

    def latent_shape(self, batch: int, resolution: int | None = None) -> tuple[int, ...]:
        res = resolution or self.default_resolution()
        return (batch, self.latent_channels, res // self.vae_scale, res // self.vae_scale)

    # ---- conditioning ---------------------------------------------------------------------
    @torch.no_grad()
    def _encode_one(self, prompt: str) -> Cond:
        pipe, dev = self.pipe, self.device
        if not self.is_sdxl:
            emb = pipe.encode_prompt(prompt, dev, 1, False)[0]
            return Cond(emb.float().cpu())
        emb, _, pooled, _ = pipe.encode_prompt(
            prompt=prompt, device=dev, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        res = self.default_resolution()
        proj = pipe.text_encoder_2.config.projection_dim
        time_ids = pipe._get_add_time_ids((res, res), (0, 0), (res, res), emb.dtype, proj)
        return Cond(emb.float().cpu(), {"text_embeds": pooled.float().cpu(), "time_ids": time_ids.float()})

    def encode(self, prompts: Sequence[str], cache: bool = True) -> Cond:
        """Text conditioning for a batch of prompts (kept on CPU in fp32). Cached per prompt unless
        ``cache=False`` (for prompts that are mostly seen once, e.g. randomly degraded ones)."""
        out = []
        for p in prompts:
            if p in self._cache:
                out.append(self._cache[p])
            elif cache:
                if len(self._cache) >= self.CACHE_SIZE:  # bounded: fresh captions every step must not grow it
                    del self._cache[next(iter(self._cache))]
                self._cache[p] = self._encode_one(p)
                out.append(self._cache[p])
            else:
                out.append(self._encode_one(p))
        return Cond.cat(out)

    def warm_cache(self, prompts: Sequence[str]) -> int:
        """Encode every distinct prompt of a run (and the empty one) once, before the first step.

        Training then never calls a text encoder again: every step's conditioning is a cache hit.
        Prompt sets larger than the cache are left to the per-step cache (returns 0).
        """
        distinct = list(dict.fromkeys(["", *prompts]))
        if len(distinct) > self.CACHE_SIZE:
            return 0
        self.encode(distinct)
        return len(distinct)

    def uncond(self, batch: int) -> Cond:
        """Unconditional input: empty prompt (SD1.5) or zero embeddings (SDXL default)."""
        base = self.encode([""])
        if self.uncond_mode == "zeros":
            added = {k: (torch.zeros_like(v) if k == "text_embeds" else v) for k, v in base.added.items()}
            base = Cond(torch.zeros_like(base.embeds), added)
        return base.expand(batch)

    # ---- the denoiser contract ------------------------------------------------------------
    def predict(self, x_t: Tensor, t: Tensor, cond: Cond, unet: nn.Module | None = None) -> Tensor:
        """Raw network output (eps or v, per ``prediction_type``) at integer timesteps ``t``."""
        net = unet if unet is not None else self.unet
        self.nfe += x_t.shape[0]
        dtype = next(net.parameters()).dtype
        c = cond.to(x_t.device, dtype)
        return net(x_t.to(dtype), t, **c.unet_kwargs(), return_dict=False)[0].to(x_t.dtype)

    def coeffs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``alpha_t, sigma_t`` broadcast against ``like`` and in its dtype."""
        a, s = alpha_sigma(self.alphas_cumprod, t.to(like.device))
        return expand_like(a, like).to(like.dtype), expand_like(s, like).to(like.dtype)

    def x0_of(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, s = self.coeffs(t, x_t)
        return to_x0(pred, x_t, a, s, self.prediction_type)

    def eps_of(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, s = self.coeffs(t, x_t)
        return to_eps(pred, x_t, a, s, self.prediction_type)

    # ---- latents <-> images -----------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [-1, 1], ``[B, 3, H, W]`` -> scaled latents (the UNet's space)."""
        vae = self.pipe.vae
        lat = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((lat - shift) * vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [-1, 1]."""
        return self.decode_latents_grad(latents)

    def decode_latents_grad(self, latents: Tensor) -> Tensor:
        """:meth:`decode_latents` with gradients to the latents (reward objectives).

        The clamp to [-1, 1] is a straight-through one, so saturated pixels still pass gradient.
        """
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        lat = latents / vae.config.scaling_factor + shift
        img = vae.decode(lat.to(vae.device, vae.dtype)).sample.float()
        return img + (img.clamp(-1, 1) - img).detach()
