"""Settings of ``selfnpo pretrain`` and its recipes (v2: the shipped model; v3: docs/world.md)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ...errors import SelfNPOError
from ...options import opt


@dataclass
class PretrainConfig:
    """Train the embedded world model from scratch (VAE, text encoder, then UNet)."""

    output_dir: str = opt("runs/pretrain", "run folder; the finished pipeline is written to OUTPUT_DIR/model")
    recipe: str = opt(
        "v3",
        "preset for the settings below that are left at their defaults: v3 (the shipped model: larger "
        "UNet and autoencoder, EMA weights, min-SNR weighting) or v2 (the earlier one); docs/world.md",
        choices=("v2", "v3"),
    )
    unet_channels: str = opt("32,64,64", "UNet block widths (comma-separated)")
    vae_channels: str = opt("16,32", "autoencoder block widths (comma-separated)")
    vae_steps: int = opt(3000, "autoencoder training steps")
    vae_cosine: bool = opt(False, "cosine learning-rate decay over the autoencoder steps")
    text_steps: int = opt(800, "text encoder training steps")
    unet_steps: int = opt(
        3000, "UNet training steps (constant lr: a shorter run is a prefix of a longer one)"
    )
    vae_batch_size: int = opt(16, "images per autoencoder step")
    text_batch_size: int = opt(128, "captions per text encoder step")
    batch_size: int = opt(32, "images per UNet step")
    vae_lr: float = opt(1e-3, "autoencoder learning rate")
    text_lr: float = opt(1e-3, "text encoder learning rate")
    unet_lr: float = opt(5e-4, "UNet learning rate")
    caption_dropout: float = opt(0.1, "probability of training on the empty prompt (unconditional)")
    ema_decay: float = opt(
        0.0,
        "EMA rate of the UNet weights, whose EMA is then the finished model (0 = no EMA: the last weights)",
    )
    snr_gamma: float = opt(0.0, "min-SNR-gamma loss weighting of the UNet phase (0 = off)")
    weak_steps: int = opt(
        0, "also keep the model at this UNet step as OUTPUT_DIR/weak-model (autoguidance; 0 = off)"
    )
    export: str = opt("", "also write the shipped form (UNet and VAE in fp16) to this folder")
    export_text_fp16: bool = opt(
        False, "--export also stores the text encoder's weights in fp16 (it still loads as fp32)"
    )
    checkpoint_every: int = opt(200, "steps between checkpoints")
    seed: int = opt(0, "random seed")
    device: str = opt("auto", "auto, cpu, cuda")
    resume: bool = opt(False, "continue an interrupted pretraining run")
    overwrite: bool = opt(False, "replace an existing run folder")

    # settings that a resumed run may change (the rest must be as saved)
    RESUMABLE_CHANGES = (
        "output_dir",
        "recipe",
        "unet_steps",
        "weak_steps",
        "export",
        "export_text_fp16",
        "checkpoint_every",
        "device",
        "resume",
        "overwrite",
    )
    RECIPES = {
        "v2": {},
        "v3": {
            "unet_channels": "48,96,96",
            "vae_channels": "32,64",
            "vae_steps": 2000,
            "vae_cosine": True,
            "vae_batch_size": 32,
            "unet_steps": 6000,
            "ema_decay": 0.999,
            "snr_gamma": 5.0,
            "weak_steps": 1000,
            "export_text_fp16": True,
        },
    }

    def resolved(self) -> PretrainConfig:
        """The recipe's settings, except where a setting was given explicitly (not at its default)."""
        preset = self.RECIPES[self.recipe]
        return replace(
            self, **{k: v for k, v in preset.items() if getattr(self, k) == getattr(type(self), k)}
        )

    def widths(self, name: str) -> tuple[int, ...]:
        """``unet_channels`` / ``vae_channels`` as integers."""
        try:
            out = tuple(int(x) for x in getattr(self, name).split(","))
        except ValueError:
            out = ()
        if not out or min(out) < 8 or any(w % 8 for w in out):
            raise SelfNPOError(f"--{name.replace('_', '-')} must be comma-separated multiples of 8")
        return out

    def validate(self) -> PretrainConfig:
        self.widths("unet_channels")
        self.widths("vae_channels")
        steps = (self.vae_steps, self.text_steps, self.unet_steps)
        if min(steps) < 1 or min(self.batch_size, self.vae_batch_size, self.text_batch_size) < 1:
            raise SelfNPOError("step counts and batch sizes must be >= 1")
        if not all(0 < lr < 1 for lr in (self.vae_lr, self.text_lr, self.unet_lr)):
            raise SelfNPOError("learning rates must be in (0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise SelfNPOError("--ema-decay must be in [0, 1)")
        if not 0.0 <= self.snr_gamma < float("inf"):
            raise SelfNPOError("--snr-gamma must be a finite number >= 0")
        if self.resume and self.overwrite:
            raise SelfNPOError("--resume and --overwrite exclude each other")
        if self.checkpoint_every < 1:
            raise SelfNPOError("--checkpoint-every must be >= 1")
        if not 0 <= self.seed < 2**32:
            raise SelfNPOError("--seed must be in 0..4294967295")
        if not 0 <= self.caption_dropout <= 1:
            raise SelfNPOError("--caption-dropout must be in [0, 1]")
        return self
