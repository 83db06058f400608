"""The compact validation table of ``world_tune.py`` and the pick of BENCHMARKS.md's selection rule.

Rule (fixed before the validation results were complete): among the candidates at guidance scale
``--g``, keep those whose strict-alignment and KID intervals do not exclude 0 on the bad side, and
pick the one with the highest lower bound of the paired reward interval.

    python benchmarks/world_tune_select.py runs/tune [--split validation] [--g 3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _ci(x: list[float], digits: int = 3) -> str:
    return f"{x[0]:+.{digits}f} [{x[1]:+.{digits}f}, {x[2]:+.{digits}f}]"


def table(rows: list[dict]) -> str:
    """One markdown row per (offset, g, beta): the paired differences against the base."""
    out = [
        "| offset | g | beta | reward diff | reward MDE | reward win rate | strict alignment diff "
        "| KID diff | colour | shape | position | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["guidance_scale"], r["config"], r["beta"])):
        p = r["paired"]
        wr = p["reward"]["win_rate"]
        attrs = " | ".join(f"{p[f'attr_{k}']['diff'][0]:+.3f}" for k in ("colour", "shape", "position"))
        out.append(
            f"| {r['config']} | {r['guidance_scale']:g} | {r['beta']:g} | {_ci(p['reward']['diff'], 2)} "
            f"| {p['reward']['mde']:.2f} | {wr[0]:.3f} [{wr[1]:.3f}, {wr[2]:.3f}] | {_ci(p['alignment']['diff'])} "
            f"| {_ci(p['kid']['diff'], 4)} | {attrs} | {r.get('verdict_word', '')} |"
        )
    return "\n".join(out)


def base_levels(rows: list[dict]) -> str:
    """The base model's mean reward and strict alignment at each g (a setting's mean minus its
    paired difference: the same prompts and seeds)."""
    out = []
    for g in sorted({r["guidance_scale"] for r in rows}):
        r = next(r for r in rows if r["guidance_scale"] == g)
        reward = r["reward"][0] - r["paired"]["reward"]["diff"][0]
        aligned = r["alignment"][0] - r["paired"]["alignment"]["diff"][0]
        out.append(f"base at g = {g:g}: reward {reward:.2f}, strict alignment {aligned:.3f} (n = {r['n']})")
    return "\n".join(out)


PEERS = ("autoguidance",)


def select(rows: list[dict], g: float) -> tuple[str, float] | None:
    """The rule's pick ``(config, beta)`` at guidance scale ``g`` (None if no candidate is eligible)."""
    eligible = [
        (r["paired"]["reward"]["diff"][1], r["config"], r["beta"])
        for r in rows
        if r["guidance_scale"] == g
        and r["paired"]["alignment"]["diff"][2] >= 0  # strict alignment not worse
        and r["paired"]["kid"]["diff"][1] <= 0  # KID not worse
    ]
    return max(eligible)[1:] if eligible else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", help="the --output folder of world_tune.py")
    ap.add_argument("--split", default="validation", choices=("validation", "test"))
    ap.add_argument("--g", type=float, default=3.0, help="guidance scale the rule picks at")
    a = ap.parse_args()
    results = json.loads((Path(a.output) / a.split / "results.json").read_text())
    rows = [r for c in results.values() for r in c["rows"]]
    print(table(rows))
    print()
    print(base_levels(rows))
    if a.split == "validation":
        # peers (autoguidance) are measured beside the offsets but are not candidates of the rule
        candidates = [r for r in rows if r["config"] not in PEERS]
        print(f"\npick at g = {a.g:g}: {select(candidates, a.g)}")


if __name__ == "__main__":
    main()
