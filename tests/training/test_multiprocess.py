"""Two processes through ``accelerate launch`` (gloo, CPU) give the one-process result for the same
global batch; only the main process writes; a killed two-process run resumes to the same end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# Runs the CLI and records, per process, every write the training loop makes to the run folder.
# SELFNPO_DIE_AT_STEP=N: every process SIGKILLs itself as its N-th training step begins.
RUNNER = """
import os, signal, sys
import torch
torch.set_num_threads(1)
rank, record_to = os.environ.get("RANK", "0"), os.environ["SELFNPO_WRITES"]
import selfnpo.training.data as data
import selfnpo.training.loop as lp
import selfnpo.training.offset as off

def recording(owner, name):
    real = getattr(owner, name)
    def wrapped(*a, **k):
        with open(record_to, "a") as f:
            f.write(f"{rank} {name}\\n")
        return real(*a, **k)
    setattr(owner, name, wrapped)

for name in ("prepare_run_dir", "_log_line", "_trim_log", "_checkpoint"):
    recording(lp, name)
recording(off.TrainableOffset, "save")
recording(data.LatentPool, "save")
m, steps = int(os.environ.get("SELFNPO_DIE_AT_STEP", "0")), {"k": 0}
if m:
    real_step = lp._one_step
    def die_at_step(*a, **k):
        steps["k"] += 1
        if steps["k"] == m:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(*a, **k)
    lp._one_step = die_at_step
from selfnpo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(runner: Path, processes: int, argv: list[str], writes: Path, **env: str) -> int:
    if processes == 1:
        cmd = [sys.executable, str(runner)]
    else:  # torchrun through accelerate; with --device cpu every process is a gloo CPU rank
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(runner)]  # fmt: skip
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "SELFNPO_WRITES": str(writes),
        **env,
    }
    proc = subprocess.run(cmd + argv, env=full_env, capture_output=True, text=True, timeout=300)
    if proc.returncode and not env:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.returncode


def _args(model: str, prompts: str, out: Path, batch: int, *extra: str) -> list[str]:
    return ["train", "--model", model, "--prompts", prompts, "--output-dir", str(out), "--steps", "4",
            "--batch-size", str(batch), "--pool-size", "4", "--lr", "1e-3", "--checkpoint-every", "1",
            "--log-every", "1", "--device", "cpu", "--seed", "3", "--quiet", *extra]  # fmt: skip


def _offset(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "offset" / "pytorch_lora_weights.safetensors"))


def _losses(run: Path) -> list[float]:
    import json

    return [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_and_resume_after_a_kill(tmp_path, tiny_sd, prompts_file):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    assert _launch(runner, 1, _args(tiny_sd, prompts_file, one, 4), tmp_path / "w1.txt") == 0
    assert _launch(runner, 2, _args(tiny_sd, prompts_file, two, 2), tmp_path / "w2.txt") == 0

    # the same global batch (1 x 4 and 2 x 2): the same losses and weights, to float tolerance
    # (AdamW divides by sqrt(v), which magnifies rounding in near-zero gradients up to ~lr)
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    a, b = _offset(one), _offset(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4)
    assert any(v.abs().max() > 1e-3 for v in b.values())  # it trained

    # only the main process (rank 0) wrote anything into the run folder
    writes = (tmp_path / "w2.txt").read_text().splitlines()
    assert {w.split()[1] for w in writes} >= {"prepare_run_dir", "_log_line", "_checkpoint", "save"}
    assert all(w.startswith("0 ") for w in writes), writes
    assert len(_losses(two)) == 4  # one log line per step, not one per process

    # killed as step 3 begins, then the same command with --resume: the uninterrupted result
    args = _args(tiny_sd, prompts_file, killed, 2)
    assert _launch(runner, 2, args, tmp_path / "w3.txt", SELFNPO_DIE_AT_STEP="3") != 0
    assert not (killed / "offset").exists() and (killed / "checkpoints").is_dir()
    assert _launch(runner, 2, [*args, "--resume"], tmp_path / "w4.txt") == 0
    c = _offset(killed)
    for k in b:
        torch.testing.assert_close(c[k], b[k], rtol=0, atol=1e-6)
    assert _losses(killed) == pytest.approx(_losses(two), rel=1e-6)
