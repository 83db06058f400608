"""``selfnpo score``: reward-model scores of a ``selfnpo generate`` folder, and paired comparisons.

A folder holds PNGs and ``images.jsonl`` (index, prompt, seed, file per image). Scores go to
``scores.csv`` and ``scores.jsonl``; with ``--baseline`` (a folder made with the same prompts and
seeds) the paired difference of each reward with a bootstrap interval and the win rate go to
``comparison.csv`` and ``comparison.json``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from ..errors import SelfNPOError
from ..evaluation.stats import paired_diff_ci, win_rate
from ..io import atomic_write_text
from ..options import opt
from . import SCORERS, load_scorer, release_models


@dataclass
class ScoreConfig:
    """Score images written by selfnpo generate with PickScore, HPSv2.1, ImageReward, LAION aesthetic v2, CLIP score."""

    images: str = opt("", "folder written by selfnpo generate (PNGs + images.jsonl)")
    baseline: str = opt(
        "", "optional second generate folder with the same prompts and seeds: paired comparison"
    )
    output_dir: str = opt("outputs/score", "folder for scores.csv/.jsonl (and comparison.csv/.json)")
    models: str = opt(
        "pickscore,hpsv2,imagereward,aesthetic,clip", f"comma-separated rewards: {', '.join(SCORERS)}"
    )
    clip_model: str = opt("openai/clip-vit-large-patch14", "CLIP score: transformers CLIP folder or hub id")
    pickscore_model: str = opt("yuvalkirstain/PickScore_v1", "PickScore: CLIPModel folder or hub id")
    pickscore_tokenizer: str = opt(
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        "PickScore: tokenizer folder or hub id (the reference's processor)",
    )
    hps_weights: str = opt(
        "xswu/HPSv2/HPS_v2.1_compressed.pt", "HPSv2.1: open_clip checkpoint file, or hub owner/repo/file"
    )
    hps_tokenizer: str = opt(
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "HPSv2.1: ViT-H-14 tokenizer folder or hub id"
    )
    imagereward_weights: str = opt(
        "THUDM/ImageReward/ImageReward.pt", "ImageReward: checkpoint file, or hub owner/repo/file"
    )
    imagereward_tokenizer: str = opt("bert-base-uncased", "ImageReward: BERT tokenizer folder or hub id")
    aesthetic_weights: str = opt(
        "camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth",
        "LAION aesthetic v2: MLP state dict (.pth or .safetensors), or hub owner/repo/file",
    )
    aesthetic_clip: str = opt(
        "openai/clip-vit-large-patch14", "LAION aesthetic v2: the CLIP ViT-L/14 it reads (folder or hub id)"
    )
    batch_size: int = opt(16, "images per forward pass")
    n_boot: int = opt(1000, "bootstrap resamples for the intervals")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N")
    dtype: str = opt(
        "fp32",
        "fp32, fp16, bf16 or auto (the rewards' own numbers are fp32)",
        choices=("fp32", "fp16", "bf16", "auto"),
    )

    def model_list(self) -> list[str]:
        names = [m.strip() for m in self.models.split(",") if m.strip()]
        unknown = [m for m in names if m not in SCORERS]
        if unknown or not names:
            raise SelfNPOError(
                f"unknown --models {', '.join(unknown) or '(none)'}; known: {', '.join(SCORERS)}"
            )
        return list(dict.fromkeys(names))

    def validate(self) -> ScoreConfig:
        if not self.images:
            raise SelfNPOError("--images is required")
        if self.batch_size < 1:
            raise SelfNPOError("--batch-size must be >= 1")
        if self.n_boot < 1:
            raise SelfNPOError("--n-boot must be >= 1")
        self.model_list()
        return self


def read_generated(folder: str | Path) -> list[dict]:
    """The records of a complete ``selfnpo generate`` folder (index, prompt, seed, file)."""
    folder = Path(folder)
    index = folder / "images.jsonl"
    if not folder.is_dir():
        raise SelfNPOError(f"{folder}: no such folder")
    if not index.is_file():
        raise SelfNPOError(f"{folder}: no images.jsonl; not a finished selfnpo generate folder")
    records = []
    try:
        text = index.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SelfNPOError(f"{index}: unreadable ({type(e).__name__})") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rec = {
                "index": int(rec["index"]),
                "prompt": str(rec["prompt"]),
                "seed": int(rec["seed"]),
                "file": str(rec["file"]),
            }
        except (ValueError, KeyError, TypeError):
            raise SelfNPOError(f"{index}:{i}: expected index, prompt, seed and file") from None
        if Path(rec["file"]).name != rec["file"] or not (folder / rec["file"]).is_file():
            raise SelfNPOError(f"{folder}: image {rec['file']!r} listed in images.jsonl is missing")
        records.append(rec)
    if not records:
        raise SelfNPOError(f"{index}: lists no images")
    return records


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SelfNPOError(f"{path}: unreadable image ({type(e).__name__})") from None


def score_folder(folder: Path, rows: list[dict], name: str, scorer, batch_size: int, bar=None) -> None:
    """Add the column ``name`` (one score per image) to ``rows`` in place."""
    for k in range(0, len(rows), batch_size):
        chunk = rows[k : k + batch_size]
        scores = scorer([_open(folder / r["file"]) for r in chunk], [r["prompt"] for r in chunk])
        for r, s in zip(chunk, scores.tolist(), strict=True):
            r[name] = float(s)
        if bar is not None:
            bar.update(len(chunk))


def _csv(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_scores(out: Path, rows: list[dict], names: list[str], stem: str = "scores") -> None:
    atomic_write_text(out / f"{stem}.csv", _csv(rows, ["index", "file", "seed", "prompt", *names]))
    atomic_write_text(out / f"{stem}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def compare(rows: list[dict], base: list[dict], names: list[str], n_boot: int = 1000) -> list[dict]:
    """Per reward: means, paired difference (images - baseline) with 95% interval, win rate."""
    table = []
    for name in names:
        a = [r[name] for r in rows]
        b = [r[name] for r in base]
        d, dlo, dhi = paired_diff_ci(a, b, n_boot=n_boot)
        w, wlo, whi = win_rate(a, b, n_boot=n_boot)
        table.append(
            dict(
                reward=name,
                n=len(a),
                mean=sum(a) / len(a),
                baseline_mean=sum(b) / len(b),
                diff=d,
                diff_lo=dlo,
                diff_hi=dhi,
                win_rate=w,
                win_lo=wlo,
                win_hi=whi,
            )
        )
    return table


def _check_paired(a: list[dict], b: list[dict], fa, fb) -> None:
    key = lambda r: (r["index"], r["prompt"], r["seed"])  # noqa: E731
    if len(a) != len(b):
        raise SelfNPOError(
            f"{fa} has {len(a)} images, {fb} has {len(b)}; paired scores need the same prompts and seeds"
        )
    for ra, rb in zip(a, b, strict=True):
        if key(ra) != key(rb):
            raise SelfNPOError(
                f"{fa} and {fb} differ at image {ra['index']} (prompt or seed); paired scores need the same prompts and seeds"
            )


def _score_all(cfg: ScoreConfig, names, folders, rows, device, progress_bar: bool) -> None:
    """Fill ``rows`` (one list per folder) with every reward; one reward model in memory at a time.

    A reward whose weights are missing does not stop the others from being looked up, so one
    line names every download.
    """
    from tqdm.auto import tqdm

    from ..models.loading import pick_dtype

    dtype = pick_dtype(cfg.dtype, device)
    missing = []
    total = len(names) * sum(len(r) for r in rows)
    with tqdm(total=total, desc="score", disable=not progress_bar) as bar:
        for name in names:
            try:
                scorer = load_scorer(name, cfg, device, dtype)
            except SelfNPOError as e:
                missing.append(str(e))
                continue
            if not missing:
                bar.set_postfix_str(name)
                for folder, folder_rows in zip(folders, rows, strict=True):
                    score_folder(folder, folder_rows, name, scorer, cfg.batch_size, bar)
            del scorer
    release_models()
    if missing:
        raise SelfNPOError("; ".join(missing))


def run_score(cfg: ScoreConfig, progress=print, progress_bar: bool = False) -> dict:
    """Score ``cfg.images`` (and ``cfg.baseline``); returns {"rows", "baseline_rows", "comparison"}."""
    from ..models.loading import pick_device

    cfg.validate()
    names = cfg.model_list()
    folders = [Path(cfg.images)] + ([Path(cfg.baseline)] if cfg.baseline else [])
    records = [sorted(read_generated(f), key=lambda r: r["index"]) for f in folders]
    if cfg.baseline:
        _check_paired(*records, *folders)
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SelfNPOError(f"{out}: cannot write ({e.strerror})") from None
    rows = [[dict(r) for r in recs] for recs in records]
    _score_all(cfg, names, folders, rows, pick_device(cfg.device), progress_bar)
    result: dict = {"names": names}
    write_scores(out, rows[0], names)
    result["rows"] = rows[0]
    atomic_write_text(out / "score_config.json", json.dumps(asdict(cfg), indent=2))
    if cfg.baseline:
        write_scores(out, rows[1], names, stem="baseline_scores")
        table = compare(rows[0], rows[1], names, cfg.n_boot)
        atomic_write_text(out / "comparison.json", json.dumps(table, indent=2))
        atomic_write_text(out / "comparison.csv", _csv(table, list(table[0])))
        result["baseline_rows"], result["comparison"] = rows[1], table
    else:  # a comparison left by an earlier run would no longer describe these scores
        for stale in ("baseline_scores.csv", "baseline_scores.jsonl", "comparison.json", "comparison.csv"):
            (out / stale).unlink(missing_ok=True)
    progress(format_summary(result))
    return result


def format_summary(result: dict) -> str:
    """A plain-text table: mean per reward, and the paired comparison when there is one."""
    rows = result["rows"]
    lines = [f"{len(rows)} images"]
    if "comparison" not in result:
        for n in result["names"]:
            lines.append(f"  {n:<12} mean {sum(r[n] for r in rows) / len(rows):10.4f}")
        return "\n".join(lines)
    lines.append(
        f"  {'reward':<12} {'images':>10} {'baseline':>10} {'diff [95% CI]':>30} {'win rate [95% CI]':>24}"
    )
    for t in result["comparison"]:
        ci = f"{t['diff']:+.4f} [{t['diff_lo']:+.4f}, {t['diff_hi']:+.4f}]"
        wr = f"{t['win_rate']:.3f} [{t['win_lo']:.3f}, {t['win_hi']:.3f}]"
        lines.append(f"  {t['reward']:<12} {t['mean']:10.4f} {t['baseline_mean']:10.4f} {ci:>30} {wr:>24}")
    return "\n".join(lines)
