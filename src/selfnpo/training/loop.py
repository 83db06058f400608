"""The one training loop: every objective, every source, LoRA or full weights, one process or many.

State that survives a kill: ``config.json``, ``pool.safetensors`` (the self-generated or encoded
data), ``checkpoints/step-*`` (trainable weights, teacher, optimizer, RNG) and ``log.jsonl``.
Re-running the same command with ``--resume`` continues from the newest whole checkpoint and,
on CPU with the same seed, ends with bit-identical weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SelfNPOError
from ..io import (
    atomic_dir,
    atomic_write_text,
    lock_dir,
    prepare_output,
    read_prompts,
    remove_stale_temps,
    removed_on_failure,
)
from ..models import model_for
from ..models.loading import load_pipeline, resolve_model_class
from ..models.sd import DiffusionModel
from ..objectives.base import Batch, StepContext, get_objective, get_spec
from ..rewards import get_reward
from .checkpoint import load_latest, optimizer_from_flat, optimizer_to_flat, save_checkpoint
from .config import TrainConfig
from .data import LatentPool, PromptSource, Source, draw_batch, encode_image_folder, generate_pool
from .offset import TrainableOffset

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    offset_path: Path
    steps: int
    wall_time_s: float
    network_evals: int
    final_loss: float


_RUN_FILES = {"config.json", "log.jsonl", "pool.safetensors", "checkpoints", "offset", "model"}


def _legacy_run(run: Path) -> bool:
    """A run folder written before folders were marked: config.json, a log or checkpoints, and
    nothing that a run does not write."""
    names = {p.name for p in run.iterdir() if not p.name.endswith(".tmp")}
    return "config.json" in names and bool(names & {"checkpoints", "log.jsonl"}) and names <= _RUN_FILES


def prepare_run_dir(cfg: TrainConfig) -> tuple[Path, bool]:
    """Create the run folder, or return it for resumption; never silently replace anything."""
    run = Path(cfg.output_dir)
    resuming = prepare_output(
        run,
        "train",
        cfg.to_dict(),
        config_file="config.json",
        may_change=TrainConfig.RESUMABLE_CHANGES,
        paths=("model", "prompts", "image_dir", "pairs"),
        defaults=TrainConfig,
        overwrite=cfg.overwrite,
        resume=cfg.resume,
        legacy=_legacy_run,
    )
    if resuming:
        remove_stale_temps(run / "checkpoints")
    return run, resuming


def make_source(
    cfg: TrainConfig,
    model: DiffusionModel,
    offset: TrainableOffset,
    prompts,
    run: Path,
    progress: bool,
) -> Source:
    if cfg.pairs:
        from ..preference.pairs import PairSource

        return PairSource.load(cfg.pairs, model, cfg.resolution or model.default_resolution())
    if cfg.source == "noise" or get_spec(cfg.objective).prompts_only:
        return PromptSource(prompts)
    pool_file = run / "pool.safetensors"
    if pool_file.is_file():
        try:
            return LatentPool.load(pool_file)
        except Exception as e:  # noqa: BLE001
            log.warning("pool file %s is damaged (%s); rebuilding it", pool_file, type(e).__name__)
    if cfg.source == "self":
        pool = generate_pool(model, offset.teacher, prompts, cfg, progress)
    else:
        pool = encode_image_folder(model, cfg.image_dir, cfg.resolution or model.default_resolution())
    pool.save(pool_file)
    return pool


def _log_line(run: Path, rec: dict) -> None:
    with open(run / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def _trim_log(run: Path, step: int) -> None:
    p = run / "log.jsonl"
    if not p.is_file():
        return
    keep = []
    for line in p.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            if json.loads(line)["step"] <= step:
                keep.append(line)
    atomic_write_text(p, "".join(x + "\n" for x in keep))


def train(
    cfg: TrainConfig,
    progress: bool = True,
    source: Source | None = None,
    pipe=None,
    model: DiffusionModel | None = None,
) -> RunResult:
    """Run (or resume) one training job described by ``cfg``; returns where the offset was written.

    ``pipe``: an already loaded pipeline instead of ``cfg.model``; ``model``: a ready denoiser
    adapter (e.g. :class:`selfnpo.toy2d.model.Toy2DModel`), whose network is trained in place.
    """

    cfg.validate()
    needs_prompts = source is None and cfg.source != "images" and not cfg.pairs
    prompts = read_prompts(cfg.prompts) if needs_prompts else []
    if pipe is None and model is None:
        resolve_model_class(cfg.model)
    cpu = _check_device(cfg)
    main = _is_main_process(cpu)  # several processes (accelerate launch): only the main one writes
    run, resuming = _prepare_on_main(cfg, main)
    lock = lock_dir(run) if main else None
    try:
        with removed_on_failure(run, not resuming and main, keep=lambda r: (r / "checkpoints").is_dir()):
            return _train(cfg, progress, source, pipe, prompts, run, resuming, cpu, model)
    finally:
        if lock is not None:
            lock.close()


def _check_device(cfg: TrainConfig) -> bool:
    """Whether to train on the CPU; a device that is not there is an error, never a silent CPU run."""
    from ..models.loading import check_device

    dev = check_device(cfg.device)
    cpu = dev.type == "cpu"
    if cpu and cfg.mixed_precision != "no":
        log.warning("--mixed-precision %s has no effect on the CPU; training in fp32", cfg.mixed_precision)
    return cpu


def _train(
    cfg: TrainConfig, progress, source, pipe, prompts, run: Path, resuming: bool, cpu: bool, model=None
) -> RunResult:
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision="no" if cpu else cfg.mixed_precision, cpu=cpu)
    model = _model(cfg, acc, pipe, model)
    torch.manual_seed(cfg.seed)  # LoRA initialisation
    offset = TrainableOffset(model, cfg)
    opt = torch.optim.AdamW(offset.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    offset.net, opt = acc.prepare(model.unet, opt)  # a DDP wrapper with several processes
    # one generator, the same in every process: each draws the global batch and keeps its rows
    gen = torch.Generator(acc.device).manual_seed(cfg.seed)
    with acc.main_process_first():  # the main process builds the pool file, the others load it
        src = source or make_source(cfg, model, offset, prompts, run, progress and acc.is_main_process)
    model.warm_cache(getattr(src, "prompts", []))  # text encodings once per run, not per step
    step = _resume(run, acc, offset, opt, gen) if resuming else 0
    reward = get_reward(cfg.reward, acc.device) if get_spec(cfg.objective).uses_reward else None
    shard = (acc.process_index, acc.num_processes)
    ctx = StepContext(
        model, offset.student, offset.teacher, cfg, gen, offset=offset, reward=reward, shard=shard
    )
    t0, nfe0 = time.perf_counter(), model.nfe
    step, loss_val = _loop(cfg, acc, model, offset, opt, ctx, src, gen, step, run, progress)
    wall = time.perf_counter() - t0
    meta = {"objective": cfg.objective, "base_model": cfg.model, "steps": step, "train": cfg.train}
    out = offset.save(run / "offset", meta) if acc.is_main_process else run / "offset"
    if cfg.save_model and acc.is_main_process:
        _save_model(model, offset, run / "model")
    acc.wait_for_everyone()  # every process returns once the offset is written
    return RunResult(run, out, step, wall, model.nfe - nfe0, loss_val)


def _model(cfg: TrainConfig, acc, pipe, model) -> DiffusionModel:
    """The denoiser adapter: the one given, or one for ``pipe`` / ``cfg.model``."""
    if model is None:
        if pipe is None:
            pipe = load_pipeline(cfg.model, device=str(acc.device), dtype="fp32")
        model = model_for(pipe, resolution=cfg.resolution or None, frames=cfg.frames or None)
    if cfg.resolution and cfg.resolution % model.vae_scale:
        raise SelfNPOError(
            f"--resolution {cfg.resolution} is not a multiple of this model's VAE factor {model.vae_scale}"
        )
    return model


def _resume(run: Path, acc, offset: TrainableOffset, opt, gen: torch.Generator) -> int:
    """Restore the newest checkpoint of ``run`` (offset, optimiser, generator); its step (0: none)."""
    state = load_latest(run)
    if state is None:
        return 0
    tensors, meta = state
    offset.load_state_tensors(tensors)
    optimizer_from_flat(opt, tensors, meta["optimizer"])
    gen.set_state(tensors["rng"].to(torch.uint8))
    step = int(meta["step"])
    if acc.is_main_process:
        _trim_log(run, step)
    return step


def _loop(cfg, acc, model, offset, opt, ctx, src, gen, step: int, run: Path, progress) -> tuple[int, float]:
    """Optimiser steps from ``step`` to ``cfg.steps`` with logging and checkpoints; (steps, last loss)."""
    from tqdm.auto import tqdm

    objective = get_objective(cfg.objective)
    bar = tqdm(
        total=cfg.steps, initial=step, desc=cfg.objective, disable=not (progress and acc.is_main_process)
    )
    t0, loss_val, first, skipped = time.perf_counter(), float("nan"), step, 0
    while step < cfg.steps:
        loss_val = _one_step(cfg, acc, model, offset, opt, objective, ctx, src, gen, step, run)
        skipped += loss_val != loss_val  # NaN: a step skipped by --nonfinite skip
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.4g}")
        if acc.is_main_process and (step % cfg.log_every == 0 or step == cfg.steps):
            _log_line(run, {"step": step, "loss": loss_val, "lr": cfg.lr, "time_s": time.perf_counter() - t0})
        if acc.is_main_process and (
            step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        ):
            _checkpoint(run, step, offset, opt, gen, cfg)
    bar.close()
    if first == 0 and skipped == step:
        raise SelfNPOError(
            f"all {step} steps had a non-finite loss or gradient and were skipped (--nonfinite skip); "
            "the offset is untrained and was not written"
        )
    return step, loss_val


def _one_step(cfg, acc, model, offset, opt, objective, ctx, src, gen, step, run) -> float:
    total = 0.0
    for micro in range(cfg.grad_accum):
        prompts, x0 = draw_batch(src, gen, cfg.batch_size, cfg.caption_dropout, ctx.shard)
        x0_l = None
        if isinstance(x0, tuple):  # preference sources: (winners, losers)
            x0, x0_l = x0
        batch = Batch(prompts, model.encode(prompts).to(acc.device), x0, x0_l)
        sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else acc.no_sync(offset.net)
        with sync, acc.autocast():
            loss = objective(ctx, batch).mean() / cfg.grad_accum
            if not _all_finite(acc, loss):
                return _nonfinite(cfg, opt, step, run, "loss")
            acc.backward(loss)
        total += loss.item()
    if acc.num_processes > 1:  # the loss of the global batch, as one process would log it
        total = acc.reduce(torch.tensor(total, device=acc.device), reduction="mean").item()
    if cfg.max_grad_norm > 0:
        norm = acc.clip_grad_norm_(offset.params, cfg.max_grad_norm)
        # with fp16 loss scaling an overflow is routine: the scaler skips the step and lowers its scale
        if acc.scaler is None and not torch.isfinite(torch.as_tensor(norm)):
            return _nonfinite(cfg, opt, step, run, "gradient")
    opt.step()
    opt.zero_grad(set_to_none=True)
    offset.update_teacher()
    return total


def _all_finite(acc, loss) -> bool:
    """Whether the loss is finite in every process (all must skip or stop together, or the others
    would wait forever in the gradient all-reduce)."""
    bad = torch.tensor(float(not torch.isfinite(loss)), device=acc.device)
    return not (acc.reduce(bad, reduction="sum").item() if acc.num_processes > 1 else bad.item())


def _is_main_process(cpu: bool) -> bool:
    """Whether this is the main process; starts accelerate's process group (that the
    Accelerator then reuses) when the launcher started several."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    from accelerate import PartialState

    return PartialState(cpu=cpu).is_main_process


