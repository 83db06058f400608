"""Shared helpers for the benchmark scripts (not part of the ``selfnpo`` package).

Every benchmark runs each *arm* in its own Python subprocess so that the peak resident set size
(``ru_maxrss``) of one arm is not polluted by another. The parent process only starts the arms,
collects their JSON answers, prints a table and the ratios, and appends the run to a JSON file
under ``benchmarks/results/``.

The model is a Stable-Diffusion-1.5-architecture UNet with random weights (no download): the
real block layout and widths, 64x64 latents. The text encoder and VAE are deliberately small:
text conditioning is encoded once and cached, and the VAE is never called in a measured region.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# The real SD1.5 UNet (runwayml/stable-diffusion-v1-5 unet/config.json), random weights.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
# --quick: same block layout, tiny widths, 16x16 latents (a smoke run in seconds).
QUICK_UNET = dict(
    SD15_UNET,
    sample_size=16,
    layers_per_block=1,
    block_out_channels=(32, 32, 64, 64),
    cross_attention_dim=32,
    norm_num_groups=8,
)

PROMPTS = [
    "a photo of a red apple on a wooden table",
    "a watercolor painting of a lighthouse at dusk",
    "a portrait of an old man with a grey beard",
    "a bowl of ramen, studio lighting",
]


def setup_env(threads: int) -> None:
    """Offline, quiet, and a fixed torch thread count (see ``--threads`` in the scripts)."""
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    logging.getLogger("peft").setLevel(logging.ERROR)
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def unet_config(quick: bool) -> dict:
    return dict(QUICK_UNET if quick else SD15_UNET)


def build_pipeline(quick: bool, workdir: Path, seed: int = 0):
    """A random-weight StableDiffusionPipeline: SD1.5 UNet, 1-layer CLIP text encoder, small VAE.

    The VAE has four levels (scale factor 8, as SD1.5) so the pipeline's default resolution maps
    to 64x64 latents (16x16 with ``quick``), but tiny widths: it is never run in a measured region.
    """
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from selfnpo.models.tiny import autoencoder, sd_scheduler, text_encoder, write_tiny_vocab

    ucfg = unet_config(quick)
    tok_dir = write_tiny_vocab(Path(workdir) / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    vocab = len(tok)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**ucfg)
    hidden = ucfg["cross_attention_dim"]
    te = text_encoder(
        vocab, hidden, seed=seed + 1, layers=1, heads=12 if not quick else 2, intermediate=hidden * 4
    )
    torch.manual_seed(seed + 2)
    vae = autoencoder((8, 8, 8, 8), 4, ucfg["sample_size"] * 8, norm_groups=4)
    sched = sd_scheduler()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- memory ------------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs`` 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class MemoryGuard:
    """Background thread that ends the process (exit code 3) before the machine runs out of memory.

    Other work shares this machine; an arm that would push it into the OOM killer is stopped
    instead, after writing ``partial`` (with ``"aborted"`` set) to ``out``.
    """

    def __init__(self, out: Path, partial: dict, floor_bytes: int = 1536 << 20) -> None:
        self.out, self.partial, self.floor = out, partial, floor_bytes
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            avail = mem_available_bytes()
            if avail and avail < self.floor:
                self.partial.update(
                    aborted=f"stopped: machine had {avail / 2**30:.2f} GiB available "
                    f"at RSS {rss_bytes() / 2**30:.2f} GiB",
                    peak_rss_bytes=peak_rss_bytes(),
                )
                write_json(self.out, self.partial)
                os._exit(3)

    def __enter__(self) -> MemoryGuard:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()


# ---- timing of training steps ------------------------------------------------------------------
class StepProbe:
    """Wraps :func:`selfnpo.training.loop._one_step` to time every optimizer step on its own.

    ``train()`` only reports the wall time of the whole loop; this records each step's
    ``perf_counter`` time and the RSS right after it. With ``stop_after`` it raises
    :class:`StopTraining` after that many steps, before ``train()`` writes its checkpoint and
    offset (used for the full-weight arm, whose checkpoint would be ~14 GB).
    """

    def __init__(self, stop_after: int | None = None) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []
        self.rss_after: list[int] = []
        self.stop_after = stop_after
        self._orig = None

    def __enter__(self) -> StepProbe:
        from selfnpo.training import loop

        self._orig = loop._one_step

        def timed(*args, **kw):
            t0 = time.perf_counter()
            loss = self._orig(*args, **kw)
            self.times.append(time.perf_counter() - t0)
            self.losses.append(float(loss))
            self.rss_after.append(rss_bytes())
            if self.stop_after is not None and len(self.times) >= self.stop_after:
                raise StopTraining
            return loss

        loop._one_step = timed
        return self

    def __exit__(self, *exc) -> None:
        from selfnpo.training import loop

        loop._one_step = self._orig


class StopTraining(Exception):
    """Raised by :class:`StepProbe` to leave ``train()`` after the measured steps."""


class UNetCounter:
    """Counts real UNet evaluations (calls of ``conv_in``) and the samples they processed."""

    def __init__(self, unet) -> None:
        self.calls = 0
        self.samples = 0
        self._h = unet.conv_in.register_forward_hook(self._hook)

    def _hook(self, mod, inp, out) -> None:
        self.calls += 1
        self.samples += int(inp[0].shape[0])

    def remove(self) -> None:
        self._h.remove()


def warm_up_forward(pipe, batch: int = 1) -> float:
    """One no-grad UNet forward at the benchmark's latent size (allocator, oneDNN primitives)."""
    import torch

    u = pipe.unet
    c = u.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size)
    enc = torch.zeros(batch, 77, c.cross_attention_dim)
    t0 = time.perf_counter()
    with torch.no_grad():
        u(x, torch.full((batch,), 500), encoder_hidden_states=enc)
    return time.perf_counter() - t0


