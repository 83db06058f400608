"""The objective registry and what every objective receives.

An objective is a short callable ``(ctx, batch) -> per-sample loss [B]``; the one training loop
(:mod:`selfnpo.training.loop`) does reduction, backward, EMA, logging and checkpoints for all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..conditioning import Cond
from ..guidance import BoundDenoiser, Predict, guided
from ..models.sd import DiffusionModel


@dataclass
class Batch:
    """Prompts, their conditioning on the training device, and clean latents when the source has them.

    Preference sources fill ``x0`` with the preferred (winning) latents and ``x0_l`` with the
    dispreferred (losing) latents of the same prompts.
    """

    prompts: list[str]
    cond: Cond
    x0: Tensor | None = None
    x0_l: Tensor | None = None


@dataclass
class StepContext:
    """What an objective may use: the model, the student (with grad) and the teacher (no grad).

    ``offset`` is the trained offset (:class:`selfnpo.training.offset.TrainableOffset`) for
    objectives that regularise it; ``reward`` the configured reward for reward objectives.
    For objectives registered with ``reference=True`` the teacher is the frozen base model.
    """

    model: DiffusionModel
    student: Predict
    teacher: Predict
    config: object
    generator: torch.Generator
    offset: object | None = None
    reward: Callable[[Tensor, list[str]], Tensor] | None = None
    shard: tuple[int, int] = (0, 1)  # (this process, processes): see :meth:`randn`

    def _rows(self, draw: Callable[[tuple[int, ...]], Tensor], shape: tuple[int, ...]) -> Tensor:
        i, k = self.shard
        if k == 1:
            return draw(shape)
        n = shape[0]
        return draw((n * k, *shape[1:]))[i * n : (i + 1) * n]

    def randn(self, shape: tuple[int, ...]) -> Tensor:
        """Standard normal, one row per sample along the first dimension. With several processes
        (one generator, the same in each) every process draws the global batch and keeps its own
        rows, so the result equals one process with the global batch."""
        g = self.generator
        return self._rows(lambda s: torch.randn(s, generator=g, device=g.device), shape)

    def rand(self, n: int) -> Tensor:
        """Uniform on [0, 1) in float64, one per sample (sharded as :meth:`randn`)."""
        g = self.generator
        return self._rows(lambda s: torch.rand(s, generator=g, device=g.device, dtype=torch.float64), (n,))

    def rand_shared(self, n: int) -> Tensor:
        """Uniform draws for the whole batch (e.g. one step count per step): the same in every process."""
        g = self.generator
        return torch.rand((n,), generator=g, device=g.device, dtype=torch.float64)

    def guided_teacher(self, cond: Cond, w: float) -> BoundDenoiser:
        """Teacher under paper guidance weight ``w`` (``w = -1``: unconditional only)."""
        always = bool(getattr(self.config, "authors_cond_pass", False))
        return guided(self.teacher, cond, self.model.uncond(len(cond)), w + 1.0, always_both=always)


Objective = Callable[[StepContext, Batch], Tensor]


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registered objective and what the training loop must know about it.

    ``configs``: the dataclasses of the objective's own settings, defined beside it (their fields
    become ``selfnpo train`` flags; each may define ``check(self)`` raising one-line errors);
    ``reference``: the teacher is the frozen base model, whatever ``--teacher`` says;
    ``uses_reward``: the loop builds ``ctx.reward`` from ``--reward``; ``prompts_only``: it draws
    its own samples, so the data source gives prompts only; ``pairs``: it trains on preference
    pairs (``--pairs``).
    """

    name: str
    fn: Objective
    configs: tuple[type, ...] = ()
    reference: bool = False
    uses_reward: bool = False
    prompts_only: bool = False
    pairs: bool = False


SPECS: dict[str, ObjectiveSpec] = {}
OBJECTIVES: dict[str, Objective] = {}  # name -> loss function (what the loop calls)


def register(
    name: str,
    configs: tuple[type, ...] = (),
    reference: bool = False,
    uses_reward: bool = False,
    prompts_only: bool = False,
    pairs: bool = False,
) -> Callable[[Objective], Objective]:
    """Register an objective under ``name`` (see :class:`ObjectiveSpec` for the flags)."""

    def deco(fn: Objective) -> Objective:
        SPECS[name] = ObjectiveSpec(name, fn, tuple(configs), reference, uses_reward, prompts_only, pairs)
        OBJECTIVES[name] = fn
        return fn

    return deco


def discover() -> dict[str, ObjectiveSpec]:
    """Import every module of :mod:`selfnpo.objectives` (each registers its objectives); the specs."""
    import importlib
    import pkgutil

    from .. import objectives

    for mod in pkgutil.iter_modules(objectives.__path__):
        if mod.name != "base":
            importlib.import_module(f"{objectives.__name__}.{mod.name}")
    return SPECS


def get_spec(name: str) -> ObjectiveSpec:
    specs = discover()
    if name not in specs:
        raise KeyError(f"unknown objective {name!r}; known: {', '.join(sorted(specs))}")
    return specs[name]


def get_objective(name: str) -> Objective:
    get_spec(name)
    return OBJECTIVES[name]


def objective_configs() -> list[type]:
    """Every registered objective's config dataclasses, once each, in discovery order."""
    out: list[type] = []
    for spec in discover().values():
        out += [c for c in spec.configs if c not in out]
    return out


def pseudo_huber(pred: Tensor, target: Tensor, c: float) -> Tensor:
    """Per-sample mean of ``sqrt((pred - target)^2 + c^2) - c``."""
    d = (pred.float() - target.float()) ** 2
    return ((d + c * c).sqrt() - c).flatten(1).mean(1)


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean squared error."""
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(1)


def regression_loss(pred: Tensor, target: Tensor, kind: str, c: float) -> Tensor:
    if kind == "pseudo_huber":
        return pseudo_huber(pred, target, c)
    if kind == "l2":
        return mse(pred, target)
    raise ValueError(f"unknown loss {kind!r}; use pseudo_huber or l2")


def uniform_int(ctx: StepContext, low: Tensor, high: int) -> Tensor:
    """Integers uniform on ``[low, high]`` per sample (``low`` a ``[B]`` tensor)."""
    u = ctx.rand(low.shape[0]).to(low.device)
    span = (high - low + 1).double()
    return (low + (u * span).floor().long()).clamp(max=high)
