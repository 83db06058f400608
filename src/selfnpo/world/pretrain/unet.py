"""Phase 3 of ``selfnpo pretrain``: the UNet, from scratch, through the one training loop.

It trains with the ``diffusion`` objective and caption dropout (so that the unconditional
prediction exists) in ``RUN/unet``, a run folder of ``selfnpo train``; with ``weak_steps`` it
stops once on the way to keep the weak model of autoguidance.
"""

from __future__ import annotations

from pathlib import Path

from ..model import WorldSource
from .config import PretrainConfig
from .export import finish


def unet_step(run: Path) -> int:
    """Step of the newest UNet checkpoint of a pretraining run (0 if none)."""
    from ...training.checkpoint import list_checkpoints

    ckpts = list_checkpoints(run / "unet")
    return int(ckpts[-1].name.split("-")[-1]) if ckpts else 0


def _unet_config(run: Path, cfg: PretrainConfig, base: Path, prompts: Path, steps: int):
    from ...training.config import TrainConfig

    return TrainConfig(
        model=str(base),
        prompts=str(prompts),
        output_dir=str(run / "unet"),
        objective="diffusion",
        train="full",
        teacher="ema" if cfg.ema_decay > 0 else "frozen",
        ema_decay=cfg.ema_decay,
        snr_gamma=cfg.snr_gamma,
        lr=cfg.unet_lr,
        weight_decay=0.0,
        steps=steps,
        batch_size=cfg.batch_size,
        caption_dropout=cfg.caption_dropout,
        checkpoint_every=cfg.checkpoint_every,
        seed=cfg.seed,
        device=cfg.device,
        save_model=True,
        resume=(run / "unet" / "config.json").is_file(),
        log_every=50,
    )


def train_unet(run: Path, cfg: PretrainConfig, base: Path, prompts: Path, progress: bool) -> None:
    """Phase 3 up to ``unet_steps``, writing ``RUN/weak-model`` on the way when asked."""
    from ...models.loading import load_pipeline
    from ...models.sd import DiffusionModel
    from ...training.loop import train

    weak = run / "weak-model"
    segments = [cfg.unet_steps]
    if 0 < cfg.weak_steps < cfg.unet_steps and not weak.is_dir() and unet_step(run) < cfg.weak_steps:
        segments.insert(0, cfg.weak_steps)
    for steps in segments:  # a resumed run ends bit-identical to one uninterrupted run
        tc = _unet_config(run, cfg, base, prompts, steps)
        pipe = load_pipeline(str(base), device=cfg.device, dtype="fp32")
        train(tc, progress=progress, source=WorldSource(DiffusionModel(pipe)), pipe=pipe)
        if steps == cfg.weak_steps:
            finish(run, cfg, weak)
