"""The one DDIM-type sampler of the training objectives (user-facing generation reuses diffusers).

States walk *positions* on an ascending grid of integer training levels (``ddim_grid``): position
``p`` is level ``grid[p]`` and position ``-1`` is level 0, so every step lands on the grid, whether
or not the grid divides ``T``. Positions are per sample (``[B]``), so one batch can hold states at
different levels. Coefficients and conversions come from ``model.schedule`` (through ``coeffs`` /
``x0_of`` / ``eps_of``), so the same step is DDIM on a VP schedule and the Euler step of the
velocity ODE on a flow schedule.

One step from level ``t`` to ``t'`` (R0 eq. 3.2, with Self-NPO's DDIM as ``eta = 1``)::

    x' = alpha_t' x0_hat + sigma_t' (eta eps_hat + sqrt(1 - eta^2) z),   z ~ N(0, I)

``eta`` here weighs the predicted noise (R0's convention, that of ``--r0-eta`` and
:class:`selfnpo.schedulers.R0Scheduler`): 1 is deterministic DDIM, 0 replaces the predicted noise
by a fresh draw ``z`` from an explicit ``torch.Generator`` (or the training loop's ``randn``).
Uses: the TDFT teacher rollout (:func:`ddim_rollout`), full sampling of the pool, the
full-simulation baseline and DDSPO (:func:`ddim_sample`), DRaFT-K with gradients through the last
calls (``grad_calls``) and R0's stochastic generator (``etas``, ``randn``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .guidance import BoundDenoiser
from .models.sd import DiffusionModel
from .param import ddim_step, ddim_step_eta

Noise = Callable[[tuple[int, ...]], Tensor]  # shape -> standard normal draws


def grid_levels(grid: Tensor) -> Tensor:
    """``[0, grid...]``: the level of position ``p`` is ``grid_levels(grid)[p + 1]``."""
    return torch.cat([grid.new_zeros(1), grid])


def top(grid: Tensor, n: int, device: torch.device | str) -> Tensor:
    """Positions ``[n]`` at the grid's noisiest level."""
    return torch.full((n,), len(grid) - 1, device=device, dtype=torch.long)


def _noise_source(generator: torch.Generator | None, randn: Noise | None, like: Tensor) -> Noise:
    """How stochastic steps draw ``z``: ``randn`` when given (the training loop's per-process draws),
    else standard normals from ``generator`` in ``like``'s dtype."""
    if randn is not None:
        return randn
    if generator is None:
        raise ValueError("stochastic steps (etas) need a generator")
    return lambda shape: torch.randn(
        shape, generator=generator, device=generator.device, dtype=like.dtype
    ).to(like.device)


def _step(
    model: DiffusionModel,
    x: Tensor,
    x0: Tensor,
    eps: Tensor,
    t: Tensor,
    t_next: Tensor,
    eta: Tensor | None,
    draw: Noise | None,
) -> Tensor:
    """The state at levels ``t_next`` ``[B]`` from ``x`` at ``t``; a sample whose level does not
    drop (already at 0) keeps its state. ``eta`` ``[B]``: R0's stochastic step, None: DDIM."""
    a, s = model.coeffs(t_next, x)
    if eta is None:
        x_next = ddim_step(x0, eps, a, s)
    else:
        eta = eta.to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        x_next = ddim_step_eta(x0, eps, a, s, eta, draw(tuple(x.shape)))
    return torch.where((t_next < t).reshape(-1, *([1] * (x.ndim - 1))), x_next, x)


def walk(
    model: DiffusionModel,
    f: BoundDenoiser,
    x: Tensor,
    pos: Tensor,
    grid: Tensor,
    calls: int,
    final_step: bool = True,
    grad_calls: int = 0,
    etas: Tensor | None = None,
    generator: torch.Generator | None = None,
    randn: Noise | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``calls`` network calls down ``grid`` from ``x`` at positions ``pos`` ``[B]``.

    Each call is followed by a step one position down (a sample at level 0 stays where it is),
    except the last when ``final_step`` is False. ``grad_calls``: the last calls that keep a graph
    (if gradients are enabled at all). ``etas`` ``[calls, B]``: the noise weight of each step
    (default: 1, deterministic), with fresh noise from ``generator`` (or ``randn(shape)``).
    Returns ``(x, t, x0)``: the state, its levels ``[B]``, and the last call's x0 estimate.
    """
    levels = grid_levels(grid.to(x.device))
    draw = None if etas is None else _noise_source(generator, randn, x)
    t, x0 = levels[pos + 1], x
    for i in range(calls):
        if final_step and not bool((t > 0).any()):  # every sample at level 0: steps change nothing
            break
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= calls - grad_calls):
            pred = f(x, t)
            x0 = model.x0_of(pred, x, t)
            if i + 1 == calls and not final_step:
                break
            pos = (pos - 1).clamp_min(-1)
            t_next = levels[pos + 1]
            eps = model.eps_of(pred, x, t)
            x = _step(model, x, x0, eps, t, t_next, None if etas is None else etas[i], draw)
            t = t_next
    return x, t, x0


def ddim_rollout(
    model: DiffusionModel, f: BoundDenoiser, x: Tensor, pos: Tensor, steps: int, grid: Tensor
) -> tuple[Tensor, Tensor]:
    """``steps`` deterministic DDIM steps down ``grid`` from positions ``pos``, clamped at level 0
    (Self-NPO's teacher rollout). Returns ``(x_t_end, t_end)``."""
    x, t, _ = walk(model, f, x, pos, grid, steps)
    return x, t


def sample(
    model: DiffusionModel,
    f: BoundDenoiser,
    noise: Tensor,
    grid: Tensor,
    grad_calls: int = 0,
    calls: int | None = None,
    etas: Tensor | None = None,
    generator: torch.Generator | None = None,
    randn: Noise | None = None,
) -> Tensor:
    """From ``noise`` at ``grid[-1]`` down the ascending ``grid``: the x0 estimate of the last call.

    ``calls`` network calls (default all; fewer gives R0+'s intermediate estimate ``x0^(k)``);
    gradients through the last ``grad_calls`` (DRaFT-K truncated backpropagation); ``etas`` with
    ``generator`` or ``randn``: R0's stochastic steps (eq. 3.2).
    """
    calls = calls or len(grid)
    pos = top(grid, noise.shape[0], noise.device)
    return walk(model, f, noise, pos, grid, calls, False, grad_calls, etas, generator, randn)[2]


@torch.no_grad()
def ddim_sample(model: DiffusionModel, f: BoundDenoiser, noise: Tensor, grid: Tensor) -> Tensor:
    """Full deterministic DDIM from ``grid[-1]`` down the ascending ``grid`` to an x0 estimate."""
    return sample(model, f, noise, grid)
