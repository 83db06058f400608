"""The papers' plug-and-play claims on SD1.5, tested: an offset trained on the base guides a
ControlNet pipeline and an img2img pipeline, loads into a fine-tuned derivative of the base (a
perturbed copy stands in for DreamShaper / Juggernaut), and acts on unconditional generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DiffusionPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
)

from selfnpo.npo import NPOGuidance

PROMPTS = ["a red circle", "green star"]


def _load(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gens(n: int = 2):
    return [torch.Generator().manual_seed(i) for i in range(n)]


def _exact_and_acting(pipe, lora, run) -> None:
    """beta 0 is the plain pipeline bit for bit, beta 1 changes the result, detaching restores it."""
    plain = run()
    with NPOGuidance(pipe, negative=lora, beta=0.0):
        np.testing.assert_array_equal(run(), plain)
    with NPOGuidance(pipe, negative=lora, beta=1.0):
        changed = run()
    assert np.abs(changed - plain).max() > 1e-4
    np.testing.assert_array_equal(run(), plain)


@pytest.fixture(scope="module")
def controlnet_pipe(tiny_sd):
    base = _load(tiny_sd)
    torch.manual_seed(11)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():  # from_unet zero-initialises the output convolutions: make them act
        for p in controlnet.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_controlnet_pipeline(controlnet_pipe, sd_lora):
    """ControlNet's residuals are batched with the UNet call; NPO splits them with it (the
    ControlNet itself is not offset: it runs once, as in plain diffusers)."""
    pipe = controlnet_pipe
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))

    def run():
        return pipe(
            PROMPTS,
            image=image,
            guidance_scale=5.0,
            num_inference_steps=3,
            generator=_gens(),
            output_type="np",
        ).images

    _exact_and_acting(pipe, sd_lora, run)


def test_controlnet_negative_half_is_the_lora_model_with_the_same_residuals(
    controlnet_pipe, tiny_sd, sd_lora
):
    beta = 0.7
    ours = controlnet_pipe
    ours._guidance_scale = 5.0  # what the pipeline sets during a call; turns the CFG split on
    ref, base = _load(tiny_sd), _load(tiny_sd)
    ref.load_lora_weights(str(sd_lora), adapter_name="neg")
    ref.set_adapters(["neg"], adapter_weights=[beta])
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor(500)
    emb = torch.randn(4, 77, 32, generator=g)
    with torch.no_grad():
        down, mid = ours.controlnet(
            x,
            t,
            encoder_hidden_states=emb,
            controlnet_cond=torch.rand(4, 3, 16, 16, generator=g),
            return_dict=False,
        )
    kw = dict(
        down_block_additional_residuals=list(down), mid_block_additional_residual=mid, return_dict=False
    )
    with NPOGuidance(ours, negative=sd_lora, beta=beta), torch.no_grad():
        got = ours.unet(x, t, encoder_hidden_states=emb, **kw)[0]

    def half(i):
        s = slice(2 * i, 2 * i + 2)
        return dict(
            encoder_hidden_states=emb[s],
            down_block_additional_residuals=[d[s] for d in down],
            mid_block_additional_residual=mid[s],
            return_dict=False,
        )

    with torch.no_grad():
        want_neg = ref.unet(x[:2], t, **half(0))[0]
        want_pos = base.unet(x[2:], t, **half(1))[0]
    torch.testing.assert_close(got[:2], want_neg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2:], want_pos, rtol=1e-5, atol=1e-6)


def test_img2img_pipeline(tiny_sd, sd_lora):
    pipe = StableDiffusionImg2ImgPipeline(**_load(tiny_sd).components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))

    def run():
        return pipe(
            PROMPTS,
            image=image,
            strength=0.7,
            guidance_scale=5.0,
            num_inference_steps=4,
            generator=_gens(),
            output_type="np",
        ).images

    _exact_and_acting(pipe, sd_lora, run)


def test_offset_loads_into_a_fine_tuned_derivative(tiny_sd, sd_lora, tmp_path):
    """A perturbed copy of the base takes the base's offset: beta 0 is the derivative itself, and the
    negative branch equals the derivative with the LoRA loaded through plain diffusers."""
    derived = _load(tiny_sd)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in derived.unet.parameters():
            p.add_(0.02 * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=g))
    derived.save_pretrained(tmp_path / "derived")
    path = str(tmp_path / "derived")
    pipe = _load(path)

    def run():
        return pipe(
            PROMPTS, guidance_scale=5.0, num_inference_steps=3, generator=_gens(), output_type="np"
        ).images

    _exact_and_acting(pipe, sd_lora, run)
    beta = 0.5
    ref = _load(path)
    ref.load_lora_weights(str(sd_lora), adapter_name="neg")
    ref.set_adapters(["neg"], adapter_weights=[beta])
    pipe._guidance_scale = 5.0
    x, emb = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 77, 32, generator=g)
    with NPOGuidance(pipe, negative=sd_lora, beta=beta), torch.no_grad():
        got = pipe.unet(x, torch.tensor(300), encoder_hidden_states=emb, return_dict=False)[0]
    with torch.no_grad():
        want = ref.unet(x[:2], torch.tensor(300), encoder_hidden_states=emb[:2], return_dict=False)[0]
    torch.testing.assert_close(got[:2], want, rtol=1e-5, atol=1e-6)


def test_unconditional_generation_with_the_offset(tiny_sd, sd_lora):
    """With empty prompts plain CFG is a no-op (both branches agree); with the offset the negative
    branch is the offset model, so guidance pushes unconditional samples away from it."""
    pipe = _load(tiny_sd)

    def run(g: float):
        return pipe(
            ["", ""], guidance_scale=g, num_inference_steps=3, generator=_gens(), output_type="np"
        ).images

    unguided = run(1.0)
    np.testing.assert_allclose(run(5.0), unguided, atol=1e-5)
    with NPOGuidance(pipe, negative=sd_lora, beta=0.0):
        np.testing.assert_allclose(run(5.0), unguided, atol=1e-5)
    with NPOGuidance(pipe, negative=sd_lora, beta=1.0):
        guided = run(5.0)
        np.testing.assert_array_equal(run(1.0), unguided)  # no negative branch at guidance 1
    assert np.abs(guided - unguided).max() > 1e-3
