"""Self-NPO in an exact 2-D world: when does a negative offset help, and when does it hurt?

The world is a 3-class Gaussian mixture on a ring (``selfnpo.toy2d.mixture.ring_mixture``). An MLP
denoiser is pre-trained through the one training loop (``diffusion`` objective, caption dropout
0.1); its step-``--under-steps`` checkpoint is the *under-trained* base and the same run resumed
to ``--well-steps`` the *well-trained* one. On each base, negative LoRA offsets are trained through
the same loop: ``tdft`` (Self-NPO, data-free self pool, the project defaults scaled to the toy) at
two learning rates, and the ``full_sim`` baseline. Samples are drawn with the toy pipeline and
``selfnpo.npo.NPOGuidance`` (negative branch ``theta + beta * delta``) from the same noise and
classes for every setting, and scored exactly: mean ``log p(x|c)``, share of samples in the class's
95% highest-density region (precision), Bayes-classifier accuracy, and k-NN precision/recall.
Differences are paired against the base at the same g (same seeds) with bootstrap intervals.

    python benchmarks/toy2d_selfnpo.py --output runs/toy2d
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import torch

from selfnpo.evaluation.stats import paired_diff_ci
from selfnpo.io import atomic_write_text
from selfnpo.toy2d.metrics import class_knn_precision_recall, hdr_log_threshold, per_sample
from selfnpo.toy2d.mixture import ring_mixture
from selfnpo.toy2d.model import LORA_TARGETS, MixtureSource, Toy2DModel, build_toy_pipeline, class_prompt
from selfnpo.toy2d.model import guided_sample as sample
from selfnpo.training.config import TrainConfig
from selfnpo.training.loop import train

GUIDANCE = (1.0, 1.5, 3.0, 5.0, 7.5)
BETAS = (0.25, 0.5, 1.0)
METRICS = ("loglik", "in_hdr", "correct")
# negative offsets: name -> TrainConfig overrides (all LoRA rank 4 on fc1/fc2, EMA teacher)
OFFSETS = {
    "tdft lr1e-4": dict(objective="tdft", lr=1e-4),
    "tdft lr1e-3": dict(objective="tdft", lr=1e-3),
    "full_sim lr1e-4": dict(objective="full_sim", lr=1e-4),
}


def pretrain(mix, out: Path, stages: dict[str, int], seed: int) -> tuple[dict, float]:
    """One pre-training run; ``stages`` maps a name to a step count (ascending), and the run is
    resumed to each in turn, so every base is an earlier checkpoint of the next one."""
    pipe = build_toy_pipeline(seed=seed)
    kw = dict(
        model="toy2d",
        prompts="-",
        source="images",
        image_dir="-",
        output_dir=str(out / "pretrain"),
        objective="diffusion",
        train="full",
        teacher="frozen",
        caption_dropout=0.1,
        lr=2e-3,
        weight_decay=0.0,
        batch_size=256,
        checkpoint_every=0,
        log_every=100,
        seed=seed,
    )
    t0 = time.perf_counter()
    bases = {}
    for i, (name, steps) in enumerate(stages.items()):
        cfg = TrainConfig(steps=steps, resume=i > 0, **kw)
        train(cfg, progress=False, source=MixtureSource(mix), model=Toy2DModel(pipe))
        bases[name] = pipe.copy()
        bases[name].unet.eval().requires_grad_(False)
    return bases, time.perf_counter() - t0


def train_offset(
    base, out: Path, prompts_file: Path, steps: int, seed: int, data=None, **over
) -> tuple[Path, float]:
    """A negative offset (LoRA unless ``over`` says otherwise) trained on a copy of ``base``
    (``data``: a ready data source instead of the configured one); returns its folder and wall time."""
    defaults = dict(train="lora", lora_rank=4, lora_targets=LORA_TARGETS, batch_size=64, pool_size=512)
    cfg = TrainConfig(
        model="toy2d",
        prompts=str(prompts_file),
        output_dir=str(out),
        steps=steps,
        checkpoint_every=0,
        log_every=50,
        seed=seed,
        **(defaults | over),
    )
    res = train(cfg, progress=False, source=data, model=Toy2DModel(base.copy()))
    return res.run_dir / "offset", res.wall_time_s


def score(mix, x, cls, thresholds) -> tuple[dict, dict]:
    per = per_sample(mix, x, cls, thresholds)
    p, r = class_knn_precision_recall(x, cls, mix)
    summary = {k: float(v.mean()) for k, v in per.items()} | {"knn_precision": p, "knn_recall": r}
    return per, summary


def run(args) -> dict:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    mix = ring_mixture()
    thresholds = [hdr_log_threshold(mix, c) for c in range(mix.num_classes)]
    prompts_file = out / "prompts.txt"
    prompts_file.write_text("".join(class_prompt(c) + "\n" for c in range(mix.num_classes)))
    g = torch.Generator().manual_seed(args.seed + 1)
    noise = torch.randn(args.n, 2, generator=g)
    cls = torch.arange(args.n) % mix.num_classes
    prompts = [class_prompt(int(c)) for c in cls]
    bases, pre_s = pretrain(
        mix, out, {"under-trained": args.under_steps, "well-trained": args.well_steps}, args.seed
    )
    result = {"config": vars(args), "pretrain_s": pre_s, "rows": [], "offsets": {}}
    for bname, base in bases.items():
        offsets = {}
        for oname, over in OFFSETS.items():
            folder = out / "offsets" / f"{bname}-{oname.replace(' ', '-')}"
            offsets[oname], wall = train_offset(
                base, folder, prompts_file, args.offset_steps, args.seed, **over
            )
            result["offsets"][f"{bname} / {oname}"] = {"wall_s": wall, **over}
        for gs in GUIDANCE:
            ref, ref_sum = score(mix, sample(base, prompts, noise, gs), cls, thresholds)
            result["rows"].append({"base": bname, "g": gs, "offset": "none", "beta": 0.0, **ref_sum})
            if gs == 1.0:
                continue  # g = 1 uses the positive branch only: a negative offset cannot change it
            for oname, folder in offsets.items():
                for beta in BETAS:
                    per, summ = score(mix, sample(base, prompts, noise, gs, folder, beta), cls, thresholds)
                    diffs = {f"d_{m}": paired_diff_ci(per[m], ref[m], n_boot=1000, seed=0) for m in METRICS}
                    result["rows"].append(
                        {"base": bname, "g": gs, "offset": oname, "beta": beta, **summ, **diffs}
                    )
    true_x, _ = mix.sample(args.n, cls, torch.Generator().manual_seed(args.seed + 2))
    result["true_samples"] = score(mix, true_x, cls, thresholds)[1]
    return result


def _ci(d) -> str:
    mean, lo, hi = d
    mark = "+" if lo > 0 else ("-" if hi < 0 else " ")
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark}"


def markdown(res: dict) -> str:
    n = res["config"]["n"]
    t = res["true_samples"]
    lines = [
        f"n = {n} samples per row ({n // 3} per class), 25 DDIM steps, paired with the base at the same g "
        "(same noise, same class). Intervals: 95% bootstrap over samples; `+`/`-` marks an interval "
        "that excludes 0.",
        "",
        f"True samples: log p(x|c) {t['loglik']:.3f}, in 95% HDR {t['in_hdr']:.3f}, "
        f"class accuracy {t['correct']:.3f}, k-NN precision {t['knn_precision']:.3f}, recall {t['knn_recall']:.3f}.",
        "",
        "| base | g | negative offset | beta | log p(x\\|c) | Δ log p vs base | HDR precision | Δ HDR | "
        "class acc | Δ acc | kNN P | kNN R |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        d = {m: (_ci(r[f"d_{m}"]) if f"d_{m}" in r else "") for m in METRICS}
        lines.append(
            f"| {r['base']} | {r['g']:g} | {r['offset']} | {r['beta']:g} | {r['loglik']:.3f} | {d['loglik']} | "
            f"{r['in_hdr']:.3f} | {d['in_hdr']} | {r['correct']:.3f} | {d['correct']} | "
            f"{r['knn_precision']:.3f} | {r['knn_recall']:.3f} |"
        )
    lines += [
        "",
        "Offset training (wall seconds): "
        + ", ".join(f"{k} {v['wall_s']:.1f}" for k, v in res["offsets"].items())
        + f"; pre-training {res['pretrain_s']:.1f}.",
    ]
    return "\n".join(lines) + "\n"


def run_and_write(run_fn, markdown_fn, args, stem: str, md_name: str = "") -> None:
    """Quiet the libraries, run on one thread, and write ``STEM.json`` and ``STEM.md`` to ``--output``."""
    warnings.filterwarnings("ignore")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res = run_fn(args)
    res["wall_s"] = time.perf_counter() - t0
    out = Path(args.output)
    atomic_write_text(out / f"{stem}.json", json.dumps(res, indent=1))
    table = markdown_fn(res)
    atomic_write_text(out / f"{md_name or stem}.md", table)
    print(table)
    print(f"wall time {res['wall_s']:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", required=True, help="folder for results.json, table.md and the runs")
    ap.add_argument("--n", type=int, default=1500, help="samples per setting (classes in turn)")
    ap.add_argument(
        "--under-steps", type=int, default=300, help="pre-training steps of the under-trained base"
    )
    ap.add_argument(
        "--well-steps", type=int, default=3000, help="pre-training steps of the well-trained base"
    )
    ap.add_argument("--offset-steps", type=int, default=500, help="training steps of each negative offset")
    ap.add_argument("--seed", type=int, default=0)
    run_and_write(run, markdown, ap.parse_args(), "results", md_name="table")


if __name__ == "__main__":
    main()
