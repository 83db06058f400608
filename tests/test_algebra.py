"""Offset algebra: dense LoRA deltas, in-place application and its inverse, merged model folders,
every (eta, delta) mix of NPO guidance, the merge CLI's errors, and the sweep's report."""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file

from selfnpo.algebra import (
    apply_deltas,
    lora_delta,
    merge_offsets,
    offset_delta,
    parse_offsets,
    remove_deltas,
)
from selfnpo.cli import main
from selfnpo.errors import SelfNPOError
from selfnpo.npo import NPOGuidance
from selfnpo.offsets import adapter_scales, save_full_delta


def _pipe(path):
    pipe = DiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(unet, n: int = 2, seed: int = 0) -> tuple[tuple, dict]:
    """Random UNet inputs (SDXL gets its added conditions)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, unet.config.in_channels, 8, 8, generator=g)
    kw = {"encoder_hidden_states": torch.randn(n, 77, unet.config.cross_attention_dim, generator=g)}
    if unet.config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(n, 32, generator=g),
            "time_ids": torch.rand(n, 6, generator=g) * 64,
        }
    return (x, torch.tensor(400)), kw


@torch.no_grad()
def _out(unet, args, kw):
    return unet(*args, **kw).sample


def _half(kw: dict, sl: slice) -> dict:
    return {
        k: ({kk: vv[sl] for kk, vv in v.items()} if isinstance(v, dict) else v[sl]) for k, v in kw.items()
    }


def _random_full_delta(unet, path: Path, seed: int, scale: float = 0.05) -> Path:
    """A full-weight offset on every attention weight, saved the way training saves one."""
    g = torch.Generator().manual_seed(seed)
    delta = {
        k: scale * torch.randn(p.shape, generator=g)
        for k, p in unet.named_parameters()
        if ".attn" in k and k.endswith("weight")
    }
    save_full_delta(path / "full_delta.safetensors", delta, {"base_model": "test"})
    return path / "full_delta.safetensors"


def _rescaled_lora(src, dst: Path, factor: float, lora_alpha: float) -> Path:
    """A second, different LoRA: the up factors of ``src`` times ``factor``, and its own
    ``lora_alpha`` (so its peft scale ``lora_alpha / r`` is not 1)."""
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) * (factor if ".up." in k or "lora_B" in k else 1.0) for k in f.keys()}  # noqa: SIM118
    config = json.loads(meta["lora_adapter_metadata"])
    config["unet.lora_alpha"] = lora_alpha
    meta["lora_adapter_metadata"] = json.dumps(config)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "pytorch_lora_weights.safetensors"), metadata=meta)
    return dst / "pytorch_lora_weights.safetensors"


def _numel(path) -> int:
    with safe_open(str(path), "pt") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118


def _lora(kind, sd_lora, sdxl_lora):
    return sd_lora if kind == "sd" else sdxl_lora


# ---- dense deltas and their application ----------------------------------------------------
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_scale_zero_is_the_base_model_bit_for_bit(kind, tiny_dir, sd_lora, sdxl_lora, tmp_path):
    pipe = _pipe(tiny_dir / kind)
    unet = pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    args, kw = _inputs(unet)
    y0 = _out(unet, args, kw)
    full = _random_full_delta(unet, tmp_path, seed=1)
    terms = [(offset_delta(_lora(kind, sd_lora, sdxl_lora), unet), 0.0), (offset_delta(full, unet), 0.0)]
    assert list(unet.state_dict()) == list(before)  # reading a LoRA leaves no peft layers behind
    apply_deltas(unet, terms)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(_out(unet, args, kw), y0)
    apply_deltas(unet, [(terms[0][0], 1.0)])
    assert not torch.equal(_out(unet, args, kw), y0)  # a non-zero scale does change it


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd_alpha20"])
def test_lora_at_scale_s_equals_base_plus_s_times_its_dense_delta(
    kind, tiny_dir, sd_lora, sdxl_lora, tmp_path
):
    lora = _lora(kind, sd_lora, sdxl_lora)
    if kind == "sd_alpha20":  # peft scale lora_alpha / r = 2.5 instead of 1
        kind, lora = "sd", _rescaled_lora(sd_lora, tmp_path, 1.0, lora_alpha=20.0)
    with_adapter, merged = _pipe(tiny_dir / kind), _pipe(tiny_dir / kind)
    with_adapter.load_lora_weights(str(lora), adapter_name="n")
    delta = lora_delta(lora, merged.unet)
    base = {k: v.clone() for k, v in merged.unet.state_dict().items()}
    args, kw = _inputs(merged.unet)
    y_base = _out(merged.unet, args, kw)
    for s in (0.6, -1.3):
        with adapter_scales(with_adapter.unet, {"n": s}):
            want = _out(with_adapter.unet, args, kw)
        apply_deltas(merged.unet, [(delta, s)])
        got = _out(merged.unet, args, kw)
        remove_deltas(merged.unet, [(delta, s)])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert (got - y_base).abs().max() > 1e-3
    # and the dense delta is what diffusers' own fuse_lora adds
    with_adapter.fuse_lora(lora_scale=0.6, adapter_names=["n"])
    with_adapter.unload_lora_weights()
    fused = with_adapter.unet.state_dict()
    for k, v in fused.items():
        want = base[k] + 0.6 * delta[k] if k in delta else base[k]
        torch.testing.assert_close(v, want, rtol=1e-5, atol=1e-6)


def test_apply_then_remove_returns_the_original_weights(tiny_sd, sd_lora, tmp_path):
    unet = _pipe(tiny_sd).unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    terms = [
        (lora_delta(sd_lora, unet), 0.8),
        (offset_delta(_random_full_delta(unet, tmp_path, 2), unet), -0.5),
    ]
    apply_deltas(unet, terms)
    changed = [k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) >= len(terms[1][0])
    remove_deltas(unet, terms)
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=1e-6, atol=1e-6)


def test_deltas_of_another_model_are_refused_before_anything_changes(tiny_sd, tiny_sdxl, sdxl_lora, tmp_path):
    sd, sdxl = _pipe(tiny_sd).unet, _pipe(tiny_sdxl).unet
    before = {k: v.clone() for k, v in sd.state_dict().items()}
    with pytest.raises(SelfNPOError, match="does not fit"):
        lora_delta(sdxl_lora, sd)
    xl_delta = offset_delta(_random_full_delta(sdxl, tmp_path, 3), sdxl)
    with pytest.raises(SelfNPOError, match="shape|does not have"):
        apply_deltas(sd, [(xl_delta, 1.0)])
    assert list(sd.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in sd.state_dict().items())


def test_parse_offsets():
    assert parse_offsets("a/off:0.5, b:-1,c") == [("a/off", 0.5), ("b", -1.0), ("c", 1.0)]
    assert parse_offsets("C:/runs/x") == [("C:/runs/x", 1.0)]
    with pytest.raises(SelfNPOError):
        parse_offsets(" , ")


# ---- merged folders and NPO guidance mixes -------------------------------------------------
@pytest.fixture
def sd_offsets(tiny_sd, sd_lora, tmp_path):
    """Two LoRAs and two full deltas for the tiny SD model."""
    unet = _pipe(tiny_sd).unet
    return {
        "lora": str(sd_lora),
        "lora2": str(_rescaled_lora(sd_lora, tmp_path / "lora2", -0.7, lora_alpha=20.0)),
        "full": str(_random_full_delta(unet, (tmp_path / "full").resolve(), 4)),
        "full2": str(_random_full_delta(unet, (tmp_path / "full2").resolve(), 5)),
    }


@pytest.mark.parametrize(
    ("eta", "delta"), [("lora", "full"), ("full", "lora"), ("full", "full2"), ("lora", "lora2")]
)
def test_merged_folders_reproduce_both_npo_branches(eta, delta, tiny_sd, sd_offsets, tmp_path, monkeypatch):
    """theta+eta and theta+alpha*eta+beta*delta merged into plain diffusers folders give exactly
    NPOGuidance's two halves, for every mix of LoRA and full-weight offsets."""
    alpha, beta = 0.4, 0.7
    eta_p, delta_p = sd_offsets[eta], sd_offsets[delta]
    merge_offsets(tiny_sd, [(eta_p, alpha), (delta_p, beta)], tmp_path / "neg")
    merge_offsets(tiny_sd, [(eta_p, 1.0)], tmp_path / "pos")
    neg = UNet2DConditionModel.from_pretrained(tmp_path / "neg" / "unet")
    pos = DiffusionPipeline.from_pretrained(tmp_path / "pos").unet  # the whole folder loads too
    assert json.loads((tmp_path / "neg" / "selfnpo_merge.json").read_text())["offsets"][1]["scale"] == beta

    pipe = _pipe(tiny_sd)
    pipe._guidance_scale = 5.0  # what the pipeline sets during a call; turns the CFG split on
    n_params = sum(p.numel() for p in pipe.unet.parameters())
    args, kw = _inputs(pipe.unet, n=4, seed=7)
    if "full" not in (eta, delta):  # LoRA offsets only: adapter scales, never a weight copy
        monkeypatch.setattr(torch.func, "functional_call", None)
    with NPOGuidance(pipe, negative=delta_p, positive=eta_p, alpha=alpha, beta=beta):
        got = _out(pipe.unet, args, kw)
        added = sum(p.numel() for p in pipe.unet.parameters()) - n_params
    if "full" not in (eta, delta):  # while attached the network grew by the LoRA factors, nothing more
        assert added == _numel(eta_p) + _numel(delta_p)
    assert sum(p.numel() for p in pipe.unet.parameters()) == n_params  # and then is as it was
    base = _out(_pipe(tiny_sd).unet, args, kw)
    want_neg = _out(neg, (args[0][:2], args[1]), _half(kw, slice(0, 2)))
    want_pos = _out(pos, (args[0][2:], args[1]), _half(kw, slice(2, 4)))
    torch.testing.assert_close(got[:2], want_neg, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[2:], want_pos, rtol=1e-4, atol=1e-5)
    assert (want_neg - base[:2]).abs().max() > 1e-3 and (want_pos - base[2:]).abs().max() > 1e-3


