"""Classifier-free guidance as a combinator over bound denoisers.

A *bound denoiser* is ``f(x_t, t) -> raw prediction`` with its conditioning and weights already
fixed. The papers write ``eps = (w + 1) eps_pos - w eps_neg`` (Self-NPO eq. 4); diffusers'
``guidance_scale`` is ``g = w + 1``, which is the convention used here:
``eps = eps_neg + g * (eps_pos - eps_neg)``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .conditioning import Cond

BoundDenoiser = Callable[[Tensor, Tensor], Tensor]
# an unbound denoiser: ``predict(x_t, t, cond) -> raw prediction`` (a student, teacher or model)
Predict = Callable[[Tensor, Tensor, Cond], Tensor]


def w_to_g(w: float) -> float:
    """Paper guidance weight ``w`` -> diffusers ``guidance_scale`` ``g = w + 1``."""
    return w + 1.0


def cfg(pos: BoundDenoiser, neg: BoundDenoiser, scale: float, always_both: bool = False) -> BoundDenoiser:
    """``neg + scale * (pos - neg)``; the negative branch may be any denoiser (base, offset, merged).

    ``scale == 0`` is the negative branch alone and ``scale == 1`` the positive alone; those skip
    the other network pass unless ``always_both`` (which reproduces code that computes and
    discards it, for cost comparisons).
    """
    if not always_both and scale == 0.0:
        return neg
    if not always_both and scale == 1.0:
        return pos

    def guided(x_t: Tensor, t: Tensor) -> Tensor:
        p, n = pos(x_t, t), neg(x_t, t)
        return n + scale * (p - n)

    return guided


def guided(
    predict: Predict, cond: Cond, uncond: Cond | None = None, scale: float = 1.0, always_both: bool = False
) -> BoundDenoiser:
    """``predict`` bound to the prompts' conditioning ``cond`` and to ``uncond``, combined by
    :func:`cfg` at ``scale`` (``scale == 1``: the conditional branch alone; ``uncond`` may be None)."""

    def pos(x: Tensor, t: Tensor) -> Tensor:
        return predict(x, t, cond)

    def neg(x: Tensor, t: Tensor) -> Tensor:
        if uncond is None:
            raise ValueError("guidance at a scale other than 1 needs the unconditional input")
        return predict(x, t, uncond)

    return cfg(pos, neg, scale, always_both=always_both)
