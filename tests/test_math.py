"""The math, checked exactly: conversions round-trip in float64, Tweedie on a Gaussian mixture is
the posterior mean, and Self-NPO Theorems 1-2 hold for the re-noising of eq. 16."""

from __future__ import annotations

import math

import pytest
import torch

from selfnpo import param
from selfnpo.schedules import alpha_sigma, ddim_grid, nsr


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


AC = _sd_alphas_cumprod()  # float64 regardless of the default dtype


class Mixture:
    """1-D Gaussian mixture ``sum_k w_k N(mu_k, s_k^2)`` pushed through ``x_t = a x0 + sigma eps``."""

    def __init__(self):
        self.w = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64)
        self.mu = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64)
        self.s = torch.tensor([0.3, 0.6, 0.2], dtype=torch.float64)

    def sample_x0(self, n, g):
        k = torch.multinomial(self.w, n, replacement=True, generator=g)
        return self.mu[k] + self.s[k] * torch.randn(n, generator=g)

    def _parts(self, x, a, sig):
        var = a**2 * self.s**2 + sig**2  # [K]
        logp = (
            torch.log(self.w)
            - 0.5 * torch.log(2 * math.pi * var)
            - (x[:, None] - a * self.mu) ** 2 / (2 * var)
        )
        return var, logp

    def log_p(self, x, a, sig):
        return torch.logsumexp(self._parts(x, a, sig)[1], 1)

    def posterior_mean(self, x, a, sig):
        var, logp = self._parts(x, a, sig)
        r = torch.softmax(logp, 1)
        comp = self.mu + a * self.s**2 / var * (x[:, None] - a * self.mu)
        return (r * comp).sum(1)

    def moments(self, a, sig, order):
        """Exact raw moment E[x^order] of the level-(a, sig) marginal, orders 1-4."""
        m, v = a * self.mu, a**2 * self.s**2 + sig**2
        table = {1: m, 2: m**2 + v, 3: m**3 + 3 * m * v, 4: m**4 + 6 * m**2 * v + 3 * v**2}
        return (self.w * table[order]).sum()


@pytest.mark.parametrize("t", [0, 10, 500, 999])
def test_conversions_round_trip_float64(t):
    g = torch.Generator().manual_seed(t)
    a, s = alpha_sigma(AC, torch.tensor([t]))
    x0, eps = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    x_t = a * x0 + s * eps
    v = param.x0_eps_to_v(x0, eps, a, s)
    for pred, kind in ((eps, "epsilon"), (v, "v_prediction"), (x0, "sample")):
        torch.testing.assert_close(
            param.to_x0(pred, x_t, a, s, kind), x0, rtol=1e-9, atol=1e-9 * (1 + 1 / a.item())
        )
        torch.testing.assert_close(
            param.to_eps(pred, x_t, a, s, kind), eps, rtol=1e-9, atol=1e-9 * (1 + 1 / s.item())
        )
    torch.testing.assert_close(param.x0_to_eps(x_t, x0, a, s), eps, rtol=1e-9, atol=1e-8)
    score = param.eps_to_score(eps, s)
    torch.testing.assert_close(param.score_to_x0(x_t, score, a, s), x0, rtol=1e-9, atol=1e-8)
    tau = torch.tensor(0.37)
    xf = (1 - tau) * x0 + tau * eps
    torch.testing.assert_close(param.flow_to_x0(xf, eps - x0, tau), x0)
    torch.testing.assert_close(param.flow_to_eps(xf, eps - x0, tau), eps)


def test_schedule_helpers():
    assert ddim_grid(25).tolist()[:3] == [39, 79, 119] and ddim_grid(25)[-1].item() == 999
    a, s = alpha_sigma(AC, torch.arange(1000))
    r = nsr(a, s)
    assert bool((r[1:] > r[:-1]).all())
    torch.testing.assert_close(a**2 + s**2, torch.ones(1000))
    with pytest.raises(ValueError):
        ddim_grid(0)


@pytest.mark.parametrize("t", [50, 400, 900])
def test_tweedie_equals_exact_posterior_mean(t):
    mix = Mixture()
    a, s = alpha_sigma(AC, torch.tensor(t))
    x = torch.linspace(-4, 4, 101).requires_grad_(True)
    score = torch.autograd.grad(mix.log_p(x, a, s).sum(), x)[0]
    x = x.detach()
    exact = mix.posterior_mean(x, a, s)
    torch.testing.assert_close(param.score_to_x0(x, score, a, s), exact, rtol=1e-10, atol=1e-10)
    eps = -s * score  # an exact eps-network
    torch.testing.assert_close(param.eps_to_x0(x, eps, a, s), exact, rtol=1e-10, atol=1e-10)


def _renoised(mix, t, s_level, n, seed):
    g = torch.Generator().manual_seed(seed)
    a_t, sg_t = alpha_sigma(AC, torch.tensor(t))
    a_s, sg_s = alpha_sigma(AC, torch.tensor(s_level))
    x_t = a_t * mix.sample_x0(n, g) + sg_t * torch.randn(n, generator=g)
    x_s = param.renoise(x_t, a_t, sg_t, a_s, sg_s, torch.randn(n, generator=g))
    return x_t, x_s, (a_t, sg_t, a_s, sg_s)


