"""``selfnpo pretrain``: reproduce the embedded world model from scratch, in three resumable phases.

(1) The AutoencoderKL learns to reconstruct 32x32 renders (:mod:`.autoencoder`); (2) the
CLIPTextModel (over the real CLIP BPE vocabulary) learns to encode what a caption states and is
then frozen (:mod:`.text`); both run in the small resumable loop of :mod:`.phase`. (3) The UNet
is trained from scratch through the one training loop (:mod:`.unet`). The run folder holds
``pretrain_config.json``, ``tokenizer/``, ``vae/``, ``text/``, ``base/`` (the pipeline after
phases 1 and 2), ``unet/`` (a training run), ``model/`` and, for autoguidance, ``weak-model/``.
The shipped copy is stored in fp16 (:func:`.export.export_model`).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ...io import atomic_dir, atomic_write_text, prepare_output
from ..model import build_world_pipeline, world_prompts
from .autoencoder import record_reconstruction, set_latent_scale, train_vae
from .config import PretrainConfig
from .export import export_model, finish
from .text import train_text_encoder
from .unet import train_unet

__all__ = ["PretrainConfig", "pretrain"]


def _prepare(cfg: PretrainConfig) -> Path:
    run = Path(cfg.output_dir)
    prepare_output(
        run,
        "pretrain",
        asdict(cfg),
        config_file="pretrain_config.json",
        may_change=PretrainConfig.RESUMABLE_CHANGES,
        defaults=PretrainConfig,
        overwrite=cfg.overwrite,
        resume=cfg.resume,
        legacy=lambda r: (r / "pretrain_config.json").is_file(),  # run folders of earlier versions
    )
    return run


def _base_pipeline(run: Path, cfg: PretrainConfig, device, progress: bool) -> Path:
    """Phases 1 and 2: ``RUN/base``, the pipeline with the trained autoencoder and text encoder."""
    from ...models.tiny import write_clip_vocab

    base = run / "base"
    if (base / "model_index.json").is_file():
        return base
    tok = write_clip_vocab(run / "tokenizer")
    widths = cfg.widths("unet_channels"), cfg.widths("vae_channels")
    pipe = build_world_pipeline(tok, cfg.seed, *widths).to(device)
    train_vae(pipe, cfg, run, progress)
    set_latent_scale(pipe, cfg.seed + 1)
    record_reconstruction(pipe, run / "vae" / "reconstruction.json", cfg.seed + 5)
    train_text_encoder(pipe, cfg, run, progress)
    with atomic_dir(base) as tmp:
        pipe.save_pretrained(tmp)
    return base


def pretrain(cfg: PretrainConfig, progress: bool = True) -> Path:
    """All three phases; returns the finished diffusers folder ``OUTPUT_DIR/model``."""
    from ...models.loading import pick_device

    cfg = cfg.validate().resolved()
    run = _prepare(cfg)
    base = _base_pipeline(run, cfg, pick_device(cfg.device), progress)
    prompts = run / "train_prompts.txt"
    if not prompts.is_file():
        atomic_write_text(prompts, "\n".join(world_prompts(1000, "train", cfg.seed)) + "\n")
    train_unet(run, cfg, base, prompts, progress)
    model = finish(run, cfg, run / "model")
    if cfg.export:
        export_model(model, Path(cfg.export), text_fp16=cfg.export_text_fp16)
    return model