def test_merge_at_scale_zero_and_through_the_cli(tiny_sd, sd_lora, tmp_path, capsys):
    merge_offsets(tiny_sd, [(sd_lora, 0.0)], tmp_path / "zero")
    base = _pipe(tiny_sd).unet.state_dict()
    zero = UNet2DConditionModel.from_pretrained(tmp_path / "zero" / "unet").state_dict()
    assert zero.keys() == base.keys() and all(torch.equal(zero[k], base[k]) for k in base)

    out = tmp_path / "cli"
    assert main(["merge", "--model", tiny_sd, "--offsets", f"{sd_lora}:0.5", "--output-dir", str(out)]) == 0
    merged = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    delta = lora_delta(sd_lora, _pipe(tiny_sd).unet)
    for k in base:
        want = base[k] + 0.5 * delta[k] if k in delta else base[k]
        torch.testing.assert_close(merged[k], want, rtol=1e-6, atol=1e-7)
    assert (
        main(
            [
                "merge",
                "--model",
                tiny_sd,
                "--offsets",
                str(sd_lora),
                "--output-dir",
                str(tmp_path / "h"),
                "--dtype",
                "fp16",
            ]
        )
        == 0
    )
    with safe_open(str(tmp_path / "h" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118


@pytest.mark.parametrize(
    "case", ["missing", "existing", "other_model_lora", "other_model_full", "no_offsets"]
)
def test_merge_cli_bad_input(case, tiny_sd, tiny_sdxl, sdxl_lora, tmp_path, capsys):
    out = tmp_path / "merged"
    offsets = {
        "missing": str(tmp_path / "nope" / "pytorch_lora_weights.safetensors"),
        "existing": str(sdxl_lora),
        "other_model_lora": f"{sdxl_lora}:1",
        "other_model_full": str(_random_full_delta(_pipe(tiny_sdxl).unet, tmp_path, 6)),
        "no_offsets": "",
    }[case]
    model = tiny_sdxl if case == "existing" else tiny_sd
    if case == "existing":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    rc = main(["merge", "--model", model, "--offsets", offsets, "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("selfnpo merge: error:"), err
    if case == "existing":
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".merged*"))  # no temporaries left behind


# ---- heat maps and the sweep -----------------------------------------------------------------
def test_heatmap_writes_numbers_and_escapes_labels():
    from selfnpo.evaluation.plots import Heatmap, svg_heatmap

    hm = Heatmap("<b>t</b>", "beta & co", "g", ["0", "1"], ["3", "<5>"], [[0.25, float("nan")], [1.5, -2.0]])
    svg = svg_heatmap(hm)
    ElementTree.fromstring(svg)  # well-formed
    assert (
        "&lt;b&gt;t&lt;/b&gt;" in svg and "beta &amp; co" in svg and "&lt;5&gt;" in svg and "<b>" not in svg
    )
    assert all(f">{v}</text>" in svg for v in ("0.25", "1.5", "-2", "n/a"))
    assert svg.count("<rect") == 4
    with pytest.raises(ValueError, match="values"):
        Heatmap("t", "r", "c", ["0"], ["1", "2"], [[1.0]])


def test_sweep_on_the_world_model(tmp_path, capsys):
    from selfnpo.sweep import METRICS
    from selfnpo.world.model import shipped_model_dir

    unet = UNet2DConditionModel.from_pretrained(shipped_model_dir() / "unet")
    neg = _random_full_delta(unet, tmp_path / "neg", 8, scale=0.02)
    pos = _random_full_delta(unet, tmp_path / "pos", 9, scale=0.02)
    out = tmp_path / "sweep"
    args = ["sweep", "--quiet", "--output", str(out), "--negative", str(neg), "--positive", str(pos)]
    args += ["--alphas", "0,0.5", "--betas", "0,1", "--guidance-scales", "3"]
    args += ["--eval-prompts", "4", "--sample-steps", "2", "--device", "cpu"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [(r["alpha"], r["beta"], r["guidance_scale"]) for r in m["rows"]] == [
        (0.0, 0.0, 3.0),
        (0.0, 1.0, 3.0),
        (0.5, 0.0, 3.0),
        (0.5, 1.0, 3.0),
    ]
    for r in m["rows"]:
        for key in ("alignment", "reward", "frechet"):
            mean, lo, hi = r[key]
            assert lo <= mean <= hi
        assert ("win_rate_reward" in r) == ((r["alpha"], r["beta"]) != (0.0, 0.0))
    assert set(m["heatmaps"]) == {k for k, _, _ in METRICS}
    for key, panels in m["heatmaps"].items():
        (panel,) = panels.values()  # several alphas: alpha x beta, one panel per g
        assert panel["alpha"] == [0.0, 0.5] and panel["beta"] == [0.0, 1.0]
        for i, a in enumerate(panel["alpha"]):
            for j, b in enumerate(panel["beta"]):
                row = next(r for r in m["rows"] if (r["alpha"], r["beta"]) == (a, b))
                assert panel["values"][i][j] == (row[key][0] if key in row else None)
    page = (out / "report.html").read_text()
    assert page.count("<svg") == len(METRICS)
    assert all(label in page for _, label, _ in METRICS[:3])
    assert (out / "grid.png").is_file()
    ims = {p.name: np.load(p) for p in (out / "images").glob("*.npy")}
    assert len(ims) == 4 and not np.array_equal(
        ims["alpha0.0_beta0.0_g3.0.npy"], ims["alpha0.0_beta1.0_g3.0.npy"]
    )
    assert not np.array_equal(ims["alpha0.0_beta1.0_g3.0.npy"], ims["alpha0.5_beta1.0_g3.0.npy"])

    capsys.readouterr()
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err  # never overwritten silently
    assert main([*args, "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["rows"] == m["rows"]
    assert main([*args[:-2], "--seed", "1", "--device", "cpu", "--resume"]) == 2
    # a truncated image file (a crash of the disk) is made again, not a traceback; "out/" is "out"
    f = out / "images" / "alpha0.5_beta1.0_g3.0.npy"
    good = f.read_bytes()
    f.write_bytes(good[:50])
    resumed = [a if a != str(out) else str(out) + "/" for a in args]
    assert main([*resumed, "--resume"]) == 0
    assert f.read_bytes() == good
    assert json.loads((out / "metrics.json").read_text())["rows"] == m["rows"]
    assert (out / ".selfnpo-run").read_text().strip() == "sweep"
