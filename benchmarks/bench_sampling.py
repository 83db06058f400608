"""NPO-guided sampling vs plain classifier-free guidance: time and peak memory, side by side.

Both arms use the same random-weight SD1.5-architecture pipeline, the same prompt and seed,
batch 1, ``guidance_scale=7.5`` and a few DDIM steps with ``output_type="latent"`` (the VAE is
not run). The NPO arm wraps the call in :class:`selfnpo.npo.NPOGuidance` with a rank-8 LoRA
negative offset on the attention projections (``to_q,to_k,to_v,to_out.0``) and ``beta=1``.
Prompt embeddings are computed once before the measured region and passed to the pipeline.

Each arm runs in its own subprocess (peak RSS by ``ru_maxrss``); time is ``perf_counter``
around the measured pipeline call only, after a one-step warm-up call of the same arm.

    python benchmarks/bench_sampling.py            # SD1.5 UNet, 64x64 latents (minutes)
    python benchmarks/bench_sampling.py --quick    # tiny UNet, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

TARGET_TIME, TARGET_MEM = 1.10, 1.05
LORA_RANK = 8
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def arm_make_lora(a) -> dict:
    """Write a rank-8 LoRA for this UNet with non-zero B (a stand-in for a trained offset)."""
    import torch
    from peft import LoraConfig

    from selfnpo.offsets import save_lora

    pipe = C.build_pipeline(a.quick, a.work, arch=a.arch, device=a.device)
    unet = pipe.unet
    cfg = LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian", target_modules=LORA_TARGETS
    )
    unet.add_adapter(cfg, adapter_name="bench_delta")
    g = torch.Generator().manual_seed(123)
    n = 0
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
            if "lora_" in name:
                n += p.numel()
    unet.to("cpu")
    path = save_lora(pipe, unet, "bench_delta", Path(a.work) / "lora", {"purpose": "benchmark"})
    return {"lora_path": str(path), "lora_params": n, "lora_bytes": path.stat().st_size}


def arm_sample(a, npo: bool) -> dict:
    import torch

    from selfnpo.npo import NPOGuidance

    res: dict = {"npo": npo}
    t0 = time.perf_counter()
    pipe = C.build_pipeline(a.quick, a.work, arch=a.arch, device=a.device, dtype=a.dtype)
    res["build_s"] = round(time.perf_counter() - t0, 1)
    res["rss_after_build_bytes"] = C.rss_bytes()
    if a.device == "cuda":
        res["cuda_after_build_bytes"] = torch.cuda.memory_allocated()
    text = encoded_prompt(pipe, a.device)  # text encoded once, outside the measured calls

    def call(steps: int):
        out = pipe(
            **text,
            guidance_scale=7.5,
            num_inference_steps=steps,
            output_type="latent",
            generator=torch.Generator("cpu").manual_seed(a.seed),
        ).images
        C.sync(a.device)
        return out

    guide = NPOGuidance(pipe, negative=a.lora, beta=1.0, mode=a.npo_mode) if npo else contextlib.nullcontext()
    res["rss_after_offset_bytes"] = C.rss_bytes()
    counter = C.UNetCounter(pipe.unet)
    with guide:
        t0 = time.perf_counter()
        call(1)
        res["warmup_s"] = time.perf_counter() - t0
        counter.calls = counter.samples = 0
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            lat = call(a.steps)
            times.append(time.perf_counter() - t0)
    res.update(
        times_s=times,
        time_s=min(times),
        steps=a.steps,
        repeats=a.repeats,
        unet_calls_per_step=counter.calls / (a.steps * a.repeats),
        unet_samples_per_step=counter.samples / (a.steps * a.repeats),
        latent_finite=bool(torch.isfinite(lat).all()),
        latent_std=float(lat.float().std()),
        **C.peak_memory(a.device),
    )
    if npo:
        res["npo_call"] = guide.last_call  # "single" (one batched call) or "split"
    lat = lat.float().cpu()
    torch.save(lat, Path(a.work) / f"latent_{'npo' if npo else 'plain'}.pt")
    return res


def encoded_prompt(pipe, device: str) -> dict:
    """The pipeline's text keyword arguments for ``PROMPTS[0]`` with an empty negative prompt."""
    out = pipe.encode_prompt(
        prompt=C.PROMPTS[0],
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt="",
    )
    names = ["prompt_embeds", "negative_prompt_embeds"]
    names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"] if len(out) == 4 else []
    return dict(zip(names, out, strict=True))


