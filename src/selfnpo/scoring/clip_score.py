"""CLIP score: ``100 * max(cos(image, text), 0)`` with a transformers ``CLIPModel``.

The convention of torchmetrics' ``CLIPScore`` (and of the diffusion papers that report values
near 30), by default with OpenAI's CLIP ViT-L/14 (``openai/clip-vit-large-patch14``).
Images: ``Resize(224, BICUBIC)``, ``CenterCrop(224)``, OpenAI normalisation; prompts truncated
to the model's 77 tokens.
"""

from __future__ import annotations

import torch

from .common import clip_features, clip_pixels, load_pretrained, unit

_LOADED: dict[tuple, tuple] = {}


def load_clip(spec: str, flag: str, what: str, device, dtype, tokenizer: str = "", tokenizer_flag: str = ""):
    """(model, tokenizer) of a transformers CLIP model folder or hub id; the last one is kept."""
    from transformers import CLIPModel, CLIPTokenizer

    key = (spec, tokenizer, str(device), dtype)
    if key not in _LOADED:
        _LOADED.clear()  # keep one: the aesthetic MLP and CLIP score read the same ViT-L/14
        model = load_pretrained(CLIPModel, spec, flag, what, dtype=dtype).to(device).eval()
        tok = load_pretrained(CLIPTokenizer, tokenizer or spec, tokenizer_flag or flag, f"{what} tokenizer")
        _LOADED[key] = (model.requires_grad_(False), tok)
    return _LOADED[key]


def image_size(model) -> int:
    return int(model.config.vision_config.image_size)


def tokenize(tok, prompts, length: int):
    ids = tok(list(prompts), padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return ids["input_ids"], ids["attention_mask"]


@torch.no_grad()
def clip_cosine(model, tokenizer, images, prompts) -> torch.Tensor:
    """Cosine similarity of each image's and its prompt's CLIP embeddings, ``[N]``."""
    pixels = clip_pixels(images, image_size(model))
    ids, mask = tokenize(tokenizer, prompts, model.config.text_config.max_position_embeddings)
    img, txt = clip_features(model, pixels, ids, mask)
    return (unit(img) * unit(txt)).sum(-1)


class ClipScore:
    """``100 * max(cos, 0)`` between CLIP image and text embeddings."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer

    def __call__(self, images, prompts) -> torch.Tensor:
        return (100.0 * clip_cosine(self.model, self.tokenizer, images, prompts)).clamp_min(0.0).cpu()


def load(cfg, device, dtype) -> ClipScore:
    return ClipScore(*load_clip(cfg.clip_model, "--clip-model", "CLIP score model", device, dtype))
