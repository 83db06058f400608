"""A class-conditional 2-D Gaussian mixture with every density in closed form.

Class ``c`` has density ``p(x|c) = sum_k w_ck N(x; mu_ck, Sigma_ck)``; the classes have prior
``pi_c`` and the unconditional marginal is ``p(x) = sum_c pi_c p(x|c)``. Pushed through the VP
forward process ``x_t = alpha_t x_0 + sigma_t eps`` every component stays Gaussian,
``N(alpha mu, alpha^2 Sigma + sigma^2 I)``, so the noisy marginal, its score, the exact
epsilon and Tweedie's posterior mean ``E[x_0 | x_t, c]`` (Self-NPO eq. 2/12) are all exact.
Everything is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

F64 = torch.float64


@dataclass
class Mixture2D:
    """Components ``mu [M, 2]``, ``cov [M, 2, 2]``, within-class weights ``w [M]`` (summing to 1
    per class), class of each component ``cls [M]`` and class prior ``prior [K]``."""

    mu: Tensor
    cov: Tensor
    w: Tensor
    cls: Tensor
    prior: Tensor

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return int(self.prior.shape[0])

    def _joint_weights(self, c: Tensor | None) -> Tensor:
        """``[B, M]`` log-weights of each component under class ``c`` (``None``: the marginal)."""
        logw = self.w.log()
        if c is None:
            return (logw + self.prior.log()[self.cls])[None]
        same = self.cls[None, :] == c.to(self.cls.device)[:, None]
        return torch.where(same, logw[None], torch.full_like(same, -math.inf, dtype=F64))

    def _component_logpdf(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Per-component ``log N(x; alpha mu, alpha^2 Sigma + sigma^2 I)`` ``[B, M]`` and the
        precision matrices ``[B, M, 2, 2]``; ``alpha, sigma`` are ``[B]``."""
        a, s = alpha.to(F64)[:, None, None, None], sigma.to(F64)[:, None, None, None]
        eye = torch.eye(2, dtype=F64)
        cov = a**2 * self.cov[None] + s**2 * eye  # [B, M, 2, 2]
        prec = torch.linalg.inv(cov)
        d = x.to(F64)[:, None, :] - a[..., 0] * self.mu[None]  # [B, M, 2]
        maha = torch.einsum("bmi,bmij,bmj->bm", d, prec, d)
        logdet = torch.logdet(cov)
        return -0.5 * (maha + logdet) - math.log(2 * math.pi), prec

    @staticmethod
    def _levels(n: int, alpha, sigma) -> tuple[Tensor, Tensor]:
        """``alpha, sigma`` (scalars or ``[n]``) as float64 ``[n]`` tensors."""
        a, s = torch.as_tensor(alpha, dtype=F64), torch.as_tensor(sigma, dtype=F64)
        return (a.expand(n) if a.ndim == 0 else a), (s.expand(n) if s.ndim == 0 else s)

    def log_prob(self, x: Tensor, c: Tensor | None = None, alpha=1.0, sigma=0.0) -> Tensor:
        """Exact ``log p_t(x | c)`` of the level-``(alpha, sigma)`` marginal (``c=None``: ``p_t(x)``).

        ``alpha=1, sigma=0`` is the data density itself.
        """
        a, s = self._levels(x.shape[0], alpha, sigma)
        comp, _ = self._component_logpdf(x, a, s)
        return torch.logsumexp(comp + self._joint_weights(c), 1)

    def class_log_posterior(self, x: Tensor) -> Tensor:
        """Exact ``log p(c | x)`` of clean points, ``[B, K]`` (Bayes' rule over the classes)."""
        joint = torch.stack(
            [
                self.log_prob(x, torch.full((x.shape[0],), k)) + self.prior[k].log()
                for k in range(self.num_classes)
            ],
            1,
        )
        return joint - torch.logsumexp(joint, 1, keepdim=True)

    def posterior_mean(self, x_t: Tensor, c: Tensor | None, alpha, sigma) -> Tensor:
        """Tweedie's ``E[x_0 | x_t, c]`` (Self-NPO eq. 12), exact.

        Per component ``mu + alpha Sigma (alpha^2 Sigma + sigma^2 I)^-1 (x_t - alpha mu)``,
        weighted by the components' posterior responsibilities.
        """
        a, s = self._levels(x_t.shape[0], alpha, sigma)
        comp, prec = self._component_logpdf(x_t, a, s)
        r = torch.softmax(comp + self._joint_weights(c), 1)  # [B, M]
        d = x_t.to(F64)[:, None, :] - a[:, None, None] * self.mu[None]
        m = self.mu[None] + a[:, None, None] * torch.einsum("mij,bmjk,bmk->bmi", self.cov, prec, d)
        return (r[..., None] * m).sum(1)

    def eps(self, x_t: Tensor, c: Tensor | None, alpha, sigma) -> Tensor:
        """The exact epsilon-prediction ``(x_t - alpha E[x_0|x_t,c]) / sigma = -sigma * score``."""
        a, s = self._levels(x_t.shape[0], alpha, sigma)
        x0 = self.posterior_mean(x_t, c, a, s)
        return (x_t.to(F64) - a[:, None] * x0) / s[:, None]

    def sample(self, n: int, c: Tensor | None, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` draws of ``x ~ p(x|c)`` (per-sample ``c [n]``; ``None`` draws classes from the
        prior first). Returns ``(x [n, 2], c [n])``."""
        if c is None:
            c = torch.multinomial(self.prior, n, replacement=True, generator=g)
        logw = self._joint_weights(c)
        k = torch.multinomial(logw.exp(), 1, generator=g)[:, 0]
        chol = torch.linalg.cholesky(self.cov)[k]  # [n, 2, 2]
        z = torch.randn(n, 2, generator=g, dtype=F64)
        return self.mu[k] + torch.einsum("nij,nj->ni", chol, z), c


def ring_mixture(
    num_classes: int = 3,
    per_class: int = 3,
    radius: float = 1.5,
    std: float = 0.15,
    stretch: float = 2.0,
) -> Mixture2D:
    """``num_classes * per_class`` components on a ring, classes interleaved (component ``j``
    belongs to class ``j mod K``), each elongated ``stretch`` times along the ring, so that the
    unconditional marginal is a ring of modes and each class holds every K-th mode."""
    m = num_classes * per_class
    ang = torch.arange(m, dtype=F64) * (2 * math.pi / m)
    mu = radius * torch.stack([ang.cos(), ang.sin()], 1)
    tangent = torch.stack([-ang.sin(), ang.cos()], 1)
    normal = torch.stack([ang.cos(), ang.sin()], 1)
    rot = torch.stack([tangent, normal], 2)  # columns: along the ring, outwards
    scales = torch.diag(torch.tensor([(std * stretch) ** 2, std**2], dtype=F64))
    cov = rot @ scales @ rot.transpose(1, 2)
    cls = torch.arange(m) % num_classes
    w = torch.full((m,), 1.0 / per_class, dtype=F64)
    prior = torch.full((num_classes,), 1.0 / num_classes, dtype=F64)
    return Mixture2D(mu, cov, w, cls, prior)
