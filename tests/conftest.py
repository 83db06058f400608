"""Tiny random-weight SD1.5-type and SDXL-type pipelines, built offline once per test session."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
torch.set_num_threads(1)  # tiny models gain nothing from more; avoids oversubscription


@pytest.fixture(scope="session", autouse=True)
def _quiet():
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from selfnpo.models.tiny import build_tiny_pipeline, write_tiny_vocab

    root = tmp_path_factory.mktemp("models")
    tok = write_tiny_vocab(root / "tokenizer")
    for kind in ("sd", "sdxl"):
        build_tiny_pipeline(kind, tok).save_pretrained(root / kind)
    build_tiny_pipeline("sd", tok, prediction_type="v_prediction", seed=5).save_pretrained(root / "sd_v")
    return root


@pytest.fixture(scope="session")
def tiny_sd(tiny_dir):
    return str(tiny_dir / "sd")


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_dir):
    return str(tiny_dir / "sdxl")


@pytest.fixture
def prompts_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a red circle\na blue square at the top\ngreen star\nyellow ring, dots\n")
    return str(p)


def train_tiny(model: str, out, prompts: str, pipe=None, **kw):
    from selfnpo.training.config import TrainConfig
    from selfnpo.training.loop import train

    base = dict(
        model=model,
        prompts=prompts,
        output_dir=str(out),
        steps=2,
        batch_size=2,
        pool_size=2,
        checkpoint_every=0,
        lr=5e-2,
        log_every=1,
    )
    base.update(kw)
    return train(TrainConfig(**base), progress=False, pipe=pipe)


@pytest.fixture(scope="session")
def session_prompts(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("a red circle\na blue square at the top\ngreen star\nyellow ring, dots\n")
    return str(p)


@pytest.fixture(scope="session")
def sd_lora(tiny_sd, session_prompts, tmp_path_factory):
    """A trained (non-zero) negative LoRA offset for the tiny SD model."""
    return train_tiny(tiny_sd, tmp_path_factory.mktemp("run") / "sd", session_prompts).offset_path


@pytest.fixture(scope="session")
def sdxl_lora(tiny_sdxl, session_prompts, tmp_path_factory):
    return train_tiny(tiny_sdxl, tmp_path_factory.mktemp("run") / "sdxl", session_prompts).offset_path
