"""Phase 1 of ``selfnpo pretrain``: the AutoencoderKL learns to reconstruct 32x32 renders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...io import atomic_write_text
from ..captions import caption
from ..model import images_to_unit, world_batch
from ..render import render_batch
from .config import PretrainConfig
from .phase import PhaseTrainer


def _vae_loss(vae, x: Tensor, g: torch.Generator) -> Tensor:
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=g, device=g.device)
    rec = vae.decode(z).sample
    return (rec - x).abs().mean() + ((rec - x) ** 2).mean() + 1e-6 * post.kl().mean()


def train_vae(pipe, cfg: PretrainConfig, run: Path, progress: bool) -> None:
    """Phase 1: the autoencoder (checkpointed in ``run/vae``; a resumed run continues exactly)."""
    vae = pipe.vae.train()
    params = list(vae.parameters())
    g = torch.Generator(vae.device).manual_seed(cfg.seed)

    def cosine(step: int) -> float:
        return cfg.vae_lr * 0.5 * (1.0 + math.cos(math.pi * step / cfg.vae_steps))

    def loss_at(step: int) -> Tensor:
        seed = int(torch.randint(2**62, (1,), generator=g, device=g.device).item())
        _, images = world_batch(np.random.default_rng(seed), cfg.vae_batch_size, "any")
        return _vae_loss(vae, images_to_unit(images).to(vae.device), g)

    opt_ = torch.optim.AdamW(params, lr=cfg.vae_lr, weight_decay=0.0)
    trainer = PhaseTrainer(run / "vae", params, opt_, g, cfg.vae_steps, cfg.checkpoint_every)
    trainer.lr_at = cosine if cfg.vae_cosine else None
    trainer.run(loss_at, "autoencoder", progress)
    vae.eval()


@torch.no_grad()
def set_latent_scale(pipe, seed: int) -> float:
    """Scale latents to unit variance, as SD's ``scaling_factor`` does (computed on 512 renders)."""
    _, images = world_batch(np.random.default_rng(seed), 512, "any")
    lat = pipe.vae.encode(images_to_unit(images).to(pipe.vae.device)).latent_dist.mean
    scale = float(1.0 / lat.std())
    pipe.vae.register_to_config(scaling_factor=scale)
    return scale


@torch.no_grad()
def record_reconstruction(pipe, path: Path, seed: int) -> None:
    """Classifier alignment and per-attribute accuracy on 256 autoencoder round trips."""
    from ..classifier import alignment, load_classifier, scene_accuracy

    rng = np.random.default_rng(seed)
    images, scenes = render_batch(rng, 256, "any")
    caps = [caption(sc, rng) for sc in scenes]
    x = images_to_unit(images).to(pipe.vae.device)
    rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1).cpu()
    clf = load_classifier()
    out = {"alignment": float(alignment(clf, rec, caps).float().mean())}
    out.update({k: float(v) for k, v in scene_accuracy(clf, rec, scenes).items()})
    atomic_write_text(path, json.dumps(out, indent=2))
