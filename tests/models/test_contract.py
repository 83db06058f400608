"""The denoiser contract every model adapter must pass (selfnpo.models.model_for).

Samplers, guidance and objectives depend on nothing else, so one table of families checks all:
the latent shape, conditioning, a prediction of the latent's shape that depends on the prompt,
and conversions consistent with the schedule (``alpha * x0 + sigma * eps == x_t``).
"""

from __future__ import annotations

import pytest
import torch

from selfnpo.models import model_for

FAMILIES = ("sd", "sdxl", "sd_v", "sd3", "flux", "wan", "cogvideox")


def _build(family: str, tok):
    from selfnpo.models import tiny, tiny_transformers

    if family in ("sd", "sdxl"):
        return tiny.build_tiny_pipeline(family, tok)
    if family == "sd_v":
        return tiny.build_tiny_pipeline("sd", tok, prediction_type="v_prediction", seed=5)
    return getattr(tiny_transformers, f"build_tiny_{family}_pipeline")(tok)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    from selfnpo.models.tiny import write_tiny_vocab

    return write_tiny_vocab(tmp_path_factory.mktemp("contract") / "tokenizer")


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_honours_the_denoiser_contract(family, vocab):
    model = model_for(_build(family, vocab))
    torch.manual_seed(0)
    shape = model.latent_shape(2)
    assert shape[0] == 2
    x = torch.randn(shape)
    t = torch.tensor([model.schedule.t_max, 100])
    cond, unc = model.encode(["a red circle", "green star"]), model.uncond(2)
    assert len(cond) == 2 and len(unc) == 2
    with torch.no_grad():
        pred = model.predict(x, t, cond)
        again = model.predict(x, t, cond)
        other = model.predict(x, t, unc)
    assert pred.shape == x.shape and torch.isfinite(pred).all()
    assert torch.equal(pred, again)  # deterministic
    assert not torch.allclose(pred, other)  # the prompt matters
    x0, eps = model.x0_of(pred, x, t), model.eps_of(pred, x, t)
    a, s = model.coeffs(t, x)
    torch.testing.assert_close(a * x0 + s * eps, x, rtol=1e-4, atol=1e-4)
    assert model.num_train_timesteps == model.schedule.t_max + 1
    with torch.no_grad():
        images = model.decode_latents(x0[:1])
    assert images.shape[0] == 1 and torch.isfinite(images).all()