@pytest.mark.parametrize("t,s_level", [(0, 300), (200, 600), (599, 999)])
def test_theorem1_renoised_state_has_forward_marginal(t, s_level):
    """Eq. 16 maps x_t ~ p_t to x_s ~ p_s: raw moments 1-4 match the exact ones within 5 SE."""
    mix, n = Mixture(), 400_000
    _, x_s, (_, _, a_s, sg_s) = _renoised(mix, t, s_level, n, seed=t + s_level)
    for k in (1, 2, 3, 4):
        exact = mix.moments(a_s, sg_s, k)
        se = (x_s**k).std() / math.sqrt(n)
        assert abs((x_s**k).mean() - exact) < 5 * se, k


def test_naive_renoising_of_the_tweedie_target_does_not_have_the_marginal():
    """Eq. 15 (noising x_{t->0}) shrinks the variance: the check above would catch it."""
    mix, n, t, s_level = Mixture(), 400_000, 700, 800
    x_t, _, (a_t, sg_t, a_s, sg_s) = _renoised(mix, t, s_level, n, seed=1)
    g = torch.Generator().manual_seed(2)
    naive = a_s * mix.posterior_mean(x_t, a_t, sg_t) + sg_s * torch.randn(n, generator=g)
    exact2 = mix.moments(a_s, sg_s, 2)
    assert abs((naive**2).mean() - exact2) > 20 * (naive**2).std() / math.sqrt(n)


def _grad_pair(target_fn, n=400_000, t=300, s_level=700):
    """Per-sample gradient of 0.5 (T - f(x_s))^2 for the linear model f = th1 * x_s + th0."""
    mix = Mixture()
    x_t, x_s, (a_t, sg_t, a_s, sg_s) = _renoised(mix, t, s_level, n, seed=11)
    th1, th0 = 0.3, 0.1
    resid = target_fn(mix, x_t, x_s, (a_t, sg_t, a_s, sg_s)) - (th1 * x_s + th0)
    return torch.stack([-resid * x_s, -resid], 1)  # [n, 2]


def test_theorem2_tdft_gradient_equals_regression_on_posterior_mean():
    """E[grad ||x_{t->0} - f(x_s)||^2] == E[grad ||E[x0|x_s] - f(x_s)||^2] (Theorem 2)."""

    def tdft_target(mix, x_t, x_s, c):
        return mix.posterior_mean(x_t, c[0], c[1])

    def exact_target(mix, x_t, x_s, c):
        return mix.posterior_mean(x_s, c[2], c[3])

    g1, g2 = _grad_pair(tdft_target), _grad_pair(exact_target)
    diff = g1 - g2
    se = diff.std(0) / math.sqrt(diff.shape[0])
    assert bool((diff.mean(0).abs() < 5 * se).all()), (diff.mean(0), se)
    assert bool((g2.mean(0).abs() > 50 * se).all())  # the gradient itself is far from zero


def test_theorem2_fails_for_a_wrong_target():
    """Regressing on the noisy-level posterior mean of a *different* level breaks the identity."""

    def wrong(mix, x_t, x_s, c):
        return mix.posterior_mean(x_s, c[0], c[1])

    def exact_target(mix, x_t, x_s, c):
        return mix.posterior_mean(x_s, c[2], c[3])

    diff = _grad_pair(wrong) - _grad_pair(exact_target)
    se = diff.std(0) / math.sqrt(diff.shape[0])
    assert bool((diff.mean(0).abs() > 10 * se).any())


def test_cfg_combinator():
    from selfnpo.guidance import cfg, w_to_g

    calls = []

    def pos(x, t):
        calls.append("pos")
        return x + 1

    def neg(x, t):
        calls.append("neg")
        return x - 1

    x, t = torch.zeros(2), torch.zeros(2)
    torch.testing.assert_close(cfg(pos, neg, 3.0)(x, t), torch.full((2,), 5.0))
    calls.clear()
    assert torch.equal(cfg(pos, neg, w_to_g(-1.0))(x, t), neg(x, t)) and calls == ["neg", "neg"]
    calls.clear()
    cfg(pos, neg, 0.0, always_both=True)(x, t)
    assert sorted(calls) == ["neg", "pos"]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weight_is_min_snr_gamma_in_x0_space(prediction_type):
    """Weighted loss in the network's space == min(SNR, gamma) * squared x0 error (Hang et al. eq. 6)."""
    from selfnpo.objectives.diffusion import min_snr_weight

    g = torch.Generator().manual_seed(0)
    ac = torch.linspace(0.999, 0.002, 1000, dtype=torch.float64)
    t = torch.tensor([0, 10, 200, 500, 999])
    a, s = alpha_sigma(ac, t)
    a, s = a.view(-1, 1), s.view(-1, 1)
    x0, eps = (
        torch.randn(5, 16, generator=g, dtype=torch.float64),
        torch.randn(5, 16, generator=g, dtype=torch.float64),
    )
    x_t = a * x0 + s * eps
    target = param.target_for(x0, eps, a, s, prediction_type)
    pred = target + 0.1 * torch.randn(5, 16, generator=g, dtype=torch.float64)
    x0_hat = param.to_x0(pred, x_t, a, s, prediction_type)
    gamma = 5.0
    snr = (a / s).flatten() ** 2
    want = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) * ((x0_hat - x0) ** 2).mean(1)
    got = min_snr_weight(a.flatten(), s.flatten(), gamma, prediction_type).double() * (
        (pred - target) ** 2
    ).mean(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)
