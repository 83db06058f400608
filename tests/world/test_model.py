"""The shipped world model, its reproduction command, and the main job (``selfnpo demo``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from selfnpo import cli
from selfnpo.world.model import PretrainConfig, pretrain, shipped_model_dir


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


def test_pretrain_smoke_and_resume(tmp_path):
    cfg = dict(vae_steps=2, unet_steps=2, batch_size=2, vae_batch_size=2, checkpoint_every=1)
    model = pretrain(PretrainConfig(output_dir=str(tmp_path / "a"), **cfg), progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    assert pipe.unet.config.sample_size == 16
    half = pretrain(
        PretrainConfig(output_dir=str(tmp_path / "b"), **{**cfg, "unet_steps": 1}), progress=False
    )
    assert half.is_dir()
    resumed = pretrain(PretrainConfig(output_dir=str(tmp_path / "b"), resume=True, **cfg), progress=False)
    a = StableDiffusionPipeline.from_pretrained(str(model)).unet.state_dict()
    b = StableDiffusionPipeline.from_pretrained(str(resumed)).unet.state_dict()
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
    assert {r["beta"] for r in m["sweep"]} == {0.0, 1.0}
    html = (out / "report.html").read_text()
    assert "QUICK RUN" in html and (out / "grid.png").is_file()
    assert cli.main(["demo", "--quick", "--quiet", "--output", str(out)]) == 2  # never overwritten silently
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--guidance-scales", "a,b"], ["--eval-prompts", "0"]])
def test_demo_bad_input(bad, tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--quiet", "--output", str(tmp_path / "d"), *bad]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
