"""How good the shipped world model is: autoencoder reconstructions and prompt following.

Prints the classifier's alignment on VAE reconstructions of fresh renders, and the model's
strict alignment, mean reward and per-attribute accuracies at several guidance scales on
training-split and held-out prompts (same seeds for every setting). The per-attribute columns
read the classifier's decoded scene: the object count is right; some object has the first
stated object's shape and colour together, its shape, its colour; the background colour is
right (over prompts that state one).

    python benchmarks/world_model_quality.py [--model FOLDER]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from selfnpo.evaluation.bench import generate_uint8
from selfnpo.models.loading import load_pipeline
from selfnpo.world.captions import parse_caption
from selfnpo.world.classifier import alignment, decode, images_to_tensor, load_classifier, reward
from selfnpo.world.model import images_to_unit, shipped_model_dir, world_batch, world_prompts


@torch.no_grad()
def attribute_accuracy(clf, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Fractions of stated attributes that the classifier's decoded scene gets right.

    Per stated object: ``colour`` (some decoded object has its colour), ``shape`` (some decoded
    object has its shape), ``first`` (some decoded object has the first object's shape and colour
    together), ``position`` (over objects whose cell is stated: that cell is occupied); per image:
    ``count`` (as many objects as stated) and ``background`` (over prompts that state one).
    """
    scenes = decode(clf(images))
    hits = {k: 0 for k in ("count", "first", "shape", "colour", "position", "background")}
    n = {k: 0 for k in hits}
    for text, scene in zip(prompts, scenes, strict=True):
        lab = parse_caption(text)
        o0 = lab.objects[0]
        cells = {s.position for s in scene.objects}
        hits["count"] += len(scene.objects) == len(lab.objects)
        hits["first"] += any(s.shape == o0.shape and s.colour == o0.colour for s in scene.objects)
        n["count"] += 1
        n["first"] += 1
        for o in lab.objects:
            hits["shape"] += any(s.shape == o.shape for s in scene.objects)
            hits["colour"] += any(s.colour == o.colour for s in scene.objects)
            n["shape"] += 1
            n["colour"] += 1
            if o.position is not None:
                hits["position"] += o.position in cells
                n["position"] += 1
        if lab.background is not None:
            n["background"] += 1
            hits["background"] += scene.background == lab.background
    return {k: hits[k] / max(n[k], 1) for k in hits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(shipped_model_dir()), help="pipeline folder (default: shipped)")
    ap.add_argument("--n", type=int, default=128, help="images per setting")
    ap.add_argument("--guidance-scales", default="1,3,6")
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps")
    ap.add_argument("--splits", default="train,heldout", help="prompt splits")
    a = ap.parse_args()
    pipe = load_pipeline(a.model, device="cpu", dtype="fp32")
    clf = load_classifier()
    caps, ims = world_batch(np.random.default_rng(123), 128, "any")
    x = images_to_unit(ims)
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    print(
        f"alignment on 128 VAE reconstructions: {alignment(clf, rec, caps).float().mean():.3f} "
        f"(on the renders themselves: {alignment(clf, x, caps).float().mean():.3f})"
    )
    print(
        "| split | g | strict alignment | mean reward | count | first object | shape | colour | position"
        " | background |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for split in a.splits.split(","):
        prompts = world_prompts(a.n, split, 5)
        for g in (float(v) for v in a.guidance_scales.split(",")):
            imgs = images_to_tensor(generate_uint8(pipe, prompts, list(range(a.n)), g, a.steps))
            with torch.no_grad():
                r = reward(clf, imgs, prompts).mean()
            acc = attribute_accuracy(clf, imgs, prompts)
            cols = " | ".join(
                f"{acc[k]:.3f}" for k in ("count", "first", "shape", "colour", "position", "background")
            )
            print(
                f"| {split} | {g:g} | {alignment(clf, imgs, prompts).float().mean():.3f} | {r:.1f} | {cols} |"
            )


if __name__ == "__main__":
    main()
