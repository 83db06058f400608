"""Both kinds of schedule, checked exactly in float64: the VP one reproduces the SD coefficients,
the flow one diffusers' FlowMatchEulerDiscreteScheduler; conversions round-trip; Tweedie and
Self-NPO Theorem 1 hold on a flow path; the DDIM step is the flow Euler step."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_math import AC, Mixture

from selfnpo import param
from selfnpo.sampling import ddim_rollout, ddim_sample
from selfnpo.schedules import FlowSchedule, VPSchedule, alpha_sigma, ddim_grid, nsr, schedule_for


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


VP = VPSchedule(AC, "epsilon")
FLOW = FlowSchedule(1000, shift=3.0)
KINDS = {
    "vp-epsilon": VP,
    "vp-v": VPSchedule(AC, "v_prediction"),
    "vp-sample": VPSchedule(AC, "sample"),
    "flow": FLOW,
}


def test_vp_schedule_is_the_sd_schedule():
    t = torch.arange(1000)
    a, s = VP.alpha_sigma(t)
    a0, s0 = alpha_sigma(AC, t)
    assert torch.equal(a, a0) and torch.equal(s, s0)
    assert VP.network_time(t) is t and VP.t_max == 999 and VP.num_train_timesteps == 1000
    with pytest.raises(ValueError):
        VPSchedule(AC, "flow")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_schedule_is_diffusers_flow_match_training_schedule(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    fs = schedule_for(sched)
    assert isinstance(fs, FlowSchedule) and fs.shift == shift
    t = torch.arange(1000)
    a, s = fs.alpha_sigma(t)
    torch.testing.assert_close(s, sched.sigmas.flip(0).double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fs.network_time(t), sched.timesteps.flip(0), rtol=1e-6, atol=1e-4)
    assert torch.equal(a + s, torch.ones(1000)) and s[-1] == 1.0 and a[-1] == 0.0
    r = nsr(a[:-1], s[:-1])
    assert bool((r[1:] > r[:-1]).all())  # monotone in t, as eq. 16 needs


def test_schedule_for_refuses_what_it_cannot_represent():
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(ValueError, match="dynamic"):
        schedule_for(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(ValueError, match="neither"):
        schedule_for(SimpleNamespace(config={}))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("t", [0, 10, 500, 998])
def test_round_trips_through_the_schedule(kind, t):
    sch = KINDS[kind]
    g = torch.Generator().manual_seed(t)
    x0, eps = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    tt = torch.full((4,), t)
    a, s = sch.coeffs(tt, x0)
    x_t = a * x0 + s * eps
    pred = sch.target(x0, eps, tt)  # what an exact network outputs
    tol = 1e-9 * (1 + 1 / a.min().item() + 1 / s.min().item())
    torch.testing.assert_close(sch.to_x0(pred, x_t, tt), x0, rtol=1e-9, atol=tol)
    torch.testing.assert_close(sch.to_eps(pred, x_t, tt), eps, rtol=1e-9, atol=tol)


def test_flow_conversions_at_the_ends():
    """sigma = 1 (pure noise) and sigma = 0 (data) need no division."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, generator=g), torch.randn(5, generator=g)
    v = param.x0_eps_to_flow(x0, eps)
    for sig in (torch.tensor(1.0), torch.tensor(0.0)):
        x_t = (1 - sig) * x0 + sig * eps
        torch.testing.assert_close(param.to_x0(v, x_t, 1 - sig, sig, "flow"), x0)
        torch.testing.assert_close(param.to_eps(v, x_t, 1 - sig, sig, "flow"), eps)


