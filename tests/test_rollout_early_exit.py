"""The TDFT rollout where samples reach level 0 early (docs/method.md, difference 7).

The authors' rollout ends for the whole batch once every sample is at t = 0, and then takes the
estimate of the last call made as the target; selfnpo's ``walk`` also stops there, but the target
is the teacher's estimate at the state reached. These tests pin down selfnpo's side: the states
are those of the full K steps, the two targets differ only for the samples that arrived last, by
``(sigma_0 / alpha_0) (eps_39 - eps_0)``, and the exit's probability follows from the uniform
start position.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from selfnpo.objectives.tdft import start_state
from selfnpo.sampling import ddim_rollout, walk
from selfnpo.schedules import VPSchedule, ddim_grid


def _sd15():
    """SD1.5's scaled-linear schedule, epsilon prediction."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return VPSchedule(torch.cumprod(1 - betas, 0), "epsilon")


def _model(schedule):
    return SimpleNamespace(x0_of=schedule.to_x0, eps_of=schedule.to_eps, coeffs=schedule.coeffs)


def _eps(schedule):
    """A smooth, level-dependent noise prediction (the exact one of N(0.5, 0.3) data, plus a bend)."""

    def f(x, t):
        a, s = schedule.coeffs(t, x)
        return s * (x - a * 0.5) / (a * a * 0.3 + s * s) + 0.1 * torch.sin(3 * x) * s

    return f


def test_the_early_stop_keeps_the_states_and_the_target_is_taken_at_them():
    sched, grid, k = _sd15(), ddim_grid(25), 5
    m, f = _model(sched), _eps(_sd15())
    calls = []

    def counted(x, t):
        calls.append(t.clone())
        return f(x, t)

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pos = torch.tensor([0, 2, 3])  # every p' < K: all reach level 0, the last after 4 steps
    x_t, t, last_x0 = walk(m, counted, x, pos, grid, k)
    assert t.tolist() == [0, 0, 0] and len(calls) == 4  # stopped once every sample was at 0
    for i in range(3):  # the same states as each sample's own rollout
        xi, ti = ddim_rollout(m, f, x[i : i + 1], pos[i : i + 1], k, grid)
        assert torch.equal(xi, x_t[i : i + 1]) and ti.item() == 0

    zero = torch.zeros(3, dtype=torch.long)
    ours = m.x0_of(f(x_t, zero), x_t, zero)  # selfnpo's target (tdft.py)
    # samples that were already at 0 at the last call: the authors' target is the same
    assert torch.allclose(last_x0[:2], ours[:2], rtol=0, atol=1e-12)
    # the last arrival: the authors' target is the estimate at level 39, one step earlier
    x_39, t_39 = ddim_rollout(m, f, x[2:], pos[2:], 3, grid)
    assert t_39.item() == 39
    eps_39, eps_0 = f(x_39, t_39), f(x_t[2:], zero[:1])
    a0, s0 = sched.coeffs(zero[:1], x_39)
    assert torch.allclose(last_x0[2:], m.x0_of(eps_39, x_39, t_39), rtol=0, atol=1e-12)
    assert torch.allclose(ours[2:] - last_x0[2:], (s0 / a0) * (eps_39 - eps_0), rtol=0, atol=1e-12)
    assert abs((s0 / a0).item() - 0.0292) < 1e-4
    assert not torch.allclose(ours[2:], last_x0[2:])


def test_a_batch_reaches_level_zero_within_k_steps_with_probability_k_over_grid_to_the_b():
    sched, grid, k, b = _sd15(), ddim_grid(25), 5, 4
    g = torch.Generator().manual_seed(0)
    ctx = SimpleNamespace(
        generator=g,
        model=SimpleNamespace(coeffs=sched.coeffs),
        rand=lambda n: torch.rand(n, generator=g, dtype=torch.float64),
        randn=lambda shape: torch.randn(shape, generator=g, dtype=torch.float64),
    )
    n = 400_000
    batch = SimpleNamespace(x0=torch.zeros(n, 1, dtype=torch.float64))
    _, p = start_state(ctx, batch, grid, (n, 1))
    assert p.min().item() == 0 and p.max().item() == len(grid) - 1
    early = p < k  # reaches level 0 (t' <= 199) within K steps
    assert grid[k - 1].item() == 199
    assert abs(early.double().mean().item() - k / len(grid)) < 0.003
    whole = early.reshape(-1, b).all(dim=1).double().mean().item()  # batches of 4
    assert abs(whole - (k / len(grid)) ** b) < 4e-4  # 1.6e-3