# ---- arms as subprocesses ----------------------------------------------------------------------
def add_threads_arg(ap) -> None:
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per arm [1: on this shared 2-core machine one thread was faster and "
        "steadier than two, whose OpenMP barriers stall when another process holds a core]",
    )


def run_arm(
    script: Path,
    arm: str,
    out: Path,
    args: list[str],
    threads: int = 1,
    timeout: float | None = None,
) -> dict:
    """Run ``python script --arm ARM --out OUT ARGS`` and return its JSON (or an error record)."""
    cmd = [
        sys.executable,
        str(script),
        "--arm",
        arm,
        "--out",
        str(out),
        "--threads",
        str(threads),
        *args,
    ]
    t0 = time.perf_counter()
    print(f"[{_now()}] arm {arm}: {' '.join(cmd[1:])}", flush=True)
    try:
        proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        rc, tail = -1, f"timed out after {timeout} s"
    res: dict = {}
    if out.is_file():
        res = json.loads(out.read_text())
    res.setdefault("arm", arm)
    res["returncode"] = rc
    res["process_wall_s"] = round(time.perf_counter() - t0, 1)
    if rc != 0:
        res.setdefault("error", tail)
        print(f"  arm {arm} exited with {rc}:\n{tail}", flush=True)
    else:
        print(f"  arm {arm} done in {res['process_wall_s']} s", flush=True)
    return res


def write_json(path: Path, obj) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def append_results(name: str, quick: bool, record: dict) -> Path:
    """Append ``record`` to ``benchmarks/results/<name>[_quick].json`` (a JSON list of runs)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{'_quick' if quick else ''}.json"
    runs = []
    if path.is_file():
        with contextlib.suppress(ValueError):
            runs = json.loads(path.read_text())
    runs.append(record)
    write_json(path, runs)
    return path


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                cpu = line.split(":", 1)[1].strip()
    return {
        "date_utc": _now(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch_threads_default": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_start": os.getloadavg(),
        "argv": sys.argv,
    }


def verdict(ratio: float, target: float) -> str:
    ok = ratio <= target
    return f"(target <= {target})  {'OK' if ok else f'MISSED by {(ratio / target - 1) * 100:.1f}%'}"


def gib(n: float | int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        )
        if j == 0:
            print("  ".join("-" * w for w in widths))


# ---- the paired instrument in markdown tables (docs/evaluation.md) ----------------------------
PAIRED_HEADER = [
    "reward diff",
    "reward MDE",
    "strict alignment diff",
    "alignment MDE",
    "KID diff",
    "KID MDE",
    "n",
    "verdict",
]


def fmt_ci(ci) -> str:
    """'mean [lo, hi]' with signs, 3 significant digits; '-' for None."""
    return "-" if ci is None else f"{ci[0]:+.3g} [{ci[1]:+.3g}, {ci[2]:+.3g}]"


def paired_cells(row: dict) -> list[str]:
    """The PAIRED_HEADER cells of a summary row (``EvalBench.summary``) vs its base: each paired
    difference with its 95% interval and minimum detectable difference, n and the verdict; '-'
    for a row without a base."""
    p = row.get("paired")
    if not p:
        return ["-"] * (len(PAIRED_HEADER) - 1) + ["reference"]
    cells = []
    for key in ("reward", "alignment", "kid"):
        cells += [fmt_ci(p[key]["diff"]), f"{p[key]['mde']:.3g}"]
    return [*cells, str(p["reward"]["n"]), row["verdict_word"]]


def markdown_row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_header(cols: list[str]) -> str:
    return markdown_row(cols) + "\n|" + "---|" * len(cols)
