"""Adapter from a diffusers Stable-Diffusion-family pipeline to the denoiser contract.

Every sampler, guidance rule and objective in selfnpo only calls ``model.predict(x_t, t, cond)``
(raw network output in ``model.prediction_type``) and the schedule (:attr:`DiffusionModel.schedule`,
a :mod:`selfnpo.schedules` object; ``coeffs`` / ``x0_of`` / ``eps_of`` go through it). ``t`` is
the scheduler's integer training level for every family; the schedule maps it to the network's
own time. SD1.5-type pipelines (one CLIP text encoder) and SDXL-type pipelines (two text encoders,
pooled embeddings, size/crop micro-conditioning) differ only in :meth:`DiffusionModel.encode` and
:meth:`DiffusionModel.uncond`; other families subclass it (:mod:`selfnpo.models.sd3`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..conditioning import Cond
from ..schedules import Schedule, schedule_for


def denoiser_network(pipe) -> nn.Module:
    """The pipeline's denoising network: ``pipe.unet`` or ``pipe.transformer``."""
    net = getattr(pipe, "unet", None)
    if net is None:
        net = getattr(pipe, "transformer", None)
    if net is None:
        raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")
    return net


class DiffusionModel:
    """A denoising network, its text encoders and its training schedule, behind one small interface.

    ``unet`` is the denoising network whatever its class (a transformer for flow families); the
    name is kept so the training loop and offsets treat every family alike.
    """

    CACHE_SIZE = 8192  # prompts whose encodings are kept (oldest dropped first)

    def __init__(self, pipe, uncond_mode: str = "auto") -> None:
        self.pipe = pipe
        self.unet: nn.Module = denoiser_network(pipe)
        self.schedule: Schedule = self.make_schedule(pipe.scheduler)
        self.is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
        if uncond_mode == "auto":
            zeros = self.is_sdxl and pipe.config.get("force_zeros_for_empty_prompt", False)
            uncond_mode = "zeros" if zeros else "empty"
        self.uncond_mode = uncond_mode
        self._cache: dict[str, Cond] = {}
        self.nfe = 0  # network evaluations (samples x passes), for cost accounting

    def make_schedule(self, scheduler) -> Schedule:
        """The training schedule (families with a resolution-dependent shift override this)."""
        return schedule_for(scheduler)

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    @property
    def alphas_cumprod(self) -> Tensor:
        """VP schedules only (an AttributeError on flow models); prefer ``schedule.alpha_sigma``."""
        return self.schedule.alphas_cumprod

    # ---- geometry -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def default_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale

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

    def empty_or_zeros(self, batch: int) -> Cond:
        """The empty prompt's encoding, or all-zero embeddings (``uncond_mode="zeros"``), ``batch`` times."""
        base = self.encode([""])
        return (base.zeros() if self.uncond_mode == "zeros" else base).expand(batch)

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
        return self._forward(net, x_t.to(dtype), self.schedule.network_time(t), c).to(x_t.dtype)

    def _forward(self, net: nn.Module, x: Tensor, time: Tensor, c: Cond) -> Tensor:
        """One call of the network as its pipeline makes it (the UNet's positional call here)."""
        return net(x, time, **c.unet_kwargs(), return_dict=False)[0]

    def coeffs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``alpha_t, sigma_t`` broadcast against ``like`` and in its dtype."""
        return self.schedule.coeffs(t, like)

    def x0_of(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self.schedule.to_x0(pred, x_t, t)

    def eps_of(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self.schedule.to_eps(pred, x_t, t)

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