def arm_interleaved(a) -> dict:
    """Time only: plain CFG, NPO as one batched call (``mode="auto"``, the per-sample LoRA choice)
    and NPO split in two calls (``mode="split"``), rotated in one process so all see the same load."""
    import torch

    from selfnpo.npo import NPOGuidance

    pipe = C.build_pipeline(a.quick, a.work, arch=a.arch, device=a.device, dtype=a.dtype)
    text = encoded_prompt(pipe, a.device)
    guide = NPOGuidance(pipe, negative=a.lora, beta=1.0)
    how: dict[str, str | None] = {}

    def call(mode: str, steps: int) -> float:
        if mode != "plain":
            guide.mode = "auto" if mode == "npo" else "split"
            guide.attach()
        t0 = time.perf_counter()
        pipe(
            **text,
            guidance_scale=7.5,
            num_inference_steps=steps,
            output_type="latent",
            generator=torch.Generator("cpu").manual_seed(a.seed),
        )
        C.sync(a.device)
        dt = time.perf_counter() - t0
        if mode != "plain":
            how[mode] = guide.last_call
        guide.detach()
        return dt

    modes = ("plain", "npo", "split")
    warm = [call(m, 1) for m in modes]
    pairs = []
    for i in range(a.interleave):
        order = modes[i % 3 :] + modes[: i % 3]
        t = {m: call(m, a.steps) for m in (order if i % 2 == 0 else order[::-1])}
        pairs.append(
            {
                "plain_s": t["plain"],
                "npo_s": t["npo"],
                "split_s": t["split"],
                "ratio": t["npo"] / t["plain"],
                "split_ratio": t["split"] / t["plain"],
                "split_over_single": t["split"] / t["npo"],
            }
        )
    return {
        "warmup_s": warm,
        "steps": a.steps,
        "npo_call": how,
        "pairs": pairs,
        "ratio_median": statistics.median(p["ratio"] for p in pairs),
        "ratio_of_sums": sum(p["npo_s"] for p in pairs) / sum(p["plain_s"] for p in pairs),
        "split_ratio_median": statistics.median(p["split_ratio"] for p in pairs),
        "split_over_single_median": statistics.median(p["split_over_single"] for p in pairs),
    }


def print_interleaved(r: dict) -> None:
    if r.get("returncode"):
        return
    print(f"\nInterleaved in one process (time only), {r['steps']}-step calls, rotating order:")
    print(f"  NPO ran as: {r['npo_call']}")
    for i, p in enumerate(r["pairs"]):
        print(
            f"  round {i}: plain {p['plain_s']:.2f} s  NPO one call {p['npo_s']:.2f} s  "
            f"NPO split {p['split_s']:.2f} s  ratios {p['ratio']:.3f} / {p['split_ratio']:.3f}"
        )
    print(f"time ratio NPO (one call)/plain, median = {r['ratio_median']:.3f}  ", end="")
    print(f"{C.verdict(r['ratio_median'], TARGET_TIME)}; ratio of sums = {r['ratio_of_sums']:.3f}")
    print(f"time ratio NPO split/plain, median = {r['split_ratio_median']:.3f}; ", end="")
    print(f"split / one call, median = {r['split_over_single_median']:.3f}")


