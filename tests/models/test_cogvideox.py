"""CogVideoX (VP v-prediction on its own zero-terminal-SNR schedule, video latents [B, F, C, H, W],
CFG as one batched keyword call) through the same contract, loop and NPO guidance, on a tiny
random-weight CogVideoXPipeline with rotary position embeddings (the 5B type)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import train_tiny
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from selfnpo.errors import SelfNPOError
from selfnpo.models import model_for
from selfnpo.models.cogvideox import CogVideoXModel
from selfnpo.models.loading import load_pipeline, resolve_model_class
from selfnpo.npo import NPOGuidance
from selfnpo.schedules import VPSchedule
from selfnpo.training.offset import STUDENT

RES, FRAMES = 16, 9  # 16 x 16 frames -> 2 x 2 latents; 9 frames -> 3 latent frames
KW = dict(resolution=RES, frames=FRAMES, grid_steps=5, k_steps=2)


@pytest.fixture(scope="module")
def tiny_cog(tmp_path_factory):
    from selfnpo.models.tiny import write_tiny_vocab
    from selfnpo.models.tiny_transformers import build_tiny_cogvideox_pipeline

    root = tmp_path_factory.mktemp("cogvideox")
    build_tiny_cogvideox_pipeline(write_tiny_vocab(root / "tokenizer")).save_pretrained(root / "cog")
    return str(root / "cog")


@pytest.fixture(scope="module")
def cog_lora(tiny_cog, session_prompts, tmp_path_factory):
    return train_tiny(tiny_cog, tmp_path_factory.mktemp("run") / "cog", session_prompts, **KW).offset_path


def _load(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, g: float = 6.0, seed: int = 0):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(2)]
    return pipe(
        ["a red circle", "green star"],
        guidance_scale=g,
        height=RES,
        width=RES,
        num_frames=FRAMES,
        num_inference_steps=3,
        generator=gens,
        output_type="np",
    ).frames


def test_adapter_calls_the_transformer_as_the_pipeline_does(tiny_cog):
    assert resolve_model_class(tiny_cog) == "CogVideoXPipeline"
    pipe = load_pipeline(tiny_cog, device="cpu", dtype="fp32")
    model = model_for(pipe, resolution=RES, frames=FRAMES)
    assert isinstance(model, CogVideoXModel) and isinstance(model.schedule, VPSchedule)
    assert model.prediction_type == "v_prediction" and model.latent_shape(2) == (2, 3, 4, 2, 2)
    # the schedule is the scheduler's own (SNR-shifted, zero terminal SNR), not a generic one
    assert torch.equal(model.schedule.alphas_cumprod, pipe.scheduler.alphas_cumprod.double())
    assert model.schedule.alpha_sigma(torch.tensor([999]))[0].item() == 0.0
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 4, 2, 2, generator=g), torch.tensor([10, 900])
    cond = model.encode(["a red circle", "green star"])
    emb, _ = pipe.encode_prompt(["a red circle", "green star"], do_classifier_free_guidance=False)
    torch.testing.assert_close(cond.embeds, emb, rtol=1e-4, atol=1e-4)  # encoded one by one
    rotary = pipe._prepare_rotary_positional_embeddings(RES, RES, 3, "cpu")
    with torch.no_grad():
        want = pipe.transformer(
            hidden_states=x,
            encoder_hidden_states=cond.embeds,
            timestep=t,
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]
        got = model.predict(x, t, cond)
    assert torch.equal(got, want)
    a, s = model.coeffs(t, x)
    torch.testing.assert_close(model.x0_of(got, x, t), a * x - s * got)  # v-prediction
    assert model.decode_latents(x).shape == (2, 3, FRAMES, RES, RES)


def test_tdft_changes_only_the_student_adapter(tiny_cog, prompts_file, tmp_path):
    pipe = load_pipeline(tiny_cog, device="cpu", dtype="fp32")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    res = train_tiny(tiny_cog, tmp_path / "run", prompts_file, pipe=pipe, ema_decay=0.5, **KW)
    after = pipe.transformer.state_dict()
    base_keys = [k for k in after if "lora" not in k]
    assert {k.replace("base_layer.", "") for k in base_keys} == set(before)
    for k in base_keys:
        assert torch.equal(after[k], before[k.replace("base_layer.", "")]), k
    assert all(v.abs().sum() > 0 for k, v in after.items() if f"lora_B.{STUDENT}" in k)
    saved = load_file(str(res.offset_path))
    assert saved and all(k.startswith("transformer.") for k in saved)
    assert json.loads((res.offset_path.parent / "selfnpo_offset.json").read_text())["family"] == "cogvideox"


@pytest.mark.parametrize(
    "objective,kw",
    [
        ("full_sim", {}),
        ("diffusion", {"source": "self"}),
        ("ddspo", {"ddspo_variant": "paired", "ddspo_loser_steps": 2}),
    ],
)
def test_other_objectives_run(tiny_cog, prompts_file, tmp_path, objective, kw):
    res = train_tiny(tiny_cog, tmp_path / "run", prompts_file, objective=objective, **KW, **kw)
    assert np.isfinite(res.final_loss) and res.offset_path.is_file()


def test_resume_continues_exactly(tiny_cog, prompts_file, tmp_path):
    kw = dict(steps=4, checkpoint_every=2, lr=1e-3, ema_decay=0.5, **KW)
    whole = train_tiny(tiny_cog, tmp_path / "whole", prompts_file, **kw)
    train_tiny(tiny_cog, tmp_path / "split", prompts_file, **{**kw, "steps": 2})
    resumed = train_tiny(tiny_cog, tmp_path / "split", prompts_file, **kw, resume=True)
    a, b = load_file(str(whole.offset_path)), load_file(str(resumed.offset_path))
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zero_offsets_equal_the_plain_pipeline(tiny_cog, cog_lora):
    plain = _run(_load(tiny_cog))
    pipe = _load(tiny_cog)
    with NPOGuidance(pipe, negative=cog_lora, alpha=0.0, beta=0.0):
        np.testing.assert_array_equal(_run(pipe), plain)
    with NPOGuidance(pipe, negative=cog_lora, beta=1.0):
        changed = _run(pipe)
    assert np.abs(changed - plain).max() > 1e-4
    np.testing.assert_array_equal(_run(pipe), plain)


def test_saved_lora_reproduces_the_negative_half_in_plain_diffusers(tiny_cog, cog_lora):
    beta = 0.7
    ours = _load(tiny_cog)
    ours._guidance_scale = 6.0  # what the pipeline sets during a call; turns the CFG split on
    base, ref = _load(tiny_cog), _load(tiny_cog)
    ref.load_lora_weights(str(cog_lora), adapter_name="neg")
    ref.set_adapters(["neg"], adapter_weights=[beta])
    g = torch.Generator().manual_seed(3)
    kw = dict(
        hidden_states=torch.randn(4, 3, 4, 2, 2, generator=g),
        encoder_hidden_states=torch.randn(4, 226, 32, generator=g),
        timestep=torch.full((4,), 750),
        image_rotary_emb=ours._prepare_rotary_positional_embeddings(RES, RES, 3, "cpu"),
        return_dict=False,
    )
    with NPOGuidance(ours, negative=cog_lora, beta=beta), torch.no_grad():
        with ours.transformer.cache_context("cond_uncond"):  # as the pipeline calls it
            got = ours.transformer(**kw)[0]

    def half(i):
        return {k: (v[2 * i : 2 * i + 2] if torch.is_tensor(v) else v) for k, v in kw.items()}

    with torch.no_grad():
        want_neg, want_pos = ref.transformer(**half(0))[0], base.transformer(**half(1))[0]
        base_neg = base.transformer(**half(0))[0]
    torch.testing.assert_close(got[:2], want_neg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2:], want_pos, rtol=1e-5, atol=1e-6)
    assert (want_neg - base_neg).abs().max() > 1e-5


def test_an_offset_of_another_family_is_a_one_line_error(tiny_cog, cog_lora, tiny_sd, sd_lora, tmp_path):
    from pathlib import Path

    from selfnpo.models.tiny import write_tiny_vocab
    from selfnpo.models.tiny_transformers import build_tiny_wan_pipeline

    wan = build_tiny_wan_pipeline(write_tiny_vocab(tmp_path / "tok"))
    foreign = tmp_path / "foreign"  # no selfnpo metadata: caught by the layers it names
    foreign.mkdir()
    (foreign / "pytorch_lora_weights.safetensors").write_bytes(Path(cog_lora).read_bytes())
    for call in (
        lambda: NPOGuidance(_load(tiny_cog), negative=sd_lora),
        lambda: NPOGuidance(_load(tiny_sd), negative=cog_lora),
        lambda: NPOGuidance(wan, negative=cog_lora),
        lambda: NPOGuidance(wan, negative=foreign),
    ):
        with pytest.raises(SelfNPOError, match="another model family") as e:
            call()
        assert "\n" not in str(e.value)


def test_merged_offset_equals_the_lora_at_its_scale(tiny_cog, cog_lora, tmp_path):
    from selfnpo.algebra import merge_offsets

    merged = _load(str(merge_offsets(tiny_cog, [(str(cog_lora), 0.7)], tmp_path / "merged")))
    ref = _load(tiny_cog)
    ref.load_lora_weights(str(cog_lora), adapter_name="neg")
    ref.set_adapters(["neg"], adapter_weights=[0.7])
    g = torch.Generator().manual_seed(4)
    kw = dict(
        hidden_states=torch.randn(2, 3, 4, 2, 2, generator=g),
        encoder_hidden_states=torch.randn(2, 226, 32, generator=g),
        timestep=torch.full((2,), 400),
        image_rotary_emb=ref._prepare_rotary_positional_embeddings(RES, RES, 3, "cpu"),
        return_dict=False,
    )
    with torch.no_grad():
        torch.testing.assert_close(
            merged.transformer(**kw)[0], ref.transformer(**kw)[0], rtol=1e-4, atol=1e-5
        )


def test_rotary_embeddings_are_not_split_with_the_batch(tiny_cog, cog_lora):
    """13 frames -> 4 latent frames -> 4 rotary positions, as many as the CFG batch of 2 prompts:
    the position tables must still go whole to both halves."""

    def run(pipe):
        return pipe(
            ["a red circle", "green star"],
            guidance_scale=6.0,
            height=RES,
            width=RES,
            num_frames=13,
            num_inference_steps=2,
            generator=[torch.Generator().manual_seed(i) for i in range(2)],
            output_type="np",
        ).frames

    plain = run(_load(tiny_cog))
    pipe = _load(tiny_cog)
    with NPOGuidance(pipe, negative=cog_lora, beta=1e-12):  # branches differ: the call is split
        np.testing.assert_allclose(run(pipe), plain, atol=1e-5)


def test_generate_writes_gif_videos(tiny_cog, cog_lora, tmp_path):
    from PIL import Image

    from selfnpo.generate import GenerateConfig, generate

    cfg = GenerateConfig(
        model=tiny_cog,
        prompt="a red circle",
        steps=2,
        resolution=RES,
        frames=FRAMES,
        guidance_scale=6.0,
        video_format="gif",
        negative_offset=str(cog_lora),
        device="cpu",
        output_dir=str(tmp_path / "v"),
    )
    jobs = generate(cfg, progress=False)
    im = Image.open(tmp_path / "v" / jobs[0]["file"])
    assert jobs[0]["file"].endswith(".gif") and im.size == (RES, RES) and im.n_frames == FRAMES
