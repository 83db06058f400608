"""Pluggable rewards: ``R(images, prompts) -> [B]`` in [0, 1], differentiable in the images.

A reward takes decoded images as a float tensor ``[B, 3, H, W]`` in ``[-1, 1]`` (what
``DiffusionModel.decode_latents`` returns) and the prompts, and returns one score per image,
higher is better. Methods that need a reward (reward fine-tuning, R0, building preference pairs)
look it up with :func:`get_reward`: a name registered with :func:`register_reward`, a name a package
publishes in the ``selfnpo.rewards`` entry-point group (the embedded world's ``world`` is one), or
``package.module:attr`` naming a factory ``(device) -> Reward``.

Diffusion-NPO trains a negative model with any reward method by using ``R_NPO = 1 - R``
(Diffusion-NPO, "Reward-based NPO"): :func:`npo_reward`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Protocol

import torch
from torch import Tensor

from .errors import SelfNPOError
from .options import import_attr


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


def _published() -> dict:
    return {ep.name: ep for ep in entry_points(group="selfnpo.rewards")}


def reward_factory(name: str) -> RewardFactory:
    """The factory of reward ``name``: registered, published as an entry point, or ``module:attr``;
    a one-line :class:`SelfNPOError` for a name that is none of these."""
    if name in REWARDS:
        return REWARDS[name]
    if name in (published := _published()):
        return published[name].load()
    if ":" in name:
        return import_attr(name, "reward")
    known = ", ".join(sorted({*REWARDS, *published}))
    raise SelfNPOError(f"unknown reward {name!r}; known: {known}, or module:attr")


def get_reward(name: str, device: torch.device | str = "cpu") -> Reward:
    """Build the reward ``name`` (see :func:`reward_factory`) on ``device``."""
    return reward_factory(name)(torch.device(device))


def npo_reward(reward: Reward) -> Reward:
    """``R_NPO = 1 - R`` (Diffusion-NPO): the same reward method then trains a negative model."""

    def r_npo(images: Tensor, prompts: Sequence[str]) -> Tensor:
        return 1.0 - reward(images, prompts)

    return r_npo
