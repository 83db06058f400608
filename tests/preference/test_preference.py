"""Diffusion-DPO / Diffusion-NPO losses, preference pair files, reward objectives."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from selfnpo import cli
from selfnpo.errors import SelfNPOError
from selfnpo.objectives.base import Batch, StepContext, get_objective
from selfnpo.objectives.dpo import dpo_logit, dpo_loss
from selfnpo.preference.pairs import PairRecord, PairSource, load_pair_latents, read_pairs, write_pairs

# ---- the loss on fixed numbers ------------------------------------------------------------------

MW, ML, RW, RL = (
    torch.tensor([0.30, 0.10, 0.52]),
    torch.tensor([0.25, 0.40, 0.50]),
    torch.tensor([0.28, 0.20, 0.49]),
    torch.tensor([0.27, 0.30, 0.51]),
)


def _independent(mw: float, ml: float, rw: float, rl: float, beta: float, convention: str) -> float:
    # written out from the two reference implementations' formulas, in plain floats
    if convention == "original":
        z = -0.5 * beta * ((mw - ml) - (rw - rl))
    else:
        z = beta * ((rw - rl) - (mw - ml))
    return math.log1p(math.exp(-z))  # -log sigmoid(z)


@pytest.mark.parametrize("convention", ["original", "diffusers"])
@pytest.mark.parametrize("beta", [1.0, 25.0])
def test_dpo_loss_matches_an_independent_computation(convention, beta):
    got = dpo_loss(MW.double(), ML.double(), RW.double(), RL.double(), beta, convention)
    want = [_independent(*(float(v[i]) for v in (MW, ML, RW, RL)), beta, convention) for i in range(len(MW))]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-9)


def test_diffusers_convention_is_the_original_at_twice_the_beta():
    assert torch.allclose(dpo_logit(MW, ML, RW, RL, 3.0, "diffusers"), dpo_logit(MW, ML, RW, RL, 6.0))
    with pytest.raises(ValueError, match="convention"):
        dpo_logit(MW, ML, RW, RL, 1.0, "other")


def test_reversing_the_pairs_flips_the_sign_of_the_preference_term():
    assert torch.equal(dpo_logit(ML, MW, RL, RW, 7.0), -dpo_logit(MW, ML, RW, RL, 7.0))
    # at the reference (model == ref) the loss is log 2 whatever the pair order
    assert torch.allclose(dpo_loss(RW, RL, RW, RL, 100.0), torch.full((3,), math.log(2.0)))


# ---- DPO and NPO on an analytic Gaussian mixture ------------------------------------------------


def _mixture_eps(x_t, a, s, logit):
    """Exact eps-prediction E[eps | x_t] of the 1-D mixture w*N(+2, .5^2) + (1-w)*N(-2, .5^2),
    w = sigmoid(logit): a denoiser whose only parameter is the mass on the + mode."""
    mus, s0 = torch.tensor([2.0, -2.0], dtype=x_t.dtype), 0.5
    w = torch.sigmoid(logit)
    logw = torch.stack([w, 1 - w]).log()
    var = a**2 * s0**2 + s**2
    logp = logw - 0.5 * (x_t[:, None] - a[:, None] * mus) ** 2 / var[:, None]
    r = torch.softmax(logp, dim=1)
    x0_k = mus + (a * s0**2 / var)[:, None] * (x_t[:, None] - a[:, None] * mus)
    x0_hat = (r * x0_k).sum(1)
    return (x_t - a * x0_hat) / s


def _train_mass(reverse: bool, steps: int = 150) -> float:
    g = torch.Generator().manual_seed(0)
    logit = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([logit], lr=0.5)
    for _ in range(steps):
        n = 64
        x_w = 2.0 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)  # winners: the + mode
        x_l = -2.0 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)  # losers: the - mode
        if reverse:
            x_w, x_l = x_l, x_w
        ab = torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01  # alpha_bar_t
        a, s = ab.sqrt(), (1 - ab).sqrt()
        eps = torch.randn(n, generator=g, dtype=torch.float64)
        errs = {}
        for name, x0 in (("w", x_w), ("l", x_l)):
            xt = a * x0 + s * eps
            errs[name] = (_mixture_eps(xt, a, s, logit) - eps) ** 2
            errs["r" + name] = (
                (_mixture_eps(xt, a, s, torch.zeros((), dtype=torch.float64)) - eps) ** 2
            ).detach()
        loss = dpo_loss(errs["w"], errs["l"], errs["rw"], errs["rl"], beta=2.0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(torch.sigmoid(logit.detach()))


def test_dpo_moves_mass_to_the_winners_and_npo_to_the_losers():
    w_dpo, w_npo = _train_mass(reverse=False), _train_mass(reverse=True)
    assert w_dpo > 0.6, w_dpo  # started at 0.5
    assert w_npo < 0.4, w_npo


# ---- the objectives on a tiny model -------------------------------------------------------------


def _ctx(pipe, cfg_kw, seed=0, reward=None):
    from selfnpo.models.sd import DiffusionModel
    from selfnpo.training.config import TrainConfig
    from selfnpo.training.offset import TrainableOffset

    cfg = TrainConfig(model="x", prompts="p", train="lora", lora_rank=2, **cfg_kw)
    model = DiffusionModel(pipe)
    torch.manual_seed(0)
    off = TrainableOffset(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    return StepContext(model, off.student, off.teacher, cfg, gen, offset=off, reward=reward), model, off


def test_dpo_and_reversed_pairs_are_sigmoid_complements(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    losses = {}
    for name in ("dpo", "dpo_npo"):
        ctx, model, off = _ctx(pipe, {"objective": name, "dpo_beta": 50.0, "pairs": "p"})
        # move the student away from the reference so the logit is not 0
        with torch.no_grad():
            for p in off.params:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        g = torch.Generator().manual_seed(3)
        x_w, x_l = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        batch = Batch(["a red circle", "blue star"], model.encode(["a red circle", "blue star"]), x_w, x_l)
        losses[name] = get_objective(name)(ctx, batch).detach()
        pipe.unet.delete_adapters(list(pipe.unet.peft_config))
    # same t and noise: z_npo = -z_dpo, so sigmoid(z) + sigmoid(-z) = 1
    total = torch.exp(-losses["dpo"]) + torch.exp(-losses["dpo_npo"])
    assert torch.allclose(total, torch.ones(2), atol=1e-5), total
    assert not torch.allclose(losses["dpo"], losses["dpo_npo"])


def test_reward_and_reward_npo_losses_sum_to_minus_one(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)

    def toy_reward(images, prompts):  # differentiable, in (0, 1)
        return torch.sigmoid(images.mean(dim=(1, 2, 3)) * 3)

    out = {}
    for name in ("reward", "reward_npo"):
        kw = {"objective": name, "reward_steps": 3, "reward_grad_steps": 1, "reward_guidance": 2.0}
        ctx, model, off = _ctx(pipe, kw, reward=toy_reward)
        batch = Batch(["a red circle"], model.encode(["a red circle"]))
        loss = get_objective(name)(ctx, batch)
        loss.sum().backward()
        grads = [p.grad for p in off.params if p.grad is not None]
        out[name] = (loss.detach(), sum(float(g.abs().sum()) for g in grads))
        pipe.unet.delete_adapters(list(pipe.unet.peft_config))
    assert torch.allclose(out["reward"][0] + out["reward_npo"][0], torch.full((1,), -1.0), atol=1e-6)
    assert out["reward"][1] > 0 and out["reward_npo"][1] > 0  # gradients reach the LoRA weights


# ---- pair files ---------------------------------------------------------------------------------


def _img(path, size=(16, 16), colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _pair_folder(tmp_path, n=3, **override):
    folder = tmp_path / "pairs"
    recs = []
    for i in range(n):
        _img(folder / f"images/{i}_w.png", colour=(200, 10 * i, 10))
        _img(folder / f"images/{i}_l.png", colour=(10, 10 * i, 200))
        recs.append(
            PairRecord(f"prompt {i}", f"images/{i}_w.png", f"images/{i}_l.png", 0.9, 0.1, 2 * i, 2 * i + 1)
        )
    write_pairs(folder, recs)
    return folder, recs


def test_pair_file_round_trip(tmp_path):
    folder, recs = _pair_folder(tmp_path)
    assert read_pairs(folder) == recs
    assert read_pairs(folder / "pairs.jsonl") == recs


def test_pair_source_uses_stored_latents_or_encodes_images(tmp_path, tiny_sd):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from selfnpo.models.sd import DiffusionModel

    model = DiffusionModel(StableDiffusionPipeline.from_pretrained(tiny_sd))
    folder, recs = _pair_folder(tmp_path)
    prompts, w, l = load_pair_latents(folder, model, 16)
    assert prompts == [r.prompt for r in recs] and w.shape == l.shape == (3, 4, 8, 8)
    assert not torch.allclose(w, l)  # red winners, blue losers
    stored = {"winner": torch.randn(3, 4, 8, 8), "loser": torch.randn(3, 4, 8, 8)}
    save_file(stored, str(folder / "latents.safetensors"))
    _, w2, l2 = load_pair_latents(folder, model, 16)
    assert torch.equal(w2, stored["winner"]) and torch.equal(l2, stored["loser"])
    src = PairSource(prompts, w2, l2)
    ps, (bw, bl) = src.sample(torch.Generator().manual_seed(0), 5)
    for p, x, y in zip(ps, bw, bl, strict=True):
        i = prompts.index(p)
        assert torch.equal(x, w2[i]) and torch.equal(y, l2[i])


def _edit_first_line(folder, **fields):
    f = folder / "pairs.jsonl"
    lines = f.read_text().splitlines()
    rec = json.loads(lines[0])
    rec.update(fields)
    rec = {k: v for k, v in rec.items() if v is not None}
    f.write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: _edit_first_line(d, winner="images/none.png"), "images/none.png not found"),
        (lambda d: _edit_first_line(d, colour="red"), "unknown field 'colour'"),
        (lambda d: _edit_first_line(d, loser=None), "missing or empty field 'loser'"),
        (lambda d: _edit_first_line(d, winner_score="high"), "must be a number"),
        (lambda d: (d / "pairs.jsonl").write_text("{not json\n"), "not valid JSON"),
        (lambda d: (d / "pairs.jsonl").write_text("\n"), "no preference pairs"),
        (lambda d: (d / "pairs.jsonl").unlink(), "pair file not found"),
    ],
)
def test_bad_pair_files_give_one_line_errors(tmp_path, damage, message):
    folder, _ = _pair_folder(tmp_path)
    damage(folder)
    with pytest.raises(SelfNPOError, match=message) as e:
        read_pairs(folder)
    assert "\n" not in str(e.value)


def test_mismatched_pair_sizes_are_refused(tmp_path, tiny_sd):
    from diffusers import StableDiffusionPipeline

    from selfnpo.models.sd import DiffusionModel

    folder, _ = _pair_folder(tmp_path)
    _img(folder / "images/0_l.png", size=(24, 16))
    model = DiffusionModel(StableDiffusionPipeline.from_pretrained(tiny_sd))
    with pytest.raises(SelfNPOError, match=r"pair 1: winner and loser sizes differ"):
        load_pair_latents(folder, model, 16)


def test_train_cli_with_a_bad_pair_file_exits_2_and_writes_nothing(tmp_path, tiny_sd, capsys):
    folder, _ = _pair_folder(tmp_path)
    _edit_first_line(folder, extra=1)
    out = tmp_path / "run"
    rc = cli.main(
        [
            "train",
            "--model",
            tiny_sd,
            "--objective",
            "dpo",
            "--pairs",
            str(folder),
            "--output-dir",
            str(out),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "unknown field 'extra'" in err and "\n" not in err
    rc = cli.main(
        ["train", "--model", tiny_sd, "--objective", "dpo_npo", "--output-dir", str(out), "--quiet"]
    )
    assert rc == 2 and "needs --pairs" in capsys.readouterr().err
    assert not (out / "offset").exists()


def test_dpo_training_runs_on_pairs_and_only_changes_the_student(tmp_path, tiny_sd):
    from conftest import train_tiny

    folder, _ = _pair_folder(tmp_path)
    res = train_tiny(tiny_sd, tmp_path / "run", "", objective="dpo_npo", pairs=str(folder), resolution=16)
    assert res.steps == 2 and res.offset_path.is_file() and math.isfinite(res.final_loss)
    meta = json.loads((res.run_dir / "config.json").read_text())
    assert meta["objective"] == "dpo_npo" and meta["dpo_beta_convention"] == "original"


# ---- building pairs and Pick-a-Pic --------------------------------------------------------------


def test_pairs_command_ranks_two_images_per_prompt_by_reward(tmp_path, capsys):
    out = tmp_path / "p"
    rc = cli.main(["pairs", "--num-prompts", "4", "--steps", "2", "--output-dir", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    recs = read_pairs(out)
    meta = json.loads((out / "pairs_meta.json").read_text())
    assert (
        meta["pairs"] == len(recs) == 4 and meta["network_evals"] == 4 * 2 * 2 * 2
    )  # 2 images, 2 steps, CFG
    for r in recs:
        assert r.winner_score > r.loser_score
        assert {r.winner_seed, r.loser_seed} in ({0, 1}, {2, 3}, {4, 5}, {6, 7})
    # the stored latents are the ones that were scored: re-scoring the decoded winners agrees
    from safetensors.torch import load_file

    from selfnpo.models.loading import load_pipeline
    from selfnpo.models.sd import DiffusionModel
    from selfnpo.rewards import get_reward
    from selfnpo.world.model import shipped_model_dir

    model = DiffusionModel(load_pipeline(str(shipped_model_dir()), device="cpu", dtype="fp32"))
    lat = load_file(str(out / "latents.safetensors"))
    with torch.no_grad():
        r = get_reward("world")(model.decode_latents(lat["winner"]), [x.prompt for x in recs])
    assert torch.allclose(r, torch.tensor([x.winner_score for x in recs]), rtol=1e-4, atol=1e-7)
    rc = cli.main(["pairs", "--num-prompts", "4", "--steps", "2", "--output-dir", str(out), "--quiet"])
    assert rc == 2 and "exists" in capsys.readouterr().err  # nothing overwritten
    assert read_pairs(out) == recs


def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_pickapic_parquet_converts_to_pairs_and_drops_ties(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    red, blue, green = _jpeg((250, 0, 0)), _jpeg((0, 0, 250)), _jpeg((0, 250, 0))
    table = pa.table(
        {
            "caption": ["a red thing", "a tie", "a green thing"],
            "jpg_0": [red, red, blue],
            "jpg_1": [blue, blue, green],
            "label_0": [1.0, 0.5, 0.0],
            "label_1": [0.0, 0.5, 1.0],
        }
    )
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "train-0.parquet")
    out = tmp_path / "pp"
    rc = cli.main(["import-pickapic", "--input", str(tmp_path / "data"), "--output-dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    recs = read_pairs(out)
    assert [r.prompt for r in recs] == ["a red thing", "a green thing"]
    assert (out / recs[0].winner).read_bytes() == red and (out / recs[1].winner).read_bytes() == green
    assert json.loads((out / "pairs_meta.json").read_text())["ties_or_unlabelled_dropped"] == 1
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "bad.parquet")
    rc = cli.main(
        ["import-pickapic", "--input", str(tmp_path / "bad.parquet"), "--output-dir", str(tmp_path / "q")]
    )
    assert rc == 2 and "not the Pick-a-Pic layout" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
