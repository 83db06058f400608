"""``selfnpo pairs``: preference pairs by AI feedback, with no human data.

For every prompt the model draws two images (seeds ``seed + 2i`` and ``seed + 2i + 1``, guided
DDIM), a reward scores both, and the higher-scoring one becomes the winner (the Diffusion-DPO
authors' "AI feedback" option). Pairs whose scores differ by no more than ``min_margin`` are
dropped as ties. The folder is written atomically: images, ``pairs.jsonl``, the exact latents
(``latents.safetensors``) and ``pairs_meta.json`` with what the pairs cost to build.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from ..errors import SelfNPOError
from ..io import atomic_dir, prepare_output, read_prompts, write_marker
from ..models import model_for
from ..models.sd import DiffusionModel
from ..options import MAX_SEED, check_finite, opt
from ..schedules import ddim_grid
from ..training.data import sample_latents
from .pairs import FORMAT, PairRecord, write_pairs


@dataclass
class PairsConfig:
    """Build preference pairs for a model by generating two images per prompt and ranking them with a reward."""

    model: str = opt("", "diffusers model folder or hub id (default: the embedded world model)")
    prompts: str = opt("", "prompt file (default: training-split captions of the embedded world)")
    num_prompts: int = opt(512, "without --prompts: how many embedded-world training captions")
    output_dir: str = opt("pairs", "output folder (pairs.jsonl, images/, latents.safetensors)")
    reward: str = opt("world", "reward model by name that ranks the two images")
    guidance_scale: float = opt(3.0, "guidance scale g of the generation")
    steps: int = opt(25, "DDIM steps per image")
    min_margin: float = opt(0.0, "drop pairs whose reward difference is <= this (ties)")
    batch_size: int = opt(32, "images generated per batch")
    seed: int = opt(0, "image 2i of prompt i uses seed+2i, its partner seed+2i+1")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N")
    overwrite: bool = opt(False, "replace an existing output folder")

    def validate(self) -> PairsConfig:
        check_finite(self)
        checks = [
            (0 <= self.seed <= MAX_SEED, f"--seed must be in 0..{MAX_SEED}"),
            (self.num_prompts >= 1, "--num-prompts must be >= 1"),
            (1 <= self.steps <= 1000, "--steps must be in 1..1000"),
            (1.0 <= self.guidance_scale <= 50.0, "--guidance-scale must be in [1, 50]"),
            (self.min_margin >= 0, "--min-margin must be >= 0"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SelfNPOError(msg)
        return self


def _prepare(cfg: PairsConfig) -> Path:
    out = Path(cfg.output_dir)
    legacy = lambda o: (o / "pairs_meta.json").is_file()  # noqa: E731 - folders of earlier versions
    prepare_output(out, "pairs", overwrite=cfg.overwrite, legacy=legacy)
    return out


def _png(img: torch.Tensor, path: Path) -> None:
    arr = ((img.permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


@torch.no_grad()
def _draw_images(
    model: DiffusionModel, prompts: list[str], seeds: list[int], cfg: PairsConfig
) -> torch.Tensor:
    shape = model.latent_shape(1)
    noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(
        model.device
    )
    grid = ddim_grid(cfg.steps, model.num_train_timesteps).to(model.device)
    return sample_latents(model, model.predict, prompts, noise, cfg.guidance_scale, grid).cpu()


def _draw_and_score(
    model: DiffusionModel, reward, prompts: list[str], cfg: PairsConfig, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents ``[2P, ...]`` and rewards ``[2P]`` of both images of every prompt (2i and 2i+1)."""
    from tqdm.auto import tqdm

    jobs = [(p, 2 * i + side) for i, p in enumerate(prompts) for side in (0, 1)]
    lats, scores = [], []
    for i in tqdm(range(0, len(jobs), cfg.batch_size), desc="pairs", disable=not progress):
        chunk = jobs[i : i + cfg.batch_size]
        ps = [p for p, _ in chunk]
        lat = _draw_images(model, ps, [cfg.seed + k for _, k in chunk], cfg)
        with torch.no_grad():
            scores.append(reward(model.decode_latents(lat), ps).float().cpu())
        lats.append(lat)
    return torch.cat(lats), torch.cat(scores)


def _write_images(
    tmp: Path, images: torch.Tensor, prompts: list[str], score: torch.Tensor, cfg: PairsConfig
) -> tuple[list[PairRecord], list[int], list[int]]:
    """The PNGs of the pairs that are not ties, their records, and winner and loser indices."""
    records, keep_w, keep_l = [], [], []
    for i, prompt in enumerate(prompts):
        a, b = 2 * i, 2 * i + 1
        if abs(float(score[a] - score[b])) <= cfg.min_margin:
            continue
        w, l = (a, b) if score[a] > score[b] else (b, a)
        names = [f"images/{i:06d}_{s}.png" for s in ("w", "l")]
        _png(images[w], tmp / names[0])
        _png(images[l], tmp / names[1])
        seeds = cfg.seed + w, cfg.seed + l
        records.append(PairRecord(prompt, names[0], names[1], float(score[w]), float(score[l]), *seeds))
        keep_w.append(w)
        keep_l.append(l)
    return records, keep_w, keep_l


def _write_folder(
    out: Path, cfg: PairsConfig, model: DiffusionModel, prompts: list[str], lat, score, cost: dict
) -> None:
    """The whole pair folder, atomically: images, ``pairs.jsonl``, latents and ``pairs_meta.json``."""
    with atomic_dir(out) as tmp:
        write_marker(tmp, "pairs")
        (tmp / "images").mkdir()
        records, keep_w, keep_l = _write_images(tmp, model.decode_latents(lat), prompts, score, cfg)
        if not records:
            raise SelfNPOError("every pair was a tie under --min-margin; nothing to write")
        write_pairs(tmp, records)
        save_file(
            {"winner": lat[keep_w].contiguous(), "loser": lat[keep_l].contiguous()},
            str(tmp / "latents.safetensors"),
            metadata={"format": FORMAT},
        )
        meta = {"format": FORMAT, "config": asdict(cfg), "prompts": len(prompts), "pairs": len(records)}
        meta.update(ties_dropped=len(prompts) - len(records), **cost)
        (tmp / "pairs_meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


def build_pairs(cfg: PairsConfig, pipe=None, progress: bool = True) -> Path:
    """Generate, score and write the pairs; returns the ``pairs.jsonl`` path."""
    from ..models.loading import load_pipeline
    from ..rewards import get_reward

    cfg.validate()
    if cfg.prompts:
        prompts = read_prompts(cfg.prompts)
    else:
        from ..world.model import world_prompts

        prompts = world_prompts(cfg.num_prompts, "train", cfg.seed)
    out = _prepare(cfg)
    if pipe is None:
        from ..world.model import shipped_model_dir

        pipe = load_pipeline(cfg.model or str(shipped_model_dir()), device=cfg.device, dtype="fp32")
    model = model_for(pipe)
    reward = get_reward(cfg.reward, model.device)
    t0, nfe0 = time.perf_counter(), model.nfe
    lat, score = _draw_and_score(model, reward, prompts, cfg, progress)
    wall = time.perf_counter() - t0
    cost = {"network_evals": model.nfe - nfe0, "images_scored": 2 * len(prompts), "wall_time_s": wall}
    _write_folder(out, cfg, model, prompts, lat, score, cost)
    return out / "pairs.jsonl"
