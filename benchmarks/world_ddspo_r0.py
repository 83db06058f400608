"""DDSPO, Diffusion-DPO, R0 / R0+ and Self-NPO on top of each, on the embedded world.

Every method trains a LoRA for the shipped world model from the same training prompts; images
are generated for held-out prompts with the same seeds for every row, so win rates are paired.
Diffusion-DPO is trained on the same (c, c-) image pairs as DDSPO (``ddspo_targets = noise``),
which is the paper's comparison. R0 generates in 4 steps (``R0Scheduler``, fixed eta = 1, no
CFG); the base model is shown at 25 and 50 steps with CFG and at 4 steps.

    python benchmarks/world_ddspo_r0.py --output runs/ddspo-r0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from selfnpo.demo import DemoConfig
from selfnpo.evaluation.bench import EvalBench, train_to
from selfnpo.io import atomic_write_text
from selfnpo.models.loading import load_pipeline
from selfnpo.schedulers import R0Scheduler
from selfnpo.world.classifier import load_classifier
from selfnpo.world.model import shipped_model_dir, world_prompts

G = 3.0  # guidance scale of the CFG rows (the world model's default in docs/world.md)


def _fmt(ci: list[float]) -> str:
    return f"{ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]"


def _train(cfg: DemoConfig, model: str, prompts: Path, run: Path, steps: int, pool, **kw):
    """``selfnpo.evaluation.bench.train_to`` from scratch, every pool-based run reusing one self-generated pool."""
    return train_to(cfg, model, prompts, run, steps, source=pool, resume=False, overwrite=True, **kw)


def _runs(a, cfg: DemoConfig, model: str, prompts: Path, out: Path) -> dict:
    from selfnpo.training.data import LatentPool

    loser = {"ddspo_loser_steps": a.loser_steps}
    specs = {  # the first run makes the pool the others reuse
        "selfnpo": ("tdft", a.selfnpo_steps, {}),
        "ddspo": ("ddspo", a.train_steps, loser),
        "ddspo_unpaired": ("ddspo", a.train_steps, {"ddspo_variant": "unpaired"}),
        "diffusion_dpo": ("ddspo", a.train_steps, {**loser, "ddspo_targets": "noise"}),
        "ddspo_npo": ("ddspo_npo", a.train_steps, loser),
        "r0": ("r0", a.train_steps, {"lr": a.r0_lr}),
        "r0_plus": ("r0_plus", a.train_steps, {"lr": a.r0_lr}),
    }
    runs, pool = {}, None
    for name, (objective, steps, kw) in specs.items():
        src = pool if objective not in ("r0", "r0_plus") else None
        res = _train(cfg, model, prompts, out / name, steps, src, objective=objective, **kw)
        if pool is None:
            pool = LatentPool.load(out / name / "pool.safetensors")
        runs[name] = {
            "objective": objective,
            "overrides": kw,
            "steps": res.steps,
            "wall_time_s": res.wall_time_s,
            "network_evals": res.network_evals,
            "offset": str(res.offset_path.parent),
        }
        print(f"trained {name}: {res.steps} steps, {res.wall_time_s:.0f} s", flush=True)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="runs/ddspo-r0")
    ap.add_argument("--train-steps", type=int, default=60, help="steps of DDSPO, D-DPO and R0 runs")
    ap.add_argument("--selfnpo-steps", type=int, default=200)
    ap.add_argument("--loser-steps", type=int, default=8, help="DDIM steps of the c- images")
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate (DDSPO, D-DPO, Self-NPO)")
    ap.add_argument("--r0-lr", type=float, default=1e-4, help="LoRA learning rate of R0 and R0+")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = DemoConfig(
        output=a.output,
        eval_prompts=a.eval_prompts,
        train="lora",
        lr=a.lr,
        seed=a.seed,
        sample_steps=a.sample_steps,
    )
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    model = str(shipped_model_dir())
    prompts = out / "train_prompts.txt"
    atomic_write_text(prompts, "\n".join(world_prompts(512, "train", cfg.seed)) + "\n")
    t0 = time.perf_counter()
    runs = _runs(a, cfg, model, prompts, out)
    off = {k: Path(v["offset"]) for k, v in runs.items()}
    classifier = load_classifier()
    bench = EvalBench(cfg, load_pipeline(model, device="cpu", dtype="fp32"), classifier)
    long = EvalBench(
        replace(cfg, sample_steps=50), load_pipeline(model, device="cpu", dtype="fp32"), classifier
    )
    four_pipe = load_pipeline(model, device="cpu", dtype="fp32")
    four_pipe.scheduler = R0Scheduler.from_config(four_pipe.scheduler.config, timestep_spacing="trailing")
    four = EvalBench(replace(cfg, sample_steps=4), four_pipe, classifier)
    # (row, bench, g, negative, beta, positive, alpha, compared with)
    base = "base 25 steps g=3"
    settings = [
        (base, bench, G, None, 0.0, None, 0.0, None),
        ("base 50 steps g=3", long, G, None, 0.0, None, 0.0, base),
        ("base 4 steps g=1", four, 1.0, None, 0.0, None, 0.0, base),
        ("base 4 steps g=3", four, G, None, 0.0, None, 0.0, base),
        ("Self-NPO", bench, G, off["selfnpo"], 1.0, None, 0.0, base),
        ("DDSPO", bench, G, None, 0.0, off["ddspo"], 1.0, base),
        ("DDSPO unpaired", bench, G, None, 0.0, off["ddspo_unpaired"], 1.0, base),
        ("Diffusion-DPO (same pairs)", bench, G, None, 0.0, off["diffusion_dpo"], 1.0, base),
        ("DDSPO-NPO as negative", bench, G, off["ddspo_npo"], 1.0, None, 0.0, base),
        ("DDSPO + Self-NPO", bench, G, off["selfnpo"], 1.0, off["ddspo"], 1.0, "DDSPO"),
        (
            "Diffusion-DPO + Self-NPO",
            bench,
            G,
            off["selfnpo"],
            1.0,
            off["diffusion_dpo"],
            1.0,
            "Diffusion-DPO (same pairs)",
        ),
        ("R0 4 steps g=1", four, 1.0, None, 0.0, off["r0"], 1.0, base),
        ("R0+ 4 steps g=1", four, 1.0, None, 0.0, off["r0_plus"], 1.0, base),
        ("R0 4 steps g=1 vs base 4 steps", four, 1.0, None, 0.0, off["r0"], 1.0, "base 4 steps g=1"),
        ("R0 4 steps g=3", four, G, None, 0.0, off["r0"], 1.0, "R0 4 steps g=1"),
        ("R0 + Self-NPO 4 steps g=3", four, G, off["selfnpo"], 1.0, off["r0"], 1.0, "R0 4 steps g=3"),
    ]
    where, rows = {}, []
    for name, b, g, neg, beta, pos, alpha, ref in settings:
        b.run(name, g, neg, beta, positive=pos, alpha=alpha)
        where[name] = b
        if ref is not None and where[ref] is not b:  # paired scores live per bench; share them
            b.scores[ref] = where[ref].scores[ref]
        rows.append({"row": name, "vs": ref or "-", **b.summary(name, ref)})
        print(f"scored {name}", flush=True)
    result = {
        "runs": runs,
        "rows": rows,
        "args": vars(a),
        "eval_prompts": len(bench.prompts),
        "total_wall_s": time.perf_counter() - t0,
    }
    atomic_write_text(out / "ddspo_r0.json", json.dumps(result, indent=2))
    print(f"{len(bench.prompts)} prompts of the {cfg.split} split; paired columns compare with 'vs'")
    print(
        C.markdown_header(
            ["setting", "alignment", "reward", "KID", "reward win rate", "vs", *C.PAIRED_HEADER]
        )
    )
    for r in rows:
        wr = _fmt(r["win_rate_reward"]) if "win_rate_reward" in r else "-"
        print(
            C.markdown_row(
                [
                    r["row"],
                    _fmt(r["alignment"]),
                    _fmt(r["reward"]),
                    _fmt(r["kid"]),
                    wr,
                    r["vs"],
                    *C.paired_cells(r),
                ]
            )
        )
    for m, r in runs.items():
        print(f"{m}: {r['steps']} steps, {r['wall_time_s']:.0f} s, {r['network_evals']} network evaluations")


if __name__ == "__main__":
    main()
