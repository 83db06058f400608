"""Self-NPO against autoguidance (Karras et al. 2024) on the same 2-D bases, noises and classes.

Autoguidance replaces the unconditional branch by a *weaker version of the same model on the same
class*: ``eps = eps_weak(x|c) + g (eps(x|c) - eps_weak(x|c))``. Here the weak model is an earlier
checkpoint of the same pre-training run (300 or 1000 of 3000 steps). Self-NPO keeps the
unconditional input and weakens the network by its offset (default TDFT, LoRA lr 1e-3, beta = 1).
All rows sample the same noises with the project's DDIM sampler and ``cfg`` combinator; Δ is
paired against plain CFG at the same g.

    python benchmarks/toy2d_autoguidance.py --output runs/toy2d-autoguidance
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from toy2d_selfnpo import METRICS, pretrain, run_and_write, sample, score, train_offset

from selfnpo.evaluation.stats import paired_diff_ci
from selfnpo.guidance import cfg
from selfnpo.sampling import ddim_sample
from selfnpo.schedules import ddim_grid
from selfnpo.toy2d.metrics import hdr_log_threshold
from selfnpo.toy2d.mixture import ring_mixture
from selfnpo.toy2d.model import Toy2DModel, class_prompt

GUIDANCE = (1.5, 3.0, 5.0, 7.5)


@torch.no_grad()
def autoguided(strong, weak, prompts, noise, g: float, steps: int = 25):
    """DDIM with ``eps_weak(x|c) + g (eps_strong(x|c) - eps_weak(x|c))``."""
    ms, mw = Toy2DModel(strong), Toy2DModel(weak)
    c = ms.encode(prompts)

    def pos(x, t):
        return ms.predict(x, t, c)

    def neg(x, t):
        return mw.predict(x, t, c)

    return ddim_sample(ms, cfg(pos, neg, g), noise, ddim_grid(steps))


def run(args) -> dict:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    mix = ring_mixture()
    thresholds = [hdr_log_threshold(mix, c) for c in range(mix.num_classes)]
    prompts_file = out / "prompts.txt"
    prompts_file.write_text("".join(class_prompt(c) + "\n" for c in range(mix.num_classes)))
    noise = torch.randn(args.n, 2, generator=torch.Generator().manual_seed(args.seed + 1))
    cls = torch.arange(args.n) % mix.num_classes
    prompts = [class_prompt(int(c)) for c in cls]
    bases, _ = pretrain(mix, out, {"300": 300, "1000": 1000, "3000": 3000}, args.seed)
    strong = bases["3000"]
    offset, _ = train_offset(
        strong.copy(), out / "offset", prompts_file, args.offset_steps, args.seed, objective="tdft", lr=1e-3
    )
    rows = []
    for gs in GUIDANCE:
        ref, ref_sum = score(mix, sample(strong, prompts, noise, gs), cls, thresholds)
        rows.append({"method": "plain CFG", "g": gs, **ref_sum})
        arms = {
            "Self-NPO (tdft, beta 1)": sample(strong, prompts, noise, gs, offset, 1.0),
            "autoguidance, weak = step 300": autoguided(strong, bases["300"], prompts, noise, gs),
            "autoguidance, weak = step 1000": autoguided(strong, bases["1000"], prompts, noise, gs),
        }
        for name, x in arms.items():
            per, summ = score(mix, x, cls, thresholds)
            diffs = {f"d_{m}": paired_diff_ci(per[m], ref[m], n_boot=1000, seed=0) for m in METRICS}
            rows.append({"method": name, "g": gs, **summ, **diffs})
    return {"config": vars(args), "rows": rows}


def markdown(res: dict) -> str:
    lines = [
        f"n = {res['config']['n']}, strong model = step 3000; Δ paired with plain CFG at the same g "
        "(95% bootstrap interval).",
        "",
        "| g | method | log p(x\\|c) | Δ log p | HDR precision | Δ HDR | class acc | kNN P | kNN R |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        d = {m: "" for m in METRICS}
        for m in METRICS:
            if f"d_{m}" in r:
                mean, lo, hi = r[f"d_{m}"]
                d[m] = f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        lines.append(
            f"| {r['g']:g} | {r['method']} | {r['loglik']:.3f} | {d['loglik']} | {r['in_hdr']:.3f} | "
            f"{d['in_hdr']} | {r['correct']:.3f} | {r['knn_precision']:.3f} | {r['knn_recall']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--output", required=True, help="folder for autoguidance.json, autoguidance.md and the runs"
    )
    ap.add_argument("--n", type=int, default=1500, help="samples per setting")
    ap.add_argument("--offset-steps", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    run_and_write(run, markdown, ap.parse_args(), "autoguidance")


if __name__ == "__main__":
    main()
