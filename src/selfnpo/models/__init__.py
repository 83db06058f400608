"""Model adapters: one per pipeline family, all behind :class:`selfnpo.models.sd.DiffusionModel`."""

from __future__ import annotations


def family(pipe) -> str:
    """``sd`` (SD1.5 / SDXL types), ``sd3``, ``flux``, ``wan`` or ``cogvideox`` for a diffusers pipeline."""
    name = type(pipe).__name__
    prefixes = (("StableDiffusion3", "sd3"), ("Flux", "flux"), ("Wan", "wan"), ("CogVideoX", "cogvideox"))
    for prefix, fam in prefixes:
        if name.startswith(prefix):
            return fam
    return "sd"


def check_supported(pipe) -> None:
    """One-line refusal of models of a supported class that have no negative branch to act on
    (timestep-distilled Flux) or need more than one offset (two-expert Wan 2.2)."""
    fam = family(pipe)
    if fam == "flux":
        from .flux import check_flux

        check_flux(pipe)
    elif fam == "wan":
        from .wan import check_wan

        check_wan(pipe)


def model_for(pipe, uncond_mode: str = "auto", resolution: int | None = None, frames: int | None = None):
    """The adapter for a loaded diffusers pipeline.

    ``resolution`` fixes the time shift of resolution-dependent schedules (Flux) and the default
    size of families without one in their config (Flux, Wan); ``frames`` the clip length of video
    families (Wan, CogVideoX). Other families ignore them.
    """
    fam = family(pipe)
    if fam == "sd3":
        from .sd3 import SD3Model

        return SD3Model(pipe, uncond_mode)
    if fam == "flux":
        from .flux import FluxModel

        return FluxModel(pipe, uncond_mode, resolution)
    if fam == "wan":
        from .wan import WanModel

        return WanModel(pipe, uncond_mode, resolution, frames)
    if fam == "cogvideox":
        from .cogvideox import CogVideoXModel

        return CogVideoXModel(pipe, uncond_mode, resolution, frames)
    from .sd import DiffusionModel

    return DiffusionModel(pipe, uncond_mode)
