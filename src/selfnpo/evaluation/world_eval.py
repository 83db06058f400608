"""Scoring generated images on the embedded world: alignment, reward, per-attribute correctness,
features, and paired comparisons of a setting with its base (same prompts, same seeds)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..world.captions import CaptionLabels, parse_caption, relation_holds
from ..world.classifier import alignment, decode, images_to_tensor, reward
from ..world.render import Scene, render

# Per-image attribute checks read from the classifier's decoded scene (see attribute_scores).
ATTRIBUTES: tuple[str, ...] = (
    "count",
    "colour",
    "shape",
    "object",
    "size",
    "position",
    "relation",
    "background",
    "texture",
)
# The metrics every paired comparison reports, in table order: (key, label).
PAIRED_METRICS: tuple[tuple[str, str], ...] = (
    ("reward", "reward (log-lik.)"),
    ("reward_01", "reward in [0, 1]"),
    ("alignment", "strict alignment"),
    *((f"attr_{a}", a) for a in ATTRIBUTES),
)
# Smallest nonzero per-image difference of the 0/1 and per-object-fraction metrics (for the MDE
# of a run in which every pair ties); None for continuous ones.
RESOLUTION: dict[str, float] = {
    "alignment": 1.0,
    **{f"attr_{a}": 1.0 for a in ("count", "relation", "background", "texture")},
    **{f"attr_{a}": 0.5 for a in ("colour", "shape", "object", "size", "position")},
}
# The metrics the one-line verdict is decided on (plus KID).
VERDICT_METRICS: tuple[str, ...] = ("reward", "alignment")


@dataclass
class Scores:
    """Per-image scores of one setting, in prompt/seed order."""

    aligned: np.ndarray  # [N] bool: every stated attribute recognised
    reward: np.ndarray  # [N] float: log-likelihood of the prompt's attributes (<= 0)
    features: np.ndarray  # [N, D] classifier features, for KID and the Frechet distance
    reward_01: np.ndarray | None = None  # [N] exp(reward / number of stated attributes)
    attributes: dict[str, np.ndarray] = field(default_factory=dict)  # [N] in [0, 1], NaN = not stated

    def save(self, path: str | Path) -> None:
        """All arrays in one ``.npz`` file (for benchmarks that resume)."""
        arrays = {"aligned": self.aligned, "reward": self.reward, "features": self.features}
        if self.reward_01 is not None:
            arrays["reward_01"] = self.reward_01
        arrays.update({f"attr_{k}": v for k, v in self.attributes.items()})
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        with np.load(path) as z:
            attrs = {k[5:]: z[k] for k in z.files if k.startswith("attr_")}
            r01 = z["reward_01"] if "reward_01" in z.files else None
            return cls(z["aligned"], z["reward"], z["features"], r01, attrs)

    def metric(self, key: str) -> np.ndarray | None:
        """The [N] float64 values of a PAIRED_METRICS key (None when not scored)."""
        if key == "alignment":
            return self.aligned.astype(np.float64)
        if key == "reward":
            return self.reward
        if key == "reward_01":
            return self.reward_01
        if key.startswith("attr_"):
            return self.attributes.get(key[5:])
        raise KeyError(key)


def _fraction(hits: list[bool]) -> float:
    return float(np.mean(hits)) if hits else float("nan")


def attribute_scores(labels: CaptionLabels, scene: Scene) -> dict[str, float]:
    """Which stated attributes the decoded ``scene`` gets right, each in [0, 1] or NaN when the
    caption does not state it.

    For each stated object the candidates are the decoded objects in its stated cell (all decoded
    objects when the caption gives no cell). ``colour``, ``shape``: the fraction of stated
    objects with a candidate of that colour / shape; ``object``: of that shape and colour
    together; ``size``: over objects with a stated size, a candidate of the stated colour has it;
    ``position``: over objects with a stated cell, an object of the stated colour is in it;
    ``relation``: two distinct decoded objects of the two stated colours stand in the relation;
    ``count``: the number of objects; ``background``, ``texture``: when stated.
    """
    objs = scene.objects

    def cands(o):
        return [p for p in objs if o.position is None or p.position == o.position]

    stated = labels.objects
    out = {
        "count": float(len(objs) == len(stated)),
        "colour": _fraction([any(p.colour == o.colour for p in cands(o)) for o in stated]),
        "shape": _fraction([any(p.shape == o.shape for p in cands(o)) for o in stated]),
        "object": _fraction(
            [any(p.shape == o.shape and p.colour == o.colour for p in cands(o)) for o in stated]
        ),
        "size": _fraction(
            [any(p.colour == o.colour and p.size == o.size for p in cands(o)) for o in stated if o.size]
        ),
        "position": _fraction(
            [any(p.colour == o.colour for p in cands(o)) for o in stated if o.position is not None]
        ),
        "relation": float("nan"),
        "background": float("nan")
        if labels.background is None
        else float(scene.background == labels.background),
        "texture": float("nan") if labels.texture is None else float(scene.texture == labels.texture),
    }
    if labels.relation is not None:
        o0, o1 = stated
        out["relation"] = float(
            any(
                p.colour == o0.colour
                and q.colour == o1.colour
                and relation_holds(labels.relation, p.position, q.position)
                for i, p in enumerate(objs)
                for j, q in enumerate(objs)
                if i != j
            )
        )
    return out


@torch.no_grad()
def score_images(classifier, images: np.ndarray, prompts: Sequence[str], batch: int = 256) -> Scores:
    """Score uint8 ``[N, H, W, 3]`` images against their prompts."""
    x = images_to_tensor(images)
    al = alignment(classifier, x, list(prompts)).numpy()
    rw = torch.cat(
        [reward(classifier, x[i : i + batch], list(prompts[i : i + batch])) for i in range(0, len(x), batch)]
    )
    feats = torch.cat([classifier.features(x[i : i + batch]) for i in range(0, len(x), batch)])
    scenes = [s for i in range(0, len(x), batch) for s in decode(classifier(x[i : i + batch]))]
    labels = [parse_caption(p) for p in prompts]
    per_image = [attribute_scores(lab, sc) for lab, sc in zip(labels, scenes, strict=True)]
    attrs = {a: np.array([d[a] for d in per_image], dtype=np.float64) for a in ATTRIBUTES}
    n_attr = np.array([lab.n_attributes() for lab in labels], dtype=np.float64)
    rw64 = rw.numpy().astype(np.float64)
    return Scores(al.astype(bool), rw64, feats.numpy().astype(np.float64), np.exp(rw64 / n_attr), attrs)


def real_features(classifier, scenes) -> np.ndarray:
    """Classifier features of true renders (the KID and Frechet reference)."""
    images = np.stack([render(s) for s in scenes])
    with torch.no_grad():
        x = images_to_tensor(images)
        return (
            torch.cat([classifier.features(x[i : i + 256]) for i in range(0, len(x), 256)])
            .numpy()
            .astype(np.float64)
        )


FRECHET_DIMS = 16


def pca_basis(real: np.ndarray, k: int = FRECHET_DIMS) -> np.ndarray:
    """``[D, k]`` top principal directions of the real features.

    The Frechet distance is computed in this space: with tens of images and 320-dimensional
    features the covariances would be singular and the distance mostly estimation noise.
    """
    _, _, vt = np.linalg.svd(real - real.mean(0), full_matrices=False)
    return vt[: min(k, vt.shape[0])].T


def kid_space(real: np.ndarray):
    """The map applied to features before KID: standardise each dimension by the mean and
    standard deviation of the real features, dropping dimensions constant on them.

    The classifier's ReLU features are of order 10, where the cubic kernel (x.y/D + 1)^3 would be
    dominated by magnitudes (values of 1e5 and more); after this fixed affine map (the same for
    every setting, computed from the real reference only) KID is on the scale of Binkowski et
    al.'s Inception features.
    """
    mu, sd = real.mean(0), real.std(0)
    keep = sd > 1e-6 * max(float(sd.max()), 1e-30)

    def apply(x: np.ndarray) -> np.ndarray:
        return (x[:, keep] - mu[keep]) / sd[keep]

    return apply


def paired_metrics(s: Scores, base: Scores, real: np.ndarray, seed: int = 0, n_boot: int = 1000) -> dict:
    """Every metric of ``s`` against ``base`` at the same prompts and seeds.

    ``{key: paired_comparison(...)}`` for each PAIRED_METRICS key (attributes over the pairs whose
    prompt states them; ``{"n": 0}`` when none does), and ``"kid"``: :func:`kid_comparison` of
    the features against ``real`` (both mapped by :func:`kid_space`).
    """
    from .realism import kid_comparison
    from .stats import paired_comparison

    out: dict[str, dict] = {}
    for key, _ in PAIRED_METRICS:
        a, b = s.metric(key), base.metric(key)
        if a is None or b is None:
            continue
        keep = np.isfinite(a) & np.isfinite(b)
        if not keep.any():
            out[key] = {"n": 0}
            continue
        out[key] = paired_comparison(
            a[keep], b[keep], n_boot=n_boot, seed=seed, resolution=RESOLUTION.get(key)
        )
    f = kid_space(real)
    out["kid"] = kid_comparison(f(s.features), f(base.features), f(real), n_boot=n_boot, seed=seed)
    return out


def verdict(paired: dict) -> tuple[str, str]:
    """(word, line) for one setting, from the paired comparisons of VERDICT_METRICS and KID.

    The word is "helps" when some of these intervals exclude 0 on the good side and none on the
    bad side, "hurts" in the opposite case, "mixed" when both happen, otherwise "no detectable
    difference"; only whether each interval excludes 0 decides.
    """
    names = {"reward": "reward", "alignment": "strict alignment", "kid": "KID"}
    better, worse, unresolved = [], [], []
    for key in (*VERDICT_METRICS, "kid"):
        c = paired.get(key)
        if not c or not c.get("n"):
            continue
        if c["outcome"] == "better":
            better.append(names[key])
        elif c["outcome"] == "worse":
            worse.append(names[key])
        else:
            unresolved.append((names[key], c["mde"]))
    if better and not worse:
        word, line = "helps", f"helps ({', '.join(better)} better)"
    elif worse and not better:
        word, line = "hurts", f"hurts ({', '.join(worse)} worse)"
    elif better and worse:
        word, line = "mixed", f"mixed ({', '.join(better)} better; {', '.join(worse)} worse)"
    else:
        word = "no detectable difference"
        return word, f"{word} (MDE {', '.join(f'{n} {m:.3g}' for n, m in unresolved)})"
    if unresolved:
        line += "; no detectable difference in " + ", ".join(f"{n} (MDE {m:.3g})" for n, m in unresolved)
    return word, line


def summarise(s: Scores, real: np.ndarray, base: Scores | None, seed: int = 0) -> dict:
    """Means with bootstrap intervals, KID and Frechet distance to real renders (Frechet in the
    top-16 PCA space of the real features); with a ``base``: the paired comparisons
    (:func:`paired_metrics`), the verdict, and the reward and alignment win rates."""
    from .realism import frechet_ci, kid_ci
    from .stats import bootstrap_mean_ci, win_rate

    basis, f = pca_basis(real), kid_space(real)
    out = {
        "n": int(s.reward.size),
        "alignment": list(bootstrap_mean_ci(s.aligned.astype(np.float64), seed=seed)),
        "reward": list(bootstrap_mean_ci(s.reward, seed=seed)),
        "kid": list(kid_ci(f(s.features), f(real), seed=seed)),
        "frechet": list(frechet_ci(s.features @ basis, real @ basis, seed=seed)),
    }
    if s.reward_01 is not None:
        out["reward_01"] = list(bootstrap_mean_ci(s.reward_01, seed=seed))
    attrs = {}
    for a, v in s.attributes.items():
        v = v[np.isfinite(v)]
        attrs[a] = [*bootstrap_mean_ci(v, seed=seed), int(v.size)] if v.size else [None, None, None, 0]
    if attrs:
        out["attributes"] = attrs
    if base is not None:
        out["win_rate_reward"] = list(win_rate(s.reward, base.reward, seed=seed))
        out["win_rate_alignment"] = list(
            win_rate(s.aligned.astype(np.float64), base.aligned.astype(np.float64), seed=seed)
        )
        out["paired"] = paired_metrics(s, base, real, seed=seed)
        out["verdict_word"], out["verdict"] = verdict(out["paired"])
    return out
