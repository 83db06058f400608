"""benchmarks/world_tune.py: the grid, and the validation-then-test rule (no model is loaded)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "world_tune.py"


@pytest.fixture(scope="module")
def tune():
    spec = importlib.util.spec_from_file_location("world_tune", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_grid_covers_the_knobs(tune):
    g = tune.grid(tune.ABLATE_FROM)
    assert len(g) == len(tune.RUNS) * len(tune.STEPS) + len(tune.ABLATIONS)
    overrides = [spec["overrides"] for spec in g.values()]
    assert {o["train"] for o in overrides} == {"lora", "full"}
    assert any(o["train"] == "full" and o["lr"] <= 1e-6 for o in overrides)  # the authors' regime
    for key, values in (("source", {"noise", "images"}), ("teacher", {"frozen"})):
        assert values <= {o.get(key) for o in overrides}
    assert {o.get("k_steps") for o in overrides} >= {2, 10}
    assert {o.get("rollout_guidance") for o in overrides} >= {0.0, 2.0}
    # Configurations of one run differ only in steps, so one run serves them all.
    runs = {}
    for spec in g.values():
        runs.setdefault(spec["run"], []).append(spec)
    for specs in runs.values():
        assert len({json.dumps(s["overrides"], sort_keys=True) for s in specs}) == 1
    assert set(tune.QUICK_CONFIGS) <= set(g)
    with pytest.raises(SystemExit):
        tune.grid("no-such-run")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--split", "test"], "needs --configs"),
        (["--configs", "nope"], "unknown configurations"),
    ],
)
def test_test_split_needs_chosen_configs(tune, tmp_path, monkeypatch, argv, message):
    monkeypatch.setattr(sys, "argv", ["world_tune.py", "--output", str(tmp_path / "t"), *argv])
    with pytest.raises(SystemExit, match=message):
        tune.main()


def test_a_finished_test_evaluation_is_never_silently_redone(tune, tmp_path, monkeypatch):
    out = tmp_path / "t"
    (out / "test").mkdir(parents=True)
    name = "lora_lr1e-3_s200"
    (out / "test" / "results.json").write_text(json.dumps({name: {"fingerprint": {"eval_prompts": 64}}}))
    argv = ["world_tune.py", "--output", str(out), "--split", "test", "--configs", name]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="already evaluated on test"):
        tune.main()


def test_selection_rule_keeps_safe_candidates_and_takes_the_best_reward_lower_bound():
    spec = importlib.util.spec_from_file_location(
        "world_tune_select", SCRIPT.with_name("world_tune_select.py")
    )
    sel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sel)

    def row(config, g, beta, reward, align, kid):
        paired = {"reward": {"diff": reward, "mde": 1.0, "win_rate": [0.5, 0.4, 0.6]}}
        paired.update(alignment={"diff": align}, kid={"diff": kid})
        paired.update({f"attr_{k}": {"diff": [0.0, 0.0, 0.0]} for k in ("colour", "shape", "position")})
        return {"config": config, "guidance_scale": g, "beta": beta, "paired": paired}

    rows = [
        row("a", 3.0, 1.0, [2.0, 1.0, 3.0], [0, -0.02, -0.01], [0, -1, 1]),  # best reward, alignment worse
        row("b", 3.0, 0.5, [1.0, 0.2, 2.0], [0, -0.01, 0.01], [0, -1, 1]),
        row("c", 3.0, 0.5, [1.5, 0.5, 2.5], [0, -0.01, 0.01], [0.1, 0.01, 0.2]),  # KID worse
        row("d", 3.0, 1.0, [0.5, 0.1, 0.9], [0, -0.01, 0.01], [0, -1, 1]),
        row("e", 5.0, 1.0, [9.0, 8.0, 10.0], [0, 0, 0], [0, -1, 1]),  # another g
    ]
    assert sel.select(rows, 3.0) == ("b", 0.5)
    assert sel.select(rows, 7.5) is None
    assert sel.table(rows).count("\n") == len(rows) + 1
