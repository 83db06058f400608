"""NPO guidance on real diffusers pipelines: exactness against plain diffusers, LoRA round trips."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from selfnpo.npo import DELTA, NPOGuidance


def _load(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, sched: str, seed: int = 0, g: float = 5.0):
    pipe.scheduler = getattr(diffusers, sched).from_config(pipe.scheduler.config)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(2)]
    return pipe(
        ["a red circle", "green star"],
        guidance_scale=g,
        num_inference_steps=4,
        generator=gens,
        output_type="np",
    ).images


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("sched", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_zero_offsets_equal_plain_diffusers(kind, sched, tiny_dir, sd_lora, sdxl_lora):
    path = str(tiny_dir / kind)
    lora = sd_lora if kind == "sd" else sdxl_lora
    plain = _run(_load(path), sched)
    pipe2 = _load(path)
    with NPOGuidance(pipe2, negative=lora, alpha=0.0, beta=0.0):
        out = _run(pipe2, sched)
    np.testing.assert_array_equal(out, plain)
    with NPOGuidance(pipe2, negative=lora, alpha=0.0, beta=1.0):
        changed = _run(pipe2, sched)
    assert np.abs(changed - plain).max() > 1e-4
    np.testing.assert_array_equal(_run(pipe2, sched), plain)  # detached: the base model again


def test_guidance_one_uses_positive_branch_only(tiny_sd, sd_lora):
    plain = _run(_load(tiny_sd), "DDIMScheduler", g=1.0)
    pipe = _load(tiny_sd)
    with NPOGuidance(pipe, negative=sd_lora, beta=1.0):
        np.testing.assert_array_equal(_run(pipe, "DDIMScheduler", g=1.0), plain)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_saved_lora_reproduces_the_negative_branch_in_plain_diffusers(kind, tiny_dir, sd_lora, sdxl_lora):
    """A fresh pipeline + load_lora_weights(beta) gives exactly our negative half; the other half is base."""
    path, lora = str(tiny_dir / kind), (sd_lora if kind == "sd" else sdxl_lora)
    beta = 0.7
    ours = _load(path)
    ours._guidance_scale = 5.0  # what the pipeline sets during a call; turns the CFG split on
    ref = _load(path)
    ref.load_lora_weights(str(lora), adapter_name="neg")
    ref.set_adapters(["neg"], adapter_weights=[beta])
    base = _load(path)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor(500)
    emb = torch.randn(4, 77, base.unet.config.cross_attention_dim, generator=g)
    kw = {}
    if kind == "sdxl":
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(4, 32, generator=g),
            "time_ids": torch.rand(4, 6, generator=g) * 64,
        }
    with NPOGuidance(ours, negative=lora, beta=beta):
        got = ours.unet(x, t, encoder_hidden_states=emb, **kw).sample
    with torch.no_grad():
        half = {k: {kk: vv[:2] for kk, vv in v.items()} for k, v in kw.items()}
        want_neg = ref.unet(x[:2], t, encoder_hidden_states=emb[:2], **half).sample
        half = {k: {kk: vv[2:] for kk, vv in v.items()} for k, v in kw.items()}
        want_pos = base.unet(x[2:], t, encoder_hidden_states=emb[2:], **half).sample
    torch.testing.assert_close(got[:2], want_neg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2:], want_pos, rtol=1e-5, atol=1e-6)
    assert (
        want_neg
        - base.unet(
            x[:2],
            t,
            encoder_hidden_states=emb[:2],
            **{k: {kk: vv[:2] for kk, vv in v.items()} for k, v in kw.items()},
        ).sample
    ).abs().max() > 1e-5


def test_full_delta_and_lora_scale_agree(tiny_sd, sd_lora, tmp_path):
    """Merging the LoRA into a full-weight delta gives the same negative branch (full-delta path)."""
    from selfnpo.offsets import lora_layers, save_full_delta

    pipe = _load(tiny_sd)
    pipe.load_lora_weights(str(sd_lora), adapter_name="m")
    base = {k: v.clone() for k, v in _load(tiny_sd).unet.state_dict().items()}
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    assert lora_layers(pipe.unet, "m") == []
    delta = {
        k: v - base[k] for k, v in pipe.unet.state_dict().items() if k in base and not torch.equal(v, base[k])
    }
    assert delta
    save_full_delta(tmp_path / "full_delta.safetensors", delta, {"base_model": tiny_sd})
    a, b = _load(tiny_sd), _load(tiny_sd)
    a._guidance_scale = b._guidance_scale = 5.0
    g = torch.Generator().manual_seed(1)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with NPOGuidance(a, negative=sd_lora, beta=0.5):
        ya = a.unet(x, 300, encoder_hidden_states=emb).sample
    with NPOGuidance(b, negative=tmp_path / "full_delta.safetensors", beta=0.5):
        yb = b.unet(x, 300, encoder_hidden_states=emb).sample
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    assert DELTA not in b.unet.state_dict()  # full deltas are never written into the module


def _lora_copy(lora, tmp_path):
    import shutil

    shutil.copytree(lora.parent, tmp_path / "lora")
    return tmp_path / "lora" / lora.name


def test_the_pipeline_comes_back_unchanged_and_saves_a_usable_model(tiny_sd, sd_lora, tmp_path):
    pipe = _load(tiny_sd)
    keys = list(pipe.unet.state_dict())
    plain = _run(pipe, "DDIMScheduler")
    with NPOGuidance(pipe, negative=sd_lora, beta=1.0):
        changed = _run(pipe, "DDIMScheduler")
    assert np.abs(changed - plain).max() > 1e-4
    assert list(pipe.unet.state_dict()) == keys  # no adapter, no wrapped layer left behind
    assert not getattr(pipe.unet, "peft_config", None)
    pipe.save_pretrained(tmp_path / "saved")
    np.testing.assert_array_equal(_run(_load(str(tmp_path / "saved")), "DDIMScheduler"), plain)
    # the sequence of the issue: unload_lora_weights, then a second NPOGuidance applies its offset
    pipe.unload_lora_weights()
    with NPOGuidance(pipe, negative=sd_lora, beta=1.0):
        np.testing.assert_array_equal(_run(pipe, "DDIMScheduler"), changed)
    # one object attached several times (as the sweep does) applies the offset every time
    npo = NPOGuidance(pipe, negative=sd_lora, beta=1.0)
    assert list(pipe.unet.state_dict()) == keys  # constructing it changes nothing either
    for _ in range(2):
        with npo:
            np.testing.assert_array_equal(_run(pipe, "DDIMScheduler"), changed)
    assert list(pipe.unet.state_dict()) == keys


def test_the_users_own_adapters_keep_their_scales(tiny_sd, sd_lora, tmp_path):
    from selfnpo.offsets import lora_layers

    pipe = _load(tiny_sd)
    pipe.load_lora_weights(str(_lora_copy(sd_lora, tmp_path)), adapter_name="mine")
    pipe.set_adapters(["mine"], adapter_weights=[0.3])
    keys = list(pipe.unet.state_dict())
    scales = [layer.scaling["mine"] for layer in lora_layers(pipe.unet, "mine")]
    mine = _run(pipe, "DDIMScheduler")
    with NPOGuidance(pipe, negative=sd_lora, beta=1.0):
        _run(pipe, "DDIMScheduler")
    assert list(pipe.unet.state_dict()) == keys
    assert [layer.scaling["mine"] for layer in lora_layers(pipe.unet, "mine")] == scales
    assert pipe.get_active_adapters() == ["mine"]
    np.testing.assert_array_equal(_run(pipe, "DDIMScheduler"), mine)


def test_non_finite_offsets_are_refused(tiny_sd, sd_lora, tmp_path):
    from safetensors.torch import load_file, save_file

    from selfnpo.errors import SelfNPOError
    from selfnpo.offsets import save_full_delta

    bad = _lora_copy(sd_lora, tmp_path)
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(bad)).items()}, str(bad))
    pipe = _load(tiny_sd)
    keys = list(pipe.unet.state_dict())
    with pytest.raises(SelfNPOError, match="NaN"):
        NPOGuidance(pipe, negative=bad)
    assert list(pipe.unet.state_dict()) == keys
    full = tmp_path / "full_delta.safetensors"
    save_full_delta(full, {"conv_in.weight": torch.full_like(pipe.unet.conv_in.weight, float("inf"))}, {})
    with pytest.raises(SelfNPOError, match="NaN or infinite"):
        NPOGuidance(pipe, negative=full)
    with pytest.raises(SelfNPOError, match="finite"):
        NPOGuidance(pipe, negative=sd_lora, beta=float("nan"))
