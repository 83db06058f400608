"""Exact and sample-based quality measures of 2-D samples against the true mixture.

Per sample (so two methods sampled from the same seeds can be compared pair by pair):
``loglik`` = exact ``log p(x|c)``; ``in_hdr`` = whether ``x`` lies in the class's 95% highest-density
region (an exact precision); ``correct`` = whether the Bayes classifier ``argmax_c' p(c'|x)`` returns
``c`` (prompt following). Per set: the k-NN precision and recall of Kynkäänniemi et al. (2019)
against fresh true samples of the same class.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .mixture import F64, Mixture2D


def hdr_log_threshold(mix: Mixture2D, c: int, mass: float = 0.95, n: int = 20_000, seed: int = 0) -> float:
    """``tau_c`` with ``P(log p(x|c) >= tau_c) = mass`` for ``x ~ p(x|c)``: the level of the
    highest-density region holding ``mass`` of the class (Monte Carlo, ``n`` draws)."""
    g = torch.Generator().manual_seed(seed)
    x, cls = mix.sample(n, torch.full((n,), c), g)
    return float(torch.quantile(mix.log_prob(x, cls), 1.0 - mass))


def per_sample(mix: Mixture2D, x: Tensor, c: Tensor, thresholds: list[float]) -> dict[str, np.ndarray]:
    """``loglik``, ``in_hdr`` and ``correct`` of each sample ``x [N, 2]`` of class ``c [N]``."""
    x = x.to(F64)
    loglik = mix.log_prob(x, c)
    tau = torch.tensor(thresholds, dtype=F64)[c]
    correct = mix.class_log_posterior(x).argmax(1) == c
    return {
        "loglik": loglik.numpy(),
        "in_hdr": (loglik >= tau).numpy().astype(np.float64),
        "correct": correct.numpy().astype(np.float64),
    }


def _knn_radii(x: Tensor, k: int) -> Tensor:
    """Distance of each point to its k-th nearest other point of the same set."""
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def knn_precision_recall(gen: Tensor, real: Tensor, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al. (2019): precision = share of generated points inside the union of the
    real points' k-NN balls; recall = share of real points inside the generated points' k-NN balls."""
    gen, real = gen.to(F64), real.to(F64)
    d = torch.cdist(gen, real)  # [G, R]
    precision = (d <= _knn_radii(real, k)[None, :]).any(1).double().mean()
    recall = (d <= _knn_radii(gen, k)[:, None]).any(0).double().mean()
    return float(precision), float(recall)


def class_knn_precision_recall(
    gen: Tensor, c: Tensor, mix: Mixture2D, k: int = 3, seed: int = 1
) -> tuple[float, float]:
    """:func:`knn_precision_recall` per class against as many fresh true samples, averaged over classes."""
    g = torch.Generator().manual_seed(seed)
    ps, rs = [], []
    for cls in range(mix.num_classes):
        sel = gen[c == cls]
        real, _ = mix.sample(sel.shape[0], torch.full((sel.shape[0],), cls), g)
        p, r = knn_precision_recall(sel, real, k)
        ps.append(p)
        rs.append(r)
    return float(np.mean(ps)), float(np.mean(rs))
