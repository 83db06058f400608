"""Typed training configuration; every field's help text is the CLI's ``--help``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import SelfNPOError


def opt(default, help: str, **kw):  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help, **kw})


def with_defaults(cls: type, saved: dict) -> dict:
    """A config saved by an earlier version, with settings added since counted as their defaults."""
    return {**{f.name: f.default for f in dataclasses.fields(cls)}, **saved}


MAX_SEED = 2**32 - 1  # numpy, torch and every generator accept it, also with + index


def check_finite(cfg) -> None:
    """Name the first float setting of ``cfg`` that is NaN or infinite (it would only show up
    later as a non-finite loss or silently wrong images)."""
    import math

    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise SelfNPOError(f"--{f.name.replace('_', '-')} must be a finite number, got {v}")


@dataclass
class TrainConfig:
    """Self-NPO training. Defaults follow the authors' code (docs/method.md) except where noted."""

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
    snr_gamma: float = opt(
        0.0, "diffusion objective: min-SNR-gamma loss weight min(SNR, gamma)/SNR (Hang et al. 2023; 0 = off)"
    )
    resume: bool = opt(False, "continue the run in --output-dir from its last checkpoint")
    overwrite: bool = opt(False, "replace an existing run folder")
    save_model: bool = opt(False, "also save the whole trained pipeline (used by pretrain)")
    # --- preference and reward objectives: dpo, dpo_npo, reward, reward_npo (docs/preference.md) ---
    pairs: str = opt(
        "", "with --objective dpo / dpo_npo: preference pair file (pairs.jsonl; docs/preference.md)"
    )
    dpo_beta: float = opt(5000.0, "Diffusion-DPO beta (strength of the KL regularisation)")
    dpo_beta_convention: str = opt(
        "original",
        "how beta enters the DPO loss: original (-0.5*beta*(model_diff - ref_diff), the Diffusion-DPO "
        "code) or diffusers (beta*(ref_diff - model_diff), twice as strong at equal beta)",
        choices=("original", "diffusers"),
    )
    reward: str = opt("world", "reward model by name (selfnpo.rewards; 'world' = the embedded world's)")
    reward_steps: int = opt(10, "reward objectives: DDIM steps of the sampling rollout")
    reward_grad_steps: int = opt(1, "reward objectives: K of DRaFT-K, gradient through the last K steps")
    reward_guidance: float = opt(7.5, "reward objectives: guidance scale g of the rollout (1 = no CFG)")
    # --- DDSPO and R0 (objectives ddspo, r0, r0_plus) ---
    ddspo_variant: str = opt(
        "paired",
        "ddspo: where the losing images come from: paired (the reference's samples under c-, made on "
        "the fly; the paper's main setting), unpaired (other prompts' images of the batch with c-; "
        "'Not-paired'), random_positive (other prompts' images with their own prompts as c-)",
        choices=("paired", "unpaired", "random_positive"),
    )
    ddspo_degrade: str = opt(
        "random_removal",
        "ddspo: prompt degradation c -> c-: random_removal, a .jsonl/.tsv file of rewrites (e.g. an "
        "LLM's) or module:function",
    )
    ddspo_remove_low: float = opt(0.4, "ddspo random_removal: smallest fraction of tokens removed")
    ddspo_remove_high: float = opt(0.7, "ddspo random_removal: largest fraction of tokens removed")
    ddspo_targets: str = opt(
        "reference",
        "ddspo: score targets: reference (eq. 7) or noise (the forward noise: Diffusion-DPO on the same "
        "(c, c-) pairs, the paper's D-DPO baseline)",
        choices=("reference", "noise"),
    )
    ddspo_beta: float = opt(0.0, "ddspo: DPO beta of the score-space loss (0 = use --dpo-beta)")
    ddspo_loser_steps: int = opt(
        0, "ddspo paired: DDIM steps for the losing images under c- (0 = --grid-steps, like the pool)"
    )
    r0_rewards: str = opt(
        "", "r0: weighted rewards 'name:weight,name:weight' (empty = --reward with weight 1)"
    )
    r0_steps: int = opt(4, "r0: K, steps of the generator (eq. 3.2) during training")
    r0_cfg_weight: float = opt(1.0, "r0: weight of the implicit CFG reward (0 = off)")
    r0_reg_weight: float = opt(1.0, "r0: weight of the weight regularisation ||W - W_0||^2 (eq. 3.3)")
    r0_raw_grads: bool = opt(
        False, "r0: sum the weighted raw reward gradients instead of normalising each to unit norm (eq. 3.5)"
    )
    r0_fixed_eta: bool = opt(
        False, "r0: train with --r0-eta at every step instead of eta ~ U[0, 1] (eq. 3.4)"
    )
    r0_eta: float = opt(1.0, "r0: the fixed eta of --r0-fixed-eta (1 = deterministic DDIM)")

    def validate(self) -> TrainConfig:
        """Reject impossible settings with one-line errors."""
        if not self.model:
            raise SelfNPOError("--model is required")
        from ..objectives.base import PAIR_OBJECTIVES, get_objective

        try:
            get_objective(self.objective)
        except KeyError as e:
            raise SelfNPOError(str(e.args[0])) from None
        if self.objective in PAIR_OBJECTIVES and not self.pairs:
            raise SelfNPOError(f"--objective {self.objective} needs --pairs (a preference pair file)")
        if self.source != "images" and not self.prompts and not self.pairs:
            raise SelfNPOError("--prompts is required")
        if self.source == "images" and not self.image_dir:
            raise SelfNPOError("--source images needs --image-dir")
        check_finite(self)
        checks = [
            (self.steps >= 1, "--steps must be >= 1"),
            (self.log_every >= 1, "--log-every must be >= 1"),
            (0 <= self.seed <= MAX_SEED, f"--seed must be in 0..{MAX_SEED}"),
            (self.lora_alpha >= 0, "--lora-alpha must be >= 0 (0 = same as rank)"),
            (self.max_grad_norm >= 0, "--max-grad-norm must be >= 0 (0 = off)"),
            (bool(self.lora_targets.strip(" ,")), "--lora-targets must name at least one UNet module"),
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
            (0.0 <= self.snr_gamma < float("inf"), "--snr-gamma must be a finite number >= 0"),
            (
                self.resolution == 0 or (self.resolution >= 16 and self.resolution % 8 == 0),
                "--resolution must be 0 (the model's default) or a multiple of 8 of at least 16",
            ),
            (self.resolution <= 4096, "--resolution must be <= 4096"),
            (self.frames >= 0, "--frames must be >= 0"),
            (self.checkpoint_every >= 0, "--checkpoint-every must be >= 0"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1"),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other"),
            (self.dpo_beta > 0, "--dpo-beta must be > 0"),
            (self.reward_steps >= 1, "--reward-steps must be >= 1"),
            (
                1 <= self.reward_grad_steps <= self.reward_steps,
                "--reward-grad-steps must be in 1..--reward-steps",
            ),
            (self.reward_guidance >= 1.0, "--reward-guidance must be >= 1"),
            (
                0.0 <= self.ddspo_remove_low <= self.ddspo_remove_high <= 1.0,
                "--ddspo-remove-low/high must satisfy 0 <= low <= high <= 1",
            ),
            (self.ddspo_beta >= 0, "--ddspo-beta must be >= 0"),
            (
                self.objective not in ("ddspo", "ddspo_npo")
                or self.ddspo_variant == "paired"
                or self.batch_size >= 2,
                f"--ddspo-variant {self.ddspo_variant} needs --batch-size >= 2",
            ),
            (0 <= self.ddspo_loser_steps <= 1000, "--ddspo-loser-steps must be in 0..1000"),
            (1 <= self.r0_steps <= 1000, "--r0-steps must be in 1..1000"),
            (self.r0_cfg_weight >= 0, "--r0-cfg-weight must be >= 0"),
            (self.r0_reg_weight >= 0, "--r0-reg-weight must be >= 0"),
            (0.0 <= self.r0_eta <= 1.0, "--r0-eta must be in [0, 1]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SelfNPOError(msg)
        if self.objective in ("r0", "r0_plus"):
            from ..objectives.r0 import parse_rewards

            parse_rewards(self.r0_rewards, self.reward)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # fields that may differ between a run and its resumption
    RESUMABLE_CHANGES = ("resume", "overwrite", "device", "log_every", "steps", "output_dir")
