"""The one output-folder rule (:func:`selfnpo.io.prepare_output`) that every command uses."""

import json

import pytest

from selfnpo.errors import SelfNPOError
from selfnpo.io import MARKER, prepare_output

CFG = {"seed": 0, "lr": 0.001, "steps": 10, "model": "m"}


def _prepare(path, cfg=CFG, **kw):
    kw = {"config_file": "job.json", "may_change": ("steps",), "paths": ("model",), **kw}
    return prepare_output(path, "train", cfg, **kw)


def test_fresh_folder_is_created_marked_and_its_config_saved(tmp_path):
    out = tmp_path / "a" / "run"
    assert _prepare(out) is False
    assert (out / MARKER).read_text().strip() == "train"
    assert json.loads((out / "job.json").read_text()) == CFG


def test_resume_with_the_same_or_an_allowed_change(tmp_path):
    out = tmp_path / "run"
    _prepare(out)
    (out / ".job.json.x.tmp").write_text("left by a killed writer")
    assert _prepare(out, resume=True) is True
    assert not list(out.glob(".*.tmp"))
    assert _prepare(out, {**CFG, "steps": 20}, resume=True) is True
    assert json.loads((out / "job.json").read_text()) == CFG  # the saved config is kept


def test_resume_with_a_disallowed_change_names_it_in_one_line(tmp_path):
    out = tmp_path / "run"
    _prepare(out)
    with pytest.raises(SelfNPOError) as e:
        _prepare(out, {**CFG, "lr": 0.01}, resume=True)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "cannot resume: lr (--lr was 0.001, now 0.01)" in msg
    assert "different settings" in msg


def test_a_setting_older_folders_lack_counts_as_its_default(tmp_path):
    out = tmp_path / "run"
    _prepare(out)
    new = {**CFG, "beta": 1.0, "new_sha256": "abc"}
    assert _prepare(out, new, resume=True, defaults={"beta": 1.0}) is True  # hash: trusted
    with pytest.raises(SelfNPOError, match="--beta was 0.5, now 1.0"):
        _prepare(out, new, resume=True, defaults={"beta": 0.5})
    (out / "job.json").write_text(json.dumps({**CFG, "new_sha256": "def"}))
    with pytest.raises(SelfNPOError, match="the file --new changed"):
        _prepare(out, new, resume=True)


def test_paths_compare_as_files_and_a_damaged_config_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    _prepare(out, {**CFG, "model": "m"})
    assert _prepare(out, {**CFG, "model": str(tmp_path / "m")}, resume=True) is True
    (out / "job.json").write_text("{damaged")
    with pytest.raises(SelfNPOError, match="job.json: damaged, cannot resume"):
        _prepare(out, resume=True)


def test_existing_folders_need_a_flag_and_unmarked_ones_are_never_replaced(tmp_path):
    out = tmp_path / "run"
    _prepare(out)
    with pytest.raises(SelfNPOError, match="--resume to continue it or --overwrite"):
        _prepare(out)
    assert _prepare(out, {**CFG, "lr": 0.5}, overwrite=True) is False
    assert json.loads((out / "job.json").read_text())["lr"] == 0.5
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    for kw in ({"overwrite": True}, {"resume": True}, {"config_file": ""}):
        with pytest.raises(SelfNPOError, match="was not written by selfnpo"):
            _prepare(mine, **kw)
    assert (mine / "precious.txt").read_text() == "keep"


def test_a_folder_written_whole_is_only_checked(tmp_path):
    out = tmp_path / "pairs"
    assert prepare_output(out, "pairs") is False
    assert not out.exists()
    out.mkdir()
    (out / MARKER).write_text("pairs\n")
    with pytest.raises(SelfNPOError, match="pass --overwrite"):
        prepare_output(out, "pairs")
    assert prepare_output(out, "pairs", overwrite=True) is False
    assert (out / MARKER).is_file()  # replaced only when the job's new folder is complete
