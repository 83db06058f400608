"""Batch generation with NPO guidance through the model's own diffusers pipeline.

Video pipelines (Wan, CogVideoX) write one mp4 (or GIF) per sample instead of a PNG. Flux.1-dev
runs its negative branch only under true CFG: ``--guidance-scale`` is then true CFG's scale and
``--distilled-guidance`` the guidance embedding both of its calls get.

Image ``i`` (prompt ``i // n``, repeat ``i % n``) always uses seed ``seed + i``, so a resumed or
re-batched job produces the same set. Every image is written atomically; a killed job re-run
with ``--resume`` skips the images that exist.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .errors import SelfNPOError
from .io import (
    atomic_path,
    atomic_write_text,
    lock_dir,
    prepare_output,
    read_prompts,
    removed_on_failure,
)
from .options import MAX_SEED, check_finite, opt

SCHEDULERS = (
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
    "LMSDiscreteScheduler",
    "DDPMScheduler",
    "HeunDiscreteScheduler",
    "R0Scheduler",
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
)


@dataclass
class GenerateConfig:
    """Generate images with theta+eta on the conditional branch and theta+alpha*eta+beta*delta on the negative."""

    model: str = opt("", "diffusers model folder or hub id")
    prompts: str = opt("", "prompt file (.txt / .tsv / .jsonl)")
    prompt: str = opt("", "a single prompt (instead of --prompts)")
    output_dir: str = opt("outputs/generate", "folder for the PNGs and images.jsonl")
    negative_offset: str = opt(
        "", "negative offset delta: LoRA or full-delta safetensors (file or run offset folder)"
    )
    positive_offset: str = opt("", "optional positive offset eta (e.g. a Diffusion-DPO LoRA)")
    alpha: float = opt(0.0, "share of eta in the negative branch")
    beta: float = opt(1.0, "scale of delta in the negative branch (0 = no NPO)")
    guidance_scale: float = opt(7.5, "diffusers guidance scale g (the papers' w is g - 1)")
    negative_prompt: str = opt("", "negative prompt for the negative branch")
    steps: int = opt(25, "sampling steps")
    scheduler: str = opt("", f"scheduler class to use instead of the model's own ({', '.join(SCHEDULERS)})")
    r0_eta: float = opt(
        1.0, "with --scheduler R0Scheduler: fixed eta of R0's generator step (1 = deterministic DDIM)"
    )
    num_images_per_prompt: int = opt(1, "images per prompt")
    batch_size: int = opt(8, "images per pipeline call")
    seed: int = opt(0, "image i uses seed + i")
    distilled_guidance: float = opt(
        3.5, "Flux.1-dev: the guidance embedding both branches get (--guidance-scale is true CFG's scale)"
    )
    frames: int = opt(0, "video pipelines: frames per video (0 = the pipeline's default)")
    fps: int = opt(0, "video pipelines: frame rate of the written files (0 = Wan 16, CogVideoX 8)")
    video_format: str = opt(
        "mp4", "video pipelines: mp4 (needs imageio-ffmpeg; falls back to gif) or gif", choices=("mp4", "gif")
    )
    resolution: int = opt(0, "image size (0 = the model's default)")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N")
    dtype: str = opt("auto", "auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    resume: bool = opt(False, "skip images that already exist in --output-dir")
    overwrite: bool = opt(False, "replace an existing output folder")

    def validate(self) -> GenerateConfig:
        if not self.model:
            raise SelfNPOError("--model is required")
        if bool(self.prompts) == bool(self.prompt):
            raise SelfNPOError("give exactly one of --prompts FILE or --prompt TEXT")
        check_finite(self)
        for ok, msg in [
            (self.steps >= 1 and self.steps <= 1000, "--steps must be in 1..1000"),
            (0 <= self.seed <= MAX_SEED, f"--seed must be in 0..{MAX_SEED}"),
            (self.resolution <= 4096, "--resolution must be <= 4096"),
            (self.num_images_per_prompt >= 1, "--num-images-per-prompt must be >= 1"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (0 <= self.guidance_scale <= 100, "--guidance-scale must be in [0, 100]"),
            (
                self.resolution >= 0 and self.resolution % 8 == 0,
                "--resolution must be a multiple of 8",
            ),
            (
                not self.scheduler or self.scheduler in SCHEDULERS,
                f"unknown --scheduler {self.scheduler!r}",
            ),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other"),
            (0.0 <= self.r0_eta <= 1.0, "--r0-eta must be in [0, 1]"),
            (self.frames >= 0 and self.fps >= 0, "--frames and --fps must be >= 0"),
            (self.video_format in ("mp4", "gif"), "--video-format must be mp4 or gif"),
            (
                abs(self.alpha) <= 10 and abs(self.beta) <= 10,
                "--alpha and --beta must be in [-10, 10]",
            ),
        ]:
            if not ok:
                raise SelfNPOError(msg)
        return self


_NOT_COMPARED = ("resume", "overwrite", "device", "output_dir")
_PATHS = ("model", "prompts", "negative_offset", "positive_offset")
_GEN_FILES = ("generate_config.json", "images.jsonl")


def _legacy_output(out: Path) -> bool:
    """An output folder written before folders were marked: generate_config.json and PNGs."""
    names = [p.name for p in out.iterdir() if not p.name.endswith(".tmp")]
    return "generate_config.json" in names and all(n in _GEN_FILES or n.endswith(".png") for n in names)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _offset_hashes(cfg: GenerateConfig) -> dict[str, str]:
    from .offsets import resolve_offset_file

    return {
        f"{k}_sha256": _sha256(resolve_offset_file(getattr(cfg, k)))
        for k in ("negative_offset", "positive_offset")
        if getattr(cfg, k)
    }


def _prepare_output(cfg: GenerateConfig, hashes: dict[str, str] | None = None) -> tuple[Path, bool]:
    """The output folder (created, or checked for ``--resume``) and whether it is resumed."""
    out = Path(cfg.output_dir)
    mine = {k: v for k, v in asdict(cfg).items() if k not in _NOT_COMPARED}
    mine.update(hashes or {})
    defaults = {f.name: f.default for f in fields(GenerateConfig) if f.name != "batch_size"}
    resuming = prepare_output(
        out,
        "generate",
        mine,
        config_file="generate_config.json",
        paths=_PATHS,
        defaults=defaults,  # batch_size and offset hashes, not recorded by earlier versions: trusted
        overwrite=cfg.overwrite,
        resume=cfg.resume,
        legacy=_legacy_output,
    )
    return out, resuming


def _finished(path: Path) -> bool:
    """Whether ``path`` is a PNG that decodes fully (a truncated or garbage file is made again);
    videos are written atomically, so one that exists is whole."""
    from PIL import Image

    if not path.is_file():
        return False
    if path.suffix != ".png":
        return path.stat().st_size > 0
    try:
        with Image.open(path) as im:
            im.load()
            return im.format == "PNG"
    except Exception:  # noqa: BLE001 - any decoding failure: not finished
        return False


def _has_outputs(out: Path) -> bool:
    """Whether a failed job's folder holds finished images or videos worth keeping."""
    return any(any(out.glob(f"*.{ext}")) for ext in ("png", "mp4", "gif"))


