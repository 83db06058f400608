"""Wan 2.1 (flow, video latents [B, C, F, H, W], CFG as two separate calls) through the same
contract, loop and NPO guidance, on a tiny random-weight WanPipeline; two-expert Wan 2.2 refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_tiny
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from selfnpo.errors import SelfNPOError
from selfnpo.models import model_for
from selfnpo.models.loading import load_pipeline, resolve_model_class
from selfnpo.models.wan import WanModel
from selfnpo.npo import NPOGuidance
from selfnpo.schedules import FlowSchedule
from selfnpo.training.offset import STUDENT

RES, FRAMES = 16, 5  # 16 x 16 frames -> 2 x 2 latents; 5 frames -> 2 latent frames
KW = dict(resolution=RES, frames=FRAMES, grid_steps=5, k_steps=2)


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from selfnpo.models.tiny import write_tiny_vocab
    from selfnpo.models.tiny_transformers import build_tiny_wan_pipeline

    root = tmp_path_factory.mktemp("wan")
    tok = write_tiny_vocab(root / "tokenizer")
    build_tiny_wan_pipeline(tok).save_pretrained(root / "wan")
    build_tiny_wan_pipeline(tok, two_experts=True).save_pretrained(root / "wan22")
    return str(root / "wan")


@pytest.fixture(scope="module")
def wan_lora(tiny_wan, session_prompts, tmp_path_factory):
    return train_tiny(tiny_wan, tmp_path_factory.mktemp("run") / "wan", session_prompts, **KW).offset_path


def _load(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, g: float = 5.0, seed: int = 0):
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


def test_adapter_calls_the_transformer_as_the_pipeline_does(tiny_wan):
    assert resolve_model_class(tiny_wan) == "WanPipeline"
    pipe = load_pipeline(tiny_wan, device="cpu", dtype="fp32")
    model = model_for(pipe, resolution=RES, frames=FRAMES)
    assert isinstance(model, WanModel) and isinstance(model.schedule, FlowSchedule)
    assert model.schedule.shift == 3.0 and model.latent_shape(2) == (2, 16, 2, 2, 2)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 2, 2, 2, generator=g), torch.tensor([10, 900])
    cond = model.encode(["a red circle", "green star"])
    emb, _ = pipe.encode_prompt(
        ["a red circle", "green star"], do_classifier_free_guidance=False, max_sequence_length=512
    )
    torch.testing.assert_close(cond.embeds, emb, rtol=1e-4, atol=1e-4)  # encoded one by one
    sigma = model.schedule.alpha_sigma(t)[1]
    with torch.no_grad():
        want = pipe.transformer(
            hidden_states=x,
            timestep=(sigma * 1000).float(),
            encoder_hidden_states=cond.embeds,
            return_dict=False,
        )[0]
        got = model.predict(x, t, cond)
    assert torch.equal(got, want)
    assert model.decode_latents(x).shape == (2, 3, FRAMES, RES, RES)
    unc = model.uncond(2)
    empty, _ = pipe.encode_prompt("", do_classifier_free_guidance=False, max_sequence_length=512)
    torch.testing.assert_close(unc.embeds[:1], empty, rtol=1e-5, atol=1e-5)


def test_tdft_changes_only_the_student_adapter(tiny_wan, prompts_file, tmp_path):
    pipe = load_pipeline(tiny_wan, device="cpu", dtype="fp32")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    res = train_tiny(tiny_wan, tmp_path / "run", prompts_file, pipe=pipe, ema_decay=0.5, **KW)
    after = pipe.transformer.state_dict()
    base_keys = [k for k in after if "lora" not in k]
    assert {k.replace("base_layer.", "") for k in base_keys} == set(before)
    for k in base_keys:
        assert torch.equal(after[k], before[k.replace("base_layer.", "")]), k
    assert all(v.abs().sum() > 0 for k, v in after.items() if f"lora_B.{STUDENT}" in k)
    saved = load_file(str(res.offset_path))
    assert saved and all(k.startswith("transformer.") for k in saved)
    assert json.loads((res.offset_path.parent / "selfnpo_offset.json").read_text())["family"] == "wan"


@pytest.mark.parametrize(
    "objective,kw",
    [
        ("full_sim", {}),
        ("diffusion", {"source": "self"}),
        ("ddspo", {"ddspo_variant": "paired", "ddspo_loser_steps": 2}),
    ],
)
def test_other_objectives_run(tiny_wan, prompts_file, tmp_path, objective, kw):
    res = train_tiny(tiny_wan, tmp_path / "run", prompts_file, objective=objective, **KW, **kw)
    assert np.isfinite(res.final_loss) and res.offset_path.is_file()


def test_resume_continues_exactly(tiny_wan, prompts_file, tmp_path):
    kw = dict(steps=4, checkpoint_every=2, lr=1e-3, ema_decay=0.5, **KW)
    whole = train_tiny(tiny_wan, tmp_path / "whole", prompts_file, **kw)
    train_tiny(tiny_wan, tmp_path / "split", prompts_file, **{**kw, "steps": 2})
    resumed = train_tiny(tiny_wan, tmp_path / "split", prompts_file, **kw, resume=True)
    a, b = load_file(str(whole.offset_path)), load_file(str(resumed.offset_path))
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zero_offsets_equal_the_plain_pipeline(tiny_wan, wan_lora):
    plain = _run(_load(tiny_wan))
    pipe = _load(tiny_wan)
    with NPOGuidance(pipe, negative=wan_lora, alpha=0.0, beta=0.0):
        np.testing.assert_array_equal(_run(pipe), plain)
    with NPOGuidance(pipe, negative=wan_lora, beta=1.0):
        changed = _run(pipe)
        np.testing.assert_array_equal(_run(pipe, g=1.0), _run(_load(tiny_wan), g=1.0))  # no uncond call
    assert np.abs(changed - plain).max() > 1e-4
    np.testing.assert_array_equal(_run(pipe), plain)
    assert "cache_context" not in vars(pipe.transformer)


def test_saved_lora_reproduces_the_negative_call_in_plain_diffusers(tiny_wan, wan_lora):
    beta = 0.7
    ours, base = _load(tiny_wan), _load(tiny_wan)
    ref = _load(tiny_wan)
    ref.load_lora_weights(str(wan_lora), adapter_name="neg")
    ref.set_adapters(["neg"], adapter_weights=[beta])
    g = torch.Generator().manual_seed(3)
    kw = dict(
        hidden_states=torch.randn(2, 16, 2, 2, 2, generator=g),
        timestep=torch.full((2,), 750.0),
        encoder_hidden_states=torch.randn(2, 12, 32, generator=g),
        return_dict=False,
    )
    with NPOGuidance(ours, negative=wan_lora, beta=beta), torch.no_grad():
        with ours.transformer.cache_context("uncond"):
            got_neg = ours.transformer(**kw)[0]
        with ours.transformer.cache_context("cond"):
            got_pos = ours.transformer(**kw)[0]
    with torch.no_grad():
        want_neg, want_pos = ref.transformer(**kw)[0], base.transformer(**kw)[0]
    torch.testing.assert_close(got_neg, want_neg, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_pos, want_pos)
    assert (want_neg - want_pos).abs().max() > 1e-5


def test_other_families_and_two_expert_wan_are_one_line_errors(
    tiny_wan, wan_lora, tiny_sd, sd_lora, tmp_path
):
    from selfnpo.models.tiny import write_tiny_vocab
    from selfnpo.models.tiny_transformers import build_tiny_flux_pipeline

    wan22 = str(Path(tiny_wan).parent / "wan22")
    flux = build_tiny_flux_pipeline(write_tiny_vocab(tmp_path / "tok"))
    renamed = tmp_path / "foreign"  # a Wan LoRA without selfnpo's metadata: caught by its layer names
    renamed.mkdir()
    (renamed / "pytorch_lora_weights.safetensors").write_bytes(Path(wan_lora).read_bytes())
    for call, match in (
        (lambda: NPOGuidance(_load(tiny_wan), negative=sd_lora), "another model family"),
        (lambda: NPOGuidance(_load(tiny_sd), negative=wan_lora), "another model family"),
        (lambda: NPOGuidance(flux, negative=wan_lora), "another model family"),
        (lambda: NPOGuidance(flux, negative=renamed), "another model family"),
        (lambda: NPOGuidance(_load(wan22), negative=wan_lora), "two experts"),
        (lambda: load_pipeline(wan22, device="cpu", dtype="fp32"), "two experts"),
    ):
        with pytest.raises(SelfNPOError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("fmt", ["mp4", "gif"])
def test_generate_writes_videos(tiny_wan, wan_lora, tmp_path, fmt):
    from PIL import Image

    from selfnpo.generate import GenerateConfig, generate

    kw = dict(model=tiny_wan, prompt="a red circle", steps=2, num_images_per_prompt=2, device="cpu")
    kw.update(resolution=RES, frames=FRAMES, guidance_scale=5.0, video_format=fmt)
    jobs = generate(
        GenerateConfig(**kw, negative_offset=str(wan_lora), output_dir=str(tmp_path / "a")), progress=False
    )
    files = [tmp_path / "a" / j["file"] for j in jobs]
    assert [f.suffix for f in files] == [f".{fmt}"] * 2 and all(f.is_file() for f in files)
    if fmt == "gif":
        im = Image.open(files[0])
        assert im.size == (RES, RES) and im.n_frames == FRAMES
    else:
        import imageio_ffmpeg

        reader = imageio_ffmpeg.read_frames(str(files[0]))
        meta = next(reader)
        assert tuple(meta["size"]) == (RES, RES) and sum(1 for _ in reader) == FRAMES
    # resuming skips what exists; beta 0 writes other videos than beta 1 with the same seeds
    generate(
        GenerateConfig(**kw, output_dir=str(tmp_path / "a"), negative_offset=str(wan_lora), resume=True),
        progress=False,
    )
    generate(
        GenerateConfig(**kw, output_dir=str(tmp_path / "b"), negative_offset=str(wan_lora), beta=0.0),
        progress=False,
    )
    assert files[0].read_bytes() != (tmp_path / "b" / jobs[0]["file"]).read_bytes()


def test_video_falls_back_to_gif_without_imageio_ffmpeg(monkeypatch):
    import importlib.util

    from selfnpo import video

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "imageio_ffmpeg" else real(n, *a)
    )
    assert video.video_format("mp4") == "gif" and video.video_format("gif") == "gif"


def test_merged_offset_equals_the_lora_at_its_scale(tiny_wan, wan_lora, tmp_path):
    from selfnpo.algebra import merge_offsets

    merged = _load(str(merge_offsets(tiny_wan, [(str(wan_lora), 0.7)], tmp_path / "merged")))
    ref = _load(tiny_wan)
    ref.load_lora_weights(str(wan_lora), adapter_name="neg")
    ref.set_adapters(["neg"], adapter_weights=[0.7])
    g = torch.Generator().manual_seed(4)
    kw = dict(
        hidden_states=torch.randn(2, 16, 2, 2, 2, generator=g),
        timestep=torch.full((2,), 400.0),
        encoder_hidden_states=torch.randn(2, 12, 32, generator=g),
        return_dict=False,
    )
    with torch.no_grad():
        torch.testing.assert_close(
            merged.transformer(**kw)[0], ref.transformer(**kw)[0], rtol=1e-4, atol=1e-5
        )
