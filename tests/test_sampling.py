"""The one sampler of the objectives (selfnpo.sampling): grid positions, eta, gradients, exactness."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from selfnpo import param
from selfnpo.sampling import ddim_rollout, ddim_sample, grid_levels, sample, walk
from selfnpo.schedules import FlowSchedule, VPSchedule, ddim_grid


def _vp(kind: str = "epsilon"):
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return VPSchedule(torch.cumprod(1 - betas, 0), kind)


SCHEDULES = {"vp-eps": _vp(), "vp-v": _vp("v_prediction"), "flow": FlowSchedule(1000, shift=3.0)}


def _model(schedule):
    return SimpleNamespace(x0_of=schedule.to_x0, eps_of=schedule.to_eps, coeffs=schedule.coeffs)


def _gaussian(schedule, m: float, v: float):
    """The exact denoiser of data ~ N(m, v) (per coordinate), in the schedule's own prediction:
    ``E[x0 | x_t] = m + a v (x_t - a m) / (a^2 v + s^2)`` for ``x_t = a x0 + s eps``."""

    def f(x, t):
        a, s = schedule.coeffs(t, x)
        x0 = m + a * v * (x - a * m) / (a * a * v + s * s)
        return param.target_for(x0, (x - a * x0) / s, a, s, schedule.prediction_type)

    return f


def _draws(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=g, dtype=dtype)


def _stride_rollout(model, f, x, t, steps: int, stride: int):
    """The rollout before grid positions: ``steps`` DDIM steps of ``stride`` levels, clamped at 0."""
    for _ in range(steps):
        if not bool((t > 0).any()):
            break
        t_next = (t - stride).clamp_min(0)
        pred = f(x, t)
        x0, eps = model.x0_of(pred, x, t), model.eps_of(pred, x, t)
        a, s = model.coeffs(t_next, x)
        x = torch.where((t_next < t).reshape(-1, *([1] * (x.ndim - 1))), param.ddim_step(x0, eps, a, s), x)
        t = t_next
    return x, t


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_deterministic_rollout_equals_the_stride_rollout_on_dividing_grids(name):
    """eta = 1 (deterministic, the default) is bit for bit the rollout that stepped ``T / n`` levels."""
    sched = SCHEDULES[name]
    f = _gaussian(sched, 0.3, 0.5)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for n, steps in ((25, 5), (10, 3), (1000, 7)):
        grid, stride = ddim_grid(n), 1000 // n
        pos = torch.tensor([n - 1, n // 2, 2, 0, 1])
        got = ddim_rollout(_model(sched), f, x, pos, steps, grid)
        want = _stride_rollout(_model(sched), f, x, grid[pos], steps, stride)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        ones = torch.ones(steps, 5)
        stoch = walk(_model(sched), f, x, pos, grid, steps, etas=ones, generator=torch.Generator())
        assert torch.equal(stoch[0], want[0])  # eta = 1 weighs the fresh draw 0


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


@pytest.mark.parametrize("n", [7, 30])
def test_a_full_walk_visits_exactly_ddim_grid(n):
    seen = []

    def f(x, t):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    ddim_sample(_model(_vp()), f, torch.ones(1, 2, dtype=torch.float64), ddim_grid(n))
    assert seen == ddim_grid(n).flip(0).tolist()
    seen.clear()
    top = torch.full((1,), n - 1)
    _, t = ddim_rollout(_model(_vp()), f, torch.ones(1, 2, dtype=torch.float64), top, n, ddim_grid(n))
    assert seen == ddim_grid(n).flip(0).tolist() and t.tolist() == [0]


def test_stochastic_steps_are_reproducible_with_a_generator():
    sched = _vp()
    f = _gaussian(sched, 0.5, 0.3)
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid, etas = ddim_grid(10), torch.zeros(10, 64)  # eta = 0: the predicted noise fully replaced

    def run(seed):
        return sample(_model(sched), f, z, grid, etas=etas, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.equal(a, sample(_model(sched), f, z, grid, etas=etas, randn=_draws(1)))
    half = sample(_model(sched), f, z, grid, etas=etas + 0.5, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(half, a) and not torch.allclose(half, ddim_sample(_model(sched), f, z, grid))
    with pytest.raises(ValueError, match="generator"):
        sample(_model(sched), f, z, grid, etas=etas)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_deterministic_sampler_recovers_a_gaussian_as_steps_grow(name):
    """With the exact x0-predictor of N(m, v), the deterministic sampler maps N(0, 1) to N(m, v):
    the moments of its output converge as the grid refines (float64)."""
    sched, m, v = SCHEDULES[name], 0.5, 0.09
    z = torch.randn(20000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a_top, s_top = sched.alpha_sigma(torch.tensor(sched.t_max))
    z = a_top * m + (a_top**2 * v + s_top**2).sqrt() * z  # the exact marginal at the top level
    errs = []
    for n in (5, 50, 500):
        x0 = ddim_sample(_model(sched), _gaussian(sched, m, v), z, ddim_grid(n))
        errs.append(abs(x0.mean().item() - m) + abs(x0.var().item() - v))
    assert errs[2] < errs[0] and errs[1] < errs[0] and errs[2] < 0.01, errs


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


def test_weights_used_before_the_last_k_calls_get_no_gradient():
    """DRaFT-K: a weight that acts only at the first (noisiest) levels is outside the graph."""
    grid = ddim_grid(6)
    w_early = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    w_late = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)

    def f(x, t):  # levels of the last two calls: grid[1], grid[0]
        return (w_late if int(t[0]) <= int(grid[1]) else w_early) * x

    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sample(_model(_vp()), f, z, grid, grad_calls=2).sum().backward()
    assert w_early.grad is None and w_late.grad is not None and w_late.grad != 0
    w_late.grad = None
    sample(_model(_vp()), f, z, grid, grad_calls=3).sum().backward()
    assert w_early.grad is not None and w_early.grad != 0


def test_r0_step_runs_from_ddim_to_fresh_noise():
    """R0 eq. 3.2: eta = 1 is the DDIM step, eta = 0 keeps the prediction and draws all noise anew;
    a float eta (the scheduler's) and a per-sample tensor (training's) give the same step."""
    g = torch.Generator().manual_seed(3)
    x0, eps, z = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    a, s = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    assert torch.equal(param.ddim_step_eta(x0, eps, a, s, 1.0, z), param.ddim_step(x0, eps, a, s))
    assert torch.equal(param.ddim_step_eta(x0, eps, a, s, 0.0, z), param.forward_noise(x0, z, a, s))
    per_sample = torch.full((4, 1), 0.3, dtype=torch.float64)
    torch.testing.assert_close(
        param.ddim_step_eta(x0, eps, a, s, per_sample, z), param.ddim_step_eta(x0, eps, a, s, 0.3, z)
    )


@pytest.mark.parametrize("with_data", [True, False])
def test_tdft_on_a_grid_that_does_not_divide_T_stays_on_the_grid(tiny_sd, with_data):
    """TDFT with 30 grid steps of 1000: start levels and every teacher call lie on ddim_grid(30)."""
    from selfnpo.models.loading import load_pipeline
    from selfnpo.models.sd import DiffusionModel
    from selfnpo.objectives.base import Batch, StepContext
    from selfnpo.objectives.tdft import tdft

    model = DiffusionModel(load_pipeline(tiny_sd, device="cpu", dtype="fp32"))
    seen = []

    def teacher(x, t, cond):
        seen.append(t.clone())
        return model.predict(x, t, cond)

    cfg = SimpleNamespace(
        grid_steps=30, k_steps=4, rollout_guidance=-1.0, authors_cond_pass=False, resolution=None
    )
    cfg.loss, cfg.huber_c = "l2", 1e-3
    prompts = ["a red circle", "green star", "a blue square", "yellow ring"]
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)) if with_data else None
    ctx = StepContext(model, model.predict, teacher, cfg, torch.Generator().manual_seed(1))
    loss = tdft(ctx, Batch(prompts, model.encode(prompts), x0))
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    levels = set(grid_levels(ddim_grid(30)).tolist())
    assert len(seen) >= 2 and all(set(t.tolist()) <= levels for t in seen)
    assert not set(seen[0].tolist()) & {0}  # the rollout starts on the grid itself, never at 0
