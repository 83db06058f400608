"""The shipped world model, its reproduction command, and the main job (``selfnpo demo``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from selfnpo import cli
from selfnpo.errors import SelfNPOError
from selfnpo.world.captions import caption_with_labels
from selfnpo.world.model import shipped_model_dir
from selfnpo.world.pretrain import PretrainConfig, pretrain
from selfnpo.world.pretrain.text import LABEL_SLOTS, LabelReadout, caption_batch, label_targets
from selfnpo.world.render import sample_scene


def test_shipped_model_loads_in_plain_diffusers_and_draws():
    from safetensors.torch import load_file

    stored = load_file(str(shipped_model_dir() / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in stored.values())  # shipped small
    pipe = StableDiffusionPipeline.from_pretrained(str(shipped_model_dir()))
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = pipe(
        ["a large red circle in the center", "a blue square"],
        num_inference_steps=5,
        guidance_scale=3.0,
        generator=gens,
        output_type="np",
    ).images
    assert out.shape == (2, 32, 32, 3) and np.isfinite(out).all() and out.std() > 0.05
    tok = CLIPTokenizer.from_pretrained(str(shipped_model_dir() / "tokenizer"))
    assert tok("a photo")["input_ids"] == [49406, 320, 1125, 49407]  # the real CLIP BPE


def test_label_targets_state_exactly_what_the_caption_says():
    rng = np.random.default_rng(0)
    for _ in range(50):
        text, labels = caption_with_labels(sample_scene(rng, "train"), rng)
        t = dict(zip([name for name, _ in LABEL_SLOTS], label_targets(labels), strict=True))
        classes = dict(LABEL_SLOTS)
        assert classes["colour0"][t["colour0"]] == labels.objects[0].colour
        assert classes["shape0"][t["shape0"]] in text
        assert classes["count"][t["count"]] == str(len(labels.objects))
        unstated = classes["background"][t["background"]] == "-"
        assert unstated == (labels.background is None)
        if len(labels.objects) == 1:
            assert classes["shape1"][t["shape1"]] == "-"
    caps, targets = caption_batch(rng, 3)
    logits = LabelReadout(8)(torch.randn(3, 77, 8))
    assert len(caps) == 3 and targets.shape == (3, len(LABEL_SLOTS))
    assert [lg.shape for lg in logits] == [(3, len(c)) for _, c in LABEL_SLOTS]


def test_pretrain_smoke_and_resume(tmp_path):
    cfg = dict(
        vae_steps=2,
        text_steps=2,
        unet_steps=2,
        batch_size=2,
        vae_batch_size=2,
        text_batch_size=4,
        checkpoint_every=1,
        weak_steps=1,
        recipe="v3",
    )
    model = pretrain(PretrainConfig(output_dir=str(tmp_path / "a"), **cfg), progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    assert pipe.unet.config.sample_size == 16
    assert all(b.startswith("CrossAttn") for b in pipe.unet.config.down_block_types)  # every level
    assert (tmp_path / "a" / "text" / "heldout_accuracy.json").is_file()
    assert 0.0 <= json.loads((tmp_path / "a" / "vae" / "reconstruction.json").read_text())["alignment"] <= 1.0
    # the shipped weights are the EMA (decay 0.999 after two steps: still near the initial weights),
    # not the last student weights that the training loop saves beside them
    student = StableDiffusionPipeline.from_pretrained(
        str(tmp_path / "a" / "unet" / "model")
    ).unet.state_dict()
    ema = pipe.unet.state_dict()
    assert any(not torch.equal(student[k], ema[k]) for k in ema)
    weak = StableDiffusionPipeline.from_pretrained(str(tmp_path / "a" / "weak-model")).unet.state_dict()
    assert any(not torch.equal(weak[k], ema[k]) for k in ema)  # the EMA one step earlier
    with pytest.raises(SelfNPOError, match="text_steps"):
        pretrain(PretrainConfig(output_dir=str(tmp_path / "a"), resume=True, **{**cfg, "text_steps": 3}))
    half = pretrain(
        PretrainConfig(output_dir=str(tmp_path / "b"), **{**cfg, "unet_steps": 1}), progress=False
    )
    assert half.is_dir()
    resumed = pretrain(PretrainConfig(output_dir=str(tmp_path / "b"), resume=True, **cfg), progress=False)
    pa = StableDiffusionPipeline.from_pretrained(str(model))
    pb = StableDiffusionPipeline.from_pretrained(str(resumed))
    for part in ("unet", "text_encoder"):
        a, b = getattr(pa, part).state_dict(), getattr(pb, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_demo_quick_writes_a_well_formed_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--quiet", "--output", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["quick"] is True and len(m["eval_prompts"]) == 8
    for row in m["sweep"] + m["curve"]:
        for key in ("alignment", "reward", "frechet"):
            mean, lo, hi = row[key]
            assert lo <= hi and np.isfinite(mean)
        assert 0.0 <= row["alignment"][0] <= 1.0
    assert {r["beta"] for r in m["sweep"]} == {0.0, 0.5}
    assert m["split"] == "validation" and m["real_images"] == 64
    npo = [r for r in m["sweep"] if r["beta"] != 0.0]
    for row in npo + m["curve"]:  # paired differences vs the base, with n, win rate and MDE
        for key in ("reward", "reward_01", "alignment", "attr_colour", "kid"):
            c = row["paired"][key]
            assert c["n"] == 8 and c["diff"][1] <= c["diff"][2] and c["mde"] >= 0
        assert row["verdict_word"] in ("helps", "hurts", "mixed", "no detectable difference")
    assert [v["verdict"] for v in m["verdicts"]] == [r["verdict"] for r in npo]
    html = (out / "report.html").read_text()
    assert "QUICK RUN" in html and "On the test split" in html and (out / "grid.png").is_file()
    assert (
        html.index("Verdict per setting") < html.index("minimum detectable difference") < html.index("levels")
    )
    assert cli.main(["demo", "--quick", "--quiet", "--output", str(out)]) == 2  # never overwritten silently
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--guidance-scales", "a,b"], ["--eval-prompts", "0"]])
def test_demo_bad_input(bad, tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--quiet", "--output", str(tmp_path / "d"), *bad]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_pretrain_recipes_fill_only_settings_left_at_their_defaults():
    assert PretrainConfig().recipe == "v3"  # the shipped model
    v2 = PretrainConfig(recipe="v2").resolved()
    assert (v2.unet_channels, v2.ema_decay, v2.unet_steps) == ("32,64,64", 0.0, 3000)  # the earlier model
    v3 = PretrainConfig(recipe="v3", unet_steps=500).resolved()
    assert (v3.unet_channels, v3.vae_channels, v3.ema_decay, v3.snr_gamma) == (
        "48,96,96",
        "32,64",
        0.999,
        5.0,
    )
    assert v3.unet_steps == 500  # an explicit setting wins over the recipe
    with pytest.raises(SelfNPOError, match="unet-channels"):
        PretrainConfig(unet_channels="48,x").validate()


def test_export_with_fp16_text_encoder_loads_as_fp32_and_matches(tmp_path):
    """The shipped form's text encoder stored in fp16 loads as fp32 in plain diffusers and
    encodes prompts as the fp32 original does, up to fp16 rounding of its weights."""
    from safetensors.torch import load_file

    from selfnpo.world.pretrain.export import export_model

    # a source whose text encoder is not already fp16-exact (the shipped one is)
    src, plain, half = tmp_path / "src", tmp_path / "plain", tmp_path / "half"
    pipe = StableDiffusionPipeline.from_pretrained(str(shipped_model_dir()))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pipe.text_encoder.parameters():
            p.add_(1e-4 * torch.randn(p.shape, generator=g))
    pipe.save_pretrained(src)
    export_model(src, plain)
    export_model(src, half, text_fp16=True)
    stored = load_file(str(half / "text_encoder" / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in stored.values() if v.is_floating_point())
    size = lambda d: (d / "text_encoder" / "model.safetensors").stat().st_size  # noqa: E731
    assert size(half) < 0.55 * size(plain)
    a = StableDiffusionPipeline.from_pretrained(str(plain)).text_encoder
    b = StableDiffusionPipeline.from_pretrained(str(half)).text_encoder
    assert b.dtype == torch.float32
    ids = CLIPTokenizer.from_pretrained(str(half / "tokenizer"))(
        ["a large red circle in the center"], padding="max_length", return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        ea, eb = a(ids)[0], b(ids)[0]
    assert torch.allclose(ea, eb, atol=2e-2) and not torch.equal(ea, eb)
