"""The exact 2-D world: closed-form densities, Tweedie, the MLP behind the denoiser contract, and
one established fact about classifier-free guidance checked with the true score."""

from __future__ import annotations

import math

import pytest
import torch

from selfnpo.guidance import cfg
from selfnpo.npo import NPOGuidance
from selfnpo.offsets import adapter_scales
from selfnpo.sampling import ddim_sample
from selfnpo.schedules import alpha_sigma, ddim_grid
from selfnpo.toy2d.metrics import (
    class_knn_precision_recall,
    hdr_log_threshold,
    knn_precision_recall,
    per_sample,
)
from selfnpo.toy2d.mixture import ring_mixture
from selfnpo.toy2d.model import (
    LORA_TARGETS,
    MixtureSource,
    Toy2DModel,
    build_toy_pipeline,
    class_prompt,
    exact_predict,
    guided_sample,
)
from selfnpo.training.config import TrainConfig
from selfnpo.training.loop import train
from selfnpo.training.offset import STUDENT, TEACHER

MIX = ring_mixture()


def _grid_mass(log_p, lim=4.0, n=201):
    ax = torch.linspace(-lim, lim, n, dtype=torch.float64)
    xx, yy = torch.meshgrid(ax, ax, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    return float(log_p(pts).exp().sum() * (ax[1] - ax[0]) ** 2)


@pytest.mark.parametrize("c", [0, 2, None])
@pytest.mark.parametrize("level", [(1.0, 0.0), (0.6, 0.8)])
def test_exact_density_normalises(c, level):
    a, s = level

    def log_p(x):
        cls = None if c is None else torch.full((x.shape[0],), c)
        return MIX.log_prob(x, cls, a, s)

    assert abs(_grid_mass(log_p) - 1.0) < 1e-3


def test_marginal_is_the_prior_weighted_class_mixture():
    x, _ = MIX.sample(64, None, torch.Generator().manual_seed(0))
    per_class = torch.stack([MIX.log_prob(x, torch.full((64,), k)) for k in range(3)], 1)
    want = torch.logsumexp(per_class + MIX.prior.log(), 1)
    torch.testing.assert_close(MIX.log_prob(x), want)
    torch.testing.assert_close(MIX.class_log_posterior(x).exp().sum(1), torch.ones(64, dtype=torch.float64))


@pytest.mark.parametrize("a,s", [(0.9, math.sqrt(1 - 0.81)), (0.3, math.sqrt(1 - 0.09))])
def test_tweedie_matches_monte_carlo_and_the_score(a, s):
    """E[x0 | x_t, c] in closed form equals a self-normalised Monte Carlo posterior mean, and
    the exact eps equals -sigma * grad log p_t (autograd)."""
    g = torch.Generator().manual_seed(1)
    x_t = torch.tensor([[1.2, 0.4], [-0.5, 1.0], [0.0, -1.4]], dtype=torch.float64)
    c = torch.tensor([0, 1, 2])
    n = 400_000
    for i in range(3):
        x0, _ = MIX.sample(n, torch.full((n,), int(c[i])), g)
        logw = -((x_t[i] - a * x0) ** 2).sum(1) / (2 * s**2)
        w = torch.softmax(logw, 0)
        mc = (w[:, None] * x0).sum(0)
        se = ((w[:, None] ** 2) * (x0 - mc) ** 2).sum(0).sqrt()  # delta-method standard error
        exact = MIX.posterior_mean(x_t[i : i + 1], c[i : i + 1], a, s)[0]
        assert bool(((mc - exact).abs() < 5 * se).all()), (mc, exact, se)
    x = x_t.clone().requires_grad_(True)
    score = torch.autograd.grad(MIX.log_prob(x, c, a, s).sum(), x)[0]
    torch.testing.assert_close(MIX.eps(x_t, c, a, s), -s * score, rtol=1e-10, atol=1e-10)


def test_knn_precision_recall_of_a_set_against_itself_and_a_shifted_one():
    x, _ = MIX.sample(300, torch.zeros(300, dtype=torch.long), torch.Generator().manual_seed(2))
    assert knn_precision_recall(x, x) == (1.0, 1.0)
    p, r = knn_precision_recall(x + 5.0, x)
    assert p == 0.0 and r == 0.0


def _tiny_base(tmp_path, steps=30):
    pipe = build_toy_pipeline(hidden=32, depth=2, seed=0)
    kw = dict(model="toy2d", prompts="-", source="images", image_dir="-", output_dir=str(tmp_path / "pre"))
    cfg_ = TrainConfig(
        **kw,
        objective="diffusion",
        train="full",
        teacher="frozen",
        caption_dropout=0.2,
        lr=3e-3,
        steps=steps,
        batch_size=64,
        checkpoint_every=0,
    )
    train(cfg_, progress=False, source=MixtureSource(MIX), model=Toy2DModel(pipe))
    pipe.unet.eval().requires_grad_(False)
    return pipe


def _tdft(base, tmp_path, **kw):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("class 0\nclass 1\nclass 2\n")
    work = base.copy()
    cfg_ = TrainConfig(
        model="toy2d",
        prompts=str(prompts),
        output_dir=str(tmp_path / "tdft"),
        objective="tdft",
        lora_targets=LORA_TARGETS,
        lora_rank=2,
        steps=3,
        batch_size=8,
        pool_size=8,
        lr=1e-2,
        checkpoint_every=0,
        ema_decay=0.5,
        **kw,
    )
    return work, train(cfg_, progress=False, model=Toy2DModel(work))


def test_mlp_trains_through_the_loop_and_tdft_changes_only_the_adapter(tmp_path):
    base = _tiny_base(tmp_path)
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    work, res = _tdft(base, tmp_path)
    after = work.unet.state_dict()
    plain = [k for k in after if "lora" not in k]
    assert {k.replace("base_layer.", "") for k in plain} == set(before)
    for k in plain:
        assert torch.equal(after[k], before[k.replace("base_layer.", "")]), k
    student_b = [v for k, v in after.items() if f"lora_B.{STUDENT}" in k]
    assert student_b and all(v.abs().sum() > 0 for v in student_b)
    assert res.offset_path.is_file() and math.isfinite(res.final_loss)
    # LoRA scale 0 is the base, bit for bit; scale 1 is not
    model, base_model = Toy2DModel(work), Toy2DModel(base)
    x, t = torch.randn(5, 2), torch.tensor([0, 10, 300, 700, 999])
    cond = model.encode(["class 0", "", "class 2", "class 1", ""])
    with torch.no_grad():
        want = base_model.predict(x, t, cond)
        with adapter_scales(work.unet, {STUDENT: 0.0, TEACHER: 0.0}):
            assert torch.equal(model.predict(x, t, cond), want)
        with adapter_scales(work.unet, {TEACHER: 0.0}):
            assert not torch.equal(model.predict(x, t, cond), want)


def test_npo_guidance_on_the_toy_pipeline(tmp_path):
    """The saved offset loads into the base through NPOGuidance: beta 0 is plain CFG bit for bit,
    beta 1 changes the samples, and g = 1 (positive branch only) ignores the offset."""
    base = _tiny_base(tmp_path)
    _, res = _tdft(base, tmp_path)
    prompts = [class_prompt(i % 3) for i in range(12)]
    noise = torch.randn(12, 2, generator=torch.Generator().manual_seed(3))
    plain = base(prompts, noise, guidance_scale=3.0, num_inference_steps=5)
    plain1 = base(prompts, noise, guidance_scale=1.0, num_inference_steps=5)
    with NPOGuidance(base, negative=res.run_dir / "offset", beta=0.0):
        assert torch.equal(base(prompts, noise, guidance_scale=3.0, num_inference_steps=5), plain)
    with NPOGuidance(base, negative=res.run_dir / "offset", beta=1.0):
        assert not torch.equal(base(prompts, noise, guidance_scale=3.0, num_inference_steps=5), plain)
        assert torch.equal(base(prompts, noise, guidance_scale=1.0, num_inference_steps=5), plain1)
    assert torch.equal(base(prompts, noise, guidance_scale=3.0, num_inference_steps=5), plain)  # detached
    one = guided_sample(base, prompts, noise, 3.0, res.run_dir / "offset", beta=1.0, steps=5)
    with NPOGuidance(base, negative=res.run_dir / "offset", beta=1.0):
        assert torch.equal(one, base(prompts, noise, guidance_scale=3.0, num_inference_steps=5))


def test_pipeline_sampler_equals_the_project_ddim_with_the_cfg_combinator():
    pipe = build_toy_pipeline(hidden=16, depth=1, seed=4)
    model = Toy2DModel(pipe)
    prompts = [class_prompt(i % 3) for i in range(6)]
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(5))
    c, u = model.encode(prompts), model.uncond(6)

    def f(x, t):
        return model.predict(x, t, c)

    def f_u(x, t):
        return model.predict(x, t, u)

    with torch.no_grad():
        ours = ddim_sample(model, cfg(f, f_u, 2.5), noise, ddim_grid(10))
    torch.testing.assert_close(pipe(prompts, noise, guidance_scale=2.5, num_inference_steps=10), ours)


