"""LAION aesthetic predictor v2: a linear-stack MLP over unit CLIP ViT-L/14 image embeddings.

Reference: improved-aesthetic-predictor, ``sac+logos+ava1-l14-linearMSE.pth`` (a torch state dict,
read here with ``weights_only=True``; a safetensors copy with the same keys also works). Keys
``layers.{0,2,4,6,7}.{weight,bias}``: Linear(768, 1024), Dropout, Linear(1024, 128), Dropout,
Linear(128, 64), Dropout, Linear(64, 16), Linear(16, 1), with no activations. Its input is
OpenAI CLIP ViT-L/14's ``encode_image`` (``CLIPModel`` image features here), L2-normalised.
"""

from __future__ import annotations

import torch

from ..errors import SelfNPOError
from .clip_score import image_size, load_clip
from .common import clip_pixels, load_weights, resolve_file, unit

LAYERS = (0, 2, 4, 6, 7)


def mlp_layers(state: dict, path, embed_dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (weight, bias) chain of the MLP, checked against the reference's keys and shapes."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing = [
        f"layers.{i}.{p}" for i in LAYERS for p in ("weight", "bias") if f"layers.{i}.{p}" not in state
    ]
    if missing:
        raise SelfNPOError(f"{path}: no reward MLP head (missing {', '.join(missing[:3])})")
    chain, width = [], embed_dim
    for i in LAYERS:
        w, b = state[f"layers.{i}.weight"].float(), state[f"layers.{i}.bias"].float()
        if w.ndim != 2 or w.shape[1] != width or b.shape != (w.shape[0],):
            raise SelfNPOError(
                f"{path}: MLP layers.{i} has shape {tuple(w.shape)}, expected (*, {width}) "
                "(for the aesthetic MLP: is the CLIP model ViT-L/14, embedding 768?)"
            )
        chain.append((w, b))
        width = w.shape[0]
    if width != 1:
        raise SelfNPOError(f"{path}: the last layer has {width} outputs, expected 1")
    return chain


class Aesthetic:
    """``MLP(e / |e|)`` with ``e`` the CLIP image embedding."""

    def __init__(self, model, chain) -> None:
        self.model = model
        self.chain = [(w.to(model.device), b.to(model.device)) for w, b in chain]

    @torch.no_grad()
    def __call__(self, images, prompts) -> torch.Tensor:
        pixels = clip_pixels(images, image_size(self.model))
        dtype = next(self.model.parameters()).dtype
        pooled = self.model.vision_model(pixel_values=pixels.to(self.model.device, dtype)).pooler_output
        x = unit(self.model.visual_projection(pooled))
        for w, b in self.chain:
            x = x @ w.T + b
        return x[:, 0].cpu()


def load(cfg, device, dtype) -> Aesthetic:
    path = resolve_file(cfg.aesthetic_weights, "--aesthetic-weights", "LAION aesthetic v2 MLP")
    model, _ = load_clip(
        cfg.aesthetic_clip, "--aesthetic-clip", "CLIP ViT-L/14 for the aesthetic MLP", device, dtype
    )
    return Aesthetic(model, mlp_layers(load_weights(path), path, model.config.projection_dim))
