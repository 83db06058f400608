"""DDSPO (score-space preference loss, prompt degradation) and R0 / R0+ (reward-maximising generator)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import train_tiny
from PIL import Image
from safetensors.torch import load_file

from selfnpo.degrade import degrade_prompt, get_degrader, removal_count
from selfnpo.errors import SelfNPOError
from selfnpo.models.loading import load_pipeline
from selfnpo.models.sd import DiffusionModel
from selfnpo.objectives.base import OBJECTIVES, Batch, StepContext, mse
from selfnpo.objectives.ddspo import ddspo_loss, ddspo_objective
from selfnpo.objectives.dpo import dpo_loss
from selfnpo.objectives.r0 import ascent_surrogate, normalise_reward_grads, parse_rewards, r0_loss
from selfnpo.offsets import lora_layers
from selfnpo.rewards import register_reward
from selfnpo.sampling import ddim_sample, sample
from selfnpo.schedules import ddim_grid
from selfnpo.training.config import TrainConfig
from selfnpo.training.offset import STUDENT, TrainableOffset

PATTERN = torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)


@register_reward("test_linear_big")
def _big(device):
    return lambda images, prompts: 1000.0 * (images * PATTERN.to(images.device)).flatten(1).mean(1)


@register_reward("test_square_small")
def _small(device):
    return lambda images, prompts: 1e-3 * (images**2).flatten(1).mean(1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- prompt degradation --------------------------------------------------------------------------
def test_degrade_removes_the_stated_fraction_and_keeps_order():
    prompt = " ".join(f"w{i}" for i in range(10))
    counts = []
    for seed in range(300):
        out = degrade_prompt(prompt, _gen(seed)).split()
        counts.append(10 - len(out))
        assert out == sorted(out, key=lambda w: int(w[1:]))  # a subsequence, in order
        assert len(set(out)) == len(out) and set(out) <= set(prompt.split())
    assert min(counts) == 4 and max(counts) == 7  # 40 % .. 70 % of 10 tokens, both ends reached
    for seed in range(20):
        assert len(degrade_prompt(prompt, _gen(seed), low=0.5, high=0.5).split()) == 5
    assert removal_count(20, 0.4) == 8 and removal_count(20, 0.7) == 14


def test_degrade_never_empties_a_prompt_unless_asked():
    for prompt in ("circle", "red circle", "a red circle"):
        for seed in range(100):
            assert degrade_prompt(prompt, _gen(seed), low=1.0, high=1.0).strip()
    assert degrade_prompt("a red circle", _gen(0), low=1.0, high=1.0, allow_empty=True) == ""
    assert degrade_prompt("", _gen(0)) == ""


def test_pluggable_degraders(tmp_path):
    f = tmp_path / "rewrites.jsonl"
    f.write_text(json.dumps({"prompt": "a red circle", "degraded": "a blurry red circle"}) + "\n")
    assert get_degrader(str(f))("a red circle", _gen()) == "a blurry red circle"
    with pytest.raises(SelfNPOError, match="no rewrite"):
        get_degrader(str(f))("a blue square", _gen())
    plugged = get_degrader("selfnpo.degrade:degrade_prompt")  # any importable module:function
    assert plugged("a b c d e f", _gen(3)) == degrade_prompt("a b c d e f", _gen(3))
    with pytest.raises(SelfNPOError, match="cannot import"):
        get_degrader("selfnpo.degrade:no_such_function")
    with pytest.raises(SelfNPOError, match="unknown degrader"):
        get_degrader("nonsense")


# ---- the DDSPO loss ------------------------------------------------------------------------------
@pytest.mark.parametrize("convention", ["original", "diffusers"])
def test_ddspo_loss_with_noise_targets_is_diffusion_dpo(convention):
    g = _gen(1)
    pw, pl, rw, rl, ew, el = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(6))
    got = ddspo_loss(pw, pl, rw, rl, ew, el, 50.0, convention)
    want = dpo_loss(mse(pw, ew), mse(pl, el), mse(rw, ew), mse(rl, el), 50.0, convention)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_ddspo_loss_pulls_to_the_preferred_target_and_pushes_from_the_dispreferred():
    g = _gen(2)
    ref_w, ref_l, target_l = (torch.randn(2, 16, generator=g) for _ in range(3))
    pred_w, pred_l = ref_w + 0.1 * torch.randn(2, 16, generator=g), ref_l.clone()

    def loss(pw, pl):
        return ddspo_loss(pw, pl, ref_w, ref_l, ref_w, target_l, 10.0)  # eq. 7: target_w = ref_w

    base = loss(pred_w, pred_l)
    assert (loss(pred_w + 0.2 * (ref_w - pred_w), pred_l) < base).all()  # closer to c: better
    assert (loss(pred_w, pred_l + 0.2 * (target_l - pred_l)) > base).all()  # closer to c-: worse
    torch.testing.assert_close(loss(ref_w, ref_l), torch.full((2,), float(np.log(2))))  # student = ref


def _ctx(model_dir, objective: str, **kw):
    pipe = load_pipeline(model_dir, device="cpu", dtype="fp32")
    model = DiffusionModel(pipe)
    cfg = TrainConfig(model=model_dir, prompts="x", objective=objective, **kw)
    torch.manual_seed(0)
    off = TrainableOffset(model, cfg)
    with torch.no_grad():
        for p in off.params:  # move the student away from the reference
            p.add_(0.05 * torch.randn_like(p))
    return model, off, cfg


def test_ddspo_objective_with_noise_targets_equals_the_dpo_objective(tiny_sd):
    model, off, cfg = _ctx(tiny_sd, "ddspo", dpo_beta=100.0)
    prompts = ["a red circle", "green star", "a blue square"]
    g = _gen(3)
    x_w, x_l = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    batch = Batch(prompts, model.encode(prompts), x_w, x_l)

    def run(fn, **kw):
        ctx = StepContext(model, off.student, off.teacher, cfg, _gen(7), offset=off)
        return fn(ctx, batch, **kw)

    dpo = run(OBJECTIVES["dpo"])
    torch.testing.assert_close(run(ddspo_objective, noise_targets=True), dpo, rtol=0, atol=0)
    assert not torch.allclose(run(ddspo_objective), dpo)  # the reference's targets differ


@pytest.mark.parametrize(
    "objective,variant", [("ddspo", "paired"), ("ddspo", "unpaired"), ("ddspo_npo", "random_positive")]
)
def test_ddspo_trains_through_the_loop(tiny_sd, prompts_file, tmp_path, objective, variant):
    res = train_tiny(
        tiny_sd,
        tmp_path / "run",
        prompts_file,
        objective=objective,
        ddspo_variant=variant,
        ddspo_loser_steps=2,
    )
    assert np.isfinite(res.final_loss) and res.offset_path.exists()
    paired_cost = 2 * 2 * 2 * 2  # steps x batch x loser DDIM steps x (cond + uncond)
    step_cost = 2 * 2 * 5  # steps x batch x (student on 2 branches, reference on 2, reference under c-)
    assert res.network_evals == step_cost + (paired_cost if variant == "paired" else 0)


def test_unpaired_ddspo_needs_two_prompts(tiny_sd, prompts_file, tmp_path):
    with pytest.raises(SelfNPOError, match="batch-size >= 2"):
        train_tiny(
            tiny_sd, tmp_path / "run", prompts_file, objective="ddspo", ddspo_variant="unpaired", batch_size=1
        )


# ---- R0: gradient normalisation, regularisation, generator ----------------------------------------
def test_gradient_normalisation_makes_each_contribution_unit_norm():
    g = _gen(4)
    a, b = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    scales = torch.tensor([1e-4, 1.0, 1e4]).reshape(3, 1, 1, 1)
    for grads in ([a * scales], [a * 1e3, b * 1e-3]):
        one = [normalise_reward_grads([x], [1.0]) for x in grads]
        for x in one:
            torch.testing.assert_close(x.flatten(1).norm(dim=1), torch.ones(3))
        torch.testing.assert_close(normalise_reward_grads(grads, [1.0] * len(grads)), sum(one))
    torch.testing.assert_close(normalise_reward_grads([a, b], [2.0, 3.0], normalise=False), 2 * a + 3 * b)
    x = torch.randn(3, 4, 8, 8, generator=g, requires_grad=True)
    (grad,) = torch.autograd.grad(ascent_surrogate(x, b).sum(), x)
    torch.testing.assert_close(grad, -b)


def test_r0_loss_has_the_gradient_of_eq_3_5(tiny_sd):
    model, off, cfg = _ctx(
        tiny_sd,
        "r0",
        r0_rewards="test_linear_big:1.0,test_square_small:2.0",
        r0_cfg_weight=0.0,
        r0_reg_weight=0.0,
    )
    prompts = ["a red circle", "green star"]
    ctx = StepContext(model, off.student, off.teacher, cfg, _gen(5), offset=off)
    x = torch.randn(2, 4, 8, 8, generator=_gen(6), requires_grad=True)
    loss = r0_loss(ctx, Batch(prompts, model.encode(prompts)), x)
    (got,) = torch.autograd.grad(loss.sum(), x)
    # eq. 3.5 as written: sum_i w_i R_i(x) / sg(||dR_i/dx||), per sample
    images = model.decode_latents_grad(x)
    r1 = 1000.0 * (images * PATTERN).flatten(1).mean(1)
    r2 = 1e-3 * (images**2).flatten(1).mean(1)
    n1 = torch.autograd.grad(r1.sum(), x, retain_graph=True)[0].flatten(1).norm(dim=1)
    n2 = torch.autograd.grad(r2.sum(), x, retain_graph=True)[0].flatten(1).norm(dim=1)
    (want,) = torch.autograd.grad((-(r1 / n1.detach() + 2.0 * r2 / n2.detach())).sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss.detach(), -(r1 + 2.0 * r2).detach())  # the value: the rewards


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_weight_regularisation_is_zero_at_initialisation_and_the_squared_offset_after(tiny_sd, mode):
    pipe = load_pipeline(tiny_sd, device="cpu", dtype="fp32")
    model = DiffusionModel(pipe)
    torch.manual_seed(0)
    off = TrainableOffset(model, TrainConfig(model=tiny_sd, prompts="x", objective="r0", train=mode))
    assert off.sq_norm().item() == 0.0
    with torch.no_grad():
        for p in off.params:
            p.add_(0.01 * torch.randn_like(p))
    got = off.sq_norm()
    if mode == "full":
        want = sum(
            ((p - q) ** 2).sum() for p, q in zip(off.params, off.teacher_net.parameters(), strict=True)
        )
    else:  # ||W - W_0||^2 read off the layers' outputs on the identity (no LoRA algebra)
        want = 0.0
        with torch.no_grad():
            for layer in lora_layers(pipe.unet, STUDENT):
                eye = torch.eye(layer.in_features)
                want += ((layer(eye) - layer.base_layer(eye)) ** 2).sum()
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=got.dtype), rtol=1e-4, atol=0)
    got.backward()  # differentiable in every trained weight
    assert all(p.grad is not None for p in off.params) and any(p.grad.abs().sum() > 0 for p in off.params)


def test_stochastic_sampler_with_eta_one_is_ddim(tiny_sd):
    model = DiffusionModel(load_pipeline(tiny_sd, device="cpu", dtype="fp32"))
    cond = model.encode(["a red circle", "green star"])

    def f(x, t):
        return model.predict(x, t, cond)

    z, grid = torch.randn(2, 4, 8, 8, generator=_gen(8)), ddim_grid(4)
    with torch.no_grad():
        got = sample(
            model, f, z, grid, etas=torch.ones(4, 2), randn=lambda s: torch.randn(s, generator=_gen(9))
        )
        want = ddim_sample(model, f, z, grid)
        other = sample(
            model, f, z, grid, etas=torch.zeros(4, 2), randn=lambda s: torch.randn(s, generator=_gen(9))
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(other, want, atol=1e-3)  # eta = 0 injects fresh noise


def test_r0_scheduler_is_the_generator_at_a_fixed_eta(tiny_sd):
    from selfnpo.schedulers import R0Scheduler

    model = DiffusionModel(load_pipeline(tiny_sd, device="cpu", dtype="fp32"))
    cond = model.encode(["a red circle", "green star"])

    def f(x, t):
        return model.predict(x, t, cond)

    sched = R0Scheduler.from_config(model.pipe.scheduler.config, timestep_spacing="trailing")
    sched.r0_eta = 0.5
    sched.set_timesteps(4)
    assert [int(t) for t in sched.timesteps] == ddim_grid(4).flip(0).tolist()
    z, g = torch.randn(2, 4, 8, 8, generator=_gen(10)), _gen(11)
    noises = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(3)]
    with torch.no_grad():
        it = iter(noises)
        want = sample(model, f, z, ddim_grid(4), etas=torch.full((4, 2), 0.5), randn=lambda s: next(it))
        x, it = z, iter(noises)
        for i, t in enumerate(sched.timesteps):
            kw = {"variance_noise": next(it)} if i < 3 else {}
            x = sched.step(f(x, t.expand(2)), t, x, **kw).prev_sample
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-6)


def test_parse_rewards():
    assert parse_rewards("", "world") == [("world", 1.0)]
    assert parse_rewards("world:2, test_linear_big:0.5", "x") == [("world", 2.0), ("test_linear_big", 0.5)]
    for bad in ("world:abc", ":1", "world:-1"):
        with pytest.raises(SelfNPOError):
            parse_rewards(bad, "world")
    with pytest.raises(SelfNPOError, match="r0-rewards"):
        TrainConfig(model="m", prompts="p", objective="r0", r0_rewards="world:x").validate()


@pytest.mark.parametrize("objective,mode", [("r0", "full"), ("r0_plus", "lora")])
def test_r0_trains_through_the_loop(tiny_sd, prompts_file, tmp_path, objective, mode):
    res = train_tiny(
        tiny_sd,
        tmp_path / "run",
        prompts_file,
        objective=objective,
        train=mode,
        r0_rewards="test_square_small:1",
    )
    assert np.isfinite(res.final_loss)
    tensors = load_file(str(res.offset_path))
    assert tensors and any(v.abs().sum() > 0 for v in tensors.values())  # the generator moved


# ---- R0 on the embedded world ---------------------------------------------------------------------
def _four_step_images(pipe, prompts, scales, seed=123):
    """Decoded 4-step samples of the generator at eta = 1 (deterministic) with adapter ``scales``."""
    from selfnpo.offsets import adapter_scales

    model = DiffusionModel(pipe)
    cond = model.encode(prompts)
    z = torch.randn(model.latent_shape(len(prompts)), generator=_gen(seed))
    with torch.no_grad(), adapter_scales(pipe.unet, scales):
        x = sample(
            model,
            lambda x, t: model.predict(x, t, cond),
            z,
            ddim_grid(4),
            etas=torch.ones(4, len(prompts)),
            randn=torch.randn,  # its draws are weighted 0 at eta = 1
        )
        return model.decode_latents(x).clamp(-1, 1)


def test_a_few_r0_steps_raise_the_world_reward(tmp_path):
    from selfnpo.generate import GenerateConfig, generate
    from selfnpo.rewards import get_reward
    from selfnpo.training.offset import TEACHER
    from selfnpo.world.model import shipped_model_dir, world_prompts

    world, reward = str(shipped_model_dir()), get_reward("world")
    prompts = world_prompts(8, "train", 0)
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(prompts) + "\n")
    pipe = load_pipeline(world, device="cpu", dtype="fp32")
    before = reward(_four_step_images(pipe, prompts, {}), prompts)
    res = train_tiny(
        world, tmp_path / "run", str(pf), pipe=pipe, objective="r0", steps=10, batch_size=4, lr=1e-3
    )
    after = reward(_four_step_images(pipe, prompts, {TEACHER: 0.0}), prompts)
    assert after.mean() > before.mean() + 0.01, (before.mean(), after.mean())

    # 4-step generation through `generate` (offset as eta, no CFG, R0's step) draws the generator's images
    out = tmp_path / "gen"
    gen_cfg = GenerateConfig(
        model=world,
        prompts=str(pf),
        output_dir=str(out),
        positive_offset=str(res.offset_path),
        guidance_scale=1.0,
        steps=4,
        scheduler="R0Scheduler",
        device="cpu",
        dtype="fp32",
    )
    generate(gen_cfg, pipe=load_pipeline(world, device="cpu", dtype="fp32"), progress=False)
    pngs = [np.asarray(Image.open(out / f"{i:05d}.png")) for i in range(len(prompts))]
    png = torch.from_numpy(np.stack(pngs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    mine = torch.cat([_four_step_images(pipe, [p], {TEACHER: 0.0}, seed=i) for i, p in enumerate(prompts)])
    base = torch.cat(
        [_four_step_images(pipe, [p], {TEACHER: 0.0, STUDENT: 0.0}, seed=i) for i, p in enumerate(prompts)]
    )
    err, moved = (png - mine).abs().mean(), (png - base).abs().mean()
    assert err < 0.01 and err < 0.5 * moved, (err, moved)  # 8-bit rounding apart; not the base model
