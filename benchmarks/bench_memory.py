"""Peak memory: LoRA Self-NPO (TDFT) training vs plain LoRA diffusion fine-tuning.

Same random-weight SD1.5-architecture UNet, same LoRA (rank 8 on ``to_q,to_k,to_v,to_out.0``),
batch 1, the same small latent pool (random latents with prompts, passed as
``selfnpo.training.data.LatentPool``) for both:

* ``tdft-lora``      - Self-NPO TDFT (K = 5, w = -1). Its EMA teacher is a second LoRA adapter in
  the same UNet, so there is no second copy of the network.
* ``diffusion-lora`` - objective ``diffusion``: plain denoising fine-tuning on the pool latents.
* ``tdft-full``      - (with ``--with-full``) full-weight TDFT for contrast: the teacher is a
  deep copy of the UNet, plus the base copy kept for the offset, gradients and AdamW state for
  all weights. It is stopped right after its measured steps, before ``train()`` writes its
  (~14 GB) checkpoint; a memory guard ends it before the machine runs out of memory.

Each arm runs in its own subprocess; its peak is ``ru_maxrss`` read at the end (the whole
process: model construction, training steps, and for LoRA arms the small checkpoint/offset).

    python benchmarks/bench_memory.py             # SD1.5 UNet, 64x64 latents
    python benchmarks/bench_memory.py --quick     # tiny UNet, seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

TARGET = 1.3
ARMS = {
    "tdft-lora": dict(objective="tdft", train="lora"),
    "diffusion-lora": dict(objective="diffusion", train="lora"),
    "tdft-full": dict(objective="tdft", train="full"),
}
LABELS = {
    "tdft-lora": "Self-NPO TDFT, LoRA (EMA teacher = 2nd adapter)",
    "diffusion-lora": "diffusion fine-tuning, LoRA",
    "tdft-full": "Self-NPO TDFT, full weights (contrast)",
}


def arm_train(a) -> dict:
    import torch

    from selfnpo.training.config import TrainConfig
    from selfnpo.training.data import LatentPool
    from selfnpo.training.loop import train

    work = Path(a.work)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(C.PROMPTS) + "\n")
    res: dict = {"arm": a.arm}
    t0 = time.perf_counter()
    pipe = C.build_pipeline(a.quick, work, device=a.device)  # fp32 weights; --dtype is autocast
    res["build_s"] = round(time.perf_counter() - t0, 1)
    res["rss_after_build_bytes"] = C.rss_bytes()
    if a.device == "cuda":
        res["cuda_after_build_bytes"] = torch.cuda.memory_allocated()
    res["unet_param_bytes"] = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    s = pipe.unet.config.sample_size
    g = torch.Generator().manual_seed(a.seed + 1)
    pool = LatentPool(torch.randn(len(C.PROMPTS), 4, s, s, generator=g), list(C.PROMPTS))  # on the CPU
    cfg = TrainConfig(
        model="random-sd15-architecture",
        prompts=str(prompts),
        output_dir=str(work / f"run_{a.arm}"),
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
        lora_rank=8,
        **ARMS[a.arm],
    )
    full = cfg.train == "full"
    stopped = False
    with (
        C.MemoryGuard(Path(a.out), res),
        C.StepProbe(stop_after=a.steps if full else None) as probe,
    ):
        try:
            out = train(cfg, progress=False, source=pool, pipe=pipe)
            res["network_evals_per_step"] = out.network_evals / out.steps
        except C.StopTraining:
            stopped = True
    res.update(
        steps=len(probe.times),
        step_times_s=probe.times,
        losses=probe.losses,
        losses_finite=all(torch.isfinite(torch.tensor(probe.losses)).tolist()),
        rss_after_steps_bytes=probe.rss_after,
        stopped_before_checkpoint=stopped,
        **C.peak_memory(a.device),
    )
    return res


def parent(a) -> None:
    info = C.machine_info()
    work = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    me = Path(__file__).resolve()
    arms = a.arms.split(",") + (["tdft-full"] if a.with_full and "tdft-full" not in a.arms else [])
    results = {}
    for arm in arms:
        args = ["--work", str(work), "--steps", str(a.steps), "--seed", str(a.seed)]
        args += ["--quick"] if a.quick else []
        args += C.device_args(a)
        if arm == "tdft-full" and not a.quick and a.device == "cpu":
            # params + base copy + teacher copy + grads + 2 AdamW moments = 6x the weights
            need = 6 * 859_520_964 * 4 + (2 << 30)
            avail = C.mem_available_bytes()
            if avail < need:
                results[arm] = {
                    "arm": arm,
                    "skipped": f"needs ~{C.gib(need)} GiB, {C.gib(avail)} GiB available",
                }
                print(f"  arm {arm} skipped: {results[arm]['skipped']}")
                continue
        results[arm] = C.run_arm(me, arm, work / f"{arm}.json", args, threads=a.threads)
    info["loadavg_end"] = os.getloadavg()

    rows = []
    for k, r in results.items():
        if "peak_rss_bytes" not in r:
            rows.append([LABELS[k], "-", "-", "-", r.get("skipped") or r.get("error", "failed")[-80:]])
            continue
        rows.append(
            [
                LABELS[k],
                r.get("steps", "-"),
                C.gib(r.get("rss_after_build_bytes")),
                (">= " if r.get("aborted") else "") + C.gib(C.peak_bytes(r)),
                r.get("aborted", "") or " ".join(f"{t:.1f}" for t in r.get("step_times_s", [])),
            ]
        )
    print()
    model = "QUICK UNet" if a.quick else f"SD1.5 UNet 64x64 latents, {a.dtype}, {a.device}"
    print(f"Peak memory, batch 1, {model}, {a.threads} thread(s)")
    peak = "peak GPU GiB" if a.device == "cuda" else "peak RSS GiB"
    C.print_table(["arm", "steps", "RSS model GiB", peak, "step times s / note"], rows)
    ratios = {}
    t, d = results.get("tdft-lora", {}), results.get("diffusion-lora", {})
    if "peak_rss_bytes" in t and "peak_rss_bytes" in d:
        ratios["tdft_lora_over_diffusion_lora"] = r1 = C.peak_bytes(t) / C.peak_bytes(d)
        built = "cuda_after_build_bytes" if a.device == "cuda" else "rss_after_build_bytes"
        ext = (C.peak_bytes(t) - t[built]) / (C.peak_bytes(d) - d[built])
        ratios["tdft_lora_over_diffusion_lora_above_model"] = ext
        print(f"peak ratio TDFT-LoRA / diffusion-LoRA = {r1:.3f}  {C.verdict(r1, TARGET)}")
        print(f"  (memory above the built model: ratio {ext:.3f})")
    f = results.get("tdft-full", {})
    if "peak_rss_bytes" in f and "peak_rss_bytes" in t and not f.get("aborted"):
        ratios["tdft_full_over_tdft_lora"] = C.peak_bytes(f) / C.peak_bytes(t)
        print(f"peak ratio TDFT-full / TDFT-LoRA = {ratios['tdft_full_over_tdft_lora']:.3f}")
    record = {
        "benchmark": "memory",
        "quick": a.quick,
        "machine": info,
        "settings": {
            "threads": a.threads,
            "batch": 1,
            "steps": a.steps,
            "lora_rank": 8,
            "k_steps": 5,
            "w": -1.0,
            "pool": "LatentPool(4)",
        },
        "arms": results,
        "ratios": ratios,
        "target": TARGET,
    }
    print(f"results written to {C.save_record('memory', a, record)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny UNet (smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per arm [1; quick 2]")
    ap.add_argument("--arms", default="tdft-lora,diffusion-lora", help="comma-separated arms")
    ap.add_argument("--with-full", action="store_true", help="also run tdft-full (needs ~21 GiB)")
    ap.add_argument("--seed", type=int, default=0)
    C.add_device_args(ap, "mixed precision of the training step (autocast; weights stay fp32)")
    C.add_threads_arg(ap)
    ap.add_argument("--arm", choices=tuple(ARMS), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.steps = a.steps or (2 if a.quick else 1)
    if a.arm is None:
        parent(a)
        return
    C.setup_env(a.threads)
    C.write_json(Path(a.out), arm_train(a))


if __name__ == "__main__":
    main()
