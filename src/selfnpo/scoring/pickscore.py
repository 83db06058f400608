"""PickScore (Kirstain et al., 2023): ``exp(logit_scale) * cos(image, text)`` of a fine-tuned CLIP-H.

As the reference's inference code: the ``yuvalkirstain/PickScore_v1`` ``CLIPModel`` with the
processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (``Resize(224, BICUBIC)``,
``CenterCrop(224)``, OpenAI normalisation; prompts truncated to 77 tokens). ``logit_scale`` is
about ln(100), so scores are near 20.
"""

from __future__ import annotations

import torch

from .clip_score import clip_cosine, load_clip


class PickScore:
    """``exp(logit_scale) * <img / |img|, txt / |txt|>``, one value per (image, prompt)."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer

    @torch.no_grad()
    def __call__(self, images, prompts) -> torch.Tensor:
        cos = clip_cosine(self.model, self.tokenizer, images, prompts)
        return (self.model.logit_scale.float().exp() * cos).cpu()


def load(cfg, device, dtype) -> PickScore:
    model, tok = load_clip(
        cfg.pickscore_model,
        "--pickscore-model",
        "PickScore model",
        device,
        dtype,
        cfg.pickscore_tokenizer,
        "--pickscore-tokenizer",
    )
    return PickScore(model, tok)
