"""Attribute classifier for world scenes, and the metrics built on it.

The network predicts, for each of the 9 grid cells, shape-or-empty, colour and size,
plus the background colour and texture. Per-cell predictions are treated as
independent, which gives both a hard decoding (for `alignment`) and an exact
log-probability that a caption holds (for `reward`). See docs/world.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from selfnpo.io import atomic_path, atomic_write_text
from selfnpo.world.captions import CaptionLabels, caption, consistent, parse_caption, relation_holds
from selfnpo.world.render import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    Obj,
    Scene,
    render_batch,
)

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "assets" / "classifier.safetensors"
DEFAULT_CONFIG = {"widths": [32, 48, 96], "cell_dim": 32, "global_dim": 32}
N_CELLS = len(POSITIONS)
HEADS = ("shape", "colour", "size", "background", "texture")


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class AttributeClassifier(nn.Module):
    """CNN with per-cell heads (shared across cells) and global background heads.

    Input: float images in [-1, 1], [B, 3, 32, 32]. They are resized to 36x36 so
    that after two stride-2 stages every grid cell is exactly a 3x3 block of the
    9x9 feature map, which a stride-3 convolution turns into one cell vector.
    """

    def __init__(self, widths: Sequence[int] = (32, 48, 96), cell_dim: int = 32, global_dim: int = 32):
        super().__init__()
        w0, w1, w2 = widths
        self.fine = nn.Sequential(_conv(3, w0), _conv(w0, w1, 2), _conv(w1, w1))
        self.coarse = nn.Sequential(_conv(w1, w2, 2), _conv(w2, w2))
        self.cell = nn.Sequential(
            nn.Conv2d(w2, 2 * cell_dim, 3, stride=3),
            nn.ReLU(),
            nn.Conv2d(2 * cell_dim, cell_dim, 1),
        )
        self.glob = nn.Linear(w1 + w2, global_dim)
        self.shape_head = nn.Linear(cell_dim, len(SHAPES) + 1)
        self.colour_head = nn.Linear(cell_dim, len(COLOURS))
        self.size_head = nn.Linear(cell_dim, len(SIZES))
        self.background_head = nn.Linear(global_dim, len(BACKGROUNDS))
        self.texture_head = nn.Linear(global_dim, len(TEXTURES))
        self.feature_dim = N_CELLS * cell_dim + global_dim

    def _penultimate(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = F.interpolate(images, size=(36, 36), mode="bilinear", align_corners=False)
        fine = self.fine(x)
        coarse = self.coarse(fine)
        cells = F.relu(self.cell(coarse)).flatten(2).transpose(1, 2)  # [B, 9, cell_dim]
        pooled = torch.cat([fine.mean((2, 3)), coarse.mean((2, 3))], dim=1)
        return cells, F.relu(self.glob(pooled))

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features [B, 9 * cell_dim + global_dim] (320 by default)."""
        cells, glob = self._penultimate(images)
        return torch.cat([cells.flatten(1), glob], dim=1)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Logits: shape [B,9,7] (class 0 = empty), colour [B,9,6], size [B,9,2],
        background [B,4], texture [B,4]."""
        cells, glob = self._penultimate(images)
        return {
            "shape": self.shape_head(cells),
            "colour": self.colour_head(cells),
            "size": self.size_head(cells),
            "background": self.background_head(glob),
            "texture": self.texture_head(glob),
        }


def images_to_tensor(images: np.ndarray) -> Tensor:
    """uint8 [N, 32, 32, 3] -> float [N, 3, 32, 32] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def scene_targets(scenes: Sequence[Scene]) -> dict[str, Tensor]:
    """Integer targets per head; colour/size of empty cells are -100 (ignored)."""
    n = len(scenes)
    shape = torch.zeros(n, N_CELLS, dtype=torch.long)
    colour = torch.full((n, N_CELLS), -100, dtype=torch.long)
    size = torch.full((n, N_CELLS), -100, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            c = POSITIONS.index(o.position)
            shape[i, c] = 1 + SHAPES.index(o.shape)
            colour[i, c] = COLOURS.index(o.colour)
            size[i, c] = SIZES.index(o.size)
    background = torch.tensor([BACKGROUNDS.index(s.background) for s in scenes])
    texture = torch.tensor([TEXTURES.index(s.texture) for s in scenes])
    return dict(shape=shape, colour=colour, size=size, background=background, texture=texture)


def classifier_loss(logits: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
    """Sum of the mean cross-entropies of all heads."""
    total = logits["shape"].new_zeros(())
    for head in HEADS:
        lg, tg = logits[head], targets[head]
        total = total + F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1))
    return total


