"""The objective registry: specs discovered from the package, their configs, the flat TrainConfig."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
from conftest import train_tiny

from selfnpo.errors import SelfNPOError
from selfnpo.objectives.base import discover, get_spec, objective_configs
from selfnpo.options import with_defaults
from selfnpo.training.config import CommonTrainConfig, TrainConfig


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_objective_module_is_discovered_with_its_spec():
    specs = discover()
    expected = {"tdft", "full_sim", "diffusion", "dpo", "dpo_npo", "reward", "reward_npo"}
    expected |= {"ddspo", "ddspo_npo", "r0", "r0_plus"}
    assert expected <= set(specs)
    for name, spec in specs.items():
        assert spec.name == name and callable(spec.fn)
        assert all(dataclasses.is_dataclass(c) for c in spec.configs)
    assert get_spec("dpo_npo").pairs and get_spec("r0").uses_reward and get_spec("reward").prompts_only
    assert not get_spec("tdft").reference and get_spec("ddspo").reference
    with pytest.raises(KeyError, match="unknown objective 'nope'"):
        get_spec("nope")


def test_train_config_is_the_common_settings_plus_each_objective_config():
    configs = objective_configs()
    parts = [_names(CommonTrainConfig), *(_names(c) for c in configs)]
    assert sum(len(p) for p in parts) == len(set().union(*parts))  # no setting defined twice
    assert _names(TrainConfig) == set().union(*parts)
    own = {c.__name__: c.__module__ for c in configs}
    assert own["RolloutConfig"].endswith("objectives.tdft") and own["R0Config"].endswith("objectives.r0")
    # the common part names no objective-specific knob
    assert not any(n.startswith(("dpo_", "ddspo_", "r0_", "reward")) for n in _names(CommonTrainConfig))


def test_flat_config_round_trips_and_old_configs_get_defaults():
    cfg = TrainConfig(model="m", prompts="p", dpo_beta=10.0, k_steps=3, r0_steps=2)
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert TrainConfig(**saved) == cfg
    old = {k: v for k, v in saved.items() if k not in ("snr_gamma", "r0_eta")}  # before those existed
    assert TrainConfig(**with_defaults(TrainConfig, old)) == cfg


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(k_steps=30), "--k-steps 30 is larger than the grid"),
        (dict(dpo_beta=0.0), "--dpo-beta must be > 0"),
        (dict(reward_grad_steps=20), "--reward-grad-steps must be in 1..--reward-steps"),
        (dict(objective="ddspo", ddspo_variant="unpaired", batch_size=1), "needs --batch-size >= 2"),
        (dict(objective="r0", r0_rewards="world:x"), "bad weight"),
        (dict(snr_gamma=-1.0), "--snr-gamma"),
        (dict(objective="reward_npo", reward="nope"), "unknown reward 'nope'"),
        (dict(objective="r0", r0_rewards="world:1,no_such_module:x:2"), "cannot import reward"),
    ],
)
def test_each_objective_config_checks_its_own_settings(kw, msg):
    with pytest.raises(SelfNPOError, match=msg):
        TrainConfig(model="m", prompts="p", **kw).validate()


def test_a_reward_is_resolved_only_for_objectives_that_use_one():
    TrainConfig(model="m", prompts="p", objective="tdft", reward="nope").validate()


def test_rewards_by_name_entry_point_or_module_attr():
    from selfnpo.objectives.r0 import parse_rewards
    from selfnpo.rewards import get_reward
    from selfnpo.world.reward import WorldReward

    assert isinstance(get_reward("world"), WorldReward)  # published by the package's entry point
    assert isinstance(get_reward("selfnpo.world.reward:WorldReward"), WorldReward)
    for bad, msg in [
        ("nope", "unknown reward 'nope'"),
        ("selfnpo.world.reward:Nope", "cannot import reward"),
        ("no_such_module:x", "cannot import reward"),
    ]:
        with pytest.raises(SelfNPOError, match=msg) as e:
            get_reward(bad)
        assert "\n" not in str(e.value)
    assert parse_rewards("selfnpo.world.reward:WorldReward:0.5,world", "world") == [
        ("selfnpo.world.reward:WorldReward", 0.5),
        ("world", 1.0),
    ]


# config.json of a run written before the objectives' settings moved beside them (all defaults,
# keys in that version's order): the flat format every later version must keep reading.
OLD_FLAT_CONFIG = {
    "model": "", "prompts": "", "output_dir": "runs/selfnpo", "objective": "tdft", "source": "self",
    "image_dir": "", "pool_size": 64, "pool_guidance_scale": 7.5, "grid_steps": 25, "k_steps": 5,
    "rollout_guidance": -1.0, "authors_cond_pass": False, "loss": "pseudo_huber", "huber_c": 0.001,
    "teacher": "ema", "ema_decay": 0.999, "train": "lora", "lora_rank": 8, "lora_alpha": 0.0,
    "lora_targets": "to_q,to_k,to_v,to_out.0", "lr": 0.0001, "weight_decay": 0.001, "max_grad_norm": 1.0,
    "steps": 1000, "batch_size": 4, "grad_accum": 1, "resolution": 0, "frames": 0, "mixed_precision": "no",
    "gradient_checkpointing": False, "device": "auto", "seed": 0, "checkpoint_every": 100,
    "keep_checkpoints": 2, "log_every": 10, "nonfinite": "stop", "caption_dropout": 0.0, "snr_gamma": 0.0,
    "resume": False, "overwrite": False, "save_model": False, "pairs": "", "dpo_beta": 5000.0,
    "dpo_beta_convention": "original", "reward": "world", "reward_steps": 10, "reward_grad_steps": 1,
    "reward_guidance": 7.5, "ddspo_variant": "paired", "ddspo_degrade": "random_removal",
    "ddspo_remove_low": 0.4, "ddspo_remove_high": 0.7, "ddspo_targets": "reference", "ddspo_beta": 0.0,
    "ddspo_loser_steps": 0, "r0_rewards": "", "r0_steps": 4, "r0_cfg_weight": 1.0, "r0_reg_weight": 1.0,
    "r0_raw_grads": False, "r0_fixed_eta": False, "r0_eta": 1.0,
}  # fmt: skip


def test_the_old_flat_config_has_the_same_keys_and_defaults():
    assert TrainConfig(**OLD_FLAT_CONFIG) == TrainConfig()
    assert set(TrainConfig().to_dict()) == set(OLD_FLAT_CONFIG)


def test_train_flags_are_the_union_of_the_config_fields():
    from selfnpo.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = {a.dest: a for a in sub.choices["train"]._actions if a.dest not in ("help", "quiet")}
    fields = {f.name: f for c in (CommonTrainConfig, *objective_configs()) for f in dataclasses.fields(c)}
    assert set(actions) == set(fields)
    for name, f in fields.items():
        a = actions[name]
        assert a.option_strings == ["--" + name.replace("_", "-")]
        assert a.default == f.default and a.choices == f.metadata.get("choices")
        assert a.help.startswith(f.metadata["help"])


def test_a_run_with_an_old_flat_config_json_resumes(tiny_sd, prompts_file, tmp_path):
    run = tmp_path / "run"
    train_tiny(tiny_sd, run, prompts_file, steps=1)
    saved = json.loads((run / "config.json").read_text())
    old = {k: saved[k] for k in OLD_FLAT_CONFIG if k not in ("snr_gamma", "r0_eta")}  # older still
    (run / "config.json").write_text(json.dumps(old, indent=2))
    assert train_tiny(tiny_sd, run, prompts_file, steps=2, resume=True).steps == 2
