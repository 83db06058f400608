"""``selfnpo sweep``: NPO guidance over a grid of (alpha, beta, guidance scale), as heat maps.

Every setting runs the conditional branch with ``theta + eta`` and the negative branch with
``theta + alpha * eta + beta * delta`` (Diffusion-NPO eq. 10) on the same world prompts (the
``validation`` split by default) and seeds, so settings are paired. Each is scored with the world
metrics of ``selfnpo demo``: the paired reward difference from the reference ``alpha = beta = 0``
at the same g, alignment, reward, KID and the reward win rate over the reference. The report shows one heat map per metric and panel, like Diffusion-NPO's
hyper-parameter figure. Generated images are kept, so ``--resume`` skips finished settings.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import SelfNPOError
from .io import atomic_path, lock_dir, prepare_output, removed_on_failure
from .options import opt

METRICS = (  # key, label, higher is better
    ("reward_diff", "reward difference vs alpha=beta=0 (paired)", True),
    ("alignment", "alignment accuracy", True),
    ("reward", "reward (log-lik.)", True),
    ("kid", "KID vs real renders", False),
    ("win_rate_reward", "reward win rate vs alpha=beta=0", True),
)
# Paired differences from the reference copied to the top level of each row: key -> paired key.
PAIRED_KEYS = {"reward_diff": "reward", "alignment_diff": "alignment", "kid_diff": "kid"}
_MANIFEST = "sweep_config.json"
_RUN_ONLY = ("resume", "overwrite", "device", "layout")  # fields that do not change the numbers


@dataclass
class SweepConfig:
    """Evaluate NPO guidance over a grid of (alpha, beta, guidance scale) on world prompts."""

    output: str = opt("sweep-output", "report folder")
    model: str = opt("", "diffusers model folder (default: the embedded world model)")
    negative: str = opt(
        "", "negative offset delta: LoRA or full-delta safetensors (file or run offset folder)"
    )
    positive: str = opt("", "optional positive offset eta (e.g. a Diffusion-DPO LoRA)")
    alphas: str = opt("0", "comma-separated alphas (share of eta in the negative branch)")
    betas: str = opt("0,0.5,1", "comma-separated betas (scale of delta in the negative branch)")
    guidance_scales: str = opt("1.5,3,5", "comma-separated diffusers guidance scales g")
    layout: str = opt(
        "auto",
        "heat-map axes: beta-g (beta x g, one per alpha), alpha-beta (alpha x beta, one per g), "
        "auto (alpha-beta when several alphas are given)",
        choices=("auto", "beta-g", "alpha-beta"),
    )
    split: str = opt(
        "validation",
        "prompt split: validation (choosing settings) or test (reporting chosen ones, once)",
        choices=("validation", "test"),
    )
    eval_prompts: int = opt(32, "prompts of the split (one image each per setting)")
    sample_steps: int = opt(10, "DDIM sampling steps")
    seed: int = opt(0, "seed of the bootstrap intervals (the split fixes prompts and sampling seeds)")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N")
    resume: bool = opt(False, "reuse the settings already generated in --output (same settings only)")
    overwrite: bool = opt(False, "replace an existing sweep folder")

    def floats(self, name: str) -> list[float]:
        try:
            vals = [float(x) for x in getattr(self, name).split(",") if x.strip()]
        except ValueError:
            raise SelfNPOError(f"--{name.replace('_', '-')} must be comma-separated numbers") from None
        if not vals:
            raise SelfNPOError(f"--{name.replace('_', '-')} must list at least one number")
        if not all(math.isfinite(v) for v in vals):
            raise SelfNPOError(
                f"--{name.replace('_', '-')} must be finite numbers (got {getattr(self, name)!r})"
            )
        return list(dict.fromkeys(vals))

    def validate(self) -> SweepConfig:
        if not self.negative:
            raise SelfNPOError("--negative is required (the offset delta to sweep)")
        if self.eval_prompts < 2 or self.sample_steps < 1:
            raise SelfNPOError(
                "--eval-prompts must be >= 2 (intervals need two samples) and --sample-steps >= 1"
            )
        if self.sample_steps > 1000:
            raise SelfNPOError("--sample-steps must be in 1..1000")
        if not 0 <= self.seed < 2**32:
            raise SelfNPOError("--seed must be in 0..4294967295")
        if self.resume and self.overwrite:
            raise SelfNPOError("--resume and --overwrite exclude each other")
        if any(not 0 <= g <= 100 for g in self.floats("guidance_scales")):
            raise SelfNPOError("--guidance-scales must be in [0, 100]")
        if not self.positive and self.floats("alphas") != [0.0]:
            raise SelfNPOError("--alphas other than 0 need a --positive offset (alpha scales eta)")
        if any(abs(v) > 10 for v in self.floats("alphas") + self.floats("betas")):
            raise SelfNPOError("--alphas and --betas must be in [-10, 10]")
        return self

    def axes(self) -> tuple[str, str, str]:
        """(rows, columns, panel) of each heat map."""
        layout = self.layout
        if layout == "auto":
            layout = "alpha-beta" if len(self.floats("alphas")) > 1 else "beta-g"
        return (
            ("alpha", "beta", "guidance_scale")
            if layout == "alpha-beta"
            else ("beta", "guidance_scale", "alpha")
        )


def _legacy_sweep(out: Path) -> bool:
    return (out / _MANIFEST).is_file()


def _prepare(cfg: SweepConfig) -> tuple[Path, bool]:
    out = Path(cfg.output)
    resuming = prepare_output(
        out,
        "sweep",
        {k: v for k, v in asdict(cfg).items() if k not in _RUN_ONLY},
        config_file=_MANIFEST,
        paths=("output", "model", "negative", "positive"),
        defaults=SweepConfig,
        overwrite=cfg.overwrite,
        resume=cfg.resume,
        legacy=_legacy_sweep,
        flag="--output",
    )
    try:
        (out / "images").mkdir(exist_ok=True)
    except OSError as e:
        raise SelfNPOError(f"{out}: cannot write ({e.strerror})") from None
    return out, resuming


def _setting_images(bench, npo, out: Path, a: float, b: float, g: float) -> np.ndarray:
    """uint8 images of one setting, generated once and kept in ``images/`` for ``--resume``."""
    from .evaluation.bench import generate_uint8

    path = out / "images" / f"alpha{a!r}_beta{b!r}_g{g!r}.npy"  # repr: distinct values, distinct files
    if path.is_file():
        try:
            ims = np.load(path, allow_pickle=False)
            if ims.dtype == np.uint8 and ims.ndim == 4 and len(ims) == len(bench.prompts):
                return ims
        except (ValueError, OSError, EOFError):
            pass  # truncated or damaged: made again below
    npo.alpha, npo.beta = a, b
    with npo:
        ims = generate_uint8(bench.pipe, bench.prompts, bench.seeds, g, bench.cfg.sample_steps)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, ims, allow_pickle=False)
    return ims


def _heatmaps(cfg: SweepConfig, rows: list[dict]) -> tuple[list, dict]:
    """One heat map per metric and panel value, and the same numbers for metrics.json."""
    from .evaluation.plots import Heatmap, format_number

    r_ax, c_ax, p_ax = cfg.axes()
    names = {"alpha": "alphas", "beta": "betas", "guidance_scale": "guidance_scales"}
    r_vals, c_vals, p_vals = (cfg.floats(names[a]) for a in (r_ax, c_ax, p_ax))
    by = {(r["alpha"], r["beta"], r["guidance_scale"]): r for r in rows}
    maps, numbers = [], {}
    for key, label, higher in METRICS:
        numbers[key] = {}
        for pv in p_vals:
            vals = []
            for rv in r_vals:
                line = []
                for cv in c_vals:
                    row = by[
                        tuple({r_ax: rv, c_ax: cv, p_ax: pv}[a] for a in ("alpha", "beta", "guidance_scale"))
                    ]
                    line.append(row[key][0] if key in row else float("nan"))
                vals.append(line)
            title = f"{label}, {p_ax.replace('_', ' ')} = {format_number(pv)}"
            maps.append(
                Heatmap(
                    title,
                    r_ax,
                    c_ax,
                    [format_number(v) for v in r_vals],
                    [format_number(v) for v in c_vals],
                    vals,
                    higher,
                )
            )
            numbers[key][f"{p_ax}={pv!r}"] = {r_ax: r_vals, c_ax: c_vals, "values": vals}
    return maps, numbers


def _report(cfg: SweepConfig, bench, out: Path, rows: list[dict], extra: dict) -> None:
    from .evaluation.page import Grid, Report, Table, write_report
    from .evaluation.plots import format_ci

    maps, numbers = _heatmaps(cfg, rows)
    table = Table(
        "All settings (mean [95% bootstrap interval])",
        ["alpha", "beta", "g", *(label for _, label, _ in METRICS), "verdict"],
        [
            [
                r["alpha"],
                r["beta"],
                r["guidance_scale"],
                *(format_ci(*r[k]) if k in r else "-" for k, _, _ in METRICS),
                r.get("verdict", "reference"),
            ]
            for r in rows
        ],
    )
    shown = rows[:12]
    n = min(8, len(bench.prompts))
    grid = Grid(
        "Samples (same seed per column)",
        [f"alpha={r['alpha']:g} beta={r['beta']:g} g={r['guidance_scale']:g}" for r in shown],
        bench.prompts[:n],
        np.stack([bench.images[("sweep", r["alpha"], r["beta"], r["guidance_scale"])][:n] for r in shown]),
    )
    paragraphs = [
        "Conditional branch: theta + eta; negative branch: theta + alpha*eta + beta*delta "
        "(Diffusion-NPO eq. 10). All settings share prompts and seeds, so they are paired; win rates "
        "compare with alpha = beta = 0 at the same guidance scale.",
        f"{len(bench.prompts)} prompts of the {cfg.split} split, {cfg.sample_steps} sampling steps; heat-map "
        "cells are means; paired differences and verdicts are docs/evaluation.md's.",
    ]
    metrics = {"config": asdict(cfg), **extra, "rows": rows, "heatmaps": numbers}
    report = Report("NPO hyper-parameter sweep", paragraphs, [table], [], [grid], maps, metrics)
    write_report(report, out)


def run_sweep(cfg: SweepConfig, progress=print) -> dict:
    """Generate and score every (alpha, beta, g); returns the metrics written to ``metrics.json``."""
    from .models.loading import check_device, resolve_model_class
    from .offsets import offset_kind
    from .world.model import shipped_model_dir

    cfg = cfg.validate()
    t0 = time.perf_counter()
    model = cfg.model or str(shipped_model_dir())
    resolve_model_class(model)
    for src in (cfg.negative, cfg.positive):
        if src:
            offset_kind(src)  # missing or unreadable offsets fail before anything is written
    check_device(cfg.device)
    out, resuming = _prepare(cfg)
    lock = lock_dir(out)
    try:
        with removed_on_failure(out, not resuming, keep=lambda o: any((o / "images").glob("*.npy"))):
            return _run_sweep(cfg, model, out, progress, t0)
    finally:
        lock.close()


def _run_sweep(cfg: SweepConfig, model: str, out: Path, progress, t0: float) -> dict:
    from .demo import DemoConfig
    from .evaluation.bench import EvalBench
    from .evaluation.world_eval import score_images
    from .models.loading import load_pipeline
    from .npo import NPOGuidance
    from .world.classifier import load_classifier

    pipe = load_pipeline(model, device=cfg.device, dtype="fp32")
    bench_cfg = DemoConfig(
        split=cfg.split,
        eval_prompts=cfg.eval_prompts,
        real_images=max(cfg.eval_prompts, 256),
        sample_steps=cfg.sample_steps,
        seed=cfg.seed,
    )
    bench = EvalBench(bench_cfg, pipe, load_classifier())
    npo = NPOGuidance(pipe, negative=cfg.negative, positive=cfg.positive or None)
    grid = [
        (a, b, g)
        for a in cfg.floats("alphas")
        for b in cfg.floats("betas")
        for g in cfg.floats("guidance_scales")
    ]
    refs = [(0.0, 0.0, g) for g in cfg.floats("guidance_scales")]
    for a, b, g in list(dict.fromkeys(refs + grid)):
        key = ("sweep", a, b, g)
        bench.images[key] = _setting_images(bench, npo, out, a, b, g)
        bench.scores[key] = score_images(bench.classifier, bench.images[key], bench.prompts)
    rows = []
    for a, b, g in grid:
        ref = ("sweep", 0.0, 0.0, g)
        summary = bench.summary(("sweep", a, b, g), ref)
        flat = {k: summary["paired"][v]["diff"] for k, v in PAIRED_KEYS.items() if "paired" in summary}
        rows.append({"alpha": a, "beta": b, "guidance_scale": g, **summary, **flat})
        progress(f"alpha={a:g} beta={b:g} g={g:g}: alignment {rows[-1]['alignment'][0]:.3f}")
    extra = {
        "model": model,
        "negative": cfg.negative,
        "positive": cfg.positive,
        "eval_prompts": bench.prompts,
        "seeds": bench.seeds,
        "wall_time_s": time.perf_counter() - t0,
    }
    _report(cfg, bench, out, rows, extra)
    progress(f"report written to {out / 'report.html'}")
    return {"rows": rows, **extra}
