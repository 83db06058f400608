"""A small MLP denoiser for the 2-D world, behind the same contract as the Stable Diffusion UNet.

:class:`MLPDenoiser` is a diffusers model (``ModelMixin``, ``ConfigMixin``, ``PeftAdapterMixin``),
so peft LoRA (``add_adapter``, ``set_adapters``) and full-weight offsets work on it exactly as on a
UNet. Its "text conditioning" is a class id per sample (``num_classes`` is the null class, the
unconditional input). :class:`Toy2DPipeline` holds it with a diffusers ``DDIMScheduler`` and does
classifier-free guidance as diffusers' pipelines do (one call on ``cat([uncond, cond])``), so
:class:`selfnpo.npo.NPOGuidance` attaches to it unchanged. :class:`Toy2DModel` is the
:class:`~selfnpo.models.sd.DiffusionModel` adapter the training loop and objectives use: prompts
are class names (``"class 2"``) and ``""`` is unconditional.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin, StableDiffusionLoraLoaderMixin
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.utils import BaseOutput
from torch import Tensor, nn

from ..conditioning import Cond
from ..errors import SelfNPOError
from ..models.sd import DiffusionModel
from .mixture import Mixture2D

# Modules a LoRA offset adapts (TrainConfig.lora_targets for the 2-D world).
LORA_TARGETS = "fc1,fc2"


@dataclass
class MLPDenoiserOutput(BaseOutput):
    """The network output, ``sample [B, 2]`` (eps), as diffusers models return it."""

    sample: Tensor


class _Block(nn.Module):
    """``h + fc2(silu(fc1(silu(h)) + emb(e)))``: a residual block with the time/class embedding."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2, self.emb = (
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, hidden),
        )

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        act = nn.functional.silu
        return h + self.fc2(act(self.fc1(act(h)) + self.emb(e)))


