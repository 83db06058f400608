"""Time per training step: TDFT (Self-NPO) vs the authors' procedure vs full simulation.

Arms (LoRA rank 8 on the attention projections, batch 1, 25-step DDIM grid, ``w = -1``):

* ``tdft``     - Self-NPO truncated diffusion fine-tuning, K = 5 teacher steps; the conditional
  teacher pass is skipped because ``w = -1`` gives it weight 0.
* ``authors``  - the same with ``authors_cond_pass=True``: the conditional teacher pass is computed
  at every teacher step and thrown away, as in the authors' code.
* ``full_sim`` - the full-simulation baseline: the teacher samples x0 over all 25 grid steps, then
  one student regression step.

All three use ``source="noise"`` (x_{t'} is pure noise at t' = T; eq. 13), so no pool has to be
generated first; a pool start (eq. 14) runs the same number of network passes per step. Each arm
runs in its own subprocess: build the model, one no-grad UNet warm-up forward, then
``selfnpo.training.loop.train(cfg, pipe=...)``; every optimizer step is timed on its own with
``perf_counter`` (the warm-up, model construction and the final checkpoint are outside).

    python benchmarks/bench_training.py           # SD1.5 UNet, 64x64 latents
    python benchmarks/bench_training.py --quick   # tiny UNet, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

ARMS = {
    "tdft": dict(objective="tdft", authors_cond_pass=False),
    "authors": dict(objective="tdft", authors_cond_pass=True),
    "full_sim": dict(objective="full_sim", authors_cond_pass=False),
}
LABELS = {
    "tdft": "(a) TDFT K=5, w=-1, cond pass skipped",
    "authors": "(b) authors' procedure (cond pass at w=-1)",
    "full_sim": "(c) full simulation, 25-step grid",
}


class StepBreakdown:
    """Seconds and calls per part of a training step: teacher forwards (no grad), the student's
    forward (with grad), its backward, gradient clipping, the optimizer step, the EMA update;
    the rest of the step (sampling the batch, conditioning, schedule arithmetic, adapter-scale
    switches, Python) is the step time minus these."""

    def __init__(self) -> None:
        self.parts: dict[str, list[float]] = {}
        self._undo: list = []

    def _wrap(self, owner, name: str, part) -> None:
        real = getattr(owner, name)

        def timed(*args, **kw):
            import torch

            gpu = "cuda" if torch.cuda.is_initialized() else "cpu"
            C.sync(gpu)  # on a GPU each part is timed to its end, at the cost of these waits
            t0 = time.perf_counter()
            try:
                return real(*args, **kw)
            finally:
                C.sync(gpu)
                key = part() if callable(part) else part
                self.parts.setdefault(key, []).append(time.perf_counter() - t0)

        setattr(owner, name, timed)
        self._undo.append((owner, name, real))

    def __enter__(self) -> StepBreakdown:
        import torch
        from accelerate import Accelerator
        from accelerate.optimizer import AcceleratedOptimizer

        from selfnpo.models.sd import DiffusionModel
        from selfnpo.training.offset import TrainableOffset

        fwd = lambda: "student_forward" if torch.is_grad_enabled() else "teacher_forward"  # noqa: E731
        self._wrap(DiffusionModel, "predict", fwd)
        self._wrap(Accelerator, "backward", "student_backward")
        self._wrap(Accelerator, "clip_grad_norm_", "clip_grad_norm")
        self._wrap(AcceleratedOptimizer, "step", "optimizer_step")
        self._wrap(AcceleratedOptimizer, "zero_grad", "optimizer_step")
        self._wrap(TrainableOffset, "update_teacher", "ema_update")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, real in reversed(self._undo):
            setattr(owner, name, real)

    def summary(self, step_times: list[float]) -> dict:
        n = len(step_times)
        out = {k: {"calls_per_step": len(v) / n, "s_per_step": sum(v) / n} for k, v in self.parts.items()}
        other = sum(step_times) / n - sum(v["s_per_step"] for v in out.values())
        out["other"] = {"calls_per_step": 1.0, "s_per_step": other}
        return out


def arm_train(a) -> dict:
    import torch

    from selfnpo.training.config import TrainConfig
    from selfnpo.training.loop import train

    work = Path(a.work)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(C.PROMPTS) + "\n")
    res: dict = {}
    t0 = time.perf_counter()
    pipe = C.build_pipeline(a.quick, work, device=a.device)  # fp32 weights; --dtype is autocast
    res["build_s"] = round(time.perf_counter() - t0, 1)
    res["warmup_forward_s"] = C.warm_up_forward(pipe) if a.warmup else None
    cfg = TrainConfig(
        model="random-sd15-architecture",
        prompts=str(prompts),
        output_dir=str(work / f"run_{a.arm}"),
        source="noise",
        grid_steps=25,
        k_steps=5,
        rollout_guidance=-1.0,
        steps=a.steps,
        batch_size=1,
        checkpoint_every=0,
        log_every=1,
        device=a.device,
        mixed_precision={"fp32": "no"}.get(a.dtype, a.dtype),
        seed=a.seed,
        nonfinite="skip",
        train="lora",
        lora_rank=8,
        **ARMS[a.arm],
    )
    counter = C.UNetCounter(pipe.unet)
    breakdown = StepBreakdown() if a.breakdown else contextlib.nullcontext()
    with C.StepProbe() as probe, breakdown:
        out = train(cfg, progress=False, pipe=pipe)
    if a.breakdown:
        res["breakdown"] = breakdown.summary(probe.times)
    res.update(
        steps=out.steps,
        step_times_s=probe.times,
        step_time_mean_s=statistics.fmean(probe.times),
        losses=probe.losses,
        losses_finite=all(torch.isfinite(torch.tensor(probe.losses)).tolist()),
        network_evals=out.network_evals,
        network_evals_per_step=out.network_evals / out.steps,
        unet_samples_per_step=counter.samples / out.steps,
        train_wall_time_s=out.wall_time_s,
        **C.peak_memory(a.device),
    )
    return res


def parent(a) -> None:
    info = C.machine_info()
    work = Path(tempfile.mkdtemp(prefix="bench_training_"))
    me = Path(__file__).resolve()
    steps = {"tdft": a.steps_tdft, "authors": a.steps_authors, "full_sim": a.steps_full_sim}
    results = {}
    for arm in a.arms.split(","):
        args = ["--work", str(work), "--steps", str(steps[arm]), "--seed", str(a.seed)]
        args += ["--quick"] if a.quick else []
        args += [] if a.warmup else ["--no-warmup"]
        args += ["--breakdown"] if a.breakdown else []
        args += C.device_args(a)
        results[arm] = C.run_arm(me, arm, work / f"{arm}.json", args, threads=a.threads)
    info["loadavg_end"] = os.getloadavg()

    ok = {k: v for k, v in results.items() if not v.get("returncode")}
    rows = []
    for k, r in ok.items():
        rows.append(
            [
                LABELS[k],
                r["steps"],
                " ".join(f"{t:.1f}" for t in r["step_times_s"]),
                f"{r['step_time_mean_s']:.2f}",
                f"{r['network_evals_per_step']:.0f}",
                C.gib(C.peak_bytes(r)),
            ]
        )
    print()
    model = "QUICK UNet" if a.quick else f"SD1.5 UNet 64x64 latents, {a.dtype}, {a.device}"
    print(f"Training step, batch 1, LoRA r=8, {model}, {a.threads} thread(s)")
    peak = "peak GPU GiB" if a.device == "cuda" else "peak RSS GiB"
    C.print_table(["arm", "steps", "step times s", "mean s/step", "network evals/step", peak], rows)
    ratios = {}
    if "tdft" in ok:
        base = ok["tdft"]["step_time_mean_s"]
        for k in ("authors", "full_sim"):
            if k in ok:
                ratios[f"{k}_over_tdft"] = ok[k]["step_time_mean_s"] / base
                ne = ok[k]["network_evals_per_step"] / ok["tdft"]["network_evals_per_step"]
                ratios[f"{k}_over_tdft_network_evals"] = ne
                tr = ratios[f"{k}_over_tdft"]
                print(f"time ratio {k}/tdft = {tr:.3f}   (network evals ratio {ne:.3f})")
    if a.breakdown:
        ratios.update(print_breakdown(ok))
    bad = [k for k, r in ok.items() if not r["losses_finite"]]
    if bad:
        print(f"WARNING: non-finite loss in {bad}: skipped steps have no backward (too fast)")
    record = {
        "benchmark": "training",
        "quick": a.quick,
        "machine": info,
        "settings": {
            "threads": a.threads,
            "batch": 1,
            "grid_steps": 25,
            "k_steps": 5,
            "w": -1.0,
            "source": "noise",
            "lora_rank": 8,
            "steps": steps,
            "warmup_forward": a.warmup,
        },
        "arms": results,
        "ratios": ratios,
    }
    print(f"results written to {C.save_record('training', a, record)}")


def print_breakdown(ok: dict) -> dict:
    """Per-part seconds per step of every arm, and what a cost model built from the TDFT arm's
    parts predicts for the other arms' time ratios."""
    parts = sorted({p for r in ok.values() for p in r["breakdown"]})
    print("\nWhere a step's time goes (s per step; calls per step in brackets)")
    rows = [[p] + [_part(r["breakdown"].get(p)) for r in ok.values()] for p in parts]
    C.print_table(["part", *ok], rows)
    if "tdft" not in ok:
        return {}
    b = ok["tdft"]["breakdown"]
    f = b["teacher_forward"]["s_per_step"] / b["teacher_forward"]["calls_per_step"]
    fixed = sum(v["s_per_step"] for k, v in b.items() if k != "teacher_forward")
    print(
        f"TDFT arm: one teacher forward F = {f:.3f} s; the rest of a step S = {fixed:.3f} s = {fixed / f:.2f} F"
    )
    out = {"teacher_forward_s": f, "rest_of_step_s": fixed, "rest_of_step_in_forwards": fixed / f}
    for k, r in ok.items():
        if k == "tdft" or "teacher_forward" not in r["breakdown"]:
            continue
        n = r["breakdown"]["teacher_forward"]["calls_per_step"]
        pred = (n * f + fixed) / (b["teacher_forward"]["calls_per_step"] * f + fixed)
        print(f"{k}/tdft predicted from TDFT's F and S: {pred:.3f}")
        out[f"{k}_over_tdft_predicted"] = pred
    return out