def parent(a) -> None:
    import torch

    info = C.machine_info()
    work = Path(tempfile.mkdtemp(prefix="bench_sampling_"))
    common = [
        "--work",
        str(work),
        "--steps",
        str(a.steps),
        "--repeats",
        str(a.repeats),
        "--seed",
        str(a.seed),
        "--arch",
        a.arch,
        "--npo-mode",
        a.npo_mode,
        *C.device_args(a),
    ]
    if a.quick:
        common.append("--quick")
    me = Path(__file__).resolve()
    lora = C.run_arm(me, "make-lora", work / "make-lora.json", common, threads=a.threads)
    if lora.get("returncode"):
        sys.exit("could not write the LoRA offset")
    arms: dict[str, list[dict]] = {"plain": [], "npo": []}
    inter = None
    if a.interleave:
        args = [*common, "--lora", lora["lora_path"], "--interleave", str(a.interleave)]
        inter = C.run_arm(me, "interleaved", work / "interleaved.json", args, threads=a.threads)
    if a.interleave_only:
        print_interleaved(inter)
        info["loadavg_end"] = os.getloadavg()
        record = {"benchmark": "sampling", "quick": a.quick, "machine": info, "lora": lora}
        record["settings"] = {"threads": a.threads, "steps": a.steps, "interleave": a.interleave}
        record["interleaved"] = inter
        print(f"results written to {C.save_record('sampling', a, record)}")
        return
    for r in range(a.rounds):  # alternate the arms so slow drift in machine load hits both
        order = ("plain", "npo") if r % 2 == 0 else ("npo", "plain")
        for arm in order:
            out = work / f"{arm}-{r}.json"
            arms[arm].append(
                C.run_arm(me, arm, out, [*common, "--lora", lora["lora_path"]], threads=a.threads)
            )
    info["loadavg_end"] = os.getloadavg()

    best = {
        k: min((x for x in v if not x.get("returncode")), key=lambda x: x["time_s"], default=None)
        for k, v in arms.items()
    }
    p, n = best["plain"], best["npo"]
    if p is None or n is None:
        sys.exit("an arm failed; see the messages above")
    diff = (torch.load(work / "latent_npo.pt") - torch.load(work / "latent_plain.pt")).abs().max().item()
    rows = []
    for name, r in (("plain CFG", p), (f"NPO (LoRA delta, beta=1, {n.get('npo_call')})", n)):
        calls = r["unet_calls_per_step"]
        rows.append(
            [
                name,
                f"{r['time_s']:.2f}",
                f"{r['time_s'] / a.steps:.2f}",
                f"{calls:.0f} x b{r['unet_samples_per_step'] / calls:.0f}",
                C.gib(r["rss_after_build_bytes"]),
                C.gib(C.peak_bytes(r)),
            ]
        )
    time_ratio = n["time_s"] / p["time_s"]
    mem_ratio = C.peak_bytes(n) / C.peak_bytes(p)
    print()
    model = f"QUICK {a.arch} UNet" if a.quick else f"{a.arch} UNet, real size, {a.dtype}, {a.device}"
    print(f"Sampling, batch 1, {a.steps} DDIM steps, guidance 7.5, {model}, {a.threads} thread(s)")
    peak = "peak GPU GiB" if a.device == "cuda" else "peak RSS GiB"
    C.print_table(["arm", "time s", "s/step", "UNet calls/step", "RSS model GiB", peak], rows)
    print(f"time ratio NPO/plain   = {time_ratio:.3f}  {C.verdict(time_ratio, TARGET_TIME)}")
    print(f"memory ratio NPO/plain = {mem_ratio:.3f}  {C.verdict(mem_ratio, TARGET_MEM)}")
    print(f"max |latent_npo - latent_plain| = {diff:.3g} (non-zero: the offset was applied)")
    if inter is not None:
        print_interleaved(inter)
    if a.rounds > 1:
        print(
            "all measured times (s): "
            + json.dumps({k: [round(x["time_s"], 2) for x in v] for k, v in arms.items()})
        )
    record = {
        "benchmark": "sampling",
        "quick": a.quick,
        "machine": info,
        "settings": {
            "threads": a.threads,
            "steps": a.steps,
            "repeats": a.repeats,
            "rounds": a.rounds,
            "batch": 1,
            "guidance_scale": 7.5,
            "lora_rank": LORA_RANK,
            "lora_targets": LORA_TARGETS,
            "beta": 1.0,
            "seed": a.seed,
            "arch": a.arch,
            "npo_mode": a.npo_mode,
        },
        "lora": lora,
        "arms": arms,
        "ratios": {
            "time_npo_over_plain": time_ratio,
            ("peak_cuda" if a.device == "cuda" else "peak_rss") + "_npo_over_plain": mem_ratio,
        },
        "targets": {"time": TARGET_TIME, "memory": TARGET_MEM},
        "max_abs_latent_diff": diff,
        "interleaved": inter,
    }
    print(f"results written to {C.save_record('sampling', a, record)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny UNet (smoke run)")
    ap.add_argument("--steps", type=int, default=3, help="denoising steps in the measured call")
    ap.add_argument("--repeats", type=int, default=None, help="measured calls per arm process (min is kept)")
    ap.add_argument("--rounds", type=int, default=None, help="arm processes per arm, alternating order")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", default="sd15", choices=("sd15", "sdxl"), help="UNet architecture [sd15]")
    C.add_device_args(ap)
    C.add_threads_arg(ap)
    ap.add_argument(
        "--interleave",
        type=int,
        default=0,
        help="also time N pairs of plain/NPO calls alternated inside one process (time only)",
    )
    ap.add_argument("--interleave-only", action="store_true", help="only the interleaved measurement")
    ap.add_argument(
        "--npo-mode",
        default="auto",
        choices=("auto", "single", "split"),
        help="NPOGuidance mode of the separate NPO arm [auto: one batched call where it applies]",
    )
    ap.add_argument("--arm", choices=("make-lora", "plain", "npo", "interleaved"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--lora", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.repeats = a.repeats or (5 if a.quick else 1)
    a.rounds = a.rounds or (2 if a.quick else 1)
    if a.interleave_only and not a.interleave:
        a.interleave = 3
    if a.arm is None:
        parent(a)
        return
    C.setup_env(a.threads)
    out = Path(a.out)
    if a.arm == "make-lora":
        res = arm_make_lora(a)
    elif a.arm == "interleaved":
        res = arm_interleaved(a)
    else:
        res = arm_sample(a, a.arm == "npo")
    res["arm"] = a.arm
    C.write_json(out, res)


if __name__ == "__main__":
    main()
