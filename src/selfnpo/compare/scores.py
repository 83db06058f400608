"""Scores of ``selfnpo compare``: reward models per image (cached per setting) and the world's metrics."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from ..errors import SelfNPOError
from ..io import atomic_write_text
from ..scoring.run import ScoreConfig

WORLD_COLUMNS = ("world_alignment", "world_reward")
# Score options that do not change the numbers; cached scores made with other ones are recomputed.
_SCORE_IGNORED = ("images", "baseline", "output_dir", "models", "batch_size", "n_boot", "device")


def _score_key(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(ScoreConfig) if f.name not in _SCORE_IGNORED}


def _cached_scores(path: Path, records: list[dict], names: list[str], key: dict) -> list[dict] | None:
    """Rows saved by an earlier run, if they cover these images and every column in ``names`` and
    were made with the same reward weights."""
    key_file = path.parent / "score_key.json"
    if not path.is_file() or not key_file.is_file() or json.loads(key_file.read_text()) != key:
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ident = lambda r: (r["index"], r["prompt"], r["seed"], r["file"])  # noqa: E731
    if [ident(r) for r in rows] != [ident(r) for r in records] or any(
        n not in r for r in rows for n in names
    ):
        return None
    return rows


def score_settings(cfg, folders: list[Path], world: bool, progress_bar: bool) -> list[list[dict]]:
    """Per setting, one row per image with every reward column (and the world columns)."""
    from ..models.loading import pick_device
    from ..scoring.run import _score_all, read_generated, write_scores

    names = cfg.reward_names() + (list(WORLD_COLUMNS) if world else [])
    records = [sorted(read_generated(f), key=lambda r: r["index"]) for f in folders]
    cache = [f.parent.parent / "scores" / f.name for f in folders]
    key = _score_key(cfg)
    rows = [_cached_scores(c / "scores.jsonl", r, names, key) for c, r in zip(cache, records, strict=True)]
    todo = [i for i, r in enumerate(rows) if r is None]
    fresh = [[dict(r) for r in records[i]] for i in todo]
    if todo and cfg.reward_names():
        score_cfg = ScoreConfig(**{f.name: getattr(cfg, f.name) for f in fields(ScoreConfig)})
        score_cfg.dtype, score_cfg.batch_size = "fp32", cfg.score_batch_size
        _score_all(
            score_cfg,
            cfg.reward_names(),
            [folders[i] for i in todo],
            fresh,
            pick_device(cfg.device),
            progress_bar,
        )
    if todo and world:
        classifier = None
        for i, r in zip(todo, fresh, strict=True):
            classifier = _world_columns(folders[i], r, classifier)
    for i, r in zip(todo, fresh, strict=True):
        write_scores(cache[i], r, names)
        atomic_write_text(cache[i] / "score_key.json", json.dumps(key, indent=2))
        rows[i] = r
    return rows


def _world_columns(folder: Path, rows: list[dict], classifier=None):
    """Add the world's per-image alignment (0/1) and reward (log-likelihood) to ``rows``."""
    import numpy as np
    from PIL import Image

    from ..evaluation.world_eval import score_images
    from ..world.classifier import load_classifier

    classifier = classifier or load_classifier()
    ims = []
    for r in rows:
        with Image.open(folder / r["file"]) as im:
            ims.append(np.asarray(im.convert("RGB")))
    ims = np.stack(ims)
    s = score_images(classifier, ims, [r["prompt"] for r in rows])
    for r, a, w in zip(rows, s.aligned.tolist(), s.reward.tolist(), strict=True):
        r["world_alignment"], r["world_reward"] = float(a), float(w)
    return classifier


def world_frechet(cfg, folders: list[Path], rows: list[list[dict]], n_boot: int) -> list[tuple] | None:
    """Per setting, the Frechet distance of the classifier features to true renders of the same
    scenes, with its bootstrap interval (as ``selfnpo demo``); only for ``--prompts world:N``,
    whose scenes are known. Not a paired statistic: it describes a whole set."""
    import numpy as np
    import torch
    from PIL import Image

    from ..evaluation.realism import frechet_ci
    from ..evaluation.world_eval import pca_basis, real_features
    from ..world.captions import caption
    from ..world.classifier import images_to_tensor, load_classifier
    from ..world.render import sample_scene

    if not cfg.prompts.startswith("world:"):
        return None
    rng = np.random.default_rng(cfg.seed)  # the draws of world.model.world_prompts, scenes kept
    n = len(rows[0]) // cfg.num_images_per_prompt
    scenes, captions = [], []
    for _ in range(n):
        scenes.append(sample_scene(rng, "heldout"))
        captions.append(caption(scenes[-1], rng))
    if captions != [r["prompt"] for r in rows[0]][:: cfg.num_images_per_prompt]:
        return None
    classifier = load_classifier()
    real = real_features(classifier, scenes)
    basis = pca_basis(real)
    out = []
    for folder, r in zip(folders, rows, strict=True):
        ims = []
        for x in r:
            with Image.open(folder / x["file"]) as im:
                ims.append(np.asarray(im.convert("RGB")))
        with torch.no_grad():
            feats = classifier.features(images_to_tensor(np.stack(ims))).numpy().astype(np.float64)
        out.append(frechet_ci(feats @ basis, real @ basis, n_boot=min(n_boot, 200)))
    return out


def use_world_metrics(cfg, prompts: list[str]) -> bool:
    """Whether to add the world's columns: ``on``, or ``auto`` on the embedded model. They need
    prompts in the world's caption grammar (``--prompts world:N`` gives such prompts)."""
    from ..world.captions import parse_caption
    from ..world.model import shipped_model_dir

    if cfg.world_metrics == "off":
        return False
    if cfg.world_metrics == "auto" and Path(cfg.model).resolve() != shipped_model_dir().resolve():
        return False
    for i, p in enumerate(prompts, 1):
        try:
            parse_caption(p)
        except ValueError:
            if cfg.world_metrics == "auto":
                return False
            raise SelfNPOError(
                f"--world-metrics on: prompt {i} ({p[:60]!r}) is not a world caption; use --prompts world:N"
            ) from None
    return True
