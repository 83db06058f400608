"""Phase 2 of ``selfnpo pretrain``: the text encoder learns what a caption states.

A linear read-out of its token states, through one learned attention query per attribute, must
recover the caption's labels; the encoder is then frozen, as SD's CLIP is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...io import atomic_write_text
from ..captions import RELATIONS, CaptionLabels, caption_with_labels
from ..render import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, TEXTURES, sample_scene
from .config import PretrainConfig
from .phase import PhaseTrainer

# What a caption states, slot by slot; the last class of each slot means "unstated" (or "no
# second object"), except for the object count.
_UNSTATED = "-"
LABEL_SLOTS: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    (f"{attr}{i}", (*values, _UNSTATED))
    for i in (0, 1)
    for attr, values in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS))
) + (
    ("relation", (*RELATIONS, _UNSTATED)),
    ("background", (*BACKGROUNDS, _UNSTATED)),
    ("texture", (*TEXTURES, _UNSTATED)),
    ("count", ("1", "2")),
)


def label_targets(labels: CaptionLabels) -> list[int]:
    """Class index of every slot of ``LABEL_SLOTS`` for one caption's labels."""
    values: dict[str, str | None] = {
        "relation": labels.relation,
        "background": labels.background,
        "texture": labels.texture,
        "count": str(len(labels.objects)),
    }
    for i in (0, 1):
        o = labels.objects[i] if i < len(labels.objects) else None
        for attr in ("shape", "colour", "size", "position"):
            values[f"{attr}{i}"] = getattr(o, attr) if o is not None else None
    return [classes.index(values[name] or _UNSTATED) for name, classes in LABEL_SLOTS]


class LabelReadout(torch.nn.Module):
    """One learned attention query per slot over the token states, then a linear classifier.

    Deliberately weak (linear given the pooled state), so that the text encoder's own token
    states must carry each attribute in a form attention can pick out, as the UNet's does.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.queries = torch.nn.Parameter(torch.randn(len(LABEL_SLOTS), hidden) / hidden**0.5)
        self.key = torch.nn.Linear(hidden, hidden)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, len(c)) for _, c in LABEL_SLOTS)

    def forward(self, states: Tensor) -> list[Tensor]:
        """Token states ``[B, L, H]`` -> logits of every slot."""
        att = torch.einsum("sh,blh->bsl", self.queries, self.key(states)) / states.shape[-1] ** 0.5
        pooled = torch.einsum("bsl,blh->bsh", att.softmax(-1), states)
        return [head(pooled[:, k]) for k, head in enumerate(self.heads)]


def caption_batch(rng: np.random.Generator, n: int, split: str = "train") -> tuple[list[str], Tensor]:
    """``n`` fresh captions of ``split`` and their slot targets ``[n, len(LABEL_SLOTS)]``."""
    pairs = [caption_with_labels(sample_scene(rng, split), rng) for _ in range(n)]
    targets = torch.tensor([label_targets(lab) for _, lab in pairs])
    return [c for c, _ in pairs], targets


def _token_states(pipe, captions: list[str]) -> Tensor:
    """The text encoder's output as the pipeline computes it (padded to 77, no attention mask).

    Padding is done here, not by the tokenizer, whose padding settings would otherwise stick
    and be saved with the pipeline.
    """
    tok = pipe.tokenizer
    n = tok.model_max_length
    ids = [tok(c)["input_ids"][:n] for c in captions]
    ids = torch.tensor([i + [tok.pad_token_id] * (n - len(i)) for i in ids], device=pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0]


def train_text_encoder(pipe, cfg: PretrainConfig, run: Path, progress: bool) -> dict[str, float]:
    """Phase 2: teach the text encoder what captions state, then freeze it; held-out slot accuracy."""
    te = pipe.text_encoder.train()
    torch.manual_seed(cfg.seed + 3)
    readout = LabelReadout(te.config.hidden_size).to(te.device)
    params = list(te.parameters()) + list(readout.parameters())
    opt_ = torch.optim.AdamW(params, lr=cfg.text_lr, weight_decay=0.01)
    g = torch.Generator(te.device).manual_seed(cfg.seed + 2)

    def loss_at(step: int) -> Tensor:
        seed = int(torch.randint(2**62, (1,), generator=g, device=g.device).item())
        caps, targets = caption_batch(np.random.default_rng(seed), cfg.text_batch_size)
        logits = readout(_token_states(pipe, caps))
        targets = targets.to(te.device)
        return sum(torch.nn.functional.cross_entropy(lg, targets[:, k]) for k, lg in enumerate(logits))

    PhaseTrainer(run / "text", params, opt_, g, cfg.text_steps, cfg.checkpoint_every).run(
        loss_at, "text encoder", progress
    )
    te.eval().requires_grad_(False)
    with torch.no_grad():
        caps, targets = caption_batch(np.random.default_rng(cfg.seed + 4), 512, "heldout")
        logits = readout(_token_states(pipe, caps))
    acc = {
        name: float((lg.argmax(-1).cpu() == targets[:, k]).float().mean())
        for k, (lg, (name, _)) in enumerate(zip(logits, LABEL_SLOTS, strict=True))
    }
    atomic_write_text(run / "text" / "heldout_accuracy.json", json.dumps(acc, indent=2))
    return acc
