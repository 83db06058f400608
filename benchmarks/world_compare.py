"""Self-NPO (TDFT) vs the full-simulation baseline at equal training wall time, on the embedded world.

Both train a LoRA negative offset for the shipped world model from prompts only; the baseline
gets as many steps as fit in the wall time TDFT used (calibrated on two steps, then resumed, so
its run is one uninterrupted run). Each offset is then scored on held-out prompts with the same
seeds as the base model, over a grid of guidance scales and betas, on the validation split
(``--split test`` to report), with the paired differences of docs/evaluation.md. Extra ``--set KEY=VALUE``
options override TrainConfig fields of the Self-NPO run (for the ablations in BENCHMARKS.md).

    python benchmarks/world_compare.py --output runs/compare
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from selfnpo.demo import DemoConfig
from selfnpo.evaluation.bench import EvalBench, train_to
from selfnpo.io import atomic_write_text
from selfnpo.models.loading import load_pipeline
from selfnpo.world.classifier import load_classifier
from selfnpo.world.model import shipped_model_dir, world_prompts


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _fmt(ci: list[float]) -> str:
    return f"{ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]"


def _train(
    cfg: DemoConfig, model: str, prompts: Path, out: Path, overrides: dict, methods: list[str]
) -> dict:
    runs = {}
    res = train_to(cfg, model, prompts, out / "tdft", cfg.train_steps, **overrides)
    runs["tdft"] = {
        "steps": res.steps,
        "wall_time_s": res.wall_time_s,
        "network_evals": res.network_evals,
        "offset": str(res.offset_path.parent),
    }
    if "full_sim" in methods:
        probe = train_to(cfg, model, prompts, out / "full_sim", 2, objective="full_sim")
        steps = max(2, round(res.wall_time_s / (probe.wall_time_s / 2)))
        full = train_to(cfg, model, prompts, out / "full_sim", steps, objective="full_sim")
        runs["full_sim"] = {
            "steps": steps,
            "wall_time_s": probe.wall_time_s + full.wall_time_s,
            "network_evals": probe.network_evals + full.network_evals,
            "offset": str(full.offset_path.parent),
        }
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="runs/world-compare")
    ap.add_argument("--model", default="", help="diffusers folder (default: the embedded world model)")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--split", default="validation", choices=("validation", "test"))
    ap.add_argument("--eval-prompts", type=int, default=128)
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--guidance-scales", default="1.5,3,5")
    ap.add_argument("--betas", default="0.5,1")
    ap.add_argument("--methods", default="tdft,full_sim")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--seed", type=int, default=0, help="seed of prompts, training and sampling (ablations use 1)"
    )
    ap.add_argument(
        "--set", action="append", default=[], help="TrainConfig override for the tdft run, KEY=VALUE"
    )
    a = ap.parse_args()
    torch.set_num_threads(1)
    overrides = {k: _value(v) for k, v in (s.split("=", 1) for s in a.set)}
    cfg = DemoConfig(
        output=a.output,
        train_steps=a.train_steps,
        split=a.split,
        eval_prompts=a.eval_prompts,
        train="lora",
        lr=a.lr,
        seed=a.seed,
        sample_steps=a.sample_steps,
        guidance_scales=a.guidance_scales,
        betas=a.betas,
    )
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    model = a.model or str(shipped_model_dir())
    prompts = out / "train_prompts.txt"
    atomic_write_text(prompts, "\n".join(world_prompts(512, "train", cfg.seed)) + "\n")
    t0 = time.perf_counter()
    methods = a.methods.split(",")
    runs = _train(cfg, model, prompts, out, overrides, methods)
    bench = EvalBench(cfg, load_pipeline(model, device="cpu", dtype="fp32"), load_classifier())
    rows = []
    for g in cfg.floats("guidance_scales"):
        bench.run(("base", g), g, None, 0.0)
        rows.append({"method": "base", "guidance_scale": g, "beta": 0.0, **bench.summary(("base", g), None)})
        for m in runs:
            for b in cfg.floats("betas"):
                bench.run((m, g, b), g, Path(runs[m]["offset"]), b)
                rows.append(
                    {"method": m, "guidance_scale": g, "beta": b, **bench.summary((m, g, b), ("base", g))}
                )
    result = {
        "runs": runs,
        "overrides": overrides,
        "rows": rows,
        "eval_prompts": len(bench.prompts),
        "sample_steps": cfg.sample_steps,
        "lr": cfg.lr,
        "train_steps": cfg.train_steps,
        "total_wall_s": time.perf_counter() - t0,
    }
    atomic_write_text(out / "compare.json", json.dumps(result, indent=2))
    print(f"{len(bench.prompts)} prompts of the {cfg.split} split, {cfg.sample_steps} DDIM steps")
    print(
        C.markdown_header(
            ["method", "g", "beta", "alignment", "reward", "KID", "reward win rate vs base", *C.PAIRED_HEADER]
        )
    )
    for r in rows:
        wr = _fmt(r["win_rate_reward"]) if "win_rate_reward" in r else "-"
        print(
            C.markdown_row(
                [
                    r["method"],
                    f"{r['guidance_scale']:g}",
                    f"{r['beta']:g}",
                    _fmt(r["alignment"]),
                    _fmt(r["reward"]),
                ]
                + [_fmt(r["kid"]), wr, *C.paired_cells(r)]
            )
        )
    for m, r in runs.items():
        print(f"{m}: {r['steps']} steps, {r['wall_time_s']:.0f} s, {r['network_evals']} network evaluations")


if __name__ == "__main__":
    main()