def _exact_samples(g: float, n: int = 1500, steps: int = 25):
    model = Toy2DModel(build_toy_pipeline(hidden=8, depth=1))
    pred = exact_predict(MIX, model)
    cls = torch.arange(n) % 3
    c, u = model.encode([class_prompt(int(k)) for k in cls]), model.uncond(n)
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    guided = cfg(lambda x, t: pred(x, t, c), lambda x, t: pred(x, t, u), g)
    return ddim_sample(model, guided, noise, ddim_grid(steps)), cls


def test_exact_score_sampler_matches_the_true_distribution_at_g1():
    """With the true eps and 100 DDIM steps, samples at g = 1 score like true samples."""
    x, cls = _exact_samples(1.0, steps=100)
    th = [hdr_log_threshold(MIX, k) for k in range(3)]
    got = per_sample(MIX, x, cls, th)
    real, _ = MIX.sample(x.shape[0], cls, torch.Generator().manual_seed(9))
    want = per_sample(MIX, real, cls, th)
    assert abs(got["in_hdr"].mean() - 0.95) < 0.03 and abs(want["in_hdr"].mean() - 0.95) < 0.03
    assert abs(got["correct"].mean() - want["correct"].mean()) < 0.04
    assert class_knn_precision_recall(x, cls, MIX)[1] > 0.9