def _warn_no_effect(cfg: GenerateConfig) -> None:
    import logging

    log = logging.getLogger(__name__)
    if cfg.guidance_scale <= 1 and (cfg.negative_offset or cfg.positive_offset and cfg.alpha):
        log.warning(
            "--guidance-scale %g: diffusers runs no negative branch at g <= 1, so the negative "
            "offset has no effect",
            cfg.guidance_scale,
        )
    if not cfg.negative_offset and cfg.beta != GenerateConfig.beta:
        log.warning("--beta %g has no effect without --negative-offset", cfg.beta)


def generate(
    cfg: GenerateConfig, pipe=None, progress: bool = True, guidance=None, call_kwargs=None
) -> list[dict]:
    """Run the job; returns one record per image (prompt, seed, file).

    ``guidance`` replaces the :class:`NPOGuidance` built from ``cfg`` (any context manager, e.g.
    one carrying a guidance rule); ``call_kwargs(chunk) -> dict`` adds pipeline arguments for a
    batch of records (e.g. per-image negative prompts) and is called right before each batch.
    """
    from .models.loading import check_device, resolve_model_class

    cfg.validate()
    prompts = [cfg.prompt] if cfg.prompt else read_prompts(cfg.prompts)
    if pipe is None:
        resolve_model_class(cfg.model)
        check_device(cfg.device)
    _warn_no_effect(cfg)
    out, resuming = _prepare_output(cfg, _offset_hashes(cfg))
    lock = lock_dir(out)
    try:
        with removed_on_failure(out, not resuming, keep=_has_outputs):
            return _generate(cfg, pipe, progress, prompts, out, guidance, call_kwargs)
    finally:
        lock.close()


