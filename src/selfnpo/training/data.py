"""Sources of training batches: prompts only, a latent pool (self-generated or encoded images)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import SelfNPOError
from ..guidance import guided
from ..io import atomic_path
from ..models.sd import DiffusionModel
from ..sampling import ddim_sample
from ..schedules import ddim_grid

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class Source(Protocol):
    def sample(self, g: torch.Generator, n: int) -> tuple[list[str], Tensor | None]: ...


def _draw(g: torch.Generator, n: int, size: int) -> list[int]:
    return torch.randint(size, (n,), generator=g, device=g.device).tolist()


def draw_batch(
    src: Source, g: torch.Generator, n: int, dropout: float = 0.0, shard: tuple[int, int] = (0, 1)
) -> tuple[list[str], Tensor | tuple[Tensor, Tensor] | None]:
    """This process's ``n`` samples of a global batch of ``n * processes``, prompts dropped to ""
    with probability ``dropout``. Every process draws the whole global batch from the same
    generator and keeps rows ``[i n, (i + 1) n)``, so ``P`` processes see what one process with
    batch ``P n`` sees."""
    i, k = shard
    prompts, x0 = src.sample(g, n * k)
    if dropout > 0:
        drop = torch.rand(len(prompts), generator=g, device=g.device).tolist()
        prompts = ["" if u < dropout else p for p, u in zip(prompts, drop, strict=True)]
    if k == 1:
        return prompts, x0
    rows = slice(i * n, (i + 1) * n)
    if isinstance(x0, tuple):  # preference sources: (winners, losers)
        return prompts[rows], tuple(v[rows] for v in x0)
    return prompts[rows], None if x0 is None else x0[rows]


class PromptSource:
    """Prompts only; objectives start from noise (or simulate the data themselves)."""

    def __init__(self, prompts: list[str]) -> None:
        self.prompts = prompts

    def sample(self, g: torch.Generator, n: int) -> tuple[list[str], Tensor | None]:
        return [self.prompts[i] for i in _draw(g, n, len(self.prompts))], None


class LatentPool:
    """Clean latents with their prompts, kept on the CPU and drawn with replacement."""

    def __init__(self, latents: Tensor, prompts: list[str]) -> None:
        assert latents.shape[0] == len(prompts)
        self.latents, self.prompts = latents, prompts

    def sample(self, g: torch.Generator, n: int) -> tuple[list[str], Tensor | None]:
        idx = _draw(g, n, len(self.prompts))
        return [self.prompts[i] for i in idx], self.latents[idx].to(g.device)

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            save_file(
                {"latents": self.latents.contiguous()},
                str(tmp),
                metadata={"prompts": json.dumps(self.prompts)},
            )

    @staticmethod
    def load(path: Path) -> LatentPool:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            prompts = json.loads(f.metadata()["prompts"])
        return LatentPool(load_file(str(path))["latents"], prompts)


@torch.no_grad()
def sample_latents(
    model: DiffusionModel, predict, prompts: list[str], noise: Tensor, g: float, grid: Tensor
) -> Tensor:
    """Clean latents of ``prompts`` from ``noise``: DDIM over ``grid`` with guidance ``g``,
    ``predict`` in both branches (conditional and unconditional)."""
    f = guided(predict, model.encode(prompts), model.uncond(len(prompts)), g)
    return ddim_sample(model, f, noise, grid)


@torch.no_grad()
def generate_pool(model: DiffusionModel, predict, prompts: list[str], cfg, progress: bool) -> LatentPool:
    """The model's own samples: DDIM over the training grid with guidance ``pool_guidance_scale``."""
    from tqdm.auto import tqdm

    g = torch.Generator(model.device).manual_seed(cfg.seed + 7919)
    chosen = [prompts[i] for i in _draw(g, cfg.pool_size, len(prompts))]
    grid = ddim_grid(cfg.grid_steps, model.num_train_timesteps).to(model.device)
    out = []
    bs = max(cfg.batch_size, 8)
    for i in tqdm(range(0, len(chosen), bs), desc="self-generated pool", disable=not progress):
        ps = chosen[i : i + bs]
        noise = torch.randn(model.latent_shape(len(ps), cfg.resolution or None), generator=g, device=g.device)
        out.append(sample_latents(model, predict, ps, noise, cfg.pool_guidance_scale, grid).cpu())
    return LatentPool(torch.cat(out), chosen)


def _captions(folder: Path) -> list[tuple[Path, str]]:
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        pairs = []
        for i, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                pairs.append((folder / rec["file_name"], str(rec.get("text", rec.get("caption")))))
            except (ValueError, KeyError, TypeError):
                raise SelfNPOError(f"{meta}:{i}: expected {{'file_name': ..., 'text': ...}}") from None
        return pairs
    pairs = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            cap = p.with_suffix(".txt")
            if not cap.is_file():
                raise SelfNPOError(f"{p}: no caption ({cap.name} missing and no metadata.jsonl)")
            pairs.append((p, cap.read_text(encoding="utf-8").strip()))
    return pairs


def load_image(path: Path, res: int) -> Tensor:
    """Centre-crop, resize to ``res`` and scale to [-1, 1], ``[3, res, res]``."""
    try:
        im = Image.open(path).convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise SelfNPOError(f"{path}: not a readable image ({type(e).__name__})") from None
    w, h = im.size
    side = min(w, h)
    im = im.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)).resize(
        (res, res), Image.BICUBIC
    )
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


@torch.no_grad()
def encode_image_folder(model: DiffusionModel, folder: str, res: int) -> LatentPool:
    root = Path(folder)
    if not root.is_dir():
        raise SelfNPOError(f"{root}: image folder not found")
    pairs = _captions(root)
    if not pairs:
        raise SelfNPOError(f"{root}: no images found")
    lats = []
    for i in range(0, len(pairs), 16):
        imgs = torch.stack([load_image(p, res) for p, _ in pairs[i : i + 16]])
        lats.append(model.encode_images(imgs).cpu())
    return LatentPool(torch.cat(lats), [c for _, c in pairs])
