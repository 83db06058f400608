"""The embedded world's reward, published to :func:`selfnpo.rewards.get_reward` as ``world``
(the ``selfnpo.rewards`` entry point in pyproject.toml)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import SelfNPOError


class WorldReward:
    """The embedded world's reward: per-attribute geometric mean of the classifier's probability
    that the image shows what the caption states (``selfnpo.world.classifier.reward_01``)."""

    def __init__(self, device: torch.device) -> None:
        from .classifier import load_classifier

        self.classifier = load_classifier(device=str(device)).requires_grad_(False).eval()

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        from .classifier import reward_01

        if images.shape[-2:] != (32, 32):
            raise SelfNPOError(
                f"the world reward scores 32x32 images of the embedded world; got {tuple(images.shape[-2:])}"
            )
        return reward_01(self.classifier, images.float().clamp(-1, 1), list(prompts))
