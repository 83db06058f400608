"""Scoring generated images on the embedded world: alignment, reward, features, paired statistics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..world.classifier import alignment, images_to_tensor, reward
from ..world.render import render


@dataclass
class Scores:
    """Per-image scores of one setting, in prompt/seed order."""

    aligned: np.ndarray  # [N] bool: every stated attribute recognised
    reward: np.ndarray  # [N] float: log-likelihood of the prompt's attributes (<= 0)
    features: np.ndarray  # [N, D] classifier features, for the Frechet distance


@torch.no_grad()
def score_images(classifier, images: np.ndarray, prompts: Sequence[str], batch: int = 256) -> Scores:
    """Score uint8 ``[N, H, W, 3]`` images against their prompts."""
    x = images_to_tensor(images)
    al = alignment(classifier, x, list(prompts)).numpy()
    rw = torch.cat(
        [reward(classifier, x[i : i + batch], list(prompts[i : i + batch])) for i in range(0, len(x), batch)]
    )
    feats = torch.cat([classifier.features(x[i : i + batch]) for i in range(0, len(x), batch)])
    return Scores(al.astype(bool), rw.numpy().astype(np.float64), feats.numpy().astype(np.float64))


def real_features(classifier, scenes) -> np.ndarray:
    """Classifier features of true renders (the Frechet reference)."""
    images = np.stack([render(s) for s in scenes])
    with torch.no_grad():
        return classifier.features(images_to_tensor(images)).numpy().astype(np.float64)


FRECHET_DIMS = 16


def pca_basis(real: np.ndarray, k: int = FRECHET_DIMS) -> np.ndarray:
    """``[D, k]`` top principal directions of the real features.

    The Frechet distance is computed in this space: with tens of images and 320-dimensional
    features the covariances would be singular and the distance mostly estimation noise.
    """
    _, _, vt = np.linalg.svd(real - real.mean(0), full_matrices=False)
    return vt[: min(k, vt.shape[0])].T


def summarise(s: Scores, real: np.ndarray, base: Scores | None, seed: int = 0) -> dict:
    """Means with bootstrap intervals, Frechet distance to real renders (in the top-16 PCA space of
    the real features), win rate over ``base``."""
    from .stats import bootstrap_mean_ci, frechet_ci, win_rate

    basis = pca_basis(real)
    out = {
        "alignment": list(bootstrap_mean_ci(s.aligned.astype(np.float64), seed=seed)),
        "reward": list(bootstrap_mean_ci(s.reward, seed=seed)),
        "frechet": list(frechet_ci(s.features @ basis, real @ basis, seed=seed)),
    }
    if base is not None:
        out["win_rate_reward"] = list(win_rate(s.reward, base.reward, seed=seed))
        out["win_rate_alignment"] = list(
            win_rate(s.aligned.astype(np.float64), base.aligned.astype(np.float64), seed=seed)
        )
    return out
