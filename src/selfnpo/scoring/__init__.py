"""Reward models that score generated images against their prompts, without torchvision or open_clip.

Each scorer is a callable ``scorer(images: list[PIL.Image], prompts: list[str]) -> Tensor [B]``
(float32, CPU, higher is better), built by ``load(cfg, device, dtype)`` in its own module.
"""

from __future__ import annotations

# name -> (module, what the column means)
SCORERS: dict[str, tuple[str, str]] = {
    "pickscore": ("pickscore", "PickScore: exp(logit_scale) * cosine (~20)"),
    "hpsv2": ("hps", "HPSv2.1: cosine of the fine-tuned ViT-H-14 (~0.3)"),
    "imagereward": ("imagereward", "ImageReward: standardised BLIP reward (~0)"),
    "aesthetic": ("aesthetic", "LAION aesthetic v2 (1-10)"),
    "clip": ("clip_score", "CLIP score: 100 * max(cosine, 0) (~30)"),
}


def load_scorer(name: str, cfg, device, dtype):
    """Build the scorer ``name`` with the weights named in ``cfg``."""
    import importlib

    return importlib.import_module(f"{__name__}.{SCORERS[name][0]}").load(cfg, device, dtype)


def release_models() -> None:
    """Forget the CLIP model kept for the next scorer that reads the same one (aesthetic, clip)."""
    from .clip_score import _LOADED

    _LOADED.clear()
