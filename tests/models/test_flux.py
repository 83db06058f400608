"""Flux.1-dev (packed latents, dynamic time shift, guidance embedding, true CFG as two separate
calls) through the same contract, loop and NPO guidance, on a tiny random-weight FluxPipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_tiny
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from selfnpo.errors import SelfNPOError
from selfnpo.models import model_for
from selfnpo.models.flux import FluxModel
from selfnpo.models.loading import load_pipeline, resolve_model_class
from selfnpo.npo import NPOGuidance
from selfnpo.rewards import register_reward
from selfnpo.schedules import FlowSchedule
from selfnpo.training.offset import STUDENT, TEACHER

RES = 16  # 16 x 16 images -> 8 x 8 latents -> 16 packed tokens


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from selfnpo.models.tiny import write_tiny_vocab
    from selfnpo.models.tiny_transformers import build_tiny_flux_pipeline

    root = tmp_path_factory.mktemp("flux")
    tok = write_tiny_vocab(root / "tokenizer")
    build_tiny_flux_pipeline(tok).save_pretrained(root / "flux")
    build_tiny_flux_pipeline(tok, guidance_embeds=False).save_pretrained(root / "schnell")
    return str(root / "flux")


@pytest.fixture(scope="module")
def flux_lora(tiny_flux, session_prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "flux"
    return train_tiny(tiny_flux, out, session_prompts, resolution=RES).offset_path


def _load(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, true_cfg: float = 4.0, seed: int = 0):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(2)]
    return pipe(
        ["a red circle", "green star"],
        negative_prompt=["", ""],
        true_cfg_scale=true_cfg,
        height=RES,
        width=RES,
        num_inference_steps=3,
        generator=gens,
        output_type="np",
    ).images


def test_adapter_calls_the_transformer_as_the_pipeline_does(tiny_flux):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert resolve_model_class(tiny_flux) == "FluxPipeline"
    pipe = load_pipeline(tiny_flux, device="cpu", dtype="fp32")
    model = model_for(pipe, resolution=RES)
    assert isinstance(model, FluxModel) and isinstance(model.schedule, FlowSchedule)
    assert model.latent_shape(2) == (2, 16, 4)
    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)  # as FluxPipeline computes it for 16 tokens
    assert model.schedule.shift == pytest.approx(math.exp(mu))
    # the schedule's sigmas are the ones FluxPipeline samples with at this resolution
    sched = pipe.scheduler
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
    u = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    torch.testing.assert_close(model.schedule.sigma_at(u).float(), sched.sigmas[:4])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 4, generator=g), torch.tensor([10, 900])
    cond = model.encode(["a red circle", "green star"])
    emb, pooled, text_ids = pipe.encode_prompt(["a red circle", "green star"], None)
    torch.testing.assert_close(cond.embeds, emb, rtol=1e-4, atol=1e-4)  # encoded one by one
    sigma = model.schedule.alpha_sigma(t)[1]
    img_ids = pipe._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
    with torch.no_grad():
        want = pipe.transformer(
            hidden_states=x,
            timestep=(sigma * 1000).float() / 1000,
            guidance=torch.full((2,), 3.5),
            pooled_projections=cond.added["pooled_projections"],
            encoder_hidden_states=cond.embeds,
            txt_ids=text_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        got = model.predict(x, t, cond)
    assert torch.equal(got, want)
    # packing round trip through the pipeline's own (un)packing
    lat = torch.randn(2, 1, 8, 8, generator=g)
    packed = pipe._pack_latents(lat, 2, 1, 8, 8)
    assert torch.equal(pipe._unpack_latents(packed, RES, RES, model.vae_scale), lat)


def test_tdft_changes_only_the_student_adapter(tiny_flux, prompts_file, tmp_path):
    pipe = load_pipeline(tiny_flux, device="cpu", dtype="fp32")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    res = train_tiny(tiny_flux, tmp_path / "run", prompts_file, pipe=pipe, ema_decay=0.5, resolution=RES)
    after = pipe.transformer.state_dict()
    base_keys = [k for k in after if "lora" not in k]
    assert {k.replace("base_layer.", "") for k in base_keys} == set(before)
    for k in base_keys:
        assert torch.equal(after[k], before[k.replace("base_layer.", "")]), k
    assert all(v.abs().sum() > 0 for k, v in after.items() if f"lora_B.{STUDENT}" in k)
    assert any(f"lora_B.{TEACHER}" in k for k in after)
    saved = load_file(str(res.offset_path))
    assert saved and all(k.startswith("transformer.") for k in saved)
    meta = json.loads((res.offset_path.parent / "selfnpo_offset.json").read_text())
    assert meta["family"] == "flux" and meta["objective"] == "tdft"


@register_reward("test_flux_small")
def _small(device):
    return lambda images, prompts: 1e-3 * (images**2).flatten(1).mean(1)


@pytest.mark.parametrize(
    "objective,kw",
    [
        ("full_sim", {}),
        ("diffusion", {"source": "self"}),
        ("ddspo", {"ddspo_variant": "paired", "ddspo_loser_steps": 2}),
        ("reward_npo", {"reward": "test_flux_small", "reward_steps": 2}),
        ("r0_plus", {"r0_rewards": "test_flux_small:1", "r0_steps": 2}),
    ],
)
def test_other_objectives_run(tiny_flux, prompts_file, tmp_path, objective, kw):
    res = train_tiny(
        tiny_flux,
        tmp_path / "run",
        prompts_file,
        objective=objective,
        grid_steps=5,
        k_steps=2,
        resolution=RES,
        **kw,
    )
    assert np.isfinite(res.final_loss) and res.offset_path.is_file()


def test_resume_continues_exactly(tiny_flux, prompts_file, tmp_path):
    kw = dict(steps=4, checkpoint_every=2, lr=1e-3, ema_decay=0.5, resolution=RES, grid_steps=5, k_steps=2)
    whole = train_tiny(tiny_flux, tmp_path / "whole", prompts_file, **kw)
    train_tiny(tiny_flux, tmp_path / "split", prompts_file, **{**kw, "steps": 2})
    resumed = train_tiny(tiny_flux, tmp_path / "split", prompts_file, **kw, resume=True)
    a, b = load_file(str(whole.offset_path)), load_file(str(resumed.offset_path))
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zero_offsets_equal_the_plain_pipeline_under_true_cfg(tiny_flux, flux_lora):
    plain = _run(_load(tiny_flux))
    pipe = _load(tiny_flux)
    with NPOGuidance(pipe, negative=flux_lora, alpha=0.0, beta=0.0):
        np.testing.assert_array_equal(_run(pipe), plain)
    with NPOGuidance(pipe, negative=flux_lora, beta=1.0):
        changed = _run(pipe)
        # without true CFG there is no negative call: the offset never acts
        np.testing.assert_array_equal(_run(pipe, true_cfg=1.0), _run(_load(tiny_flux), true_cfg=1.0))
    assert np.abs(changed - plain).max() > 1e-4
    np.testing.assert_array_equal(_run(pipe), plain)  # detached: the base model again
    assert "cache_context" not in vars(pipe.transformer)  # the class's own method again


def test_saved_lora_reproduces_the_negative_call_in_plain_diffusers(tiny_flux, flux_lora):
    """Our call inside ``cache_context("uncond")`` equals a fresh pipeline with the LoRA loaded at
    beta; the ``"cond"`` call is the base transformer."""
    beta = 0.7
    ours, base = _load(tiny_flux), _load(tiny_flux)
    ref = _load(tiny_flux)
    ref.load_lora_weights(str(flux_lora), adapter_name="neg")
    ref.set_adapters(["neg"], adapter_weights=[beta])
    g = torch.Generator().manual_seed(3)
    kw = dict(
        hidden_states=torch.randn(2, 16, 4, generator=g),
        timestep=torch.full((2,), 0.75),
        guidance=torch.full((2,), 3.5),
        pooled_projections=torch.randn(2, 32, generator=g),
        encoder_hidden_states=torch.randn(2, 12, 32, generator=g),
        txt_ids=torch.zeros(12, 3),
        img_ids=ours._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
        return_dict=False,
    )
    with NPOGuidance(ours, negative=flux_lora, beta=beta), torch.no_grad():
        with ours.transformer.cache_context("uncond"):
            got_neg = ours.transformer(**kw)[0]
        with ours.transformer.cache_context("cond"):
            got_pos = ours.transformer(**kw)[0]
    with torch.no_grad():
        want_neg, want_pos = ref.transformer(**kw)[0], base.transformer(**kw)[0]
    torch.testing.assert_close(got_neg, want_neg, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_pos, want_pos)
    assert (want_neg - want_pos).abs().max() > 1e-5


def test_other_families_and_distilled_models_are_one_line_errors(tiny_flux, flux_lora, tiny_sd, sd_lora):
    schnell = str(Path(tiny_flux).parent / "schnell")
    for call in (
        lambda: NPOGuidance(_load(tiny_flux), negative=sd_lora),
        lambda: NPOGuidance(_load(tiny_sd), negative=flux_lora),
        lambda: NPOGuidance(_load(schnell), negative=flux_lora),
        lambda: load_pipeline(schnell, device="cpu", dtype="fp32"),
        lambda: model_for(_load(schnell)),
    ):
        with pytest.raises(SelfNPOError, match="another model family|timestep-distilled") as e:
            call()
        assert "\n" not in str(e.value)


def test_generate_runs_true_cfg_so_the_offset_acts(tiny_flux, flux_lora, tmp_path):
    from PIL import Image

    from selfnpo.generate import GenerateConfig, generate

    kw = dict(
        model=tiny_flux, prompt="a red circle", steps=2, resolution=RES, device="cpu", guidance_scale=4.0
    )
    a = generate(
        GenerateConfig(**kw, negative_offset=str(flux_lora), output_dir=str(tmp_path / "a")), progress=False
    )
    b = generate(
        GenerateConfig(**kw, negative_offset=str(flux_lora), beta=0.0, output_dir=str(tmp_path / "b")),
        progress=False,
    )
    im_a = np.asarray(Image.open(tmp_path / "a" / a[0]["file"]), dtype=np.float32)
    im_b = np.asarray(Image.open(tmp_path / "b" / b[0]["file"]), dtype=np.float32)
    assert im_a.shape == (RES, RES, 3) and np.abs(im_a - im_b).max() > 0


def test_merged_offset_equals_the_lora_at_its_scale(tiny_flux, flux_lora, tmp_path):
    from selfnpo.algebra import merge_offsets

    merged = _load(str(merge_offsets(tiny_flux, [(str(flux_lora), 0.7)], tmp_path / "merged")))
    ref = _load(tiny_flux)
    ref.load_lora_weights(str(flux_lora), adapter_name="neg")
    ref.set_adapters(["neg"], adapter_weights=[0.7])
    g = torch.Generator().manual_seed(4)
    kw = dict(
        hidden_states=torch.randn(2, 16, 4, generator=g),
        timestep=torch.full((2,), 0.4),
        guidance=torch.full((2,), 3.5),
        pooled_projections=torch.randn(2, 32, generator=g),
        encoder_hidden_states=torch.randn(2, 12, 32, generator=g),
        txt_ids=torch.zeros(12, 3),
        img_ids=ref._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
        return_dict=False,
    )
    with torch.no_grad():
        torch.testing.assert_close(
            merged.transformer(**kw)[0], ref.transformer(**kw)[0], rtol=1e-4, atol=1e-5
        )
