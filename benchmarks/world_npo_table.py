"""Self-NPO vs Diffusion-NPO on the embedded world: a table like Self-NPO's Table 1, one command.

Builds preference pairs by reward feedback (two images per training prompt, ranked by the world
reward), trains four LoRA offsets through the one training loop -- Diffusion-DPO (eta),
Diffusion-NPO by reversed pairs (delta), Self-NPO (delta, prompts only) and reward-based NPO
(delta, 1 - R) -- and scores seven settings on held-out prompts with the same seeds:

    base, base + NPO, base + Self-NPO, DPO, DPO + NPO, DPO + Self-NPO, base + reward-NPO

Each row: strict alignment, reward, Frechet distance to real renders, reward win rate vs base,
all with 95% bootstrap intervals, and the training cost of the offsets it uses (wall time and
network evaluations, the cost of building the pairs included for the pair-based ones).

    python benchmarks/world_npo_table.py --output runs/npo-table
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from selfnpo.demo import DemoConfig
from selfnpo.evaluation.bench import EvalBench, train_to
from selfnpo.evaluation.page import Grid, Report, Table, write_report
from selfnpo.io import atomic_write_text
from selfnpo.models.loading import load_pipeline
from selfnpo.preference.build import PairsConfig, build_pairs
from selfnpo.world.classifier import load_classifier
from selfnpo.world.model import shipped_model_dir, world_prompts

# (row name, positive offset, negative offset); alpha applies when both are set
ROWS = [
    ("base", None, None),
    ("base + NPO (reversed DPO)", None, "dpo_npo"),
    ("base + Self-NPO", None, "tdft"),
    ("DPO", "dpo", None),
    ("DPO + NPO", "dpo", "dpo_npo"),
    ("DPO + Self-NPO", "dpo", "tdft"),
    ("base + reward-NPO", None, "reward_npo"),
]


def _fmt(ci: list[float]) -> str:
    return f"{ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]"


def _pairs(a, out: Path) -> tuple[Path, dict]:
    folder = out / "pairs"
    if not (folder / "pairs_meta.json").is_file():
        build_pairs(
            PairsConfig(
                num_prompts=a.pair_prompts,
                output_dir=str(folder),
                guidance_scale=a.guidance_scale,
                steps=a.sample_steps,
                seed=a.seed + 17,
                device="cpu",
            ),
            progress=False,
        )
    return folder, json.loads((folder / "pairs_meta.json").read_text())


def _train_all(a, cfg: DemoConfig, model: str, out: Path) -> dict:
    prompts = out / "train_prompts.txt"
    atomic_write_text(prompts, "\n".join(world_prompts(512, "train", cfg.seed)) + "\n")
    pairs, pmeta = _pairs(a, out)
    specs = {
        "dpo": dict(objective="dpo", pairs=str(pairs), dpo_beta=a.dpo_beta),
        "dpo_npo": dict(objective="dpo_npo", pairs=str(pairs), dpo_beta=a.dpo_beta),
        "tdft": {},
        "reward_npo": dict(
            objective="reward_npo",
            reward_steps=a.sample_steps,
            reward_grad_steps=1,
            reward_guidance=a.guidance_scale,
            lr=a.reward_lr,
        ),
    }
    runs = {}
    for name, kw in specs.items():
        record = out / f"{name}.cost.json"  # a re-run of the script reuses finished runs and their cost
        if record.is_file() and json.loads(record.read_text())["steps"] == a.train_steps:
            runs[name] = json.loads(record.read_text())
            continue
        res = train_to(cfg, model, prompts, out / name, a.train_steps, **kw)
        runs[name] = {
            "steps": res.steps,
            "train_wall_time_s": res.wall_time_s,
            "train_network_evals": res.network_evals,
            "offset": str(res.offset_path.parent),
        }
        atomic_write_text(record, json.dumps(runs[name]))
    runs["pairs"] = {k: pmeta[k] for k in ("pairs", "prompts", "network_evals", "wall_time_s")}
    return runs


def _cost(runs: dict, pos: str | None, neg: str | None) -> tuple[float, int]:
    used = {n for n in (pos, neg) if n}
    wall = sum(runs[n]["train_wall_time_s"] for n in used)
    nfe = sum(runs[n]["train_network_evals"] for n in used)
    if used & {"dpo", "dpo_npo"}:  # the pairs are built once and serve both
        wall += runs["pairs"]["wall_time_s"]
        nfe += runs["pairs"]["network_evals"]
    return wall, nfe


def _report(folder: Path, result: dict, bench: EvalBench, g: float) -> None:
    cols = [
        "setting",
        "alignment",
        "reward",
        "KID",
        "reward win rate vs base",
        "wall time (s)",
        "network evals",
        *C.PAIRED_HEADER,
    ]
    rows = []
    for r in result["rows"]:
        wr = _fmt(r["win_rate_reward"]) if "win_rate_reward" in r else "-"
        rows.append(
            [r["setting"], _fmt(r["alignment"]), _fmt(r["reward"]), _fmt(r["kid"]), wr]
            + [round(r["train_wall_time_s"]), r["train_network_evals"], *C.paired_cells(r)]
        )
    n = min(8, len(bench.prompts))
    images = np.stack([bench.images[(name,)][:n] for name, _, _ in ROWS], axis=1)
    a = result["args"]
    text = (
        f"Prompts of the {bench.split} split ({result['eval_prompts']}), one image per prompt and setting, the same seeds "
        f"for every setting, g = {g:g}, {a['sample_steps']} DDIM steps; alpha = {a['alpha']:g} when a "
        f"positive and a negative offset are combined, beta = {a['beta']:g}. Intervals: 95% bootstrap. "
        "Training cost includes building the preference pairs for the settings that use them."
    )
    write_report(
        Report(
            "Self-NPO vs Diffusion-NPO on the embedded world",
            [text],
            [Table("settings", cols, rows)],
            grids=[Grid("same prompts and seeds", bench.prompts[:n], [r[0] for r in ROWS], images)],
            metrics=result,
        ),
        folder,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="runs/npo-table")
    ap.add_argument("--model", default="", help="diffusers folder (default: the embedded world model)")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--eval-prompts", type=int, default=128)
    ap.add_argument("--pair-prompts", type=int, default=512)
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--guidance-scale", type=float, default=3.0)
    ap.add_argument("--alpha", type=float, default=1.0, help="share of eta in the negative branch")
    ap.add_argument("--beta", type=float, default=1.0, help="scale of delta in the negative branch")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--reward-lr", type=float, default=1e-4)
    ap.add_argument("--dpo-beta", type=float, default=5000.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = DemoConfig(
        output=a.output,
        train_steps=a.train_steps,
        eval_prompts=a.eval_prompts,
        train="lora",
        lr=a.lr,
        seed=a.seed,
        sample_steps=a.sample_steps,
    )
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    model = a.model or str(shipped_model_dir())
    t0 = time.perf_counter()
    runs = _train_all(a, cfg, model, out)
    bench = EvalBench(cfg, load_pipeline(model, device="cpu", dtype="fp32"), load_classifier())
    g, rows = a.guidance_scale, []
    for name, pos, neg in ROWS:
        pos_p = Path(runs[pos]["offset"]) if pos else None
        neg_p = Path(runs[neg]["offset"]) if neg else None
        alpha = a.alpha if (pos and neg) else 0.0
        bench.run((name,), g, neg_p, a.beta if neg else 0.0, positive=pos_p, alpha=alpha)
        wall, nfe = _cost(runs, pos, neg)
        summary = bench.summary((name,), ("base",))
        rows.append({"setting": name, "train_wall_time_s": wall, "train_network_evals": nfe, **summary})
    result = {
        "runs": runs,
        "rows": rows,
        "args": vars(a),
        "eval_prompts": len(bench.prompts),
        "total_wall_s": time.perf_counter() - t0,
    }
    atomic_write_text(out / "table.json", json.dumps(result, indent=2))
    _report(out / "report", result, bench, g)
    print(f"g = {g:g}, alpha = {a.alpha:g} (when both offsets are used), beta = {a.beta:g}")
    print(f"{len(bench.prompts)} prompts of the {cfg.split} split")
    cols = ["setting", "alignment", "reward", "KID", "reward win rate vs base", "training wall time"]
    print(C.markdown_header([*cols, "network evals", *C.PAIRED_HEADER]))
    for r in rows:
        wr = _fmt(r["win_rate_reward"]) if "win_rate_reward" in r else "-"
        print(
            C.markdown_row(
                [r["setting"], _fmt(r["alignment"]), _fmt(r["reward"]), _fmt(r["kid"]), wr]
                + [f"{r['train_wall_time_s']:.0f} s", f"{r['train_network_evals']:,}", *C.paired_cells(r)]
            )
        )
    p = runs["pairs"]
    print(
        f"pairs: {p['pairs']} from {p['prompts']} prompts, {p['wall_time_s']:.0f} s, "
        f"{p['network_evals']:,} network evaluations"
    )


if __name__ == "__main__":
    main()