def _prepare_on_main(cfg: TrainConfig, main: bool) -> tuple[Path, bool]:
    """:func:`prepare_run_dir` in the main process only; the others learn whether it resumes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return prepare_run_dir(cfg)
    from accelerate.utils import broadcast_object_list

    out = [prepare_run_dir(cfg) if main else None]
    return broadcast_object_list(out)[0]


def _nonfinite(cfg, opt, step: int, run: Path, what: str) -> float:
    opt.zero_grad(set_to_none=True)
    if cfg.nonfinite == "skip":
        log.warning("non-finite %s at step %d; step skipped", what, step + 1)
        return float("nan")
    from .checkpoint import list_checkpoints

    ckpts = list_checkpoints(run)
    last = ckpts[-1] if ckpts else "none"
    raise SelfNPOError(
        f"non-finite {what} at step {step + 1}; training stopped, last good checkpoint: {last}"
    )


def _checkpoint(run: Path, step: int, offset: TrainableOffset, opt, gen, cfg: TrainConfig) -> None:
    tensors = dict(offset.state_tensors())
    opt_t, opt_js = optimizer_to_flat(opt)
    tensors.update(opt_t)
    tensors["rng"] = gen.get_state().cpu()
    save_checkpoint(run, step, tensors, {"optimizer": opt_js}, cfg.keep_checkpoints)


def _save_model(model: DiffusionModel, offset: TrainableOffset, out: Path) -> None:
    if offset.mode != "full":
        raise SelfNPOError("--save-model needs --train full")
    with atomic_dir(out) as tmp:
        model.pipe.save_pretrained(tmp)
