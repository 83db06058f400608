"""The GPU check: every benchmark on one GPU, plus two short Self-NPO LoRA runs, into one JSON file.

Parts (each in its own subprocess, each with a time limit; the whole check is sized for < 10
minutes on one data-centre GPU):

1. ``sampling_sd15`` / ``sampling_sdxl``: NPO vs plain CFG, time and peak GPU memory
   (``torch.cuda.max_memory_allocated``), the real SD1.5 and SDXL UNet sizes, fp16 weights.
2. ``training``: time per step of TDFT vs the authors' procedure vs full simulation, fp16
   autocast, with the per-part breakdown (teacher forwards, student forward/backward, optimizer).
3. ``memory``: peak GPU memory of LoRA TDFT vs LoRA diffusion fine-tuning (and full-weight TDFT).
4. ``train_fp16`` / ``train_bf16``: a 50-step Self-NPO LoRA run (self-generated pool) on the
   SD1.5 architecture through ``selfnpo.training.loop.train`` with ``mixed_precision`` fp16 / bf16.

    bash benchmarks/gpu_check.sh "$OUT"               # on the GPU machine
    bash benchmarks/gpu_check.sh /tmp/x --cpu-smoke   # the same script, tiny models, on the CPU

Writes ``<out>/gpu_check.json`` (the machine, every part's command, exit code, wall time and
record) and keeps each part's own record under ``<out>/parts/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

HERE = Path(__file__).resolve().parent


def parts(smoke: bool, out: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in s) of every benchmark part."""
    py = [sys.executable]
    dev = (
        ["--device", "cpu", "--dtype", "fp32", "--quick"]
        if smoke
        else ["--device", "cuda", "--dtype", "fp16"]
    )
    samp = ["--steps", "2", "--repeats", "1", "--rounds", "1", "--interleave", "2"] if smoke else [
        "--steps", "20", "--repeats", "3", "--rounds", "2", "--interleave", "5"]  # fmt: skip
    train = ["--steps-tdft", "2", "--steps-authors", "1", "--steps-full-sim", "1"] if smoke else [
        "--steps-tdft", "5", "--steps-authors", "3", "--steps-full-sim", "3"]  # fmt: skip
    mem = ["--steps", "1"] if smoke else ["--steps", "3", "--with-full"]
    rec = out / "parts"
    return [
        ("sampling_sd15", [*py, str(HERE / "bench_sampling.py"), *dev, *samp, "--arch", "sd15",
                           "--json-out", str(rec / "sampling_sd15.json")], 120),
        ("sampling_sdxl", [*py, str(HERE / "bench_sampling.py"), *dev, *samp, "--arch", "sdxl",
                           "--json-out", str(rec / "sampling_sdxl.json")], 150),
        ("training", [*py, str(HERE / "bench_training.py"), *dev, *train, "--breakdown",
                      "--json-out", str(rec / "training.json")], 120),
        ("memory", [*py, str(HERE / "bench_memory.py"), *dev, *mem, "--json-out", str(rec / "memory.json")], 90),
    ] + [
        (f"train_{mp}", [*py, str(Path(__file__).resolve()), "--train-run", mp, str(out),
                         *(["--cpu-smoke"] if smoke else [])], 75)
        for mp in (("no", "bf16") if smoke else ("fp16", "bf16"))
    ]  # fmt: skip


def train_run(mp: str, out: Path, smoke: bool) -> dict:
    """A 50-step Self-NPO LoRA run (self-generated pool) with mixed precision ``mp``."""
    import torch

    from selfnpo.training.config import TrainConfig
    from selfnpo.training.loop import train

    C.setup_env(1 if smoke else (os.cpu_count() or 1))
    device = "cpu" if smoke else "cuda"
    work = out / "work" / f"train_{mp}"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    t0 = time.perf_counter()
    C.build_pipeline(smoke, work).save_pretrained(model_dir)  # real SD1.5 UNet (tiny with --cpu-smoke)
    build = time.perf_counter() - t0
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(C.PROMPTS) + "\n")
    cfg = TrainConfig(
        model=str(model_dir),
        prompts=str(prompts),
        output_dir=str(work / "run"),
        steps=5 if smoke else 50,
        batch_size=2 if smoke else 4,
        pool_size=4 if smoke else 16,
        mixed_precision=mp,
        device=device,
        checkpoint_every=0,
        log_every=1,
        lr=1e-4,
        overwrite=True,
    )
    res = train(cfg, progress=False)
    losses = [json.loads(x)["loss"] for x in (res.run_dir / "log.jsonl").read_text().splitlines()]
    return {
        "mixed_precision": mp,
        "steps": res.steps,
        "batch_size": cfg.batch_size,
        "pool_size": cfg.pool_size,
        "build_s": build,
        "train_wall_time_s": res.wall_time_s,  # pool generation included
        "network_evals": res.network_evals,
        "losses": losses,
        "losses_finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
        "offset_bytes": Path(res.offset_path).stat().st_size,
        **C.peak_memory(device),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder for gpu_check.json and the parts' records")
    ap.add_argument("--cpu-smoke", action="store_true", help="the same parts with tiny models on the CPU")
    ap.add_argument("--parts", help="comma-separated subset of the parts (default: all)")
    ap.add_argument("--train-run", help=argparse.SUPPRESS)
    a = ap.parse_args()
    out = Path(a.out).resolve()
    (out / "parts").mkdir(parents=True, exist_ok=True)
    if a.train_run:
        C.write_json(out / "parts" / f"train_{a.train_run}.json", train_run(a.train_run, out, a.cpu_smoke))
        return
    t_all = time.perf_counter()
    record: dict = {"check": "gpu_check", "cpu_smoke": a.cpu_smoke, "machine": C.machine_info(), "parts": {}}
    if a.parts and (out / "gpu_check.json").is_file():  # a re-run of some parts keeps the others
        record["parts"] = json.loads((out / "gpu_check.json").read_text()).get("parts", {})
    if not a.cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            sys.exit("no CUDA device; use --cpu-smoke to try the script on the CPU")
        record["machine"].update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    for name, cmd, limit in parts(a.cpu_smoke, out):
        if a.parts and name not in a.parts.split(","):
            continue
        limit *= 4 if a.cpu_smoke else 1  # a shared CPU is slower than the GPU the limits are for
        print(f"[{C._now()}] {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
        except subprocess.TimeoutExpired as e:
            rc, tail = "timeout", f"stopped after {limit} s\n{(e.stdout or b'')[-2000:]!r}"
        part_file = out / "parts" / f"{name}.json"
        part = {"command": cmd, "returncode": rc, "wall_s": round(time.perf_counter() - t0, 1), "tail": tail}
        if part_file.is_file():
            part["record"] = json.loads(part_file.read_text())
        record["parts"][name] = part
        print(tail[-1500:] if rc else f"  done in {part['wall_s']} s", flush=True)
        record["wall_s"] = round(time.perf_counter() - t_all, 1)
        C.write_json(out / "gpu_check.json", record)  # after every part: a stopped check keeps the rest
    failed = [k for k, v in record["parts"].items() if v["returncode"]]
    print(f"gpu_check: {record['wall_s']} s, written to {out / 'gpu_check.json'}; failed: {failed or 'none'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
