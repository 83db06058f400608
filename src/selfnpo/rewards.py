"""Pluggable rewards: ``R(images, prompts) -> [B]`` in [0, 1], differentiable in the images.

A reward takes decoded images as a float tensor ``[B, 3, H, W]`` in ``[-1, 1]`` (what
``DiffusionModel.decode_latents`` returns) and the prompts, and returns one score per image,
higher is better. Methods that need a reward (reward fine-tuning, R0, building preference pairs)
look it up by name with :func:`get_reward`; users add their own with :func:`register_reward`.

Diffusion-NPO trains a negative model with any reward method by using ``R_NPO = 1 - R``
(Diffusion-NPO, "Reward-based NPO"): :func:`npo_reward`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from .errors import SelfNPOError


class Reward(Protocol):
    """``reward(images [B,3,H,W] in [-1, 1], prompts) -> [B]`` in [0, 1]."""

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...


RewardFactory = Callable[[torch.device], Reward]
REWARDS: dict[str, RewardFactory] = {}


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Register ``factory(device) -> Reward`` under ``name``."""

    def deco(factory: RewardFactory) -> RewardFactory:
        REWARDS[name] = factory
        return factory

    return deco


def get_reward(name: str, device: torch.device | str = "cpu") -> Reward:
    """Build the reward registered as ``name`` on ``device``."""
    if name not in REWARDS:
        raise SelfNPOError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
    return REWARDS[name](torch.device(device))


def npo_reward(reward: Reward) -> Reward:
    """``R_NPO = 1 - R`` (Diffusion-NPO): the same reward method then trains a negative model."""

    def r_npo(images: Tensor, prompts: Sequence[str]) -> Tensor:
        return 1.0 - reward(images, prompts)

    return r_npo


class WorldReward:
    """The embedded world's reward: per-attribute geometric mean of the classifier's probability
    that the image shows what the caption states (``selfnpo.world.classifier.reward_01``)."""

    def __init__(self, device: torch.device) -> None:
        from .world.classifier import load_classifier

        self.classifier = load_classifier(device=str(device)).requires_grad_(False).eval()

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        from .world.classifier import reward_01

        if images.shape[-2:] != (32, 32):
            raise SelfNPOError(
                f"the world reward scores 32x32 images of the embedded world; got {tuple(images.shape[-2:])}"
            )
        return reward_01(self.classifier, images.float().clamp(-1, 1), list(prompts))


register_reward("world")(WorldReward)
