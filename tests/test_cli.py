"""Bad input through the command line: one line on stderr, exit code 2, nothing overwritten."""

from __future__ import annotations

import errno
import json

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
    "output under a file": (
        lambda t, m, p: [
            "--model",
            m,
            "--prompts",
            p,
            "--output-dir",
            _write(t, "f", b"x") + "/run",
        ],
        "cannot write the run folder",
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
    rc, err = (
        _run(capsys, "train", "--quiet", "--steps", "1", *args)
        if "--steps" not in args
        else _run(capsys, "train", "--quiet", *args)
    )
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("selfnpo train: error:"), err
    assert needle in err, err
    assert not (tmp_path / "run").exists()  # nothing was created for a rejected job


def test_train_refuses_an_existing_run_folder(capsys, tmp_path, tiny_sd, prompts_file):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    rc, err = _run(capsys, "train", "--model", tiny_sd, "--prompts", prompts_file, "--output-dir", str(run))
    assert rc == 2 and "--resume" in err and len(err.splitlines()) == 1
    assert (run / "notes.txt").read_text() == "mine" and (run / "config.json").read_text() == "{}"


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
}


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


@pytest.mark.parametrize("failure,needle", [("disk", "disk full"), ("oom", "out of memory")])
def test_disk_full_and_out_of_memory(failure, needle, capsys, tmp_path, gen_args, monkeypatch):
    import selfnpo.generate as g

    def boom(*a, **k):
        if failure == "disk":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(g, "atomic_path", boom)
    rc, err = _run(capsys, *gen_args)
    assert rc == 2 and needle in err and len(err.splitlines()) == 1
    assert not list((tmp_path / "out").glob("*.png"))


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