@pytest.mark.parametrize("t", [50, 400, 900])
def test_flow_tweedie_equals_exact_posterior_mean(t):
    """The exact velocity E[eps - x0 | x_t] (from the score) gives the posterior mean through the
    flow conversion, on a path where alpha + sigma = 1 but alpha^2 + sigma^2 != 1."""
    mix = Mixture()
    a, s = FLOW.alpha_sigma(torch.tensor(t))
    x = torch.linspace(-4, 4, 101).requires_grad_(True)
    score = torch.autograd.grad(mix.log_p(x, a, s).sum(), x)[0]
    x = x.detach()
    x0_hat = param.score_to_x0(x, score, a, s)
    v = param.x0_eps_to_flow(x0_hat, -s * score)
    exact = mix.posterior_mean(x, a, s)
    torch.testing.assert_close(param.flow_to_x0(x, v, s), exact, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(FLOW.to_x0(v, x, torch.tensor(t)), exact, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t,s_level", [(0, 300), (200, 600), (599, 999)])
def test_theorem1_on_a_flow_schedule(t, s_level):
    """Eq. 16 maps x_t ~ p_t to x_s ~ p_s on the shifted flow path (s = 999 is pure noise)."""
    mix, n = Mixture(), 400_000
    g = torch.Generator().manual_seed(t + s_level)
    a_t, sg_t = FLOW.alpha_sigma(torch.tensor(t))
    a_s, sg_s = FLOW.alpha_sigma(torch.tensor(s_level))
    x_t = a_t * mix.sample_x0(n, g) + sg_t * torch.randn(n, generator=g)
    x_s = param.renoise(x_t, a_t, sg_t, a_s, sg_s, torch.randn(n, generator=g))
    for k in (1, 2, 3, 4):
        exact = mix.moments(a_s, sg_s, k)
        se = (x_s**k).std() / math.sqrt(n)
        assert abs((x_s**k).mean() - exact) < 5 * se, k


def test_theorem1_check_catches_noise_added_without_the_sigma_t_correction():
    """Adding ``sigma_s eps`` to the scaled state (forgetting the ``sigma_t`` part) overshoots."""
    mix, n, t, s_level = Mixture(), 400_000, 300, 500
    g = torch.Generator().manual_seed(5)
    a_t, sg_t = FLOW.alpha_sigma(torch.tensor(t))
    a_s, sg_s = FLOW.alpha_sigma(torch.tensor(s_level))
    x_t = a_t * mix.sample_x0(n, g) + sg_t * torch.randn(n, generator=g)
    wrong = a_s / a_t * x_t + sg_s * torch.randn(n, generator=g)
    assert abs((wrong**2).mean() - mix.moments(a_s, sg_s, 2)) > 20 * (wrong**2).std() / math.sqrt(n)


def test_ddim_step_is_the_flow_euler_step():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(6, generator=g), torch.randn(6, generator=g)
    for sig, sig_next in ((1.0, 0.7), (0.55, 0.2), (0.3, 0.0)):
        s, s2 = torch.tensor(sig), torch.tensor(sig_next)
        x0, eps = param.flow_to_x0(x, v, s), param.flow_to_eps(x, v, s)
        torch.testing.assert_close(param.ddim_step(x0, eps, 1 - s2, s2), x + (s2 - s) * v)


def test_ddim_rollout_on_a_flow_schedule_matches_diffusers_euler():
    """The shared rollout, on FlowSchedule levels, equals FlowMatchEulerDiscreteScheduler.step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    model = SimpleNamespace(x0_of=FLOW.to_x0, eps_of=FLOW.to_eps, coeffs=FLOW.coeffs)
    levels = [999, 799, 599, 399]
    sched.set_timesteps(sigmas=[(t + 1) / 1000 for t in levels])  # it applies its own shift

    def f(x, t):  # any velocity field; a smooth nonlinear one
        return torch.tanh(x) * (1 + t.double()[:, None] / 1000)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, generator=g)
    ours, t_end = ddim_rollout(model, f, x, torch.full((3,), 4), steps=3, grid=ddim_grid(5))  # 199..999
    ref = x.clone()
    for t in levels[:3]:
        ref = sched.step(f(ref, torch.full((3,), t)), sched.timesteps[levels.index(t)], ref).prev_sample
    assert t_end.tolist() == [399] * 3
    torch.testing.assert_close(ours, ref.double(), rtol=1e-5, atol=1e-5)  # diffusers steps in fp32


def test_flow_sampling_converges_to_the_exact_ode_answer():
    """Gaussian data x0 ~ N(mu, s0^2): the probability-flow map is affine; Euler's error falls ~1/N."""
    mu, s0 = 1.5, 0.4

    def velocity(x, t):  # exact E[eps - x0 | x_t] = (x - E[x0 | x_t]) / sigma
        a, s = FLOW.coeffs(t, x)
        post = mu + a * s0**2 / (a**2 * s0**2 + s**2) * (x - a * mu)
        return (x - post) / s

    model = SimpleNamespace(x0_of=FLOW.to_x0, eps_of=FLOW.to_eps, coeffs=FLOW.coeffs)
    z = torch.linspace(-2, 2, 9)
    a0, sg0 = FLOW.alpha_sigma(torch.tensor(0))
    exact = mu + a0 * s0**2 * z / (a0**2 * s0**2 + sg0**2).sqrt()  # E[x0 | x at level 0]
    errs = [
        (ddim_sample(model, velocity, z, ddim_grid(n)) - exact).abs().max().item() for n in (10, 100, 1000)
    ]
    assert errs[1] < errs[0] / 4 and errs[2] < errs[1] / 4 and errs[2] < 5e-3, errs


@pytest.mark.parametrize("seq_len,kind", [(16, "exponential"), (1024, "exponential"), (4096, "linear")])
def test_dynamic_shift_is_the_flux_pipelines_time_shift(seq_len, kind):
    """``set_timesteps(sigmas, mu)`` of a dynamic-shift scheduler (Flux) gives FlowSchedule's sigmas
    with the shift of ``seq_len`` tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=kind)
    fs = schedule_for(sched, image_seq_len=seq_len)
    u = np.linspace(1.0, 1 / 20, 20)
    sched.set_timesteps(sigmas=u, mu=calculate_shift(seq_len, 256, 4096, 0.5, 1.15))
    np.testing.assert_allclose(
        fs.sigma_at(torch.from_numpy(u)).numpy(), sched.sigmas[:-1].double().numpy(), atol=1e-6
    )


def test_flow_unipc_sigmas_lie_on_the_flow_schedule():
    """Wan's UniPC on flow sigmas samples ``flow_shift``-shifted levels: FlowSchedule's curve."""
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    fs = schedule_for(sched)
    assert isinstance(fs, FlowSchedule) and fs.shift == 5.0
    sched.set_timesteps(10)
    u = np.linspace(1, 1 / 1000, 11)[:-1]  # UniPC's unshifted levels, noisiest first
    np.testing.assert_allclose(
        fs.sigma_at(torch.from_numpy(u)).numpy(), sched.sigmas[:-1].double().numpy(), atol=1e-6
    )
