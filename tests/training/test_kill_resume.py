"""Jobs killed with SIGKILL at many moments and re-run with the same command end exactly where an
uninterrupted run ends (CPU, fixed seeds)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# Runs the CLI in a fresh process. Fault injection, for deterministic kill moments:
# SELFNPO_DIE_AT_SAVE=N: the N-th checkpoint save of this process writes its file, then the
# process SIGKILLs itself before anything renames it into place; SELFNPO_DIE_AT_STEP=N: the
# process SIGKILLs itself as its N-th training step begins.
RUNNER = """
import os, signal, sys
import torch
torch.set_num_threads(1)
m = int(os.environ.get("SELFNPO_DIE_AT_STEP", "0"))
if m:
    import selfnpo.training.loop as lp
    real_step, steps = lp._one_step, {"k": 0}
    def die_at_step(*a, **k):
        steps["k"] += 1
        if steps["k"] == m:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(*a, **k)
    lp._one_step = die_at_step
n = int(os.environ.get("SELFNPO_DIE_AT_SAVE", "0"))
if n:
    import safetensors.torch as st
    import selfnpo.training.checkpoint as ck
    calls = {"k": 0}
    def save_then_die(tensors, path, metadata=None):
        calls["k"] += 1
        st.save_file(tensors, path, metadata)
        if calls["k"] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    ck.save_file = save_then_die
from selfnpo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cmd(runner: Path, *argv: str) -> list[str]:
    return [sys.executable, str(runner), *argv]


def _env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def _run_killed_after(cmd: list[str], delay: float) -> int:
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.returncode


@pytest.fixture
def runner(tmp_path):
    p = tmp_path / "runner.py"
    p.write_text(RUNNER)
    return p


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_train_killed_at_many_moments_ends_bit_identical(runner, tmp_path, tiny_sd, prompts_file):
    args = [
        "train",
        "--quiet",
        "--model",
        tiny_sd,
        "--prompts",
        prompts_file,
        "--steps",
        "12",
        "--batch-size",
        "2",
        "--pool-size",
        "4",
        "--checkpoint-every",
        "1",
        "--lr",
        "1e-2",
        "--seed",
        "3",
        "--resume",
    ]
    ref = tmp_path / "ref"
    subprocess.run(_cmd(runner, *args, "--output-dir", str(ref)), env=_env(), check=True, capture_output=True)
    run = tmp_path / "run"
    cmd = _cmd(runner, *args, "--output-dir", str(run))
    # from outside, early: during start-up (imports take seconds) and the pool generation
    for delay in (0.3, 1.5):
        _run_killed_after(cmd, delay)
    killed = []
    # inside a checkpoint write (file written, folder not yet renamed): progress 0, 2, 3, 6 steps
    for n in (1, 3, 2, 4):
        killed.append(
            subprocess.run(cmd, env=_env(SELFNPO_DIE_AT_SAVE=str(n)), capture_output=True).returncode
        )
    # as a training step begins: progress 0 or 1 step each, 8 of the 12 steps in all
    for m in (1, 2, 1, 2, 1, 1):
        killed.append(
            subprocess.run(cmd, env=_env(SELFNPO_DIE_AT_STEP=str(m)), capture_output=True).returncode
        )
    assert killed == [-signal.SIGKILL] * 10, killed
    subprocess.run(cmd, env=_env(), check=True, capture_output=True)
    a = _weights(ref / "offset" / "pytorch_lora_weights.safetensors")
    b = _weights(run / "offset" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_generate_killed_midway_produces_the_same_set(runner, tmp_path, tiny_sd):
    args = [
        "generate",
        "--quiet",
        "--model",
        tiny_sd,
        "--prompt",
        "a red circle",
        "--num-images-per-prompt",
        "6",
        "--batch-size",
        "2",
        "--steps",
        "3",
        "--resume",
    ]
    ref = tmp_path / "ref"
    subprocess.run(_cmd(runner, *args, "--output-dir", str(ref)), env=_env(), check=True, capture_output=True)
    out = tmp_path / "out"
    cmd = _cmd(runner, *args, "--output-dir", str(out))
    for delay in (0.3, 3.0, 4.0, 5.0):
        _run_killed_after(cmd, delay)
    subprocess.run(cmd, env=_env(), check=True, capture_output=True)
    # a killed writer's temporaries are cleaned up by the re-run (the marker and lock file stay)
    assert sorted(p.name for p in out.glob(".*")) == [".selfnpo-lock", ".selfnpo-run"]
    want = {p.name: p.read_bytes() for p in ref.glob("*.png")}
    assert len(want) == 6 and {p.name: p.read_bytes() for p in out.glob("*.png")} == want


def test_pretrain_killed_at_several_moments_ends_bit_identical(runner, tmp_path):
    args = [
        "pretrain",
        "--quiet",
        "--recipe",
        "v2",
        "--vae-steps",
        "6",
        "--unet-steps",
        "6",
        "--batch-size",
        "2",
        "--vae-batch-size",
        "2",
        "--text-steps",
        "3",
        "--text-batch-size",
        "8",
        "--checkpoint-every",
        "1",
        "--resume",
    ]
    ref = tmp_path / "ref"
    subprocess.run(_cmd(runner, *args, "--output-dir", str(ref)), env=_env(), check=True, capture_output=True)
    run = tmp_path / "run"
    cmd = _cmd(runner, *args, "--output-dir", str(run))
    for n in (2, 9):  # inside an autoencoder checkpoint, then inside a UNet checkpoint
        subprocess.run(cmd, env=_env(SELFNPO_DIE_AT_SAVE=str(n)), capture_output=True)
    for delay in (4.0, 8.0):
        _run_killed_after(cmd, delay)
    subprocess.run(cmd, env=_env(), check=True, capture_output=True)
    a = _weights(ref / "unet" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    b = _weights(run / "unet" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    va = _weights(ref / "base" / "vae" / "diffusion_pytorch_model.safetensors")
    vb = _weights(run / "base" / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(va[k], vb[k]) for k in va)
