"""Each guidance rule reduces to plain CFG where its paper says it does, and to ``cond`` at g = 1."""

from __future__ import annotations

import pytest
import torch

from selfnpo import guidance
from selfnpo import guidance_rules as gr


def _pair(seed=0, shape=(3, 4, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64), torch.randn(
        *shape, generator=g, dtype=torch.float64
    )


def test_cfg_matches_the_combinator():
    u, c = _pair()
    guided = guidance.cfg(lambda x, t: c, lambda x, t: u, 5.0)(None, None)
    torch.testing.assert_close(gr.cfg(u, c, 0.5, 5.0), guided, rtol=0, atol=0)


def test_reductions_to_cfg():
    u, c = _pair()
    ref = gr.cfg(u, c, 500, 4.5)
    exact = dict(rtol=0, atol=0)
    torch.testing.assert_close(gr.cfg_rescale(u, c, 500, 4.5, phi=0.0), ref, **exact)
    torch.testing.assert_close(gr.guidance_interval(u, c, 500, 4.5), ref, **exact)
    torch.testing.assert_close(
        gr.guidance_interval(u, c, torch.tensor([0, 500, 999]), 4.5, -1, 999), ref, **exact
    )
    torch.testing.assert_close(gr.apg(u, c, 500, 4.5, eta=1.0)[0], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gr.cfg_zero_star(u, c, 500, 4.5, use_optimized_scale=False), ref, **exact)


@pytest.mark.parametrize(
    "rule",
    [
        lambda u, c: gr.cfg(u, c, 1, 1.0),
        lambda u, c: gr.cfg_rescale(u, c, 1, 1.0, phi=0.7),
        lambda u, c: gr.guidance_interval(u, c, 1, 1.0, 0.5, 2),
        lambda u, c: gr.apg(u, c, 1, 1.0, eta=0.0, norm_threshold=1.0, momentum=-0.5, running=u)[0],
        lambda u, c: gr.cfg_zero_star(u, c, 1, 1.0),
    ],
)
def test_scale_one_is_the_conditional_output(rule):
    u, c = _pair(1)
    torch.testing.assert_close(rule(u, c), c, rtol=1e-12, atol=1e-12)


def test_rescale_matches_conditional_std():
    u, c = _pair(2)
    out = gr.cfg_rescale(u, c, 0, 7.5, phi=1.0)
    torch.testing.assert_close(out.std(dim=(1, 2, 3)), c.std(dim=(1, 2, 3)))
    x = gr.cfg(u, c, 0, 7.5)
    torch.testing.assert_close(gr.cfg_rescale(u, c, 0, 7.5, phi=0.3), 0.3 * out + 0.7 * x)


def test_interval_is_cond_outside_per_sample():
    u, c = _pair(3)
    t = torch.tensor([100.0, 500.0, 900.0])
    out = gr.guidance_interval(u, c, t, 3.0, t_lo=200, t_hi=800)
    torch.testing.assert_close(out[[0, 2]], c[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(out[1], gr.cfg(u, c, 0, 3.0)[1], rtol=0, atol=0)
    torch.testing.assert_close(
        gr.guidance_interval(u, c, 800.0, 3.0, 200, 800), gr.cfg(u, c, 0, 3.0)
    )  # (lo, hi]
    torch.testing.assert_close(gr.guidance_interval(u, c, 200.0, 3.0, 200, 800), c)


def test_apg_projection_threshold_and_momentum():
    u, c = _pair(4)
    out, _ = gr.apg(u, c, 0, 5.0, eta=0.0)
    update = (out - c).flatten(1)
    torch.testing.assert_close(
        (update * c.flatten(1)).sum(1), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0
    )
    out, _ = gr.apg(u, c, 0, 5.0, eta=1.0, norm_threshold=0.5)
    torch.testing.assert_close(
        (out - c).flatten(1).norm(dim=1) / 4.0, torch.full((3,), 0.5, dtype=torch.float64)
    )
    u2, c2 = _pair(5)
    _, running = gr.apg(u, c, 0, 5.0, eta=1.0, momentum=-0.5)
    out2, running2 = gr.apg(u2, c2, 0, 5.0, eta=1.0, momentum=-0.5, running=running)
    expect = (c2 - u2) - 0.5 * (c - u)
    torch.testing.assert_close(running2, expect)
    torch.testing.assert_close(out2, c2 + 4.0 * expect)


def test_cfg_zero_star_scale_and_zero_init():
    u, c = _pair(6)
    assert torch.count_nonzero(gr.cfg_zero_star(u, c, 0, 4.0, step=0, zero_init_steps=1)) == 0
    s = gr.optimized_scale(u, c)
    # s* minimises |cond - s uncond|: the residual is orthogonal to uncond.
    resid = (c - s * u).flatten(1)
    torch.testing.assert_close(
        (resid * u.flatten(1)).sum(1), torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0
    )
    # cond a multiple of uncond: s* recovers it and guidance adds nothing.
    torch.testing.assert_close(
        gr.cfg_zero_star(u, 2.0 * u, 0, 7.0, step=3, zero_init_steps=1), 2.0 * u, atol=1e-6, rtol=0
    )


def test_half_precision_in_and_out():
    u, c = (x.half() for x in _pair(7))
    for out in (gr.cfg_rescale(u, c, 0, 5.0), gr.apg(u, c, 0, 5.0)[0], gr.cfg_zero_star(u, c, 0, 5.0)):
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
