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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import SelfNPOError
from .io import atomic_path, atomic_write_text, read_prompts, remove_stale_temps
from .training.config import opt, with_defaults

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
        for ok, msg in [
            (self.steps >= 1 and self.steps <= 1000, "--steps must be in 1..1000"),
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


def _prepare_output(cfg: GenerateConfig) -> Path:
    out = Path(cfg.output_dir)
    manifest = out / "generate_config.json"
    mine = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "overwrite", "device", "batch_size")}
    if out.exists() and any(out.iterdir()):
        if cfg.resume and manifest.is_file():
            saved = with_defaults(GenerateConfig, json.loads(manifest.read_text()))
            if {k: saved.get(k) for k in mine} != mine:
                raise SelfNPOError(f"{out}: holds images of different settings; cannot resume")
            remove_stale_temps(out)
            return out
        if not cfg.overwrite:
            raise SelfNPOError(f"{out}: output folder exists; pass --resume or --overwrite")
        if not manifest.is_file():
            raise SelfNPOError(
                f"{out}: exists and was not written by selfnpo generate; refusing to overwrite"
            )
        for pattern in ("*.png", "*.mp4", "*.gif"):
            for f in out.glob(pattern):
                f.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(manifest, json.dumps(mine, indent=2))
    except OSError as e:
        raise SelfNPOError(f"{out}: cannot write ({e.strerror})") from None
    return out


def generate(
    cfg: GenerateConfig, pipe=None, progress: bool = True, guidance=None, call_kwargs=None
) -> list[dict]:
    """Run the job; returns one record per image (prompt, seed, file).

    ``guidance`` replaces the :class:`NPOGuidance` built from ``cfg`` (any context manager, e.g.
    one carrying a guidance rule); ``call_kwargs(chunk) -> dict`` adds pipeline arguments for a
    batch of records (e.g. per-image negative prompts) and is called right before each batch.
    """
    import diffusers
    from tqdm.auto import tqdm

    from .models import family
    from .models.loading import load_pipeline, resolve_model_class
    from .npo import NPOGuidance
    from .video import FPS, video_format, write_video

    cfg.validate()
    prompts = [cfg.prompt] if cfg.prompt else read_prompts(cfg.prompts)
    if pipe is None:
        resolve_model_class(cfg.model)
    out = _prepare_output(cfg)
    if pipe is None:
        pipe = load_pipeline(cfg.model, device=cfg.device, dtype=cfg.dtype)
    flow = type(pipe.scheduler).__name__.startswith("FlowMatch")
    flow = flow or bool(pipe.scheduler.config.get("use_flow_sigmas", False))  # Wan's flow UniPC
    if cfg.scheduler and cfg.scheduler.startswith("FlowMatch") != flow:
        kind = "a flow-matching" if flow else "a diffusion (VP)"
        raise SelfNPOError(f"--scheduler {cfg.scheduler} does not fit {type(pipe).__name__}, {kind} model")
    if cfg.scheduler == "R0Scheduler":  # R0's few-step generator (docs/ddspo_r0.md)
        from .objectives.r0 import R0Scheduler

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
    n = cfg.num_images_per_prompt
    jobs = [
        {"index": i, "prompt": prompts[i // n], "seed": cfg.seed + i, "file": f"{i:05d}.{ext}"}
        for i in range(len(prompts) * n)
    ]
    # Batches are aligned to absolute indices so that a resumed job runs the same batches
    # as an uninterrupted one (batch composition can change the last bits of a result).
    chunks = [jobs[k : k + cfg.batch_size] for k in range(0, len(jobs), cfg.batch_size)]
    todo = [c for c in chunks if any(not (out / j["file"]).is_file() for j in c)]
    done = len(jobs) - sum(len(c) for c in todo)
    res = cfg.resolution or None
    dev = pipe.device
    with npo, tqdm(total=len(jobs), initial=done, desc="generate", disable=not progress) as bar:
        for chunk in todo:
            gens = [torch.Generator(dev).manual_seed(j["seed"]) for j in chunk]
            kw = dict(negative_prompt=[cfg.negative_prompt] * len(chunk) if cfg.negative_prompt else None)
            kw.update(_family_kwargs(cfg, fam, len(chunk)))
            kw.update(call_kwargs(chunk) if call_kwargs else {})
            result = pipe(
                [j["prompt"] for j in chunk],
                num_inference_steps=cfg.steps,
                generator=gens,
                height=res,
                width=res,
                **kw,
            )
            images = result.frames if ext != "png" else result.images
            for j, im in zip(chunk, images, strict=True):
                if (out / j["file"]).is_file():
                    continue
                if ext != "png":
                    write_video(im, out / j["file"], cfg.fps or FPS[fam], ext)
                    continue
                with atomic_path(out / j["file"]) as tmp:
                    im.save(tmp, format="PNG")
            bar.update(len(chunk))
    atomic_write_text(out / "images.jsonl", "".join(json.dumps(j) + "\n" for j in jobs))
    return jobs


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