def _generate(
    cfg: GenerateConfig, pipe, progress: bool, prompts: list[str], out: Path, guidance=None, call_kwargs=None
) -> list[dict]:
    import diffusers
    from tqdm.auto import tqdm

    from .models import family
    from .models.loading import load_pipeline
    from .npo import NPOGuidance
    from .video import FPS, video_format

    if pipe is None:
        pipe = load_pipeline(cfg.model, device=cfg.device, dtype=cfg.dtype)
    flow = type(pipe.scheduler).__name__.startswith("FlowMatch")
    flow = flow or bool(pipe.scheduler.config.get("use_flow_sigmas", False))  # Wan's flow UniPC
    if cfg.scheduler and cfg.scheduler.startswith("FlowMatch") != flow:
        kind = "a flow-matching" if flow else "a diffusion (VP)"
        raise SelfNPOError(f"--scheduler {cfg.scheduler} does not fit {type(pipe).__name__}, {kind} model")
    if cfg.scheduler == "R0Scheduler":  # R0's few-step generator (docs/ddspo_r0.md)
        from .schedulers import R0Scheduler

        pipe.scheduler = R0Scheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
        pipe.scheduler.r0_eta = cfg.r0_eta
    elif cfg.scheduler:
        pipe.scheduler = getattr(diffusers, cfg.scheduler).from_config(pipe.scheduler.config)
    npo = (
        guidance
        if guidance is not None
        else NPOGuidance(
            pipe,
            negative=cfg.negative_offset or None,
            positive=cfg.positive_offset or None,
            alpha=cfg.alpha,
            beta=cfg.beta,
        )
    )
    fam = family(pipe)
    ext = video_format(cfg.video_format) if fam in FPS else "png"
    jobs, todo, finished = _plan(cfg, prompts, out, ext)
    done = len(jobs) - sum(len(c) for c in todo)
    with npo, tqdm(total=len(jobs), initial=done, desc="generate", disable=not progress) as bar:
        for chunk in todo:
            images = _run_batch(pipe, cfg, fam, chunk, call_kwargs, video=ext != "png")
            _save_outputs(chunk, images, out, finished, ext, cfg.fps or FPS.get(fam, 0))
            bar.update(len(chunk))
    atomic_write_text(out / "images.jsonl", "".join(json.dumps(j) + "\n" for j in jobs))
    return jobs


def _plan(
    cfg: GenerateConfig, prompts: list[str], out: Path, ext: str
) -> tuple[list[dict], list[list[dict]], set[str]]:
    """Every output (index, prompt, seed, file), the batches still to run, the finished files."""
    n = cfg.num_images_per_prompt
    jobs = [
        {"index": i, "prompt": prompts[i // n], "seed": cfg.seed + i, "file": f"{i:05d}.{ext}"}
        for i in range(len(prompts) * n)
    ]
    # Batches are aligned to absolute indices so that a resumed job runs the same batches
    # as an uninterrupted one (batch composition can change the last bits of a result).
    chunks = [jobs[k : k + cfg.batch_size] for k in range(0, len(jobs), cfg.batch_size)]
    finished = {j["file"] for j in jobs if _finished(out / j["file"])}
    todo = [c for c in chunks if any(j["file"] not in finished for j in c)]
    return jobs, todo, finished


def _run_batch(pipe, cfg: GenerateConfig, fam: str, chunk: list[dict], call_kwargs, video: bool) -> list:
    """The images (or videos' frames) of one batch, image i from its own seed."""
    gens = [torch.Generator(pipe.device).manual_seed(j["seed"]) for j in chunk]
    kw = dict(negative_prompt=[cfg.negative_prompt] * len(chunk) if cfg.negative_prompt else None)
    kw.update(_family_kwargs(cfg, fam, len(chunk)))
    kw.update(call_kwargs(chunk) if call_kwargs else {})
    res = cfg.resolution or None
    prompts = [j["prompt"] for j in chunk]
    result = pipe(prompts, num_inference_steps=cfg.steps, generator=gens, height=res, width=res, **kw)
    return result.frames if video else result.images


def _save_outputs(chunk: list[dict], images: list, out: Path, finished: set[str], ext: str, fps: int) -> None:
    """Write each output of a batch that is not finished yet, atomically."""
    from .video import write_video

    for j, im in zip(chunk, images, strict=True):
        if j["file"] in finished:
            continue
        if ext != "png":
            write_video(im, out / j["file"], fps, ext)
            continue
        with atomic_path(out / j["file"]) as tmp:
            im.save(tmp, format="PNG")


def _family_kwargs(cfg: GenerateConfig, fam: str, n: int) -> dict:
    """Pipeline arguments that differ by family: Flux's true CFG, video length and output type."""
    if fam == "flux":
        # true CFG (the only negative branch Flux has) needs a negative prompt, the empty one by default
        neg = [cfg.negative_prompt] * n
        return dict(
            guidance_scale=cfg.distilled_guidance, true_cfg_scale=cfg.guidance_scale, negative_prompt=neg
        )
    kw: dict = {"guidance_scale": cfg.guidance_scale}
    if fam in ("wan", "cogvideox"):
        kw["output_type"] = "np"
        if cfg.frames:
            kw["num_frames"] = cfg.frames
    return kw