class MLPDenoiser(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Epsilon network ``f(x_t, t, c)`` for 2-D points; ``c`` is a class id, ``num_classes`` = null."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 2,
        num_classes: int = 3,
        hidden: int = 128,
        depth: int = 3,
        time_dim: int = 64,
    ):
        super().__init__()
        self.class_embedding = nn.Embedding(num_classes + 1, hidden)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.fc_in = nn.Linear(in_channels, hidden)
        self.blocks = nn.ModuleList([_Block(hidden) for _ in range(depth)])
        self.fc_out = nn.Linear(hidden, in_channels)

    def forward(self, sample: Tensor, timestep, encoder_hidden_states: Tensor, return_dict: bool = True):
        """``sample [B, 2]``, ``timestep`` scalar or ``[B]``, ``encoder_hidden_states`` class ids ``[B]``."""
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(sample.shape[0]) if t.ndim == 0 else t
        temb = get_timestep_embedding(t, self.config.time_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        e = self.time_mlp(temb.to(sample.dtype)) + self.class_embedding(
            encoder_hidden_states.long().reshape(-1)
        )
        h = self.fc_in(sample)
        for block in self.blocks:
            h = block(h, e)
        out = self.fc_out(nn.functional.silu(h))
        return MLPDenoiserOutput(sample=out) if return_dict else (out,)


def class_prompt(c: int) -> str:
    """The prompt of class ``c``."""
    return f"class {c}"


def make_scheduler() -> DDIMScheduler:
    """DDPM's linear schedule (1e-4..0.02, 1000 steps), deterministic DDIM on a trailing grid that
    ends at ``alpha = 1``, so it takes the same steps as :func:`selfnpo.sampling.ddim_sample`."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        prediction_type="epsilon",
    )


class Toy2DPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """The MLP and its scheduler; ``__call__`` samples with classifier-free guidance."""

    def __init__(self, unet: MLPDenoiser, scheduler: DDIMScheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.text_encoder = None  # the LoRA loader looks for one; class ids need no encoder
        self._guidance_scale = 1.0

    @property
    def num_classes(self) -> int:
        """Number of real classes (the null class is this number)."""
        return int(self.unet.config.num_classes)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the current call runs both branches (diffusers' convention, read by NPOGuidance)."""
        return self._guidance_scale > 1.0

    def class_ids(self, prompts: list[str]) -> Tensor:
        """``"class c"`` -> ``c``, ``""`` -> the null class."""
        names = {class_prompt(c): c for c in range(self.num_classes)} | {"": self.num_classes}
        try:
            return torch.tensor([names[p.strip()] for p in prompts], dtype=torch.long)
        except KeyError as e:
            raise SelfNPOError(
                f"unknown 2-D world prompt {e.args[0]!r}; use 'class 0'..'class {self.num_classes - 1}' or ''"
            ) from None

    def copy(self) -> Toy2DPipeline:
        """An independent copy (weights and adapters), e.g. a base to fine-tune while keeping this one."""
        return Toy2DPipeline(copy.deepcopy(self.unet), DDIMScheduler.from_config(self.scheduler.config))

    @torch.no_grad()
    def __call__(
        self, prompt: list[str], latents: Tensor, guidance_scale: float = 3.0, num_inference_steps: int = 25
    ) -> Tensor:
        """Samples ``[B, 2]`` from the noise ``latents`` with DDIM and CFG ``eps_u + g (eps_c - eps_u)``."""
        self._guidance_scale = float(guidance_scale)
        dev = self.unet.device
        cond = self.class_ids(prompt).to(dev)
        unc = torch.full_like(cond, self.num_classes)
        self.scheduler.set_timesteps(num_inference_steps, device=dev)
        x = latents.to(dev, self.unet.dtype) * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            if self.do_classifier_free_guidance:
                out = self.unet(
                    torch.cat([x, x]), t, encoder_hidden_states=torch.cat([unc, cond]), return_dict=False
                )[0]
                eps_u, eps_c = out.chunk(2)
                eps = eps_u + self._guidance_scale * (eps_c - eps_u)
            else:
                eps = self.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
            x = self.scheduler.step(eps, t, x, return_dict=False)[0]
        return x


def build_toy_pipeline(
    num_classes: int = 3, hidden: int = 128, depth: int = 3, seed: int = 0
) -> Toy2DPipeline:
    """A randomly initialised MLP (seeded) with :func:`make_scheduler`."""
    torch.manual_seed(seed)
    return Toy2DPipeline(MLPDenoiser(num_classes=num_classes, hidden=hidden, depth=depth), make_scheduler())


def guided_sample(
    pipe: Toy2DPipeline,
    prompts: list[str],
    noise: Tensor,
    g: float,
    negative=None,
    beta: float = 1.0,
    steps: int = 25,
) -> Tensor:
    """Points from ``noise`` with CFG scale ``g``; with a ``negative`` offset (file or folder) the
    unconditional branch runs with ``theta + beta * delta`` (Diffusion-NPO eq. 10, via NPOGuidance)."""
    if negative is None:
        return pipe(prompts, noise, guidance_scale=g, num_inference_steps=steps)
    from ..npo import NPOGuidance

    with NPOGuidance(pipe, negative=negative, beta=beta):
        return pipe(prompts, noise, guidance_scale=g, num_inference_steps=steps)


class Toy2DModel(DiffusionModel):
    """The 2-D pipeline behind the denoiser contract: latents are the points ``[B, 2]`` themselves."""

    def __init__(self, pipe: Toy2DPipeline) -> None:
        super().__init__(pipe, uncond_mode="empty")

    @property
    def latent_channels(self) -> int:
        """Point dimension (2)."""
        return int(self.unet.config.in_channels)

    @property
    def vae_scale(self) -> int:
        """No autoencoder: 1."""
        return 1

    def default_resolution(self) -> int:
        """No image resolution: 1."""
        return 1

    def latent_shape(self, batch: int, resolution: int | None = None) -> tuple[int, ...]:
        """``(batch, 2)``: the points are the latents."""
        return (batch, self.latent_channels)

    def _encode_one(self, prompt: str) -> Cond:
        return Cond(self.pipe.class_ids([prompt]))

    def encode_images(self, images: Tensor) -> Tensor:
        """Identity: data are points already."""
        return images.float()

    def decode_latents_grad(self, latents: Tensor) -> Tensor:
        """Identity: data are points already."""
        return latents


class MixtureSource:
    """Training source of fresh exact draws ``(class prompt, x ~ p(x|c))`` (pre-training the base)."""

    def __init__(self, mixture: Mixture2D) -> None:
        self.mixture = mixture

    def sample(self, g: torch.Generator, n: int) -> tuple[list[str], Tensor]:
        seed = int(torch.randint(2**62, (1,), generator=g, device=g.device).item())
        x, c = self.mixture.sample(n, None, torch.Generator().manual_seed(seed))
        return [class_prompt(int(k)) for k in c], x.float().to(g.device)


def exact_predict(mixture: Mixture2D, model: DiffusionModel):
    """The true epsilon-network of ``mixture`` as a ``predict(x_t, t, cond)`` (null class = ``p(x)``)."""

    def predict(x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        a, s = model.coeffs(t, x_t[:, 0])
        ids = cond.embeds.to(x_t.device).long().reshape(-1)
        null = ids >= mixture.num_classes
        cond_eps = mixture.eps(x_t, ids.clamp(max=mixture.num_classes - 1), a, s)
        if bool(null.any()):
            cond_eps = torch.where(null[:, None], mixture.eps(x_t, None, a, s), cond_eps)
        return cond_eps.to(x_t.dtype)

    return predict
