"""Model adapters: one per pipeline family, all behind :class:`selfnpo.models.sd.DiffusionModel`."""

from __future__ import annotations


def model_for(pipe, uncond_mode: str = "auto"):
    """The adapter for a loaded diffusers pipeline (SD1.5 / SDXL / SD3 families)."""
    if type(pipe).__name__.startswith("StableDiffusion3"):
        from .sd3 import SD3Model

        return SD3Model(pipe, uncond_mode)
    from .sd import DiffusionModel

    return DiffusionModel(pipe, uncond_mode)
