"""The training loop through its public API on tiny models: what changes, EMA, resume, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import train_tiny
from PIL import Image
from safetensors.torch import load_file

from selfnpo.errors import SelfNPOError
from selfnpo.models.loading import load_pipeline
from selfnpo.models.sd import DiffusionModel
from selfnpo.training.checkpoint import list_checkpoints, load_latest
from selfnpo.training.config import TrainConfig
from selfnpo.training.offset import STUDENT, TEACHER, TrainableOffset


def _offset_tensors(res):
    return load_file(str(res.offset_path))


def test_training_changes_only_the_student_adapter(tiny_sd, prompts_file, tmp_path):
    pipe = load_pipeline(tiny_sd, device="cpu", dtype="fp32")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    train_tiny(tiny_sd, tmp_path / "run", prompts_file, pipe=pipe, ema_decay=0.5)
    after = pipe.unet.state_dict()
    base_keys = [k for k in after if "lora" not in k]
    assert {k.replace("base_layer.", "") for k in base_keys} == set(before)
    for k in base_keys:
        assert torch.equal(after[k], before[k.replace("base_layer.", "")]), k
    student_b = [v for k, v in after.items() if f"lora_B.{STUDENT}" in k]
    teacher_b = [v for k, v in after.items() if f"lora_B.{TEACHER}" in k]
    assert student_b and all(v.abs().sum() > 0 for v in student_b)  # B starts at 0 and moved
    assert all(v.abs().sum() > 0 for v in teacher_b)  # the EMA teacher moved too (decay 0.5)


def _offset_for(tiny_sd, **kw):
    pipe = load_pipeline(tiny_sd, device="cpu", dtype="fp32")
    cfg = TrainConfig(model=tiny_sd, prompts="x", **kw)
    model = DiffusionModel(pipe)
    torch.manual_seed(0)
    return model, TrainableOffset(model, cfg)


def test_student_and_teacher_start_at_the_base_model(tiny_sd):
    model, off = _offset_for(tiny_sd)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    cond = model.encode(["a red circle", "green star"])
    base = load_pipeline(tiny_sd, device="cpu", dtype="fp32")
    want = DiffusionModel(base).predict(x, t, cond)
    with torch.no_grad():
        assert torch.equal(off.student(x, t, cond), want)
    assert torch.equal(off.teacher(x, t, cond), want)


@pytest.mark.parametrize("teacher,decay", [("ema", 0.9), ("frozen", 0.9)])
def test_ema_teacher_moves_as_specified(tiny_sd, teacher, decay):
    _, off = _offset_for(tiny_sd, teacher=teacher, ema_decay=decay)
    t0 = [tp.detach().clone() for tp, _ in off._pairs]
    with torch.no_grad():
        for p in off.params:
            p.add_(torch.randn_like(p))
    s1 = [sp.detach().clone() for _, sp in off._pairs]
    off.update_teacher()
    for (tp, _), a, b in zip(off._pairs, t0, s1, strict=True):
        want = a if teacher == "frozen" else decay * a + (1 - decay) * b
        torch.testing.assert_close(tp, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("train_mode", ["lora", "full"])
def test_resume_continues_exactly(tiny_sd, prompts_file, tmp_path, train_mode):
    kw = dict(steps=4, checkpoint_every=2, train=train_mode, lr=1e-3, ema_decay=0.5)
    whole = train_tiny(tiny_sd, tmp_path / "whole", prompts_file, **kw)
    train_tiny(tiny_sd, tmp_path / "split", prompts_file, **{**kw, "steps": 2})
    resumed = train_tiny(tiny_sd, tmp_path / "split", prompts_file, **kw, resume=True)
    a, b = _offset_tensors(whole), _offset_tensors(resumed)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_existing_run_folder_is_never_overwritten(tiny_sd, prompts_file, tmp_path):
    train_tiny(tiny_sd, tmp_path / "run", prompts_file, steps=1)
    before = (tmp_path / "run" / "offset" / "pytorch_lora_weights.safetensors").read_bytes()
    with pytest.raises(SelfNPOError, match="exists"):
        train_tiny(tiny_sd, tmp_path / "run", prompts_file, steps=1, seed=3)
    assert (tmp_path / "run" / "offset" / "pytorch_lora_weights.safetensors").read_bytes() == before
    with pytest.raises(SelfNPOError, match="cannot resume: seed"):
        train_tiny(tiny_sd, tmp_path / "run", prompts_file, steps=1, seed=3, resume=True)
    other = tmp_path / "notarun"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    with pytest.raises(SelfNPOError, match="not written by selfnpo"):
        train_tiny(tiny_sd, other, prompts_file, steps=1, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep"


def test_crash_during_checkpoint_keeps_the_previous_one(tiny_sd, prompts_file, tmp_path, monkeypatch):
    import selfnpo.training.checkpoint as ck

    run = tmp_path / "run"
    train_tiny(tiny_sd, run, prompts_file, steps=2, checkpoint_every=1)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001", "step-00000002"]
    real = ck.save_file

    def dies_halfway(tensors, path, metadata=None):
        real(tensors, path, metadata)
        with open(path, "r+b") as f:
            f.truncate(100)
        raise KeyboardInterrupt  # the process is killed mid-write

    monkeypatch.setattr(ck, "save_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(tiny_sd, run, prompts_file, steps=3, checkpoint_every=1, resume=True)
    monkeypatch.setattr(ck, "save_file", real)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001", "step-00000002"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    _, meta = load_latest(run)
    assert meta["step"] == 2
    # a damaged newest checkpoint is named and the previous one used
    state = run / "checkpoints" / "step-00000002" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:50])
    _, meta = load_latest(run)
    assert meta["step"] == 1


def test_nonfinite_loss_stops_with_the_step_or_skips(tiny_sd, prompts_file, tmp_path, monkeypatch):
    import selfnpo.objectives.tdft as tdft_mod
    from selfnpo.objectives import base

    calls = {"n": 0}
    real = tdft_mod.tdft

    def sometimes_nan(ctx, batch):
        calls["n"] += 1
        loss = real(ctx, batch)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setitem(base.OBJECTIVES, "tdft", sometimes_nan)
    run = tmp_path / "run"
    with pytest.raises(SelfNPOError, match="non-finite loss at step 3.*step-00000002"):
        train_tiny(tiny_sd, run, prompts_file, steps=4, checkpoint_every=1)
    assert load_latest(run)[1]["step"] == 2
    calls["n"] = 0
    res = train_tiny(tiny_sd, tmp_path / "skip", prompts_file, steps=4, nonfinite="skip")
    assert res.steps == 4 and np.isfinite(res.final_loss)


@pytest.mark.parametrize("teacher", ["ema", "frozen"])
def test_full_weight_offset_and_generation(tiny_sd, prompts_file, tmp_path, teacher):
    from selfnpo.generate import GenerateConfig, generate

    res = train_tiny(tiny_sd, tmp_path / "run", prompts_file, train="full", steps=1, lr=1e-3, teacher=teacher)
    assert res.offset_path.name == "full_delta.safetensors"
    delta = load_file(str(res.offset_path))
    unet_params = dict(load_pipeline(tiny_sd, device="cpu", dtype="fp32").unet.named_parameters())
    assert set(delta) <= set(unet_params) and any(v.abs().sum() > 0 for v in delta.values())
    cfg = GenerateConfig(
        model=tiny_sd,
        prompt="a red circle",
        output_dir=str(tmp_path / "img"),
        negative_offset=str(tmp_path / "run" / "offset"),
        steps=2,
        num_images_per_prompt=2,
    )
    jobs = generate(cfg, progress=False)
    assert [j["seed"] for j in jobs] == [0, 1] and (tmp_path / "img" / "00001.png").is_file()


def test_full_weight_offset_on_a_unet_with_a_loaded_lora(tiny_sd, sd_lora, prompts_file, tmp_path):
    """A full-weight offset trained while a user's LoRA is loaded keeps the plain weight names
    (peft renames them to ``base_layer``), leaves the LoRA untouched, and loads into a plain model."""
    from selfnpo.offsets import is_adapter_param, load_full_delta

    pipe = load_pipeline(tiny_sd, device="cpu", dtype="fp32")
    pipe.load_lora_weights(str(sd_lora.parent if sd_lora.is_file() else sd_lora), adapter_name="style")
    lora_before = {k: v.clone() for k, v in pipe.unet.state_dict().items() if is_adapter_param(k)}
    assert lora_before and any(".base_layer." in k for k in pipe.unet.state_dict())
    res = train_tiny(tiny_sd, tmp_path / "run", prompts_file, pipe=pipe, train="full", steps=1, lr=1e-3)
    delta = load_full_delta(res.offset_path, load_pipeline(tiny_sd, device="cpu", dtype="fp32").unet)
    assert not any(".base_layer." in k or is_adapter_param(k) for k in delta)
    assert any(v.abs().sum() > 0 for v in delta.values())
    after = pipe.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in lora_before.items())


@pytest.mark.parametrize("source", ["noise", "images"])
def test_other_sources_and_objectives(tiny_dir, prompts_file, tmp_path, source):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    model = str(tiny_dir / "sd_v")  # a v-prediction model
    for objective in ("tdft", "full_sim"):
        res = train_tiny(
            model,
            tmp_path / f"{source}-{objective}",
            prompts_file,
            source=source,
            image_dir=str(folder),
            objective=objective,
            grid_steps=10,
            k_steps=3,
        )
        assert np.isfinite(res.final_loss)
    res = train_tiny(
        model,
        tmp_path / "diff",
        prompts_file,
        source="images",
        image_dir=str(folder),
        objective="diffusion",
    )
    assert np.isfinite(res.final_loss)


def test_tdft_costs_k_plus_one_teacher_passes(tiny_sd, prompts_file, tmp_path):
    """K rollout steps + 1 target pass (unconditional only at w=-1) + 1 student pass per sample."""
    res = train_tiny(tiny_sd, tmp_path / "a", prompts_file, source="noise", steps=2, batch_size=2, k_steps=5)
    assert res.network_evals == 2 * 2 * (5 + 1 + 1)
    res = train_tiny(
        tiny_sd,
        tmp_path / "b",
        prompts_file,
        source="noise",
        steps=2,
        batch_size=2,
        k_steps=5,
        authors_cond_pass=True,
    )
    assert res.network_evals == 2 * 2 * (2 * (5 + 1) + 1)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_sd):
    grads = []
    for gc in (False, True):
        model, off = _offset_for(tiny_sd, gradient_checkpointing=gc)
        assert model.unet.is_gradient_checkpointing == gc and model.unet.training
        with torch.no_grad():  # non-zero B so that every LoRA factor gets a gradient
            for p in off.params:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
        off.student(x, t, model.encode(["a red circle", "green star"])).square().mean().backward()
        grads.append([p.grad.clone() for p in off.params])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_nonfinite_gradient_stops_with_the_step(tiny_sd, prompts_file, tmp_path, monkeypatch):
    import selfnpo.objectives.tdft as tdft_mod
    from selfnpo.objectives import base

    real = tdft_mod.tdft

    def inf_gradient(ctx, batch):
        loss = real(ctx, batch)
        p = next(p for p in ctx.model.unet.parameters() if p.requires_grad)
        return loss + (p - p.detach()).abs().sqrt().sum()  # value 0, gradient inf

    monkeypatch.setitem(base.OBJECTIVES, "tdft", inf_gradient)
    with pytest.raises(SelfNPOError, match="non-finite gradient at step 1"):
        train_tiny(tiny_sd, tmp_path / "run", prompts_file, steps=2)


def test_commands_never_touch_the_network_for_local_folders(tiny_sd, prompts_file, tmp_path, monkeypatch):
    import socket

    from selfnpo import cli

    def no_network(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    run = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "--quiet",
                "--model",
                tiny_sd,
                "--prompts",
                prompts_file,
                "--steps",
                "1",
                "--pool-size",
                "2",
                "--output-dir",
                str(run),
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "generate",
                "--quiet",
                "--model",
                tiny_sd,
                "--prompt",
                "a red circle",
                "--steps",
                "2",
                "--negative-offset",
                str(run / "offset"),
                "--output-dir",
                str(tmp_path / "img"),
            ]
        )
        == 0
    )


def test_resume_accepts_a_run_written_before_a_setting_existed(tiny_sd, prompts_file, tmp_path):
    import json

    from selfnpo.errors import SelfNPOError

    run = tmp_path / "run"
    train_tiny(tiny_sd, run, prompts_file, steps=1)
    cfg_file = run / "config.json"
    saved = json.loads(cfg_file.read_text())
    del saved["reward_guidance"]  # as if written by a version without this setting
    cfg_file.write_text(json.dumps(saved))
    assert train_tiny(tiny_sd, run, prompts_file, steps=2, resume=True).steps == 2
    with pytest.raises(SelfNPOError, match="--reward-guidance was 7.5, now 2.0"):
        train_tiny(tiny_sd, run, prompts_file, steps=3, resume=True, reward_guidance=2.0)


@pytest.mark.parametrize("source", ["self", "noise"])
def test_text_encoder_calls_do_not_grow_with_steps(tiny_sd, prompts_file, tmp_path, source):
    """Text embeddings are computed once per run: 2 and 6 steps make the same encoder calls."""
    calls = []
    for steps in (2, 6):
        pipe = load_pipeline(tiny_sd, device="cpu", dtype="fp32")
        n = [0]
        pipe.text_encoder.register_forward_hook(lambda *a, n=n: n.__setitem__(0, n[0] + 1))
        train_tiny(
            tiny_sd,
            tmp_path / f"{source}{steps}",
            prompts_file,
            pipe=pipe,
            source=source,
            steps=steps,
            caption_dropout=0.5,
        )
        calls.append(n[0])
    assert calls[0] == calls[1] > 0
