"""The embedded default model: a tiny SD1.5-type pipeline trained on the procedural world.

Its architecture, the world's training data (renders and captions) and where the shipped copy
lives; ``selfnpo pretrain`` (:mod:`selfnpo.world.pretrain`) trains it from scratch.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .captions import caption
from .render import render_batch, sample_scene

UNET_HEADS = (2, 8, 8)
TEXT_HIDDEN = 64
TEXT_LAYERS = 3
TEXT_HEADS = 4


def shipped_model_dir() -> Path:
    """Folder of the trained world model inside the installed package."""
    return Path(str(resources.files("selfnpo.world") / "assets" / "world-model"))


def images_to_unit(images: np.ndarray) -> Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def world_batch(rng: np.random.Generator, n: int, split: str = "train") -> tuple[list[str], np.ndarray]:
    """``n`` fresh renders of ``split`` and one caption each."""
    images, scenes = render_batch(rng, n, split)
    return [caption(s, rng) for s in scenes], images


def world_prompts(n: int, split: str, seed: int) -> list[str]:
    """Captions of ``n`` scenes of ``split`` (``heldout`` for evaluation prompts)."""
    rng = np.random.default_rng(seed)
    return [caption(sample_scene(rng, split), rng) for _ in range(n)]


class WorldSource:
    """Training source that renders fresh world scenes each step and encodes them with the VAE."""

    def __init__(self, model, split: str = "train") -> None:
        self.model, self.split = model, split

    def sample(self, g: torch.Generator, n: int) -> tuple[list[str], Tensor]:
        seed = int(torch.randint(2**62, (1,), generator=g, device=g.device).item())
        caps, images = world_batch(np.random.default_rng(seed), n, self.split)
        return caps, self.model.encode_images(images_to_unit(images)).to(g.device)


def build_world_pipeline(
    tokenizer_dir: Path,
    seed: int = 0,
    unet_channels: tuple[int, ...] = (32, 64, 64),
    vae_channels: tuple[int, ...] = (16, 32),
):
    """The untrained world pipeline (cross-attention at every UNet level)."""
    from ..models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(
        "sd",
        tokenizer_dir,
        sample_size=16,
        channels=unet_channels,
        text_hidden=TEXT_HIDDEN,
        vae_channels=vae_channels,
        seed=seed,
        text_layers=TEXT_LAYERS,
        text_heads=TEXT_HEADS,
        attention_heads=UNET_HEADS,
        cross_attention_everywhere=True,
    )