def test_established_fact_cfg_trades_recall_for_prompt_following():
    """Classifier-free guidance with the *exact* score (Ho & Salimans 2022): g = 3 raises the Bayes
    classifier's accuracy and log p(c|x) of samples over g = 1, and lowers k-NN recall (diversity)."""
    x1, cls = _exact_samples(1.0)
    x3, _ = _exact_samples(3.0)
    idx = torch.arange(cls.shape[0])
    post1, post3 = MIX.class_log_posterior(x1)[idx, cls], MIX.class_log_posterior(x3)[idx, cls]
    assert float(post3.mean()) > float(post1.mean()) + 0.05
    acc1 = float((MIX.class_log_posterior(x1).argmax(1) == cls).double().mean())
    acc3 = float((MIX.class_log_posterior(x3).argmax(1) == cls).double().mean())
    assert acc3 > acc1 + 0.03 and acc3 > 0.99
    r1, r3 = class_knn_precision_recall(x1, cls, MIX)[1], class_knn_precision_recall(x3, cls, MIX)[1]
    assert r3 < r1 - 0.3


def test_schedule_is_the_pipelines():
    model = Toy2DModel(build_toy_pipeline(hidden=8, depth=1))
    a, s = alpha_sigma(model.alphas_cumprod, torch.tensor([0, 999]))
    assert model.latent_shape(7) == (7, 2) and float(a[1]) < 0.01 and float(s[0]) < 0.02
