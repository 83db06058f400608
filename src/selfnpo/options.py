"""Config helpers shared by every command's dataclass: field help, old-config defaults, checks.

Each command's config is a dataclass whose field metadata holds the help text; the CLI builds its
flags from them (:mod:`selfnpo.cli`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

from .errors import SelfNPOError


def opt(default, help: str, **kw):  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help, **kw})


def with_defaults(cls: type, saved: dict) -> dict:
    """A config saved by an earlier version, with settings added since counted as their defaults."""
    return {**{f.name: f.default for f in dataclasses.fields(cls)}, **saved}


MAX_SEED = 2**32 - 1  # numpy, torch and every generator accept it, also with + index


def check_finite(cfg) -> None:
    """Name the first float setting of ``cfg`` that is NaN or infinite (it would only show up
    later as a non-finite loss or silently wrong images)."""
    import math

    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise SelfNPOError(f"--{f.name.replace('_', '-')} must be a finite number, got {v}")


def import_attr(spec: str, what: str):
    """The callable named by ``package.module:attr`` (a reward, a degrader, ...); a one-line
    :class:`SelfNPOError` naming ``what`` when it cannot be imported or is not callable."""
    import importlib

    mod, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise SelfNPOError(f"cannot import {what} {spec!r} ({type(e).__name__})") from None
    if not callable(obj):
        raise SelfNPOError(f"{what} {spec!r} is not callable")
    return obj