def decode(logits: dict[str, Tensor]) -> list[Scene]:
    """Hard predictions as Scenes (any number of objects, one per occupied cell)."""
    idx = {k: v.argmax(-1).cpu().tolist() for k, v in logits.items()}
    scenes = []
    for b in range(len(idx["background"])):
        objects = tuple(
            Obj(SHAPES[s - 1], COLOURS[idx["colour"][b][c]], SIZES[idx["size"][b][c]], POSITIONS[c])
            for c, s in enumerate(idx["shape"][b])
            if s > 0
        )
        bg, tex = BACKGROUNDS[idx["background"][b]], TEXTURES[idx["texture"][b]]
        scenes.append(Scene(objects, bg, tex))
    return scenes


def _batched_logits(classifier: nn.Module, images: Tensor, batch_size: int) -> dict[str, Tensor]:
    outs = [classifier(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


@functools.lru_cache(maxsize=8192)
def _parse_cached(text: str) -> CaptionLabels:
    return parse_caption(text)


def _labels(captions: Sequence[str | CaptionLabels]) -> list[CaptionLabels]:
    return [c if isinstance(c, CaptionLabels) else _parse_cached(c) for c in captions]


@torch.no_grad()
def alignment(
    classifier: nn.Module,
    images: Tensor,
    captions: Sequence[str | CaptionLabels],
    batch_size: int = 256,
) -> Tensor:
    """BoolTensor [B]: the decoded image satisfies everything its caption states,
    including the number of objects (an extra or missing object fails)."""
    predicted = decode(_batched_logits(classifier, images, batch_size))
    ok = [consistent(lab, scene) for lab, scene in zip(_labels(captions), predicted, strict=True)]
    return torch.tensor(ok, dtype=torch.bool)


@functools.cache
def _relation_mask(relation: str | None) -> Tensor:
    """[9, 9] admissible (cell of object 0, cell of object 1) pairs."""
    mask = ~torch.eye(N_CELLS, dtype=torch.bool)
    if relation is not None:
        holds = [[relation_holds(relation, a, b) for b in POSITIONS] for a in POSITIONS]
        mask &= torch.tensor(holds)
    return mask


def _object_loglik(logp: dict[str, Tensor], b: int, obj) -> Tensor:
    """[9] log P(cell holds this object) for item b; -inf outside its stated cell."""
    ll = logp["shape"][b, :, 1 + SHAPES.index(obj.shape)] + logp["colour"][b, :, COLOURS.index(obj.colour)]
    if obj.size is not None:
        ll = ll + logp["size"][b, :, SIZES.index(obj.size)]
    if obj.position is not None:
        keep = torch.zeros(N_CELLS, dtype=torch.bool, device=ll.device)
        keep[POSITIONS.index(obj.position)] = True
        ll = ll.masked_fill(~keep, float("-inf"))
    return ll


def _caption_loglik(logp: dict[str, Tensor], b: int, labels: CaptionLabels) -> Tensor:
    """log P(the image satisfies the caption) under independent per-cell predictions."""
    empty = logp["shape"][b, :, 0]
    objs = [_object_loglik(logp, b, o) - empty for o in labels.objects]
    if len(objs) == 1:
        total = torch.logsumexp(objs[0], 0)
    elif len(objs) == 2:
        pair = objs[0][:, None] + objs[1][None, :]
        mask = _relation_mask(labels.relation).to(pair.device)
        total = torch.logsumexp(pair.masked_fill(~mask, float("-inf")).flatten(), 0)
    else:
        raise ValueError(f"captions state one or two objects, got {len(objs)}")
    total = total + empty.sum()
    if labels.background is not None:
        total = total + logp["background"][b, BACKGROUNDS.index(labels.background)]
    if labels.texture is not None:
        total = total + logp["texture"][b, TEXTURES.index(labels.texture)]
    return total


def reward(classifier: nn.Module, images: Tensor, captions: Sequence[str | CaptionLabels]) -> Tensor:
    """Differentiable [B] log-probability (<= 0) that each image satisfies its caption.

    Unstated cells are marginalised: the sum runs over every admissible cell (or
    ordered pair of distinct cells satisfying the relation) for the caption's
    objects, with all other cells empty.
    """
    logp = {k: F.log_softmax(v, dim=-1) for k, v in classifier(images).items()}
    labels = _labels(captions)
    return torch.stack([_caption_loglik(logp, b, lab) for b, lab in enumerate(labels)])


def reward_01(classifier: nn.Module, images: Tensor, captions: Sequence[str | CaptionLabels]) -> Tensor:
    """Reward in [0, 1]: exp(reward / n_attributes), a per-attribute geometric mean."""
    n_attr = torch.tensor([lab.n_attributes() for lab in _labels(captions)], dtype=images.dtype)
    return torch.exp(reward(classifier, images, captions) / n_attr.to(images.device))


@torch.no_grad()
def scene_accuracy(
    classifier: nn.Module, images: Tensor, scenes: Sequence[Scene], batch_size: int = 256
) -> dict[str, float]:
    """Exact-label accuracy per head: shape-or-empty over all cells, colour and size over
    occupied cells, background, texture, and `scene` (every label of the image right)."""
    logits = _batched_logits(classifier, images, batch_size)
    targets = scene_targets(scenes)
    out = {}
    for head in HEADS:
        pred, tgt = logits[head].argmax(-1).cpu(), targets[head]
        valid = tgt != -100
        out[head] = float((pred == tgt)[valid].float().mean())
    canon = [(sorted(s.objects, key=lambda o: o.position), s.background, s.texture) for s in scenes]
    pred = [(sorted(s.objects, key=lambda o: o.position), s.background, s.texture)
            for s in decode(logits)]  # fmt: skip
    out["scene"] = float(np.mean([a == b for a, b in zip(canon, pred, strict=True)]))
    return out


# ---------------------------------------------------------------- training


def augment(x: Tensor, gen: torch.Generator, max_noise: float = 0.05) -> Tensor:
    """Small whole-pixel shifts and Gaussian noise, so that slightly imperfect
    generated images are still read correctly."""
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
    if dy or dx:
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")[:, :, 1 + dy : 33 + dy, 1 + dx : 33 + dx]
    sigma = torch.rand(x.shape[0], 1, 1, 1, generator=gen) * max_noise
    return x + sigma * torch.randn(x.shape, generator=gen)


def _lr_at(step: int, steps: int, lr: float, warmup: int = 50) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + np.cos(np.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def evaluate(classifier: nn.Module, n: int = 2000, seed: int = 0) -> dict[str, float]:
    """Accuracy on fresh renders drawn from default_rng((seed, 1)) (training uses
    (seed, 0)): per-head accuracy, alignment of true captions per split, and the
    false-acceptance rate of another scene's caption."""
    classifier.eval()
    rng = np.random.default_rng((seed, 1))
    out = {}
    for split in ("any", "train", "heldout"):
        images, scenes = render_batch(rng, n if split == "any" else n // 4, split)
        x = images_to_tensor(images)
        caps = [caption(s, rng) for s in scenes]
        out[f"alignment_{split}"] = float(alignment(classifier, x, caps).float().mean())
        if split == "any":
            out.update({f"acc_{k}": v for k, v in scene_accuracy(classifier, x, scenes).items()})
            other = [caps[(i + 1) % len(caps)] for i in range(len(caps))]
            matches = [consistent(parse_caption(c), s) for c, s in zip(other, scenes, strict=True)]
            wrong = torch.tensor([not m for m in matches])
            accepted = alignment(classifier, x, other)
            out["false_accept_other_caption"] = float(accepted[wrong].float().mean())
    return out


def train_classifier(
    steps: int = 1200,
    batch_size: int = 128,
    seed: int = 0,
    out_path: str | Path = DEFAULT_WEIGHTS,
    progress: bool = True,
    pool_size: int = 40_000,
    fresh_per_step: int = 16,
    lr: float = 3e-3,
    eval_n: int = 2000,
) -> dict:
    """Train on renders of `sample_scene(split="any")`, save safetensors + JSON, return metrics.

    A pool of `pool_size` renders is made up front and `fresh_per_step` of its
    entries are replaced by new renders every step, so data stays fresh cheaply.
    """
    torch.manual_seed(seed)
    gen, rng, start = (
        torch.Generator().manual_seed(seed),
        np.random.default_rng((seed, 0)),
        time.time(),
    )
    images, scenes = render_batch(rng, pool_size, "any")
    pool_x, pool_t = images_to_tensor(images), scene_targets(scenes)
    model = AttributeClassifier(**DEFAULT_CONFIG).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    for step in range(steps):
        opt.param_groups[0]["lr"] = _lr_at(step, steps, lr)
        images, scenes = render_batch(rng, fresh_per_step, "any")
        slots = torch.from_numpy(rng.choice(pool_size, size=fresh_per_step, replace=False))
        pool_x[slots] = images_to_tensor(images)
        for key, value in scene_targets(scenes).items():
            pool_t[key][slots] = value
        idx = torch.randint(0, pool_size, (batch_size,), generator=gen)
        loss = classifier_loss(model(augment(pool_x[idx], gen)), {k: v[idx] for k, v in pool_t.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress and (step % 100 == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)
    train_s = time.time() - start
    metrics = evaluate(model, eval_n, seed)
    if progress:
        print(json.dumps(metrics, indent=1))
    train = dict(steps=steps, batch_size=batch_size, seed=seed, pool_size=pool_size,
                 fresh_per_step=fresh_per_step, lr=lr, seconds=round(train_s, 1))  # fmt: skip
    _save(model, Path(out_path), train, metrics)
    return {"train_seconds": train_s, **metrics}


def _save(model: nn.Module, path: Path, train: dict, metrics: dict) -> None:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    info = {
        "config": DEFAULT_CONFIG,
        "train": train,
        "eval": {"rng": f"numpy default_rng(({train['seed']}, 1))", **metrics},
        "torch": torch.__version__,
    }
    atomic_write_text(path.with_suffix(".json"), json.dumps(info, indent=2) + "\n")


def load_classifier(path: str | Path | None = None, device: str = "cpu") -> AttributeClassifier:
    """Load weights (safetensors, default: the shipped assets), frozen and in eval mode.

    Parameters do not require grad, so `reward` gives gradients for images only."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    config = DEFAULT_CONFIG
    if path.with_suffix(".json").exists():
        config = json.loads(path.with_suffix(".json").read_text()).get("config", config)
    model = AttributeClassifier(**config)
    model.load_state_dict(load_file(str(path)))
    return model.requires_grad_(False).to(device).eval()


def main(argv: Sequence[str] | None = None) -> None:
    """Train (or with --eval-only, evaluate) the classifier from the command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--pool-size", type=int, default=40_000)
    ap.add_argument("--eval-n", type=int, default=2000)
    ap.add_argument("--eval-only", action="store_true", help="evaluate the weights at --out")
    args = ap.parse_args(argv)
    if args.eval_only:
        print(json.dumps(evaluate(load_classifier(args.out), args.eval_n, args.seed), indent=1))
    else:
        train_classifier(
            args.steps,
            args.batch_size,
            args.seed,
            args.out,
            True,
            args.pool_size,
            eval_n=args.eval_n,
        )


if __name__ == "__main__":
    main()
