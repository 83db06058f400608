"""The one sampler of the objectives (selfnpo.sampling): grid positions, eta, gradients, exactness."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from selfnpo.sampling import ddim_rollout, ddim_sample, grid_levels, sample, walk
from selfnpo.schedules import VPSchedule, ddim_grid


def _vp():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return VPSchedule(torch.cumprod(1 - betas, 0), "epsilon")


def _model(schedule):
    return SimpleNamespace(x0_of=schedule.to_x0, eps_of=schedule.to_eps, coeffs=schedule.coeffs)


def _gaussian_eps(schedule, m: float, v: float):
    """The exact eps-prediction for data ~ N(m, v) (per coordinate)."""

    def f(x, t):
        a, s = schedule.coeffs(t, x)
        # E[eps | x_t] for x_t = a x0 + s eps, x0 ~ N(m, v): s (x_t - a m) / (a^2 v + s^2)
        return s * (x - a * m) / (a * a * v + s * s)

    return f


def _draws(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("n", [7, 25, 30, 1000])
def test_rollout_walks_the_grid_also_when_it_does_not_divide_T(n):
    sched = _vp()
    grid = ddim_grid(n)
    seen = []

    def f(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    pos = torch.tensor([n - 1, min(3, n - 1), 0])
    x, t = ddim_rollout(_model(sched), f, torch.ones(3, 2, dtype=torch.float64), pos, steps=5, grid=grid)
    levels = set(grid_levels(grid).tolist())
    assert all(set(s.tolist()) <= levels for s in seen) and set(t.tolist()) <= levels
    assert t.tolist() == grid_levels(grid)[(pos - 5).clamp_min(-1) + 1].tolist()


def test_deterministic_sampler_is_ddim_and_eta_one_equals_it():
    sched = _vp()
    f = _gaussian_eps(sched, 0.5, 0.3)
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = ddim_grid(10)
    det = ddim_sample(_model(sched), f, z, grid)
    assert torch.equal(det, sample(_model(sched), f, z, grid, etas=torch.ones(10, 64), randn=_draws(0)))
    etas = torch.full((10, 64), 0.3)
    a = sample(_model(sched), f, z, grid, etas=etas, randn=_draws(1))
    b = sample(_model(sched), f, z, grid, etas=etas, randn=_draws(1))
    c = sample(_model(sched), f, z, grid, etas=etas, randn=_draws(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_deterministic_sampler_recovers_a_gaussian_as_steps_grow():
    """With the exact eps of N(m, v), DDIM's ODE maps N(0, 1) to N(m, v): moments converge."""
    sched, m, v = _vp(), 0.5, 0.09
    z = torch.randn(20000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errs = []
    for n in (5, 50, 500):
        x0 = ddim_sample(_model(sched), _gaussian_eps(sched, m, v), z, ddim_grid(n))
        errs.append(abs(x0.mean().item() - m) + abs(x0.var().item() - v))
    assert errs[2] < errs[0] and errs[2] < 0.01


def test_gradient_flows_through_the_last_calls_only():
    sched = _vp()
    w = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    calls_with_grad = []

    def f(x, t):
        calls_with_grad.append(torch.is_grad_enabled())
        return w * x

    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample(_model(sched), f, z, ddim_grid(6), grad_calls=2)
    assert calls_with_grad == [False] * 4 + [True] * 2
    out.sum().backward()
    assert w.grad is not None and w.grad != 0
    with torch.no_grad():
        walk(_model(sched), f, z, torch.full((4,), 5), ddim_grid(6), 3, grad_calls=3)
    assert calls_with_grad[-3:] == [False] * 3  # an outer no_grad wins
