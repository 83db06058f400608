"""The objective registry: specs discovered from the package, their configs, the flat TrainConfig."""

from __future__ import annotations

import dataclasses
import json

import pytest

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
    ],
)
def test_each_objective_config_checks_its_own_settings(kw, msg):
    with pytest.raises(SelfNPOError, match=msg):
        TrainConfig(model="m", prompts="p", **kw).validate()


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
