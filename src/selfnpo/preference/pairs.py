"""Preference pair files (format ``selfnpo.pairs.v1``, docs/preference.md) and the pair source.

A pair folder holds ``pairs.jsonl``, one JSON object per line::

    {"prompt": "a red star", "winner": "images/000000_w.png", "loser": "images/000000_l.png",
     "winner_score": 0.71, "loser_score": 0.12, "winner_seed": 0, "loser_seed": 1}

``prompt``, ``winner`` and ``loser`` are required (image paths relative to the jsonl file); the
scores and seeds are optional; any other field is an error (a misspelt field would otherwise be
silently ignored). An optional ``latents.safetensors`` beside it holds the exact latents of every
image (tensors ``winner`` and ``loser``, ``[N, C, h, w]`` in line order, metadata ``format``); when
it is there and fits the model, training uses it instead of encoding the images.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from ..errors import SelfNPOError
from ..models.sd import DiffusionModel
from ..training.data import _draw, load_image

FORMAT = "selfnpo.pairs.v1"
REQUIRED = ("prompt", "winner", "loser")
OPTIONAL = ("winner_score", "loser_score", "winner_seed", "loser_seed")
MAX_PAIR_FILE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class PairRecord:
    """One preference pair: the prompt and the preferred / dispreferred image files."""

    prompt: str
    winner: str
    loser: str
    winner_score: float | None = None
    loser_score: float | None = None
    winner_seed: int | None = None
    loser_seed: int | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None})


def pair_file(path: str | Path) -> Path:
    """``pairs.jsonl`` itself, or the one inside a pair folder."""
    p = Path(path)
    if p.is_dir():
        p = p / "pairs.jsonl"
    if not p.is_file():
        raise SelfNPOError(f"{p}: preference pair file not found")
    return p


def _record(rec: object, where: str) -> PairRecord:
    if not isinstance(rec, dict):
        raise SelfNPOError(f"{where}: expected a JSON object with prompt, winner and loser")
    unknown = sorted(set(rec) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise SelfNPOError(
            f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(REQUIRED + OPTIONAL)})"
        )
    for k in REQUIRED:
        if not isinstance(rec.get(k), str) or not rec[k].strip():
            raise SelfNPOError(f"{where}: missing or empty field {k!r}")
    for k in OPTIONAL:
        v = rec.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise SelfNPOError(f"{where}: field {k!r} must be a number")
    return PairRecord(**rec)


def read_pairs(path: str | Path) -> list[PairRecord]:
    """Parse and check a pair file; every problem is a one-line :class:`SelfNPOError` naming the line."""
    p = pair_file(path)
    if p.stat().st_size > MAX_PAIR_FILE_BYTES:
        raise SelfNPOError(f"{p}: pair file is larger than the limit of {MAX_PAIR_FILE_BYTES:,} bytes")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SelfNPOError(f"{p}: pair file is not UTF-8 (byte {e.start})") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise SelfNPOError(f"{p}:{i}: not valid JSON") from None
        out.append(_record(rec, f"{p}:{i}"))
    if not out:
        raise SelfNPOError(f"{p}: no preference pairs in the file")
    for i, r in enumerate(out, 1):
        for side in (r.winner, r.loser):
            if not (p.parent / side).is_file():
                raise SelfNPOError(f"{p}: pair {i}: image {side} not found")
    return out


def write_pairs(folder: Path, records: list[PairRecord]) -> Path:
    """Write ``pairs.jsonl`` in ``folder`` (the caller makes the folder atomic)."""
    out = folder / "pairs.jsonl"
    out.write_text("".join(r.to_json() + "\n" for r in records), encoding="utf-8")
    return out


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:  # noqa: BLE001
        raise SelfNPOError(f"{path}: not a readable image ({type(e).__name__})") from None


def _stored_latents(folder: Path, n: int, shape: tuple[int, ...]) -> tuple[Tensor, Tensor] | None:
    f = folder / "latents.safetensors"
    if not f.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        t = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise SelfNPOError(f"{f}: cannot read latents ({e})") from None
    w, l = t.get("winner"), t.get("loser")
    if w is None or l is None:
        raise SelfNPOError(f"{f}: expected tensors 'winner' and 'loser'")
    want = (n, *shape)
    if tuple(w.shape) != want or tuple(l.shape) != want:
        return None  # latents of another model or resolution: encode the images instead
    return w.float(), l.float()


@torch.no_grad()
def load_pair_latents(path: str | Path, model: DiffusionModel, res: int) -> tuple[list[str], Tensor, Tensor]:
    """``(prompts, winner latents, loser latents)`` of a pair file, on the CPU."""
    p = pair_file(path)
    records = read_pairs(p)
    stored = _stored_latents(p.parent, len(records), tuple(model.latent_shape(1, res)[1:]))
    if stored is not None:
        return [r.prompt for r in records], *stored
    for i, r in enumerate(records, 1):
        sw, sl = _image_size(p.parent / r.winner), _image_size(p.parent / r.loser)
        if sw != sl:
            raise SelfNPOError(f"{p}: pair {i}: winner and loser sizes differ ({sw} vs {sl})")
    lats: dict[str, list[Tensor]] = {"winner": [], "loser": []}
    for i in range(0, len(records), 16):
        chunk = records[i : i + 16]
        for side in lats:
            imgs = torch.stack([load_image(p.parent / getattr(r, side), res) for r in chunk])
            lats[side].append(model.encode_images(imgs).cpu())
    return [r.prompt for r in records], torch.cat(lats["winner"]), torch.cat(lats["loser"])


class PairSource:
    """Preference pairs drawn with replacement; ``sample`` returns ``(prompts, (winners, losers))``."""

    def __init__(self, prompts: list[str], winners: Tensor, losers: Tensor) -> None:
        if not (len(prompts) == winners.shape[0] == losers.shape[0]):
            raise ValueError("prompts, winners and losers must have the same length")
        self.prompts, self.winners, self.losers = prompts, winners, losers

    @staticmethod
    def load(path: str | Path, model: DiffusionModel, res: int) -> PairSource:
        return PairSource(*load_pair_latents(path, model, res))

    def sample(self, g: torch.Generator, n: int) -> tuple[list[str], tuple[Tensor, Tensor]]:
        idx = _draw(g, n, len(self.prompts))
        return [self.prompts[i] for i in idx], (
            self.winners[idx].to(g.device),
            self.losers[idx].to(g.device),
        )
