"""The resumable loop of a pretraining phase that runs outside the one training loop.

Each step draws its batch from the phase's own generator, takes an AdamW step on the clipped
gradient and, every ``checkpoint_every`` steps and at the end, saves the parameters, the
optimiser and the generator atomically (``FOLDER/checkpoints/step-*``), so that a resumed phase
continues exactly where an uninterrupted one would be.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ...training.checkpoint import load_latest, optimizer_from_flat, optimizer_to_flat, save_checkpoint


@dataclass
class PhaseTrainer:
    """Train ``params`` for ``steps`` steps of ``loss_at(step)``, checkpointed in ``folder``."""

    folder: Path
    params: list[Tensor]
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # every random draw of the phase; saved with each checkpoint
    steps: int
    checkpoint_every: int
    lr_at: Callable[[int], float] | None = None  # a learning-rate schedule (None: constant)
    max_grad_norm: float = 1.0

    def restore(self) -> int:
        """Restore parameters, optimiser and generator from the newest checkpoint; its step."""
        state = load_latest(self.folder)
        if state is None:
            return 0
        tensors, meta = state
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(tensors[f"p.{i}"])
        optimizer_from_flat(self.optimizer, tensors, meta["optimizer"])
        self.generator.set_state(tensors["rng"])
        return int(meta["step"])

    def save(self, step: int, loss: Tensor) -> None:
        t, js = optimizer_to_flat(self.optimizer)
        t.update({f"p.{i}": p for i, p in enumerate(self.params)}, rng=self.generator.get_state())
        save_checkpoint(self.folder, step, t, {"optimizer": js, "loss": float(loss.detach())}, keep=2)

    def run(self, loss_at: Callable[[int], Tensor], desc: str, progress: bool) -> None:
        """Continue from the newest checkpoint up to ``steps``."""
        from tqdm.auto import tqdm

        start = self.restore()
        for step in tqdm(
            range(start, self.steps), initial=start, total=self.steps, desc=desc, disable=not progress
        ):
            loss = loss_at(step)
            if self.lr_at is not None:
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr_at(step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            if (step + 1) % self.checkpoint_every == 0 or step + 1 == self.steps:
                self.save(step + 1, loss)
