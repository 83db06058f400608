"""The world evaluation bench: one split's prompts, seeds and real-render features, the images
of each setting at those seeds, and their paired scores (``selfnpo demo``, ``selfnpo sweep`` and
the world benchmarks share it).

Its settings come from a :class:`selfnpo.demo.DemoConfig` (split, eval_prompts, real_images,
sample_steps, seed; for :func:`train_to` also batch_size, train, lr, lora_rank, pool_size).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ..demo import DemoConfig


@torch.no_grad()
def generate_uint8(
    pipe,
    prompts: list[str],
    seeds: list[int],
    g: float,
    steps: int,
    batch: int = 64,
    negative_prompts: list[str] | None = None,
) -> np.ndarray:
    """Images as uint8 ``[N, H, W, 3]``, image i from seed ``seeds[i]`` (batch-independent noise);
    ``negative_prompts``: the negative branch's prompts (default: the empty prompt)."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator(pipe.device).manual_seed(s) for s in seeds[i : i + batch]]
        neg = None if negative_prompts is None else negative_prompts[i : i + batch]
        ims = pipe(
            prompts[i : i + batch],
            negative_prompt=neg,
            guidance_scale=g,
            num_inference_steps=steps,
            generator=gens,
            output_type="np",
        ).images
        out.append((np.asarray(ims) * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(out)


class EvalBench:
    """One split's prompts, seeds and real-render features, and a cache of scored settings.

    The prompts and seeds are the first ``cfg.eval_prompts`` of ``cfg.split``
    (:func:`selfnpo.world.splits.world_split`); the KID/Frechet reference is the classifier
    features of the renders of the first ``max(cfg.real_images, cfg.eval_prompts)`` scenes of the
    same split.
    """

    def __init__(self, cfg: DemoConfig, pipe, classifier) -> None:
        from ..world.splits import world_split
        from .world_eval import real_features

        split = world_split(cfg.split, cfg.eval_prompts)
        self.split = cfg.split
        self.scenes, self.prompts, self.seeds = split.scenes, split.prompts, split.seeds
        self.cfg, self.pipe, self.classifier = cfg, pipe, classifier
        self.real = real_features(
            classifier, world_split(cfg.split, max(cfg.real_images, cfg.eval_prompts)).scenes
        )
        self.images: dict[tuple, np.ndarray] = {}
        self.scores: dict[tuple, object] = {}

    def run(
        self,
        key: tuple,
        g: float,
        offset: Path | None,
        beta: float,
        positive: Path | None = None,
        alpha: float = 0.0,
        same_prompt: bool = False,
    ):
        """Generate and score one setting (``offset=None`` or ``beta=0``: no negative offset;
        ``positive``: a positive offset eta on the conditional branch, ``alpha`` of it on the negative;
        ``same_prompt``: the negative branch gets the prompt instead of the empty prompt, which with
        a weak model's weights as the offset is autoguidance)."""
        from ..npo import NPOGuidance
        from .world_eval import score_images

        if key not in self.scores:
            neg = offset if beta else None
            with NPOGuidance(self.pipe, negative=neg, positive=positive, alpha=alpha, beta=beta):
                negs = self.prompts if same_prompt else None
                ims = generate_uint8(
                    self.pipe, self.prompts, self.seeds, g, self.cfg.sample_steps, negative_prompts=negs
                )
            self.images[key] = ims
            self.scores[key] = score_images(self.classifier, ims, self.prompts)
        return self.scores[key]

    def summary(self, key: tuple, base_key: tuple | None) -> dict:
        from .world_eval import summarise

        base = self.scores[base_key] if base_key is not None and base_key != key else None
        return summarise(self.scores[key], self.real, base, seed=self.cfg.seed)


def train_to(cfg: DemoConfig, model: str, prompts: Path, run: Path, steps: int, source=None, **overrides):
    """Train (or continue) the run in ``run`` up to ``steps``; ``overrides`` are TrainConfig fields,
    ``source`` an optional ready data source (e.g. a pool shared by several runs) or, given as a
    string, the TrainConfig field of that name (self, images or noise)."""
    if isinstance(source, str):
        overrides["source"], source = source, None
    from ..training.config import TrainConfig
    from ..training.loop import train

    tc = TrainConfig(
        model=model,
        prompts=str(prompts),
        output_dir=str(run),
        steps=steps,
        batch_size=cfg.batch_size,
        train=cfg.train,
        lr=cfg.lr,
        lora_rank=cfg.lora_rank,
        pool_size=cfg.pool_size,
        seed=cfg.seed,
        resume=True,
        checkpoint_every=0,
        log_every=10,
        device="cpu" if not torch.cuda.is_available() else "auto",
    )
    return train(replace(tc, **overrides), progress=False, source=source)
