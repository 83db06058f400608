"""``selfnpo demo``: Self-NPO end to end on the embedded world model, with an honest report.

Data-free Self-NPO training (prompts only) on training-split captions; generation on the
``validation`` split (held-out attribute combinations; ``--split test`` for reporting) with and
without the negative offset at the same seeds; for every metric the paired difference from the
base with its bootstrap interval, the win rate, n and the minimum detectable difference, KID
against real renders, and a one-line verdict per setting; ``report.html``, ``metrics.json``,
``grid.png``.

The hyper-parameter defaults live in :class:`DemoConfig` (they are chosen on the validation
split; see benchmarks/world_tune.py).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import SelfNPOError
from .evaluation.bench import EvalBench, train_to
from .io import atomic_write_text, prepare_output
from .options import opt


@dataclass
class DemoConfig:
    """Train a Self-NPO offset for the embedded world model and report whether it helps."""

    output: str = opt("demo-output", "report folder")
    quick: bool = opt(False, "a tiny run (seconds) for smoke tests; its numbers mean nothing")
    model: str = opt("", "diffusers model folder (default: the embedded world model)")
    train_steps: int = opt(200, "Self-NPO training steps")
    batch_size: int = opt(8, "training batch size")
    train: str = opt(
        "lora",
        "what the offset is: lora (rank --lora-rank) or full (all UNet weights); the defaults (LoRA, "
        "lr 1e-3, 200 steps, beta 0.5) were chosen on the validation split (BENCHMARKS.md section 9)",
        choices=("full", "lora"),
    )
    lr: float = opt(
        1e-3, "learning rate (chosen on validation with --train lora; about 1e-5 suits --train full)"
    )
    lora_rank: int = opt(8, "LoRA rank (with --train lora)")
    pool_size: int = opt(64, "self-generated pool size")
    split: str = opt(
        "validation",
        "evaluation prompts: validation (choosing settings) or test (reporting chosen ones, once)",
        choices=("validation", "test"),
    )
    eval_prompts: int = opt(64, "prompts of the split (one image each per setting)")
    real_images: int = opt(1000, "real renders of the split as the KID and Frechet reference")
    sample_steps: int = opt(10, "DDIM sampling steps for evaluation")
    guidance_scales: str = opt("1.5,3,5", "comma-separated guidance scales g of the sweep")
    betas: str = opt("0.5,1", "comma-separated offset scales beta of the sweep (0 = base is always run)")
    default_guidance: float = opt(3.0, "guidance scale for the image grid and the training curve")
    default_beta: float = opt(0.5, "offset scale beta for the image grid and the training curve")
    curve_points: int = opt(3, "evaluations along training")
    seed: int = opt(0, "seed of training and of the bootstrap (the split fixes evaluation prompts and seeds)")
    overwrite: bool = opt(False, "replace an existing report folder")

    QUICK = {
        "train_steps": 6,
        "pool_size": 8,
        "eval_prompts": 8,
        "real_images": 64,
        "sample_steps": 4,
        "guidance_scales": "3",
        "betas": "0.5",
        "curve_points": 2,
        "batch_size": 4,
    }

    def resolved(self) -> DemoConfig:
        """With ``--quick``, the tiny settings; a setting also given explicitly is refused."""
        if not self.quick:
            return self
        given = [k for k in self.QUICK if getattr(self, k) != getattr(DemoConfig, k)]
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise SelfNPOError(f"--quick sets {flags} itself; leave {flags} out or drop --quick")
        return DemoConfig(**{**asdict(self), **self.QUICK})

    def validate(self) -> DemoConfig:
        for name in (
            "train_steps",
            "batch_size",
            "pool_size",
            "eval_prompts",
            "real_images",
            "sample_steps",
            "curve_points",
        ):
            if getattr(self, name) < 1:
                raise SelfNPOError(f"--{name.replace('_', '-')} must be >= 1")
        if self.eval_prompts < 2:
            raise SelfNPOError("--eval-prompts must be >= 2 (intervals need two samples)")
        if self.sample_steps > 1000:
            raise SelfNPOError("--sample-steps must be in 1..1000")
        if not (math.isfinite(self.lr) and 0 < self.lr < 1):
            raise SelfNPOError("--lr must be in (0, 1)")
        if not (math.isfinite(self.default_guidance) and 0 <= self.default_guidance <= 100):
            raise SelfNPOError("--default-guidance must be in [0, 100]")
        if not 0 <= self.seed < 2**32:
            raise SelfNPOError("--seed must be in 0..4294967295")
        for name in ("guidance_scales", "betas"):
            vals = self.floats(name)
            flag = "--" + name.replace("_", "-")
            if not vals:
                raise SelfNPOError(f"{flag} must list at least one number (got {getattr(self, name)!r})")
            if not all(math.isfinite(v) for v in vals):
                raise SelfNPOError(f"{flag} must be finite numbers (got {getattr(self, name)!r})")
        if any(not 0 <= g <= 100 for g in self.floats("guidance_scales")):
            raise SelfNPOError("--guidance-scales must be in [0, 100]")
        if any(abs(b) > 10 for b in self.floats("betas")):
            raise SelfNPOError("--betas must be in [-10, 10]")
        if self.split not in ("validation", "test"):
            raise SelfNPOError("--split must be validation or test")
        return self

    def floats(self, field: str) -> list[float]:
        try:
            return [float(x) for x in getattr(self, field).split(",") if x.strip()]
        except ValueError:
            raise SelfNPOError(f"--{field.replace('_', '-')} must be comma-separated numbers") from None


def _prepare(cfg: DemoConfig) -> Path:
    from .models.loading import resolve_model_class
    from .world.model import shipped_model_dir

    resolve_model_class(cfg.model or str(shipped_model_dir()))  # before an old report is replaced
    out = Path(cfg.output)
    legacy = lambda o: (o / "demo_config.json").is_file()  # noqa: E731 - folders of earlier versions
    prepare_output(
        out,
        "demo",
        asdict(cfg),
        config_file="demo_config.json",
        overwrite=cfg.overwrite,
        legacy=legacy,
        flag="--output",
    )
    return out


def _training_curve(
    cfg: DemoConfig, bench: EvalBench, model: str, out: Path, progress
) -> tuple[list, Path, dict]:
    """Train in segments (a resumed run is bit-identical to one run) and evaluate each offset."""
    from .world.model import world_prompts

    prompts = out / "train_prompts.txt"
    atomic_write_text(prompts, "\n".join(world_prompts(512, "train", cfg.seed)) + "\n")
    g = cfg.default_guidance
    bench.run(("base", g), g, None, 0.0)
    points = sorted(
        {max(1, round(cfg.train_steps * (i + 1) / cfg.curve_points)) for i in range(cfg.curve_points)}
    )
    curve, cost, offset = [], {"wall_time_s": 0.0, "network_evals": 0}, None
    for p in points:
        res = train_to(cfg, model, prompts, out / "run", p)
        cost["wall_time_s"] += res.wall_time_s
        cost["network_evals"] += res.network_evals
        offset = out / "offsets" / f"step-{p:05d}"
        shutil.copytree(res.offset_path.parent, offset, dirs_exist_ok=True)
        b = cfg.default_beta
        bench.run(("npo", g, b, p), g, offset, b)
        curve.append({"step": p, **bench.summary(("npo", g, b, p), ("base", g))})
        progress(f"step {p}: {_short(curve[-1])}")
    return curve, offset, cost


def _short(row: dict) -> str:
    """A progress line: paired reward and alignment differences vs the base, and the verdict."""
    p = row["paired"]
    return (
        f"reward {p['reward']['diff'][0]:+.3f} [{p['reward']['diff'][1]:+.3f}, {p['reward']['diff'][2]:+.3f}], "
        f"alignment {p['alignment']['diff'][0]:+.3f}, KID {p['kid']['diff'][0]:+.4f} vs base: {row['verdict']}"
    )


def _sweep(cfg: DemoConfig, bench: EvalBench, offset: Path, progress) -> list[dict]:
    rows = []
    for g in cfg.floats("guidance_scales"):
        bench.run(("base", g), g, None, 0.0)
        base_row = {"guidance_scale": g, "beta": 0.0, **bench.summary(("base", g), None)}
        rows.append(base_row)
        for b in cfg.floats("betas"):
            last = b == cfg.default_beta and g == cfg.default_guidance
            key = ("npo", g, b, cfg.train_steps) if last else ("npo", g, b)
            bench.run(key, g, offset, b)
            rows.append({"guidance_scale": g, "beta": b, **bench.summary(key, ("base", g))})
            progress(f"g={g:g} beta={b:g}: {_short(rows[-1])}")
    return rows


def run_demo(cfg: DemoConfig, progress=print) -> dict:
    """The main job; returns the metrics written to ``metrics.json``."""
    from .models.loading import load_pipeline
    from .world.classifier import load_classifier
    from .world.model import shipped_model_dir

    cfg = cfg.validate().resolved()
    t0 = time.perf_counter()
    model = cfg.model or str(shipped_model_dir())
    out = _prepare(cfg)
    pipe = load_pipeline(model, device="auto", dtype="fp32")
    bench = EvalBench(cfg, pipe, load_classifier())
    curve, offset, cost = _training_curve(cfg, bench, model, out, progress)
    sweep = _sweep(cfg, bench, offset, progress)
    metrics = {
        "config": asdict(cfg),
        "model": model,
        "split": bench.split,
        "real_images": int(bench.real.shape[0]),
        "verdicts": [
            {"guidance_scale": r["guidance_scale"], "beta": r["beta"], "verdict": r["verdict"]}
            for r in sweep
            if "verdict" in r
        ],
        "eval_prompts": bench.prompts,
        "seeds": bench.seeds,
        "training": cost,
        "curve": curve,
        "sweep": sweep,
        "offset": str(offset),
        "demo_wall_time_s": time.perf_counter() - t0,
    }
    from .report_demo import write_demo_report

    write_demo_report(out, metrics, bench)
    progress(f"report written to {out / 'report.html'} ({metrics['demo_wall_time_s']:.0f} s)")
    return metrics