def _part(v: dict | None) -> str:
    return "-" if v is None else f"{v['s_per_step']:.3f} ({v['calls_per_step']:g})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny UNet (smoke run)")
    ap.add_argument("--arms", default="tdft,authors,full_sim", help="comma-separated subset of the arms")
    ap.add_argument("--steps-tdft", type=int, default=None, help="measured steps of (a) [2; quick 3]")
    ap.add_argument("--steps-authors", type=int, default=None, help="measured steps of (b) [1; quick 3]")
    ap.add_argument("--steps-full-sim", type=int, default=None, help="measured steps of (c) [1; quick 3]")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the warm-up forward")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--breakdown", action="store_true", help="time each part of a step (forwards, backward, ...)"
    )
    C.add_device_args(ap, "mixed precision of the training step (autocast; weights stay fp32)")
    C.add_threads_arg(ap)
    ap.add_argument("--arm", choices=tuple(ARMS), help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.steps_tdft = a.steps_tdft or (3 if a.quick else 2)
    a.steps_authors = a.steps_authors or (3 if a.quick else 1)
    a.steps_full_sim = a.steps_full_sim or (3 if a.quick else 1)
    if a.arm is None:
        parent(a)
        return
    C.setup_env(a.threads)
    res = arm_train(a)
    res["arm"] = a.arm
    C.write_json(Path(a.out), res)


if __name__ == "__main__":
    main()
