"""Typed training configuration; every field's help text is the CLI's ``--help``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import SelfNPOError
from ..objectives.base import get_spec, objective_configs
from ..options import MAX_SEED, check_finite, opt


@dataclass
class CommonTrainConfig:
    """What every objective shares: model, data, what trains, optimiser, run folder.

    The objectives' own settings live in config dataclasses beside them (``RolloutConfig`` in
    ``objectives/tdft.py``, ``DPOConfig`` in ``objectives/dpo.py``, ...); :data:`TrainConfig`
    joins this class and all of them into one flat config, as the command line and a run folder's
    ``config.json`` see it.
    """

    model: str = opt("", "diffusers model folder or hub id (SD1.5-type, SDXL-type or SD3 pipeline)")
    prompts: str = opt("", "prompt file: .txt (one per line), .tsv with a Prompt column, or .jsonl")
    output_dir: str = opt("runs/selfnpo", "run folder (config, log, checkpoints, offset)")
    objective: str = opt(
        "tdft",
        "training objective by name: tdft (Self-NPO), full_sim (baseline), diffusion, dpo, dpo_npo "
        "(reversed pairs), reward, reward_npo (1 - R), ddspo, ddspo_npo, r0, r0_plus",
    )
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
    lora_targets: str = opt(
        "to_q,to_k,to_v,to_out.0", "comma-separated module names of the denoising network given LoRA"
    )
    lr: float = opt(1e-4, "learning rate (the authors use 1e-6 with full weights)")
    weight_decay: float = opt(1e-3, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)")
    steps: int = opt(1000, "optimizer steps")
    batch_size: int = opt(4, "prompts per step per process")
    grad_accum: int = opt(1, "gradient accumulation steps")
    resolution: int = opt(0, "image resolution (0 = the model's default)")
    frames: int = opt(
        0, "video families: frames per training clip (0 = the pipeline's default: Wan 81, CogVideoX 49)"
    )
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
    pairs: str = opt(
        "", "with --objective dpo / dpo_npo: preference pair file (pairs.jsonl; docs/preference.md)"
    )

    def validate(self) -> CommonTrainConfig:
        """Reject impossible settings with one-line errors: the common ones here, then each
        objective config's own ``check`` (every objective's, as each flag is always accepted)."""
        if not self.model:
            raise SelfNPOError("--model is required")
        try:
            spec = get_spec(self.objective)
        except KeyError as e:
            raise SelfNPOError(str(e.args[0])) from None
        if spec.pairs and not self.pairs:
            raise SelfNPOError(f"--objective {self.objective} needs --pairs (a preference pair file)")
        if self.source != "images" and not self.prompts and not self.pairs:
            raise SelfNPOError("--prompts is required")
        if self.source == "images" and not self.image_dir:
            raise SelfNPOError("--source images needs --image-dir")
        check_finite(self)
        for ok, msg in self._common_checks():
            if not ok:
                raise SelfNPOError(msg)
        for cls in objective_configs():
            if hasattr(cls, "check"):
                cls.check(self)
        return self

    def _common_checks(self) -> list[tuple[bool, str]]:
        return [
            (self.steps >= 1, "--steps must be >= 1"),
            (self.log_every >= 1, "--log-every must be >= 1"),
            (0 <= self.seed <= MAX_SEED, f"--seed must be in 0..{MAX_SEED}"),
            (self.lora_alpha >= 0, "--lora-alpha must be >= 0 (0 = same as rank)"),
            (self.max_grad_norm >= 0, "--max-grad-norm must be >= 0 (0 = off)"),
            (bool(self.lora_targets.strip(" ,")), "--lora-targets must name at least one UNet module"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.grad_accum >= 1, "--grad-accum must be >= 1"),
            (1 <= self.grid_steps <= 1000, "--grid-steps must be in 1..1000"),
            (0.0 <= self.ema_decay <= 1.0, "--ema-decay must be in [0, 1]"),
            (self.lr > 0 and self.lr < 1.0, "--lr must be in (0, 1)"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.lora_rank >= 1, "--lora-rank must be >= 1"),
            (self.pool_size >= 1, "--pool-size must be >= 1"),
            (0.0 <= self.caption_dropout <= 1.0, "--caption-dropout must be in [0, 1]"),
            (
                self.resolution == 0 or (self.resolution >= 16 and self.resolution % 8 == 0),
                "--resolution must be 0 (the model's default) or a multiple of 8 of at least 16",
            ),
            (self.resolution <= 4096, "--resolution must be <= 4096"),
            (self.frames >= 0, "--frames must be >= 0"),
            (self.checkpoint_every >= 0, "--checkpoint-every must be >= 0"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1"),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other"),
        ]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # fields that may differ between a run and its resumption
    RESUMABLE_CHANGES = ("resume", "overwrite", "device", "log_every", "steps", "output_dir")


def _compose() -> type:
    """``TrainConfig``: the common settings, then every discovered objective's config (flat)."""
    # dataclass fields follow the reversed MRO: the common ones first, then each objective's
    bases = (*reversed(objective_configs()), CommonTrainConfig)
    cls = dataclasses.make_dataclass("TrainConfig", [], bases=bases)
    cls.__module__ = __name__
    cls.__doc__ = "Self-NPO training. Defaults follow the authors' code (docs/method.md) except where noted."
    return cls


TrainConfig = _compose()
