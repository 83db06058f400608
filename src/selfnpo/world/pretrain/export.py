"""The finished pipeline of a pretraining run: its EMA or last weights, and the shipped fp16 form."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ...errors import SelfNPOError
from ...io import atomic_dir, atomic_write_text
from ...training.checkpoint import load_latest
from .config import PretrainConfig


def finish(run: Path, cfg: PretrainConfig, dest: Path) -> Path:
    """The finished pipeline: the EMA weights, or (without EMA) the last weights the loop saved."""
    if cfg.ema_decay > 0:
        return export_ema(run, dest)
    with atomic_dir(dest) as tmp:
        shutil.copytree(run / "unet" / "model", tmp, dirs_exist_ok=True)
    return dest


def ema_pipeline(run: Path, device: str = "cpu"):
    """The pipeline of a pretraining run with the UNet's EMA weights from its newest checkpoint."""
    from ...models.loading import load_pipeline

    pipe = load_pipeline(str(run / "base"), device=device, dtype="fp32")
    state = load_latest(run / "unet")
    if state is None:
        raise SelfNPOError(f"{run}: no UNet checkpoint yet")
    tensors, meta = state
    with torch.no_grad():
        for i, p in enumerate(pipe.unet.parameters()):
            p.copy_(tensors[f"teacher.{i}"])
    return pipe


def export_ema(run: Path, dest: Path) -> Path:
    """Write the EMA pipeline of ``run``'s newest UNet checkpoint to ``dest`` (fp32 diffusers folder)."""
    pipe = ema_pipeline(run)
    with atomic_dir(dest) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return dest


def export_model(model_dir: Path, dest: Path, text_fp16: bool = False) -> None:
    """Copy a trained pipeline with the UNet and VAE stored in fp16 (the form shipped in the package).

    A plain ``from_pretrained(folder)`` must give one dtype throughout. transformers loads a model
    in the dtype its config names, so with ``text_fp16`` the text encoder's weights are stored in
    fp16 (half the size: its token table is most of the package) under a config that says float32;
    otherwise they stay fp32.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(model_dir), safety_checker=None, requires_safety_checker=False
    )
    pipe.unet.to(torch.float16)
    pipe.vae.to(torch.float16)
    if text_fp16:
        pipe.text_encoder.to(torch.float16)
    with atomic_dir(dest) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if text_fp16:
            path = Path(tmp) / "text_encoder" / "config.json"
            conf = json.loads(path.read_text())
            conf["dtype"] = "float32"
            if "torch_dtype" in conf:
                conf["torch_dtype"] = "float32"
            atomic_write_text(path, json.dumps(conf, indent=2) + "\n")
