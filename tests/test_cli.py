"""Bad input through the command line: one line on stderr, exit code 2, nothing overwritten."""

from __future__ import annotations

import errno
import json
import time

import pytest
import torch
from safetensors.torch import save_file

from selfnpo import cli


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def _bad_model_folder(tmp_path):
    d = tmp_path / "flux"
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideoPipeline"}))
    return str(d)


def _no_index(tmp_path):
    d = tmp_path / "empty_model"
    d.mkdir()
    return str(d)


def _write(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def _write_model_index(tmp_path, data: bytes):
    d = tmp_path / "model"
    d.mkdir()
    (d / "model_index.json").write_bytes(data)
    return str(d)


def _wrong_pipeline(tmp_path, model):
    import shutil

    d = tmp_path / "relabelled"
    shutil.copytree(model, d)
    index = json.loads((d / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (d / "model_index.json").write_text(json.dumps(index))
    return str(d)


def _pickle_model(tmp_path, model):
    import shutil

    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    shutil.copytree(model, d)
    for f in (d / "unet").glob("*.safetensors"):
        torch.save(load_file(str(f)), f.with_suffix(".bin"))
        f.unlink()
    return str(d)


TRAIN_CASES = {
    "missing model folder": (
        lambda t, m, p: ["--model", str(t / "nope"), "--prompts", p],
        "no such model folder",
    ),
    "folder without model_index.json": (
        lambda t, m, p: ["--model", _no_index(t), "--prompts", p],
        "no model_index.json",
    ),
    "unsupported pipeline class": (
        lambda t, m, p: ["--model", _bad_model_folder(t), "--prompts", p],
        "HunyuanVideoPipeline is not supported",
    ),
    "hub id while offline": (
        lambda t, m, p: ["--model", "someone/some-model", "--prompts", p],
        "HF_HUB_OFFLINE",
    ),
    "missing prompt file": (
        lambda t, m, p: ["--model", m, "--prompts", str(t / "none.txt")],
        "prompt file not found",
    ),
    "empty prompt file": (
        lambda t, m, p: ["--model", m, "--prompts", _write(t, "e.txt", b"\n \n")],
        "holds no prompts",
    ),
    "non-UTF-8 prompt file": (
        lambda t, m, p: ["--model", m, "--prompts", _write(t, "b.txt", b"ok\n\xff\xfe\n")],
        "not UTF-8",
    ),
    "bad jsonl prompt file": (
        lambda t, m, p: ["--model", m, "--prompts", _write(t, "b.jsonl", b"[1]\n")],
        "'prompt' field",
    ),
    "K larger than the grid": (
        lambda t, m, p: ["--model", m, "--prompts", p, "--k-steps", "30"],
        "larger than the grid",
    ),
    "zero steps": (
        lambda t, m, p: ["--model", m, "--prompts", p, "--steps", "0"],
        "--steps must be",
    ),
    "negative learning rate": (
        lambda t, m, p: ["--model", m, "--prompts", p, "--lr", "-1"],
        "--lr must be",
    ),
    "absurd learning rate": (
        lambda t, m, p: ["--model", m, "--prompts", p, "--lr", "5"],
        "--lr must be",
    ),
    "EMA decay above one": (
        lambda t, m, p: ["--model", m, "--prompts", p, "--ema-decay", "1.5"],
        "--ema-decay",
    ),
    "unknown objective": (
        lambda t, m, p: ["--model", m, "--prompts", p, "--objective", "magic"],
        "unknown objective",
    ),
    "images source without folder": (
        lambda t, m, p: ["--model", m, "--prompts", p, "--source", "images"],
        "--image-dir",
    ),
    "resume and overwrite": (
        lambda t, m, p: ["--model", m, "--prompts", p, "--resume", "--overwrite"],
        "exclude each other",
    ),
    "NaN max grad norm": (
        lambda t, m, p: ["--model", m, "--prompts", p, "--max-grad-norm", "nan"],
        "--max-grad-norm must be a finite number",
    ),
    "infinite learning rate": (
        lambda t, m, p: ["--model", m, "--prompts", p, "--lr", "inf"],
        "--lr must be a finite number",
    ),
    "negative LoRA alpha": (
        lambda t, m, p: ["--model", m, "--prompts", p, "--lora-alpha", "-8"],
        "--lora-alpha must be >= 0",
    ),
    "resolution too small": (
        lambda t, m, p: ["--model", m, "--prompts", p, "--resolution", "7"],
        "--resolution must be",
    ),
    "resolution not a multiple of the VAE factor": (
        lambda t, m, p: ["--model", m, "--prompts", p, "--resolution", "36"],
        "--resolution must be",
    ),
    "log every zero": (
        lambda t, m, p: ["--model", m, "--prompts", p, "--log-every", "0"],
        "--log-every must be >= 1",
    ),
    "seed of 2**63": (
        lambda t, m, p: ["--model", m, "--prompts", p, "--seed", str(2**63)],
        "--seed must be in",
    ),
    "negative seed": (
        lambda t, m, p: ["--model", m, "--prompts", p, "--seed", "-1"],
        "--seed must be in",
    ),
    "no such device": (
        lambda t, m, p: ["--model", m, "--prompts", p, "--device", "tpu"],
        "--device 'tpu': unknown device",
    ),
    "cuda without a GPU": (
        lambda t, m, p: ["--model", m, "--prompts", p, "--device", "cuda"],
        "no CUDA GPU",
    ),
    "LoRA targets the UNet does not have": (
        lambda t, m, p: ["--model", m, "--prompts", p, "--lora-targets", "to_nothing"],
        "--lora-targets 'to_nothing' does not fit",
    ),
    "empty LoRA targets": (
        lambda t, m, p: ["--model", m, "--prompts", p, "--lora-targets", ","],
        "--lora-targets must name",
    ),
    "tsv without a Prompt column": (
        lambda t, m, p: ["--model", m, "--prompts", _write(t, "p.tsv", b"id\ttext\n1\ta cat\n")],
        "needs a 'Prompt' column (found columns 'id', 'text')",
    ),
    "one-column tsv without header": (
        lambda t, m, p: ["--model", m, "--prompts", _write(t, "p.tsv", b"a cat\na dog\n")],
        "needs a 'Prompt' column",
    ),
    "short tsv row": (
        lambda t, m, p: ["--model", m, "--prompts", _write(t, "p.tsv", b"id\tPrompt\n1\ta cat\n2\n")],
        "p.tsv:3: row has 1 column",
    ),
    "JSON null prompt": (
        lambda t, m, p: [
            "--model",
            m,
            "--prompts",
            _write(t, "p.jsonl", b'{"prompt": "ok"}\n{"prompt": null}\n'),
        ],
        "p.jsonl:2: the prompt must be a string",
    ),
    "JSON number prompt in upper-case .JSONL": (
        lambda t, m, p: ["--model", m, "--prompts", _write(t, "P.JSONL", b'{"prompt": 123}\n')],
        "P.JSONL:1: the prompt must be a string",
    ),
    "prompt file is a directory": (
        lambda t, m, p: ["--model", m, "--prompts", str(t)],
        "is a directory",
    ),
    "corrupt model_index.json": (
        lambda t, m, p: ["--model", _write_model_index(t, b"{not json"), "--prompts", p],
        "unreadable model_index.json",
    ),
    "model_index.json naming the wrong pipeline": (
        lambda t, m, p: ["--model", _wrong_pipeline(t, m), "--prompts", p],
        "names StableDiffusionXLPipeline but has no text_encoder_2",
    ),
    "pickle-only model": (
        lambda t, m, p: ["--model", _pickle_model(t, m), "--prompts", p],
        "selfnpo loads safetensors only",
    ),
    "output under a file": (
        lambda t, m, p: [
            "--model",
            m,
            "--prompts",
            p,
            "--output-dir",
            _write(t, "f", b"x") + "/run",
        ],
        "cannot write the output folder",
    ),
}


def test_huge_prompt_file_is_refused(capsys, tmp_path, tiny_sd, monkeypatch):
    import selfnpo.io

    monkeypatch.setattr(selfnpo.io, "MAX_PROMPT_FILE_BYTES", 1000)
    big = _write(tmp_path, "big.txt", b"a prompt\n" * 200)
    rc, err = _run(
        capsys, "train", "--model", tiny_sd, "--prompts", big, "--output-dir", str(tmp_path / "run")
    )
    assert rc == 2 and "larger than" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_bad_input(case, capsys, tmp_path, tiny_sd, prompts_file):
    make, needle = TRAIN_CASES[case]
    args = make(tmp_path, tiny_sd, prompts_file)
    if "--output-dir" not in args:
        args += ["--output-dir", str(tmp_path / "run")]
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, err = (
        _run(capsys, "train", "--quiet", "--steps", "1", *args)
        if "--steps" not in args
        else _run(capsys, "train", "--quiet", *args)
    )
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("selfnpo train: error:"), err
    assert needle in err, err
    assert not (tmp_path / "run").exists()  # nothing was created for a rejected job


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _user_folder(tmp_path, tiny_sd):
    """Folders selfnpo did not write: notes beside a config.json, and a diffusers model's unet/."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "config.json").write_text("{}")
    (notes / "notes.txt").write_text("mine")
    import shutil

    unet = tmp_path / "unet"
    shutil.copytree(f"{tiny_sd}/unet", unet)
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    return [notes, unet, only_config]


@pytest.mark.parametrize("flag", [[], ["--overwrite"], ["--resume"]])
def test_train_never_touches_a_folder_it_did_not_write(flag, capsys, tmp_path, tiny_sd, prompts_file):
    for folder in _user_folder(tmp_path, tiny_sd):
        before = _snapshot(folder)
        rc, err = _run(
            capsys, "train", "--quiet", "--model", tiny_sd, "--prompts", prompts_file, "--steps", "1",
            "--output-dir", str(folder), *flag,
        )  # fmt: skip
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert "not written by selfnpo" in err and "choose another --output-dir" in err, err
        assert _snapshot(folder) == before


def _train_args(tiny_sd, prompts_file, run, *extra):
    return [
        "train", "--quiet", "--model", tiny_sd, "--prompts", prompts_file, "--output-dir", str(run),
        "--steps", "1", "--batch-size", "2", "--pool-size", "2", "--grid-steps", "5", "--k-steps", "1",
        "--checkpoint-every", "0", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "typo",
    [
        ["--lr", "nan"],
        ["--prompts-typo"],
        ["--model", "/nonexistent/model"],
        ["--device", "tpu"],
        ["--objective", "magic"],
    ],
)
def test_overwrite_checks_the_new_settings_before_removing_the_old_run(
    typo, capsys, tmp_path, tiny_sd, prompts_file
):
    run = tmp_path / "run"
    assert _run(capsys, *_train_args(tiny_sd, prompts_file, run))[0] == 0
    assert (run / ".selfnpo-run").read_text().strip() == "train"
    before = _snapshot(run)
    args = _train_args(tiny_sd, prompts_file, run, "--overwrite")
    if typo == ["--prompts-typo"]:
        args[args.index("--prompts") + 1] = str(tmp_path / "promts.txt")
    else:
        args += typo
    rc, err = _run(capsys, *args)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert _snapshot(run) == before  # the old run is intact
    assert _run(capsys, *_train_args(tiny_sd, prompts_file, run, "--overwrite", "--seed", "3"))[0] == 0
    assert json.loads((run / "config.json").read_text())["seed"] == 3


def test_run_folders_of_earlier_versions_are_still_recognised(capsys, tmp_path, tiny_sd, prompts_file):
    run = tmp_path / "run"
    assert _run(capsys, *_train_args(tiny_sd, prompts_file, run))[0] == 0
    (run / ".selfnpo-run").unlink()  # as written before the marker existed
    (run / ".selfnpo-lock").unlink()
    assert _run(capsys, *_train_args(tiny_sd, prompts_file, run, "--overwrite"))[0] == 0
    assert (run / ".selfnpo-run").is_file()
    other = tmp_path / "gen"
    other.mkdir()
    (other / ".selfnpo-run").write_text("generate\n")
    rc, err = _run(capsys, *_train_args(tiny_sd, prompts_file, other, "--overwrite"))
    assert rc == 2 and "selfnpo generate folder" in err and (other / ".selfnpo-run").is_file()


def test_a_failed_run_leaves_no_folder_that_blocks_the_rerun(capsys, tmp_path, tiny_sd, prompts_file):
    run = tmp_path / "run"
    rc, err = _run(capsys, *_train_args(tiny_sd, prompts_file, run, "--lora-targets", "no_such_layer"))
    assert rc == 2 and len(err.splitlines()) == 1 and "--lora-targets 'no_such_layer'" in err, err
    assert not run.exists()
    assert _run(capsys, *_train_args(tiny_sd, prompts_file, run))[0] == 0


def test_import_pickapic_never_replaces_a_folder_it_did_not_write(capsys, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"caption": ["x"], "jpg_0": [b""], "jpg_1": [b""], "label_0": [0.5], "label_1": [0.5]}),
        tmp_path / "in.parquet",
    )
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    rc, err = _run(
        capsys,
        "import-pickapic",
        "--input",
        str(tmp_path / "in.parquet"),
        "--output-dir",
        str(mine),
        "--overwrite",
    )
    assert rc == 2 and "not written by selfnpo" in err
    assert (mine / "thesis.tex").read_text() == "years of work"


@pytest.fixture
def gen_args(tmp_path, tiny_sd):
    return [
        "generate",
        "--quiet",
        "--model",
        tiny_sd,
        "--prompt",
        "a red circle",
        "--steps",
        "2",
        "--output-dir",
        str(tmp_path / "out"),
    ]


def _pickle_file(tmp_path):
    p = tmp_path / "offset.safetensors.bin"
    torch.save({"w": torch.zeros(1)}, p)  # a pickle: must never be loaded
    return str(p)


def _wrong_shape_delta(tmp_path, tiny_sd):
    from selfnpo.offsets import save_full_delta

    p = tmp_path / "full_delta.safetensors"
    save_full_delta(p, {"conv_in.weight": torch.zeros(3, 3)}, {"base_model": "x"})
    return str(p)


def _wrong_model_delta(tmp_path):
    from selfnpo.offsets import save_full_delta

    p = tmp_path / "other" / "full_delta.safetensors"
    save_full_delta(p, {"transformer.blocks.0.weight": torch.zeros(3)}, {"base_model": "x"})
    return str(p)


def _lora_of_other_model(tmp_path):
    p = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    p.parent.mkdir()
    save_file(
        {
            "unet.down_blocks.9.attentions.0.proj.lora_A.weight": torch.zeros(4, 999),
            "unet.down_blocks.9.attentions.0.proj.lora_B.weight": torch.zeros(999, 4),
        },
        str(p),
    )
    return str(p)


GEN_CASES = {
    "missing offset file": (
        lambda t, m: ["--negative-offset", str(t / "no.safetensors")],
        "offset file not found",
    ),
    "pickle offered as weights": (
        lambda t, m: ["--negative-offset", _pickle_file(t)],
        "never loaded",
    ),
    "corrupt safetensors": (
        lambda t, m: [
            "--negative-offset",
            _write(t, "c.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{bad"),
        ],
        "not a readable safetensors",
    ),
    "wrong-shape full delta": (
        lambda t, m: ["--negative-offset", _wrong_shape_delta(t, m)],
        "has shape",
    ),
    "full delta of another model": (
        lambda t, m: ["--negative-offset", _wrong_model_delta(t)],
        "wrong model",
    ),
    "LoRA of another model": (
        lambda t, m: ["--negative-offset", _lora_of_other_model(t)],
        "LoRA does not fit",
    ),
    "offset folder without offset": (lambda t, m: ["--negative-offset", str(t)], "holds no"),
    "prompt and prompts": (lambda t, m: ["--prompts", "x.txt"], "exactly one of"),
    "resolution not a multiple of 8": (lambda t, m: ["--resolution", "17"], "multiple of 8"),
    "unknown scheduler": (lambda t, m: ["--scheduler", "MagicScheduler"], "unknown --scheduler"),
    "absurd guidance": (lambda t, m: ["--guidance-scale", "1000"], "--guidance-scale"),
    "absurd beta": (lambda t, m: ["--beta", "1e9"], "--beta"),
    "NaN guidance scale": (lambda t, m: ["--guidance-scale", "nan"], "--guidance-scale must be a finite"),
    "NaN beta": (lambda t, m: ["--beta", "nan"], "--beta must be a finite"),
    "infinite alpha": (lambda t, m: ["--alpha=-inf"], "--alpha must be a finite"),
    "seed of 2**63": (lambda t, m: ["--seed", str(2**63)], "--seed must be in"),
    "no such device": (lambda t, m: ["--device", "tpu"], "unknown device"),
    "pickle-only model": (lambda t, m: ["--model", _pickle_model(t, m)], "safetensors only"),
    "all-NaN full delta": (lambda t, m: ["--negative-offset", _nan_delta(t, m)], "NaN or infinite"),
}


def _nan_delta(tmp_path, model):
    from selfnpo.offsets import save_full_delta

    p = tmp_path / "nan" / "full_delta.safetensors"
    save_full_delta(p, {"conv_in.weight": torch.full((32, 4, 3, 3), float("nan"))}, {"base_model": model})
    return str(p)


@pytest.mark.parametrize("case", sorted(GEN_CASES))
def test_generate_bad_input(case, capsys, tmp_path, tiny_sd, gen_args):
    make, needle = GEN_CASES[case]
    rc, err = _run(capsys, *gen_args, *make(tmp_path, tiny_sd))
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("selfnpo generate: error:"), err
    assert needle in err, err
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


def test_generate_resume_and_no_overwrite(capsys, tmp_path, gen_args):
    args = [*gen_args, "--num-images-per-prompt", "3", "--batch-size", "2"]
    assert _run(capsys, *args)[0] == 0
    out = tmp_path / "out"
    first = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert sorted(first) == ["00000.png", "00001.png", "00002.png"]
    rc, err = _run(capsys, *args)
    assert rc == 2 and "--resume" in err
    (out / "00001.png").unlink()
    (out / "00002.png").unlink()
    assert _run(capsys, *args, "--resume")[0] == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == first
    rc, err = _run(capsys, *args[:-4], "--num-images-per-prompt", "2", "--resume")
    assert rc == 2 and "different settings" in err


def test_help_explains_every_option(capsys):
    from selfnpo.generate import GenerateConfig
    from selfnpo.training.config import TrainConfig

    for cmd, cls in (("train", TrainConfig), ("generate", GenerateConfig)):
        with pytest.raises(SystemExit):
            cli.main([cmd, "--help"])
        text = capsys.readouterr().out
        for name in cls.__dataclass_fields__:
            if name != "RESUMABLE_CHANGES":
                assert "--" + name.replace("_", "-") in text, name


OTHER_CASES = {
    "merge NaN scale": (["merge", "--model", "M", "--offsets", "off:nan", "--output-dir", "O"], "finite"),
    "merge infinite scale": (
        ["merge", "--model", "M", "--offsets", "off:inf", "--output-dir", "O"],
        "finite",
    ),
    "sweep infinite guidance": (["sweep", "--negative", "x", "--guidance-scales", "3,inf"], "finite"),
    "sweep NaN beta": (["sweep", "--negative", "x", "--betas", "nan"], "finite"),
    "sweep one prompt": (["sweep", "--negative", "x", "--eval-prompts", "1"], "--eval-prompts must be >= 2"),
    "demo NaN guidance": (["demo", "--guidance-scales", "nan"], "--guidance-scales must be finite"),
    "demo empty betas": (["demo", "--betas", ","], "--betas must list at least one number"),
    "demo quick overriding flags": (["demo", "--quick", "--train-steps", "50"], "--quick sets --train-steps"),
    "demo NaN lr": (["demo", "--lr", "nan"], "--lr must be"),
    "pretrain checkpoint every zero": (
        ["pretrain", "--checkpoint-every", "0"],
        "--checkpoint-every must be >= 1",
    ),
    "pretrain huge seed": (["pretrain", "--seed", str(2**63)], "--seed must be in"),
    "pairs NaN margin": (["pairs", "--min-margin", "nan"], "--min-margin must be a finite"),
    "pairs device tpu": (
        ["pairs", "--num-prompts", "2", "--steps", "1", "--device", "tpu"],
        "unknown device",
    ),
    "pickapic negative max pairs": (["import-pickapic", "--input", "x", "--max-pairs", "-1"], "--max-pairs"),
}


@pytest.mark.parametrize("case", sorted(OTHER_CASES))
def test_other_commands_bad_input(case, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, needle = OTHER_CASES[case]
    rc, err = _run(capsys, *argv, "--quiet")
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"selfnpo {argv[0]}: error:"), err
    assert needle in err, err
    assert not [p for p in tmp_path.iterdir()], "nothing is written for a rejected job"


def test_merge_refuses_a_read_only_or_impossible_output(capsys, tmp_path, tiny_sd, sd_lora):
    rc, err = _run(
        capsys, "merge", "--model", tiny_sd, "--offsets", str(sd_lora), "--output-dir", "/proc/selfnpo-merged"
    )
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("selfnpo merge: error:"), err
    out = tmp_path / "merged"
    assert (
        _run(capsys, "merge", "--model", tiny_sd, "--offsets", f"{sd_lora}:-1", "--output-dir", str(out))[0]
        == 0
    )
    assert (out / ".selfnpo-run").read_text().strip() == "merge"


@pytest.mark.parametrize(
    "failure,needle",
    [
        ("disk", "disk full"),
        ("oom", "out of memory"),
        ("cpu-oom", "out of memory"),
        ("read-only", "cannot write"),
    ],
)
def test_disk_full_and_out_of_memory(failure, needle, capsys, tmp_path, gen_args, monkeypatch):
    import selfnpo.generate as g

    def boom(*a, **k):
        if failure == "disk":
            raise OSError(errno.ENOSPC, "No space left on device")
        if failure == "read-only":
            raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "out" / "00000.png"))
        if failure == "cpu-oom":
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
            )
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(g, "atomic_path", boom)
    rc, err = _run(capsys, *gen_args)
    assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # the half-made folder does not block the rerun


def test_every_step_skipped_is_an_error_not_an_untrained_offset(
    capsys, tmp_path, tiny_sd, prompts_file, monkeypatch
):
    import selfnpo.training.loop as loop

    def nan_objective(name):
        return lambda ctx, batch: torch.full((1,), float("nan"), requires_grad=True)

    monkeypatch.setattr(loop, "get_objective", nan_objective)
    run = tmp_path / "run"
    rc, err = _run(capsys, *_train_args(tiny_sd, prompts_file, run, "--nonfinite", "skip"))
    assert rc == 2 and "all 1 steps had a non-finite" in err and len(err.splitlines()) == 1, err
    assert not (run / "offset").exists()


def test_settings_without_effect_are_named(
    capsys, caplog, tmp_path, tiny_sd, prompts_file, gen_args, sd_lora
):
    import logging

    caplog.set_level(logging.WARNING)
    assert (
        _run(capsys, *_train_args(tiny_sd, prompts_file, tmp_path / "run", "--mixed-precision", "fp16"))[0]
        == 0
    )
    assert "--mixed-precision fp16 has no effect on the CPU" in caplog.text
    caplog.clear()
    assert _run(capsys, *gen_args, "--negative-offset", str(sd_lora), "--guidance-scale", "1")[0] == 0
    assert "the negative offset has no effect" in caplog.text
    caplog.clear()
    assert _run(capsys, *gen_args[:-1], str(tmp_path / "o2"), "--beta", "0.5")[0] == 0
    assert "--beta 0.5 has no effect without --negative-offset" in caplog.text


@pytest.mark.parametrize("signum,code,word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_a_signal_ends_with_one_line_saying_how_to_resume(signum, code, word, capsys, gen_args, monkeypatch):
    import signal

    import selfnpo.generate as g

    def stop(*a, **k):
        signal.raise_signal(getattr(signal, signum))  # delivered to this thread, not another one
        time.sleep(5)  # the handler runs at the latest when the sleep is interrupted
        raise AssertionError("not reached")

    monkeypatch.setattr(g, "_generate", stop)
    rc, err = _run(capsys, *gen_args)
    assert rc == code and err == f"selfnpo generate: {word}; run the same command with --resume to continue"


def test_a_second_process_on_a_folder_in_use_stops_at_once(capsys, tmp_path, tiny_sd, prompts_file):
    from selfnpo.io import lock_dir

    run = tmp_path / "run"
    assert _run(capsys, *_train_args(tiny_sd, prompts_file, run))[0] == 0
    before = _snapshot(run)
    held = lock_dir(run)  # as another process running on it would
    try:
        for extra in (["--resume", "--steps", "2"], ["--overwrite"]):
            rc, err = _run(capsys, *_train_args(tiny_sd, prompts_file, run), *extra)
            assert rc == 2 and "in use by another selfnpo process" in err, err
    finally:
        held.close()
    assert _snapshot(run) == before


def test_resume_compares_resolved_paths_and_names_the_setting(
    capsys, tmp_path, tiny_sd, prompts_file, monkeypatch
):
    run = tmp_path / "run"
    assert _run(capsys, *_train_args(tiny_sd, prompts_file, run))[0] == 0
    monkeypatch.chdir(tmp_path)
    args = _train_args(tiny_sd, "./prompts.txt", "run/", "--resume")
    args[args.index("--steps") + 1] = "2"
    assert _run(capsys, *args)[0] == 0
    rc, err = _run(capsys, *args, "--lr", "0.001")
    assert rc == 2 and "lr was 0.0001" in err, err
    (tmp_path / "run").rename(tmp_path / "moved")  # a moved run folder resumes too
    moved = _train_args(tiny_sd, "./prompts.txt", "moved", "--resume")
    moved[moved.index("--steps") + 1] = "3"
    assert _run(capsys, *moved)[0] == 0
    (tmp_path / "moved" / "config.json").write_text("{damaged")
    rc, err = _run(capsys, *moved)
    assert rc == 2 and "config.json: damaged, cannot resume" in err and len(err.splitlines()) == 1


def test_generate_resume_checks_images_batch_size_and_offset(capsys, tmp_path, gen_args, sd_lora):
    import shutil

    lora = tmp_path / "lora"
    shutil.copytree(sd_lora.parent, lora)
    args = [*gen_args, "--num-images-per-prompt", "3", "--batch-size", "2", "--negative-offset", str(lora)]
    assert _run(capsys, *args)[0] == 0
    out = tmp_path / "out"
    first = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert (out / ".selfnpo-run").read_text().strip() == "generate"
    (out / "00001.png").write_bytes(first["00001.png"][:100])  # truncated by a crash of the disk
    resumed = [a if a != str(out) else str(out) + "/" for a in args]
    assert _run(capsys, *resumed, "--resume")[0] == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == first
    rc, err = _run(capsys, *args[:-4], "--batch-size", "3", "--negative-offset", str(lora), "--resume")
    assert rc == 2 and "--batch-size was 2, now 3" in err, err
    f = lora / "pytorch_lora_weights.safetensors"
    from safetensors.torch import load_file, save_file

    save_file({k: v * 2 for k, v in load_file(str(f)).items()}, str(f))
    rc, err = _run(capsys, *args, "--resume")
    assert rc == 2 and "--negative-offset changed" in err, err


def test_prompt_files_with_bom_upper_case_suffix_and_fifo(tmp_path):
    import os
    import threading

    from selfnpo.io import read_prompts

    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "a cat"}\n')
    assert read_prompts(tmp_path / "a.jsonl") == ["a cat"]
    (tmp_path / "b.TSV").write_bytes(b"\xef\xbb\xbfid\tPrompt\n1\ta dog\n")
    assert read_prompts(tmp_path / "b.TSV") == ["a dog"]
    (tmp_path / "c.tsv").write_bytes(b"Prompt\na bird\n")
    assert read_prompts(tmp_path / "c.tsv") == ["a bird"]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t = threading.Thread(target=lambda: fifo.write_text("from a pipe\n"))
    t.start()
    assert read_prompts(fifo) == ["from a pipe"]
    t.join()


def test_files_and_folders_follow_the_umask(capsys, tmp_path, tiny_sd, prompts_file):
    import os
    import stat

    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        assert _run(capsys, *_train_args(tiny_sd, prompts_file, run, "--checkpoint-every", "1"))[0] == 0
    finally:
        os.umask(old)
    for p in [run, *run.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o044 == 0o044, (p, oct(mode))  # others can read the results


def test_version_and_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.startswith("selfnpo ")
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "METHOD.md" not in capsys.readouterr().out


def test_demo_console_line_compares_with_the_base_of_the_same_g():
    from selfnpo.demo import DemoConfig, _sweep

    def value(key):
        return 0.5 + key[1] if key[0] == "base" else (0.9 if key[2] == 0.5 else 0.7) + key[1]

    class Bench:
        def run(self, key, *a):
            pass

        def summary(self, key, base_key):
            if base_key is None:
                return {}
            d = value(key) - value(base_key)  # the paired difference against the base it was given
            paired = {m: {"diff": (d, d, d)} for m in ("reward", "alignment", "kid")}
            return {"paired": paired, "verdict": "v"}

    lines = []
    _sweep(DemoConfig(guidance_scales="1,2", betas="0.5,1"), Bench(), None, lines.append)
    assert [ln.split(": reward ")[0] for ln in lines] == [
        "g=1 beta=0.5",
        "g=1 beta=1",
        "g=2 beta=0.5",
        "g=2 beta=1",
    ]
    assert [float(ln.split(": reward ")[1].split(" ")[0]) for ln in lines] == [0.4, 0.2, 0.4, 0.2]
