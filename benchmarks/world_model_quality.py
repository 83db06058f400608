"""How good the shipped world model is: autoencoder reconstructions and prompt following.

Prints the classifier's alignment on VAE reconstructions of fresh renders, and the base model's
strict alignment and mean reward at several guidance scales on training-split and held-out
prompts (same seeds for every setting).

    python benchmarks/world_model_quality.py
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from selfnpo.demo import generate_uint8
from selfnpo.models.loading import load_pipeline
from selfnpo.world.classifier import alignment, images_to_tensor, load_classifier, reward
from selfnpo.world.model import images_to_unit, shipped_model_dir, world_batch, world_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="images per setting")
    ap.add_argument("--guidance-scales", default="1,3,6")
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    pipe = load_pipeline(str(shipped_model_dir()), device="cpu", dtype="fp32")
    clf = load_classifier()
    caps, ims = world_batch(np.random.default_rng(123), 128, "any")
    x = images_to_unit(ims)
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    print(
        f"alignment on 128 VAE reconstructions: {alignment(clf, rec, caps).float().mean():.3f} "
        f"(on the renders themselves: {alignment(clf, x, caps).float().mean():.3f})"
    )
    print("| split | g | strict alignment | mean reward |\n|---|---|---|---|")
    for split in ("train", "heldout"):
        prompts = world_prompts(a.n, split, 5)
        for g in (float(v) for v in a.guidance_scales.split(",")):
            imgs = images_to_tensor(generate_uint8(pipe, prompts, list(range(a.n)), g, a.steps))
            with torch.no_grad():
                r = reward(clf, imgs, prompts).mean()
            print(f"| {split} | {g:g} | {alignment(clf, imgs, prompts).float().mean():.3f} | {r:.1f} |")


if __name__ == "__main__":
    main()
