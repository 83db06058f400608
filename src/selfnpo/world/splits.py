"""The embedded world's three prompt splits: ``train``, ``validation`` and ``test``.

- ``train``: scenes of the training (shape, colour) combinations (no held-out pair anywhere),
  what offsets are trained on.
- ``validation`` and ``test``: scenes whose first object is one of the six held-out (shape,
  colour) combinations (``render.HELDOUT_PAIRS``), which neither the world model nor any offset
  has seen. Both come from the same distribution but are disjoint: each caption belongs to
  exactly one of the two by a hash of its text (:func:`heldout_split_of`), and each split draws
  from its own random stream and keeps only its own captions. No prompt is in both, whatever
  the sizes.

Sampling seeds are disjoint too: image i of a split uses seed ``SEED_BASE[split] + i``, and the
ranges are ``SPLIT_SIZE_LIMIT`` apart. Everything is a pure function of (split, n), and the
first n items of a split are the same for every larger n, so a bigger run extends a smaller one.

Rule: hyper-parameters and defaults are chosen on ``validation``; ``test`` is for reporting the
chosen settings, once. The splits and seeds never change after test results have been seen.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .captions import caption
from .render import Scene, sample_scene

EVAL_SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_SIZE_LIMIT = 1_000_000
SEED_BASE: dict[str, int] = {"train": 0, "validation": 1_000_000, "test": 2_000_000}
# Entropy of each split's random stream (np.random.default_rng([STREAM, index])).
_STREAM: dict[str, int] = {"train": 10_001, "validation": 20_002, "test": 30_003}


@dataclass(frozen=True)
class Split:
    """``prompts[i]`` describes ``scenes[i]``; image i is sampled with seed ``seeds[i]``."""

    name: str
    prompts: list[str]
    scenes: list[Scene]
    seeds: list[int]


def heldout_split_of(prompt: str) -> str:
    """Which held-out split a caption belongs to: the parity of the first byte of its SHA-256."""
    return "validation" if hashlib.sha256(prompt.encode("utf-8")).digest()[0] % 2 == 0 else "test"


def world_split(split: str, n: int) -> Split:
    """The first ``n`` (prompt, scene, seed) triples of ``split`` (see the module docstring)."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {EVAL_SPLITS}")
    if not 0 <= n <= SPLIT_SIZE_LIMIT:
        raise ValueError(f"n must be in 0..{SPLIT_SIZE_LIMIT}, got {n}")
    rng = np.random.default_rng([_STREAM[split], 0])
    prompts: list[str] = []
    scenes: list[Scene] = []
    while len(prompts) < n:
        if split == "train":
            scene = sample_scene(rng, "train")
            text = caption(scene, rng)
        else:
            scene = sample_scene(rng, "heldout")
            text = caption(scene, rng)
            if heldout_split_of(text) != split:
                continue
        prompts.append(text)
        scenes.append(scene)
    seeds = [SEED_BASE[split] + i for i in range(n)]
    return Split(split, prompts, scenes, seeds)
