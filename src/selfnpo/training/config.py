"""Typed training configuration; every field's help text is the CLI's ``--help``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import SelfNPOError


def opt(default, help: str, **kw):  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Self-NPO training. Defaults follow the authors' code (METHOD.md) except where noted."""

    model: str = opt("", "diffusers model folder or hub id (SD1.5-type or SDXL-type pipeline)")
    prompts: str = opt("", "prompt file: .txt (one per line), .tsv with a Prompt column, or .jsonl")
    output_dir: str = opt("runs/selfnpo", "run folder (config, log, checkpoints, offset)")
    objective: str = opt("tdft", "training objective: tdft (Self-NPO), full_sim (baseline), diffusion")
    source: str = opt(
        "self",
        "where x_t' comes from: self (a pool the model generates from the prompts; data-free), "
        "images (a folder of images with captions), noise (pure noise at t'=T, eq. 13)",
        choices=("self", "images", "noise"),
    )
    image_dir: str = opt("", "with --source images: folder of images and captions (metadata.jsonl or .txt)")
    pool_size: int = opt(64, "with --source self: number of self-generated samples in the pool")
    pool_guidance_scale: float = opt(7.5, "with --source self: guidance scale g used to generate the pool")
    grid_steps: int = opt(25, "DDIM grid size; t' is drawn from it and rollout steps are T/grid_steps long")
    k_steps: int = opt(5, "K: teacher DDIM steps from t' to t (t = t' - K*T/grid_steps, clamped at 0)")
    rollout_guidance: float = opt(
        -1.0, "w: paper guidance weight of the teacher rollout (-1 = unconditional only; g = w+1)"
    )
    authors_cond_pass: bool = opt(
        False,
        "compute the conditional teacher pass even when w = -1 and discard it (authors' cost)",
    )
    loss: str = opt(
        "pseudo_huber", "regression loss on x0: pseudo_huber or l2", choices=("pseudo_huber", "l2")
    )
    huber_c: float = opt(1e-3, "pseudo-Huber constant c")
    teacher: str = opt(
        "ema",
        "teacher: ema (EMA of the student) or frozen (the base model)",
        choices=("ema", "frozen"),
    )
    ema_decay: float = opt(0.999, "EMA rate of the teacher")
    train: str = opt(
        "lora",
        "what is trained: lora (default) or full (all UNet weights)",
        choices=("lora", "full"),
    )
    lora_rank: int = opt(8, "LoRA rank")
    lora_alpha: float = opt(0.0, "LoRA alpha (0 = same as rank, i.e. scale 1)")
    lora_targets: str = opt("to_q,to_k,to_v,to_out.0", "comma-separated UNet module names given LoRA")
    lr: float = opt(1e-4, "learning rate (the authors use 1e-6 with full weights)")
    weight_decay: float = opt(1e-3, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)")
    steps: int = opt(1000, "optimizer steps")
    batch_size: int = opt(4, "prompts per step per process")
    grad_accum: int = opt(1, "gradient accumulation steps")
    resolution: int = opt(0, "image resolution (0 = the model's default)")
    mixed_precision: str = opt("no", "no, fp16 or bf16 (through accelerate)", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = opt(False, "trade compute for memory in the UNet")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N")
    seed: int = opt(0, "random seed (training is exactly reproducible on CPU)")
    checkpoint_every: int = opt(100, "steps between checkpoints (0 = only at the end)")
    keep_checkpoints: int = opt(2, "how many checkpoints to keep")
    log_every: int = opt(10, "steps between log lines")
    nonfinite: str = opt(
        "stop", "on a NaN/inf loss: stop (default) or skip the step", choices=("stop", "skip")
    )
    caption_dropout: float = opt(0.0, "probability of replacing a prompt by the empty prompt")
    resume: bool = opt(False, "continue the run in --output-dir from its last checkpoint")
    overwrite: bool = opt(False, "replace an existing run folder")
    save_model: bool = opt(False, "also save the whole trained pipeline (used by pretrain)")

    def validate(self) -> TrainConfig:
        """Reject impossible settings with one-line errors."""
        if not self.model:
            raise SelfNPOError("--model is required")
        if self.source != "images" and not self.prompts:
            raise SelfNPOError("--prompts is required")
        if self.source == "images" and not self.image_dir:
            raise SelfNPOError("--source images needs --image-dir")
        checks = [
            (self.steps >= 1, "--steps must be >= 1"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.grad_accum >= 1, "--grad-accum must be >= 1"),
            (1 <= self.grid_steps <= 1000, "--grid-steps must be in 1..1000"),
            (self.k_steps >= 1, "--k-steps must be >= 1"),
            (
                self.k_steps <= self.grid_steps,
                f"--k-steps {self.k_steps} is larger than the grid ({self.grid_steps})",
            ),
            (0.0 <= self.ema_decay <= 1.0, "--ema-decay must be in [0, 1]"),
            (self.lr > 0 and self.lr < 1.0, "--lr must be in (0, 1)"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.lora_rank >= 1, "--lora-rank must be >= 1"),
            (self.huber_c > 0, "--huber-c must be > 0"),
            (self.pool_size >= 1, "--pool-size must be >= 1"),
            (0.0 <= self.caption_dropout <= 1.0, "--caption-dropout must be in [0, 1]"),
            (self.resolution >= 0, "--resolution must be >= 0"),
            (self.checkpoint_every >= 0, "--checkpoint-every must be >= 0"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1"),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SelfNPOError(msg)
        from ..objectives.base import get_objective

        try:
            get_objective(self.objective)
        except KeyError as e:
            raise SelfNPOError(str(e.args[0])) from None
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # fields that may differ between a run and its resumption
    RESUMABLE_CHANGES = ("resume", "overwrite", "device", "log_every", "steps")
