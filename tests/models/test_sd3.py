"""SD3 (rectified flow, transformer, keyword call) through the same contract, loop and NPO guidance,
on a tiny random-weight StableDiffusion3Pipeline built offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import train_tiny
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from selfnpo.models import model_for
from selfnpo.models.loading import load_pipeline, resolve_model_class
from selfnpo.models.sd3 import SD3Model
from selfnpo.npo import NPOGuidance
from selfnpo.rewards import register_reward
from selfnpo.schedules import FlowSchedule
from selfnpo.training.offset import STUDENT, TEACHER


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from selfnpo.models.tiny import write_tiny_vocab
    from selfnpo.models.tiny_transformers import build_tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("sd3")
    build_tiny_sd3_pipeline(write_tiny_vocab(root / "tokenizer")).save_pretrained(root / "sd3")
    return str(root / "sd3")


@pytest.fixture(scope="module")
def sd3_lora(tiny_sd3, session_prompts, tmp_path_factory):
    return train_tiny(tiny_sd3, tmp_path_factory.mktemp("run") / "sd3", session_prompts).offset_path


def _load(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, g: float = 5.0, seed: int = 0):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(2)]
    return pipe(
        ["a red circle", "green star"],
        guidance_scale=g,
        num_inference_steps=3,
        generator=gens,
        output_type="np",
    ).images


def test_adapter_calls_the_transformer_as_the_pipeline_does(tiny_sd3):
    assert resolve_model_class(tiny_sd3) == "StableDiffusion3Pipeline"
    pipe = load_pipeline(tiny_sd3, device="cpu", dtype="fp32")
    model = model_for(pipe)
    assert isinstance(model, SD3Model) and isinstance(model.schedule, FlowSchedule)
    assert model.schedule.shift == 3.0 and model.prediction_type == "flow" and model.uncond_mode == "empty"
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    cond = model.encode(["a red circle", "green star"])
    emb, _, pooled, _ = pipe.encode_prompt(
        ["a red circle", "green star"], None, None, do_classifier_free_guidance=False
    )
    torch.testing.assert_close(cond.embeds, emb.detach(), rtol=1e-5, atol=1e-5)  # encoded one by one
    torch.testing.assert_close(cond.added["pooled_projections"], pooled.detach(), rtol=1e-5, atol=1e-5)
    emb, pooled = cond.embeds, cond.added["pooled_projections"]
    sigma = model.schedule.alpha_sigma(t)[1]
    with torch.no_grad():
        want = pipe.transformer(
            hidden_states=x,
            timestep=(sigma * 1000).float(),
            encoder_hidden_states=emb,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        got = model.predict(x, t, cond)
    assert torch.equal(got, want)
    torch.testing.assert_close(model.x0_of(got, x, t), x - sigma.float()[:, None, None, None] * got)
    unc = model.uncond(2)
    empty, _, pooled_e, _ = pipe.encode_prompt("", None, None, do_classifier_free_guidance=False)
    torch.testing.assert_close(unc.embeds[:1], empty.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unc.added["pooled_projections"][:1], pooled_e.detach(), rtol=1e-5, atol=1e-5)


def test_tdft_changes_only_the_student_adapter(tiny_sd3, prompts_file, tmp_path):
    pipe = load_pipeline(tiny_sd3, device="cpu", dtype="fp32")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    others = {
        name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    }
    res = train_tiny(tiny_sd3, tmp_path / "run", prompts_file, pipe=pipe, ema_decay=0.5)
    after = pipe.transformer.state_dict()
    base_keys = [k for k in after if "lora" not in k]
    assert {k.replace("base_layer.", "") for k in base_keys} == set(before)
    for k in base_keys:
        assert torch.equal(after[k], before[k.replace("base_layer.", "")]), k
    for name, sd in others.items():
        assert all(torch.equal(v, sd[k]) for k, v in getattr(pipe, name).state_dict().items()), name
    student_b = [v for k, v in after.items() if f"lora_B.{STUDENT}" in k]
    teacher_b = [v for k, v in after.items() if f"lora_B.{TEACHER}" in k]
    assert student_b and all(v.abs().sum() > 0 for v in student_b)
    assert all(v.abs().sum() > 0 for v in teacher_b)
    saved = load_file(str(res.offset_path))
    assert saved and all(k.startswith("transformer.") for k in saved)  # SD3's diffusers LoRA format
    assert json.loads((res.offset_path.parent / "selfnpo_offset.json").read_text())["objective"] == "tdft"


@register_reward("test_sd3_small")
def _small(device):
    return lambda images, prompts: 1e-3 * (images**2).flatten(1).mean(1)


@pytest.mark.parametrize(
    "objective,kw",
    [
        ("full_sim", {}),
        ("diffusion", {"source": "self"}),
        ("tdft", {"source": "self"}),
        ("ddspo", {"ddspo_variant": "paired", "ddspo_loser_steps": 2}),
        ("reward_npo", {"reward": "test_sd3_small", "reward_steps": 2}),
        ("r0_plus", {"r0_rewards": "test_sd3_small:1", "r0_steps": 2}),
    ],
)
def test_other_objectives_and_sources_run(tiny_sd3, prompts_file, tmp_path, objective, kw):
    res = train_tiny(
        tiny_sd3, tmp_path / "run", prompts_file, objective=objective, grid_steps=5, k_steps=2, **kw
    )
    assert np.isfinite(res.final_loss) and res.offset_path.is_file()


def test_resume_continues_exactly(tiny_sd3, prompts_file, tmp_path):
    kw = dict(steps=4, checkpoint_every=2, lr=1e-3, ema_decay=0.5)
    whole = train_tiny(tiny_sd3, tmp_path / "whole", prompts_file, **kw)
    train_tiny(tiny_sd3, tmp_path / "split", prompts_file, **{**kw, "steps": 2})
    resumed = train_tiny(tiny_sd3, tmp_path / "split", prompts_file, **kw, resume=True)
    a, b = load_file(str(whole.offset_path)), load_file(str(resumed.offset_path))
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zero_offsets_equal_the_plain_pipeline(tiny_sd3, sd3_lora):
    plain = _run(_load(tiny_sd3))
    pipe = _load(tiny_sd3)
    with NPOGuidance(pipe, negative=sd3_lora, alpha=0.0, beta=0.0):
        np.testing.assert_array_equal(_run(pipe), plain)
    with NPOGuidance(pipe, negative=sd3_lora, beta=1.0):
        changed = _run(pipe)
    assert np.abs(changed - plain).max() > 1e-4
    np.testing.assert_array_equal(_run(pipe), plain)  # detached: the base model again
    with NPOGuidance(pipe, negative=sd3_lora, beta=1.0):  # guidance 1: the positive branch only
        np.testing.assert_array_equal(_run(pipe, g=1.0), _run(_load(tiny_sd3), g=1.0))


def test_saved_lora_reproduces_the_negative_branch_in_plain_diffusers(tiny_sd3, sd3_lora):
    """A fresh pipeline + load_lora_weights(beta) gives exactly our negative half of SD3's batched
    keyword call; the positive half is the base transformer."""
    beta = 0.7
    ours = _load(tiny_sd3)
    ours._guidance_scale = 5.0  # what the pipeline sets during a call; turns the CFG split on
    ref = _load(tiny_sd3)
    ref.load_lora_weights(str(sd3_lora), adapter_name="neg")
    ref.set_adapters(["neg"], adapter_weights=[beta])
    base = _load(tiny_sd3)
    g = torch.Generator().manual_seed(3)
    kw = dict(
        hidden_states=torch.randn(4, 4, 8, 8, generator=g),
        timestep=torch.full((4,), 750.0),
        encoder_hidden_states=torch.randn(4, 333, 32, generator=g),
        pooled_projections=torch.randn(4, 64, generator=g),
        return_dict=False,
    )
    with NPOGuidance(ours, negative=sd3_lora, beta=beta):
        got = ours.transformer(**kw)[0]

    def half(i):
        return {k: (v[2 * i : 2 * i + 2] if torch.is_tensor(v) else v) for k, v in kw.items()}

    with torch.no_grad():
        want_neg = ref.transformer(**half(0))[0]
        want_pos = base.transformer(**half(1))[0]
        base_neg = base.transformer(**half(0))[0]
    torch.testing.assert_close(got[:2], want_neg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2:], want_pos, rtol=1e-5, atol=1e-6)
    assert (want_neg - base_neg).abs().max() > 1e-5


def test_an_offset_of_another_family_is_a_one_line_error(tiny_sd3, sd3_lora, tiny_sd, sd_lora):
    from selfnpo.errors import SelfNPOError

    for path, lora in ((tiny_sd3, sd_lora), (tiny_sd, sd3_lora)):
        with pytest.raises(SelfNPOError, match="another model family") as e:
            NPOGuidance(_load(path), negative=lora)
        assert "\n" not in str(e.value)


def test_generate_writes_images_and_refuses_a_vp_scheduler(tiny_sd3, sd3_lora, tmp_path):
    from PIL import Image

    from selfnpo.errors import SelfNPOError
    from selfnpo.generate import GenerateConfig, generate

    kw = dict(model=tiny_sd3, prompt="a red circle", steps=2, num_images_per_prompt=2, device="cpu")
    jobs = generate(
        GenerateConfig(**kw, negative_offset=str(sd3_lora), output_dir=str(tmp_path / "a")), progress=False
    )
    assert len(jobs) == 2 and Image.open(tmp_path / "a" / jobs[0]["file"]).size == (16, 16)
    with pytest.raises(SelfNPOError, match="flow-matching"):
        generate(
            GenerateConfig(**kw, scheduler="DDIMScheduler", output_dir=str(tmp_path / "b")), progress=False
        )


def test_preference_pairs_and_dpo_npo(tiny_sd3, prompts_file, tmp_path):
    from selfnpo.preference.build import PairsConfig, build_pairs

    pairs = build_pairs(
        PairsConfig(
            model=tiny_sd3,
            prompts=prompts_file,
            output_dir=str(tmp_path / "pairs"),
            reward="test_sd3_small",
            steps=2,
            device="cpu",
        ),
        progress=False,
    )
    res = train_tiny(tiny_sd3, tmp_path / "run", prompts_file, objective="dpo_npo", pairs=str(pairs))
    assert np.isfinite(res.final_loss) and res.offset_path.is_file()


def test_merged_offset_equals_the_lora_at_its_scale(tiny_sd3, sd3_lora, tmp_path):
    from selfnpo.algebra import merge_offsets

    merged = _load(str(merge_offsets(tiny_sd3, [(str(sd3_lora), 0.7)], tmp_path / "merged")))
    ref = _load(tiny_sd3)
    ref.load_lora_weights(str(sd3_lora), adapter_name="neg")
    ref.set_adapters(["neg"], adapter_weights=[0.7])
    g = torch.Generator().manual_seed(4)
    kw = dict(
        hidden_states=torch.randn(2, 4, 8, 8, generator=g),
        timestep=torch.full((2,), 400.0),
        encoder_hidden_states=torch.randn(2, 333, 32, generator=g),
        pooled_projections=torch.randn(2, 64, generator=g),
        return_dict=False,
    )
    with torch.no_grad():
        torch.testing.assert_close(
            merged.transformer(**kw)[0], ref.transformer(**kw)[0], rtol=1e-4, atol=1e-5
        )


def test_offset_plugs_into_a_fine_tuned_derivative_and_img2img(tiny_sd3, sd3_lora, tmp_path):
    """The papers' plug-and-play claim on SD3: a perturbed copy of the base (a stand-in for a
    community fine-tune) takes the offset; an img2img pipeline built from it is guided exactly."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    derived = _load(tiny_sd3)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in derived.transformer.parameters():
            p.add_(0.02 * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=g))
    derived.save_pretrained(tmp_path / "derived")
    img2img = StableDiffusion3Img2ImgPipeline(**_load(str(tmp_path / "derived")).components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(2, 3, 16, 16, generator=g)

    def run():
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return img2img(
            ["a red circle", "green star"],
            image=image,
            strength=0.7,
            guidance_scale=5.0,
            num_inference_steps=4,
            generator=gens,
            output_type="np",
        ).images

    plain = run()
    with NPOGuidance(img2img, negative=sd3_lora, beta=0.0):
        np.testing.assert_array_equal(run(), plain)
    with NPOGuidance(img2img, negative=sd3_lora, beta=1.0):
        assert np.abs(run() - plain).max() > 1e-4
    np.testing.assert_array_equal(run(), plain)
