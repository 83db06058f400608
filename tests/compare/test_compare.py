"""``selfnpo compare``: guidance rules through the NPO hook, settings, the table, resume, the report."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from selfnpo import cli
from selfnpo.compare.hook import RuleHook
from selfnpo.compare.settings import parse_setting, parse_settings, slug
from selfnpo.errors import SelfNPOError
from selfnpo.models.loading import load_pipeline
from selfnpo.npo import NPOGuidance

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789,.")


@pytest.fixture(scope="module")
def pipe(tiny_sd):
    return load_pipeline(tiny_sd, device="cpu", dtype="fp32")


def _latents(pipe, g=3.0, steps=4, **kw):
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    out = pipe(
        ["a red circle", "green star"],
        guidance_scale=g,
        num_inference_steps=steps,
        generator=gens,
        output_type="latent",
        **kw,
    )
    return out.images


def _ruled(pipe, name, args, **kw):
    with NPOGuidance(pipe, rule=RuleHook(name, args, pipe.scheduler), **kw):
        return _latents(pipe)


# ---- every rule reduces to plain CFG where its paper says, on whole images -------------------
# Through the hook the pipeline forms neg + g (pos' - neg) with pos' = neg + (r - neg) / g, which
# equals r up to float32 rounding: final latents agree to rtol = atol = 1e-5, not bit for bit.
@pytest.mark.parametrize(
    "name,args",
    [
        ("cfg", {}),
        ("cfg_rescale", {"phi": 0.0}),  # rescale 0
        ("apg", {"eta": 1.0, "norm_threshold": 0.0, "momentum": 0.0}),  # no projection
        ("interval", {"t_lo": 0.0, "t_hi": float("inf")}),  # an interval covering every step
        ("cfg_zero_star", {"zero_init_steps": 0, "use_optimized_scale": 0}),  # s* = 1, no zero-init
    ],
)
def test_rule_through_hook_reduces_to_plain_cfg(pipe, name, args):
    plain = _latents(pipe)
    ruled = _ruled(pipe, name, args)
    torch.testing.assert_close(ruled, plain, rtol=1e-5, atol=1e-5)


def test_rules_change_the_images_where_they_should(pipe):
    plain = _latents(pipe)
    for name, args in [
        ("apg", {"eta": 0.0, "norm_threshold": 0.0, "momentum": 0.0}),
        ("cfg_zero_star", {"zero_init_steps": 1, "use_optimized_scale": 1}),
        ("cfg_rescale", {"phi": 0.7}),
    ]:
        assert (_ruled(pipe, name, args) - plain).abs().max() > 1e-3, name


def test_rescale_through_hook_equals_diffusers_guidance_rescale(pipe):
    torch.testing.assert_close(
        _ruled(pipe, "cfg_rescale", {"phi": 0.7}), _latents(pipe, guidance_rescale=0.7), rtol=1e-5, atol=1e-5
    )


def test_interval_covering_no_step_is_the_conditional_branch(pipe):
    ruled = _ruled(pipe, "interval", {"t_lo": 1e6, "t_hi": 2e6})
    torch.testing.assert_close(ruled, _latents(pipe, g=1.0), rtol=1e-5, atol=1e-5)


def test_rule_combines_with_an_offset(pipe, sd_lora):
    with NPOGuidance(pipe, negative=sd_lora, beta=1.0):
        npo = _latents(pipe)
    ruled = _ruled(pipe, "cfg", {}, negative=sd_lora, beta=1.0)
    torch.testing.assert_close(ruled, npo, rtol=1e-5, atol=1e-5)
    apg = _ruled(
        pipe, "apg", {"eta": 0.0, "norm_threshold": 0.0, "momentum": 0.0}, negative=sd_lora, beta=1.0
    )
    assert (apg - npo).abs().max() > 1e-3


def test_v_prediction_model_reduces_too(tiny_dir):
    p = load_pipeline(str(tiny_dir / "sd_v"), device="cpu", dtype="fp32")
    ruled = _ruled(p, "apg", {"eta": 1.0, "norm_threshold": 0.0, "momentum": 0.0})
    torch.testing.assert_close(ruled, _latents(p), rtol=1e-5, atol=1e-5)


def test_sdxl_reduces_too(tiny_sdxl):
    p = load_pipeline(tiny_sdxl, device="cpu", dtype="fp32")
    ruled = _ruled(p, "interval", {"t_lo": 0.0, "t_hi": float("inf")})
    torch.testing.assert_close(ruled, _latents(p), rtol=1e-5, atol=1e-5)


def test_autoguidance_offset_reproduces_the_weak_weights(pipe, tiny_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from selfnpo.compare.run import autoguidance_offset
    from selfnpo.offsets import canonical_params, load_full_delta

    weak_dir = _weak_model(tiny_dir)
    path = autoguidance_offset(pipe, str(weak_dir), tmp_path / "ag.safetensors")
    delta = load_full_delta(path, pipe.unet)
    weak = dict(UNet2DConditionModel.from_pretrained(weak_dir, subfolder="unet").named_parameters())
    base = {k: p for k, (_, p) in canonical_params(pipe.unet).items()}
    for k, d in delta.items():
        torch.testing.assert_close(base[k] + d, weak[k], rtol=0, atol=1e-6)


# ---- settings ----------------------------------------------------------------------------------
def test_setting_syntax():
    s = parse_setting("mine=self_npo:runs/a/offset:0.5+apg:0:15:-0.5")
    assert (s.label, s.negative, s.offset, s.beta, s.rule) == (
        "mine",
        "self_npo",
        "runs/a/offset",
        0.5,
        "apg",
    )
    assert s.rule_args == {"eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5}
    assert parse_setting("interval:0.5-3").rule_args == {"t_lo": 0.5, "t_hi": 3.0}
    assert parse_setting("cfg_rescale").rule_args == {"phi": 0.7}
    assert parse_setting("diffusion_npo:x/y.safetensors").label == "diffusion_npo"
    assert parse_setting("pag").pag_scale == 3.0
    labels = [s.label for s in parse_settings("cfg,apg,self_npo:o:1+cfg_zero_star:0")]
    assert labels == ["cfg", "apg", "self_npo:1+cfg_zero_star:0"]


def test_settings_from_json(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(
        json.dumps(["cfg", {"label": "odd, path", "negative": "npo", "offset": "a:b+c,d", "rule": "apg"}])
    )
    a, b = parse_settings(str(f))
    assert a.label == "cfg" and (b.offset, b.rule_args["eta"]) == ("a:b+c,d", 0.0)


@pytest.mark.parametrize(
    "spec",
    [
        "nope",
        "apg:x",
        "pag+apg",
        "cfg,cfg",
        "interval:5-1",
        "self_npo",
        "apg+cfg_rescale",
        "apg:1:2:3:4",
        "negative_prompt:x",
    ],
)
def test_bad_settings_raise_one_line(spec):
    with pytest.raises(SelfNPOError) as e:
        parse_settings(spec)
    assert "\n" not in str(e.value)


# ---- the command -------------------------------------------------------------------------------
def _weak_model(tiny_dir):
    weak = tiny_dir / "weak"
    if not weak.exists():
        from selfnpo.models.tiny import build_tiny_pipeline

        build_tiny_pipeline("sd", tiny_dir / "tokenizer", seed=7).save_pretrained(weak)
    return weak


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel (CLIP-score format) with a character tokenizer in CLIP's id order."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("clip")
    tokens = CHARS + [c + "</w>" for c in CHARS] + ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    torch.manual_seed(0)
    text = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    text |= dict(
        max_position_embeddings=77,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _pickscore(clip_dir):
    return [
        "--models",
        "pickscore",
        "--pickscore-model",
        str(clip_dir),
        "--pickscore-tokenizer",
        str(clip_dir),
    ]


def _compare(tmp_path, tiny_sd, prompts, settings, *extra, out="out"):
    argv = ["compare", "--quiet", "--model", tiny_sd, "--prompts", str(prompts), "--settings", settings]
    argv += ["--steps", "2", "--output-dir", str(tmp_path / out), "--batch-size", "2", *extra]
    return cli.main(argv)


def _read_table(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_compare_writes_a_well_formed_table(
    tmp_path, tiny_sd, tiny_dir, sd_lora, prompts_file, clip_dir, capsys
):
    weak = _weak_model(tiny_dir)
    settings = (
        f"cfg,apg,cfg_rescale:0.5,interval:0.5-8,cfg_zero_star,pag:2,autoguidance:{weak},negative_prompt,"
    )
    settings += f"self_npo:{sd_lora},self_npo:{sd_lora}:0.5+apg,again=cfg"
    extra = [
        *_pickscore(clip_dir),
        "--negative-prompt",
        "blurry",
        "--num-images-per-prompt",
        "2",
    ]
    assert _compare(tmp_path, tiny_sd, prompts_file, settings, *extra) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    table = _read_table(out / "table.csv")
    labels = [s.label for s in parse_settings(settings)]
    assert [r["setting"] for r in table] == labels
    for i, r in enumerate(table):
        assert int(r["n"]) == 8  # 4 prompts x 2 images
        d, lo, hi = (float(r[f"pickscore_{k}"]) for k in ("diff", "diff_lo", "diff_hi"))
        w, wlo, whi = (float(r[f"pickscore_{k}"]) for k in ("win", "win_lo", "win_hi"))
        assert lo <= d <= hi and 0 <= wlo <= w <= whi <= 1
        if i == 0:
            assert (d, lo, hi, w) == (0.0, 0.0, 0.0, 0.5)
    md = (out / "table.md").read_text().splitlines()
    assert len(md) == 2 + len(labels) and all(f"| {lab} |" in "\n".join(md) for lab in labels[1:3])
    svg = ET.fromstring((out / "winrates.svg").read_text())
    assert (
        svg.tag.endswith("svg") and len(svg.findall(".//{http://www.w3.org/2000/svg}rect")) >= len(labels) - 1
    )
    # settings that change the images change the scores (random weights: any change shows)
    changed = {r["setting"] for r in table if float(r["pickscore_diff"]) != 0}
    assert {"apg", "pag:2", "autoguidance", "negative_prompt", "self_npo"} <= changed
    # after PAG, offsets and rules, plain CFG on the shared pipeline gives the same images again
    assert (table[-1]["pickscore_diff"], table[-1]["pickscore_win"]) == ("0.0", "0.5")
    first, again = (sorted((out / "images" / slug(lab)).glob("*.png")) for lab in ("cfg", "again"))
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["label"] for s in metrics["settings"]] == labels
    assert "Win rate against cfg" in (out / "report.html").read_text()


def test_resume_skips_finished_images(tmp_path, tiny_sd, prompts_file, capsys):
    assert _compare(tmp_path, tiny_sd, prompts_file, "cfg,apg", "--batch-size", "1") == 0
    folders = sorted((tmp_path / "out" / "images").iterdir())
    pngs = sorted(p for f in folders for p in f.glob("*.png"))
    assert len(pngs) == 8
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in pngs}
    removed = pngs[5]
    removed.unlink()
    assert _compare(tmp_path, tiny_sd, prompts_file, "cfg,apg", "--batch-size", "1", "--resume") == 0
    for p, (mtime, data) in before.items():
        assert p.read_bytes() == data  # the regenerated image is the same image
        if p != removed:
            assert p.stat().st_mtime_ns == mtime  # finished images were not generated again
    # a setting added on resume is generated; changed image options are refused
    assert (
        _compare(tmp_path, tiny_sd, prompts_file, "cfg,apg,cfg_rescale", "--batch-size", "1", "--resume") == 0
    )
    assert len(_read_table(tmp_path / "out" / "table.csv")) == 3
    capsys.readouterr()
    assert _compare(tmp_path, tiny_sd, prompts_file, "cfg", "--resume", "--seed", "3") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "seed" in err
    assert _compare(tmp_path, tiny_sd, prompts_file, "cfg") == 2  # exists, no --resume


@pytest.mark.parametrize(
    "settings,expect",
    [
        ("cfg,nonsense", "unknown part"),
        ("cfg,self_npo:/no/such/offset", "not found"),
        ("cfg,autoguidance:/no/such/model", "no such model"),
        ("cfg,pag+apg", "pag runs alone"),
        ("cfg,apg:notanumber", "must be numbers"),
        ("a=cfg,a=apg", "appears twice"),
    ],
)
def test_bad_settings_exit_2_with_one_line(tmp_path, tiny_sd, prompts_file, capsys, settings, expect):
    assert _compare(tmp_path, tiny_sd, prompts_file, settings) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err and err.startswith("selfnpo compare: error:")
    assert not (tmp_path / "out").exists()  # nothing was written


def test_help_explains_every_option(capsys):
    from selfnpo.compare.run import CompareConfig

    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    text = capsys.readouterr().out
    for name, f in CompareConfig.__dataclass_fields__.items():
        assert ("--" + name.replace("_", "-") in text) == bool(f.metadata.get("help")), name


def test_world_metrics_on_the_embedded_model(tmp_path, capsys):
    argv = ["compare", "--quiet", "--prompts", "world:3", "--settings", "cfg,apg", "--steps", "2"]
    assert cli.main([*argv, "--guidance-scale", "3", "--output-dir", str(tmp_path / "w")]) == 0, (
        capsys.readouterr().err
    )
    row = _read_table(tmp_path / "w" / "table.csv")[1]
    assert {"world_alignment_mean", "world_reward_win_lo"} <= set(row) and int(row["n"]) == 3
    fd, lo, hi = (float(row[k]) for k in ("world_frechet", "world_frechet_lo", "world_frechet_hi"))
    assert 0 <= lo <= fd <= hi
    assert "world Frechet" in (tmp_path / "w" / "table.md").read_text()


# ---- the report ------------------------------------------------------------------------------
EVIL = [
    "<img src=x onerror=\"document.title='pwned'\">",
    "<script>document.title='pwned'</script> a red circle",
]


@pytest.fixture(scope="module")
def evil_report(tmp_path_factory, tiny_sd, clip_dir):
    tmp = tmp_path_factory.mktemp("evil")
    prompts = tmp / "evil.txt"
    prompts.write_text("\n".join(EVIL) + "\n")
    extra = _pickscore(clip_dir)
    assert _compare(tmp, tiny_sd, prompts, "cfg,apg,<b>x</b>=cfg_rescale", *extra) == 0
    return tmp / "out" / "report.html"


def test_report_escapes_prompts(evil_report):
    page = evil_report.read_text()
    assert "<script" not in page and "<img src=x" not in page and "<b>x</b>" not in page
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in page
    md = (evil_report.parent / "table.md").read_text()
    assert "| <b>x</b> |" in md  # markdown keeps the label as the user wrote it


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    return exe


def test_report_in_headless_chromium(evil_report, tmp_path):
    exe = _chromium()
    url = evil_report.resolve().as_uri()
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert "<title>selfnpo compare</title>" in dom and "pwned" not in dom.split("<body>")[0]
    assert "&lt;script&gt;document.title=" in dom  # the prompt is text, not a script
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1300,2000", url], capture_output=True, timeout=120
    )
    from PIL import Image

    im = np.asarray(Image.open(shot).convert("RGB"))
    assert im.shape[:2] == (2000, 1300) and im.std() > 5  # something rendered, not a blank page
