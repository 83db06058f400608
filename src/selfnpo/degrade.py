"""Prompt degradation for DDSPO: ``c -> c-``, a prompt that says less (or something worse).

DDSPO's dispreferred score is the reference model's prediction under a degraded prompt ``c-``
(DDSPO sec. 3.3). The paper's default is random removal of 40-70 % of the tokens
(:func:`degrade_prompt`); its other strategy is an LLM rewrite, which a user supplies as a
function or as a file of precomputed rewrites (:func:`get_degrader`).

A degrader is ``f(prompt, generator) -> degraded prompt``; the ``torch.Generator`` is the
training loop's, so runs stay reproducible and resumable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import SelfNPOError
from .options import import_attr

Degrader = Callable[[str, torch.Generator], str]
DEGRADERS: dict[str, Callable[[], Degrader]] = {}


def removal_count(n_tokens: int, fraction: float, allow_empty: bool = False) -> int:
    """How many of ``n_tokens`` tokens to remove for ``fraction``: ``round(fraction * n)``,
    at most ``n - 1`` unless ``allow_empty`` (a one-token prompt is then kept whole)."""
    k = int(math.floor(fraction * n_tokens + 0.5))
    return min(k, n_tokens if allow_empty else max(n_tokens - 1, 0))


def degrade_prompt(
    prompt: str,
    g: torch.Generator,
    low: float = 0.4,
    high: float = 0.7,
    allow_empty: bool = False,
) -> str:
    """Remove a random fraction ``u ~ U[low, high]`` of the whitespace tokens of ``prompt``
    (DDSPO sec. 4.2, "Rand-removal"); the kept tokens stay in order.

    Never returns an empty prompt for a non-empty one unless ``allow_empty``.
    """
    if not 0.0 <= low <= high <= 1.0:
        raise SelfNPOError(f"removal fractions must satisfy 0 <= low <= high <= 1; got {low}, {high}")
    tokens = prompt.split()
    u = torch.rand((), generator=g, device=g.device, dtype=torch.float64).item()
    k = removal_count(len(tokens), low + (high - low) * u, allow_empty)
    drop = set(torch.randperm(len(tokens), generator=g, device=g.device)[:k].tolist())
    return " ".join(w for i, w in enumerate(tokens) if i not in drop)


def register_degrader(name: str) -> Callable[[Callable[[], Degrader]], Callable[[], Degrader]]:
    """Register ``factory() -> Degrader`` under ``name``."""

    def deco(factory: Callable[[], Degrader]) -> Callable[[], Degrader]:
        DEGRADERS[name] = factory
        return factory

    return deco


@register_degrader("random_removal")
def _random_removal() -> Degrader:
    return degrade_prompt


def rewrites_from_file(path: str | Path) -> Degrader:
    """A degrader that looks prompts up in precomputed rewrites (e.g. an LLM's, made offline).

    ``.jsonl`` lines ``{"prompt": ..., "degraded": ...}`` or ``.tsv`` lines ``prompt<TAB>degraded``.
    """
    p = Path(path)
    if not p.is_file():
        raise SelfNPOError(f"{p}: rewrite file not found")
    table: dict[str, str] = {}
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            if p.suffix == ".jsonl":
                rec = json.loads(line)
                table[str(rec["prompt"])] = str(rec["degraded"])
            else:
                src, dst = line.split("\t")
                table[src] = dst
        except (ValueError, KeyError, TypeError):
            raise SelfNPOError(f"{p}:{i}: expected a prompt and its degraded rewrite") from None

    def lookup(prompt: str, g: torch.Generator) -> str:
        if prompt not in table:
            raise SelfNPOError(f"{p}: no rewrite for prompt {prompt!r}")
        return table[prompt]

    return lookup


def get_degrader(spec: str) -> Degrader:
    """Resolve ``spec``: a registered name (``random_removal``), a rewrite file (``.jsonl`` /
    ``.tsv``) or ``package.module:function`` naming a ``Degrader`` (e.g. an LLM rewrite)."""
    if spec in DEGRADERS:
        return DEGRADERS[spec]()
    if spec.endswith((".jsonl", ".tsv")):
        return rewrites_from_file(spec)
    if ":" in spec:
        return import_attr(spec, "degrader")
    known = ", ".join(sorted(DEGRADERS))
    raise SelfNPOError(
        f"unknown degrader {spec!r}; use {known}, a .jsonl/.tsv rewrite file or module:function"
    )
