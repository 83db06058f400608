"""Tune Self-NPO on the embedded world: a small grid of training configurations, each scored
against the base model over g x beta with the paired instrument, on the validation split.

Every configuration trains a negative offset from training-split prompts (data-free unless
its source is ``images``), then generates one image per prompt of the chosen split at each
guidance scale g and offset scale beta, with the same seeds as the base model at that g, and
reports for each (g, beta) the paired differences from the base (reward, strict alignment,
per-attribute correctness, KID) with 95% bootstrap intervals, win rates, n, the minimum
detectable difference and a verdict (selfnpo.evaluation.world_eval).

The rule: choose on ``--split validation`` (all configurations), then evaluate the chosen ones
on ``--split test`` once, naming them (``--configs a,b``; test refuses to run without it and
never silently re-runs a finished test evaluation with other settings).

Resumable: training runs are continued (offsets at several step counts come from one run),
finished (configuration, split) evaluations are skipped, and the base model's scores are cached
per split and g. Results: OUTPUT/<split>/results.json and OUTPUT/<split>/table.md.

Cost: the whole grid (25 configurations x 12 settings x 1,024 images at 25 DDIM steps, plus the
base at 4 g) is about 300,000 images, roughly a day on 2 CPU cores; run it where a GPU is
available, or narrow it (--configs, --guidance-scales, --betas, --eval-prompts).

    python benchmarks/world_tune.py --split validation --output runs/tune            # the grid
    python benchmarks/world_tune.py --split validation --output runs/tune --list     # its names
    python benchmarks/world_tune.py --split test --output runs/tune --configs NAME   # report
    python benchmarks/world_tune.py --quick --output /tmp/tune                       # smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from selfnpo.demo import DemoConfig
from selfnpo.evaluation.bench import EvalBench, train_to
from selfnpo.evaluation.world_eval import ATTRIBUTES, Scores
from selfnpo.io import atomic_write_text
from selfnpo.models.loading import load_pipeline
from selfnpo.world.classifier import load_classifier
from selfnpo.world.model import shipped_model_dir, world_prompts

# The reference the ablations are made around (choose another with --ablate-from).
ABLATE_FROM = "lora_lr1e-4"
# Step counts evaluated along each (learning rate, weights) run; one run serves all of them.
STEPS = (100, 200, 600)
# name -> TrainConfig overrides of the (learning rate, weights) runs. lora_lr1e-3 is the demo's
# setting before this grid; full_lr1e-6 is the authors' small-change regime (all UNet weights).
RUNS: dict[str, dict] = {
    "lora_lr1e-3": dict(train="lora", lr=1e-3),
    "lora_lr3e-4": dict(train="lora", lr=3e-4),
    "lora_lr1e-4": dict(train="lora", lr=1e-4),
    "lora_lr3e-5": dict(train="lora", lr=3e-5),
    "full_lr1e-6": dict(train="full", lr=1e-6),
    "full_lr1e-5": dict(train="full", lr=1e-5),
}
# Ablations of one factor each, applied to the ABLATE_FROM run at 200 steps.
ABLATIONS: dict[str, dict] = {
    "k2": dict(k_steps=2),
    "k10": dict(k_steps=10),
    "w0": dict(rollout_guidance=0.0),  # teacher rollout conditional only (g = 1)
    "w2": dict(rollout_guidance=2.0),  # teacher rollout with CFG at g = 3
    "noise": dict(source="noise"),  # x_t' from pure noise (eq. 13)
    "images": dict(source="images"),  # x_t' from real renders (the authors' images mode)
    "frozen": dict(teacher="frozen"),  # frozen base model as the teacher instead of the EMA
}
ABLATION_STEPS = 200


def grid(ablate_from: str) -> dict[str, dict]:
    """name -> {"run": run folder name, "steps": int, "overrides": TrainConfig overrides}."""
    out = {}
    for run, kw in RUNS.items():
        for s in STEPS:
            out[f"{run}_s{s}"] = {"run": run, "steps": s, "overrides": dict(kw)}
    if ablate_from not in RUNS:
        raise SystemExit(f"--ablate-from must be one of {sorted(RUNS)}")
    for name, kw in ABLATIONS.items():
        run = f"{ablate_from}+{name}"
        out[f"{run}_s{ABLATION_STEPS}"] = {
            "run": run,
            "steps": ABLATION_STEPS,
            "overrides": {**RUNS[ablate_from], **kw},
        }
    return out


QUICK_CONFIGS = ("lora_lr1e-3_s200", "full_lr1e-6_s200", f"{ABLATE_FROM}+noise_s{ABLATION_STEPS}")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


_fmt = C.fmt_ci


def _rate(ci) -> str:
    return f"{ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]"


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False, default=_finite) + "\n")


def _finite(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o).__name__)


def _clean(obj):
    """JSON-safe: non-finite floats become None."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _image_folder(out: Path, n: int, seed: int) -> Path:
    """Real renders of training-split scenes with their captions (for source=images)."""
    from PIL import Image

    from selfnpo.world.captions import caption
    from selfnpo.world.render import render, sample_scene

    folder = out / "train_images"
    if (folder / "metadata.jsonl").is_file():
        return folder
    tmp = out / "train_images.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed + 7)
    lines = []
    for i in range(n):
        scene = sample_scene(rng, "train")
        Image.fromarray(render(scene)).save(tmp / f"{i:05d}.png")
        lines.append(json.dumps({"file_name": f"{i:05d}.png", "text": caption(scene, rng)}))
    (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    tmp.rename(folder)
    return folder


def train_config(cfg: DemoConfig, model: str, out: Path, name: str, spec: dict, prompts: Path) -> dict:
    """Train (or resume) the configuration's run up to its step count; copy the offset aside."""
    record = out / "offsets" / name / "cost.json"
    if record.is_file():
        return json.loads(record.read_text())
    kw = dict(spec["overrides"])
    if kw.get("source") == "images":
        kw["image_dir"] = str(_image_folder(out, cfg.pool_size * 8, cfg.seed))
    run = out / "runs" / spec["run"]
    done = out / "runs" / f"{spec['run']}.cost.json"  # accumulated cost of the run's segments
    cost = (
        json.loads(done.read_text())
        if done.is_file()
        else {"steps": 0, "wall_time_s": 0.0, "network_evals": 0}
    )
    if cost["steps"] > spec["steps"]:
        raise SystemExit(
            f"{run} is already trained past {spec['steps']} steps ({cost['steps']}); evaluate the "
            "configurations of one run in the order of their steps"
        )
    res = train_to(cfg, model, prompts, run, spec["steps"], **kw)
    if res.steps > cost["steps"]:
        cost = {
            "steps": res.steps,
            "wall_time_s": cost["wall_time_s"] + res.wall_time_s,
            "network_evals": cost["network_evals"] + res.network_evals,
        }
        _write_json(done, cost)
    dest = out / "offsets" / name
    shutil.copytree(res.offset_path.parent, dest, dirs_exist_ok=True)
    rec = {**cost, "offset": str(dest), "overrides": kw}
    _write_json(record, rec)
    return rec


AUTOGUIDANCE = "autoguidance"


def autoguidance_record(pipe, weak_model: str, out: Path) -> dict:
    """The weak model as a full-weight offset ``weak - base`` (beta 1 runs exactly its weights)."""
    from selfnpo.compare.run import autoguidance_offset

    dest = out / "offsets" / AUTOGUIDANCE / "full_delta.safetensors"
    dest.parent.mkdir(parents=True, exist_ok=True)
    autoguidance_offset(pipe, weak_model, dest)
    return {"steps": 0, "wall_time_s": 0.0, "network_evals": 0, "offset": str(dest), "weak_model": weak_model}


def _base_scores(bench: EvalBench, cache: Path, g: float) -> None:
    """Score the base model at g once per split (cached on disk)."""
    key = ("base", g)
    path = cache / f"base_g{g:g}.npz"
    if key in bench.scores:
        return
    if path.is_file():
        bench.scores[key] = Scores.load(path)
        return
    bench.run(key, g, None, 0.0)
    cache.mkdir(parents=True, exist_ok=True)
    bench.scores[key].save(path)


def evaluate(
    bench: EvalBench, cache: Path, name: str, offset: Path, gs, betas, progress, same_prompt: bool = False
) -> list[dict]:
    rows = []
    for g in gs:
        _base_scores(bench, cache, g)
        for b in betas:
            key = (name, g, b)
            bench.run(key, g, offset, b, same_prompt=same_prompt)
            s = bench.summary(key, ("base", g))
            rows.append({"config": name, "guidance_scale": g, "beta": b, **s})
            p = s["paired"]
            progress(
                f"  {name} g={g:g} beta={b:g}: reward {_fmt(p['reward']['diff'])}, "
                f"alignment {_fmt(p['alignment']['diff'])}, KID {_fmt(p['kid']['diff'])}: {s['verdict']}"
            )
            bench.scores.pop(key, None)
            bench.images.pop(key, None)
    return rows


def _table(split: str, fp: dict, results: dict) -> str:
    """Markdown: the fingerprint, a compact reward matrix, then every row in full."""
    rows = [r for name in sorted(results) for r in results[name]["rows"]]
    lines = [
        f"# Self-NPO tuning on the `{split}` split",
        "",
        f"n = {fp['eval_prompts']} prompts (one image each, same seeds as the base), {fp['sample_steps']} "
        f"DDIM steps, KID against {fp['real_images']} real renders of the split; differences are "
        "setting minus base at the same g, with 95% bootstrap intervals over prompts; MDE = 2.8 "
        "standard errors (80% power at the 5% level); the verdict only reads whether the "
        "reward, strict-alignment and KID intervals exclude 0."
        + (" QUICK RUN: the numbers mean nothing." if fp["quick"] else ""),
        "",
        "## Reward difference vs base (mean [95% interval])",
        "",
    ]
    settings = sorted({(r["guidance_scale"], r["beta"]) for r in rows})
    lines.append("| config | " + " | ".join(f"g={g:g} b={b:g}" for g, b in settings) + " |")
    lines.append("|---|" + "---|" * len(settings))
    for name in sorted(results):
        cell = {(r["guidance_scale"], r["beta"]): r for r in results[name]["rows"]}
        lines.append(
            f"| {name} | "
            + " | ".join(_fmt(cell[s]["paired"]["reward"]["diff"]) if s in cell else "" for s in settings)
            + " |"
        )
    lines += [
        "",
        "## Every setting",
        "",
        C.markdown_header(["config", "g", "beta", "reward win rate", *C.PAIRED_HEADER, "train s"]),
    ]
    for r in rows:
        cost = results[r["config"]]["training"]
        lines.append(
            C.markdown_row(
                [
                    r["config"],
                    f"{r['guidance_scale']:g}",
                    f"{r['beta']:g}",
                    _rate(r["paired"]["reward"]["win_rate"]),
                ]
                + [*C.paired_cells(r), f"{cost['wall_time_s']:.0f}"]
            )
        )
    lines += ["", "## Per-attribute correctness difference vs base", ""]
    lines.append("| config | g | beta | " + " | ".join(ATTRIBUTES) + " |")
    lines.append("|---|---|---|" + "---|" * len(ATTRIBUTES))
    for r in rows:
        cells = [
            _fmt(r["paired"][f"attr_{a}"]["diff"]) if r["paired"].get(f"attr_{a}", {}).get("n") else "-"
            for a in ATTRIBUTES
        ]
        lines.append(
            f"| {r['config']} | {r['guidance_scale']:g} | {r['beta']:g} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="runs/tune")
    ap.add_argument("--split", default="validation", choices=("validation", "test"))
    ap.add_argument("--configs", default="", help="comma-separated names (default: the whole grid)")
    ap.add_argument("--ablate-from", default=ABLATE_FROM, help=f"run the ablations modify {sorted(RUNS)}")
    ap.add_argument("--list", action="store_true", help="print the configuration names and exit")
    ap.add_argument("--model", default="", help="diffusers folder (default: the embedded world model)")
    ap.add_argument(
        "--weak-model",
        default="",
        help="a weaker version of --model (e.g. an early checkpoint): adds the configuration "
        "'autoguidance', whose negative branch is that model on the same prompt (beta 1, no training)",
    )
    ap.add_argument("--guidance-scales", default="1.5,3,5,7.5")
    ap.add_argument("--betas", default="0.25,0.5,1")
    ap.add_argument("--eval-prompts", type=int, default=1024, help="prompts of the split (KID needs >= 1000)")
    ap.add_argument("--real-images", type=int, default=1000)
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pool-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument(
        "--force", action="store_true", help="re-run a finished test evaluation whose settings differ"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1/50 of the steps, 8 prompts, 4 DDIM steps, g=3, beta=1, three configurations",
    )
    a = ap.parse_args()
    torch.set_num_threads(1)
    configs = grid(a.ablate_from)
    if a.weak_model:
        configs[AUTOGUIDANCE] = {"run": AUTOGUIDANCE, "steps": 0, "overrides": {}}
    if a.list:
        for name, spec in configs.items():
            print(f"{name}: {spec['steps']} steps, {spec['overrides']}")
        return
    if a.quick:
        a.eval_prompts, a.real_images, a.sample_steps, a.pool_size, a.batch_size = 8, 64, 4, 8, 4
        a.guidance_scales, a.betas = "3", "1"
        for spec in configs.values():
            spec["steps"] = max(1, spec["steps"] // 50)
    names = [n for n in a.configs.split(",") if n] or (list(QUICK_CONFIGS) if a.quick else list(configs))
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; see --list")
    # Within one training run, shorter configurations first (later ones continue the run).
    names.sort(key=lambda n: (configs[n]["run"], configs[n]["steps"]))
    if a.split == "test" and not a.configs:
        raise SystemExit("--split test needs --configs: choose the configurations on validation first")
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    model = a.model or str(shipped_model_dir())
    gs, betas = _floats(a.guidance_scales), _floats(a.betas)
    fp = {
        "split": a.split,
        "model": model,
        "eval_prompts": a.eval_prompts,
        "real_images": a.real_images,
        "sample_steps": a.sample_steps,
        "guidance_scales": gs,
        "betas": betas,
        "quick": a.quick,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    cfg = DemoConfig(
        output=str(out),
        split=a.split,
        eval_prompts=a.eval_prompts,
        real_images=a.real_images,
        sample_steps=a.sample_steps,
        batch_size=a.batch_size,
        pool_size=a.pool_size,
        seed=a.seed,
    )
    prompts = out / "train_prompts.txt"
    if not prompts.is_file():
        atomic_write_text(prompts, "\n".join(world_prompts(512, "train", cfg.seed)) + "\n")
    split_dir = out / a.split
    results_path = split_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    bench = None
    t0 = time.perf_counter()
    for name in names:
        done = results.get(name)
        if done is not None and done["fingerprint"] == fp:
            print(f"{name}: done, skipped")
            continue
        if done is not None and a.split == "test" and not a.force:
            raise SystemExit(
                f"{name} was already evaluated on test with other settings {done['fingerprint']}; "
                "test results are final (pass --force only to repair a broken run)"
            )
        spec = configs[name]
        if name != AUTOGUIDANCE:
            print(f"{name}: training", flush=True)
            rec = train_config(cfg, model, out, name, spec, prompts)
        if bench is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            bench = EvalBench(cfg, load_pipeline(model, device=device, dtype="fp32"), load_classifier())
        if name == AUTOGUIDANCE:
            rec = autoguidance_record(bench.pipe, a.weak_model, out)
        print(f"{name}: evaluating on {a.split}", flush=True)
        same = name == AUTOGUIDANCE  # the weak model on the same prompt, at beta 1 only
        rows = evaluate(
            bench, split_dir / "scores", name, Path(rec["offset"]), gs, [1.0] if same else betas, print, same
        )
        results[name] = _clean(
            {
                "fingerprint": fp,
                "training": rec,
                "steps": spec["steps"],
                "rows": rows,
                "finished_utc": time.time(),
            }
        )
        _write_json(results_path, results)
    if results:
        atomic_write_text(
            split_dir / "table.md",
            _table(a.split, fp, {k: v for k, v in results.items() if v["fingerprint"] == fp}),
        )
    print(f"{len(names)} configurations in {time.perf_counter() - t0:.0f} s; see {split_dir / 'table.md'}")


if __name__ == "__main__":
    main()
