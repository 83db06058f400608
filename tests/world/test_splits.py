"""The train / validation / test splits of the embedded world, and per-attribute scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest

from selfnpo.evaluation.world_eval import (
    ATTRIBUTES,
    Scores,
    attribute_scores,
    paired_metrics,
    verdict,
)
from selfnpo.world.captions import CaptionLabels, ObjLabel, labels_of, parse_caption
from selfnpo.world.render import HELDOUT_PAIRS, Obj, Scene, is_heldout
from selfnpo.world.splits import SEED_BASE, SPLIT_SIZE_LIMIT, heldout_split_of, world_split


@pytest.fixture(scope="module")
def splits():
    return {name: world_split(name, 400) for name in ("train", "validation", "test")}


def test_splits_are_disjoint_in_prompts_and_seeds(splits):
    prompts = {k: set(s.prompts) for k, s in splits.items()}
    seeds = {k: set(s.seeds) for k, s in splits.items()}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not prompts[a] & prompts[b], (a, b)
        assert not seeds[a] & seeds[b], (a, b)
    for k, s in splits.items():
        assert s.seeds == [SEED_BASE[k] + i for i in range(400)]
        assert max(s.seeds) < SEED_BASE[k] + SPLIT_SIZE_LIMIT
    # Disjointness does not depend on the sizes: membership is a function of the prompt alone.
    assert all(heldout_split_of(p) == "validation" for p in splits["validation"].prompts)
    assert all(heldout_split_of(p) == "test" for p in splits["test"].prompts)


def test_splits_use_the_right_attribute_combinations(splits):
    assert not any(is_heldout(s) for s in splits["train"].scenes)
    for name in ("validation", "test"):
        s = splits[name]
        assert all((sc.objects[0].shape, sc.objects[0].colour) in HELDOUT_PAIRS for sc in s.scenes)
        # Both splits cover every held-out pair.
        assert {(sc.objects[0].shape, sc.objects[0].colour) for sc in s.scenes} == set(HELDOUT_PAIRS)
        for text, scene in zip(s.prompts, s.scenes, strict=True):
            lab = parse_caption(text)
            assert len(lab.objects) == len(scene.objects)


def test_splits_are_deterministic_and_prefix_stable(splits):
    for name, s in splits.items():
        again = world_split(name, 50)
        assert again.prompts == s.prompts[:50] and again.seeds == s.seeds[:50]
        assert again.scenes == s.scenes[:50]
    assert world_split("validation", 0).prompts == []
    with pytest.raises(ValueError):
        world_split("heldout", 3)
    with pytest.raises(ValueError):
        world_split("test", -1)


def _scene(*objs, background="white", texture="plain"):
    return Scene(tuple(Obj(*o) for o in objs), background, texture)


def test_attribute_scores_on_known_scenes():
    truth = _scene(("circle", "purple", "small", "top left"), ("square", "red", "large", "center"))
    labels = labels_of(truth)
    assert all(v == 1.0 for v in attribute_scores(labels, truth).values() if not math.isnan(v))
    # The second object has the wrong shape; the first is in the wrong cell.
    wrong = _scene(("circle", "purple", "small", "top"), ("ring", "red", "large", "center"))
    got = attribute_scores(labels, wrong)
    # (the first object is looked for in its stated cell, where there is nothing)
    assert got["count"] == 1.0 and got["colour"] == 0.5 and got["shape"] == 0.0
    assert got["position"] == 0.5 and got["object"] == 0.0 and got["size"] == 0.5
    assert math.isnan(got["relation"])
    # A relation caption: no cells stated, the relation is read from the decoded cells.
    rel = CaptionLabels(
        (ObjLabel("circle", "purple"), ObjLabel("square", "red")), relation="left of", background="white"
    )
    assert (
        attribute_scores(
            rel, _scene(("circle", "purple", "small", "left"), ("square", "red", "large", "right"))
        )["relation"]
        == 1.0
    )
    swapped = attribute_scores(
        rel, _scene(("circle", "purple", "small", "right"), ("square", "red", "large", "left"))
    )
    assert swapped["relation"] == 0.0 and swapped["object"] == 1.0 and math.isnan(swapped["position"])
    empty = attribute_scores(rel, _scene(background="black"))
    assert empty["count"] == 0.0 and empty["colour"] == 0.0 and empty["background"] == 0.0
    assert set(got) == set(ATTRIBUTES)


def _scores(rng, n, reward_shift=0.0, feat_shift=0.0):
    attrs = {a: rng.integers(0, 2, n).astype(np.float64) for a in ATTRIBUTES}
    attrs["relation"][: n // 2] = np.nan
    return Scores(
        rng.random(n) < 0.3,
        rng.normal(-30.0 + reward_shift, 1.0, n),
        rng.normal(feat_shift, 1.0, (n, 5)),
        rng.random(n),
        attrs,
    )


def test_paired_metrics_and_verdict(tmp_path):
    rng = np.random.default_rng(0)
    n = 64
    base = _scores(rng, n)
    real = rng.normal(0.0, 1.0, (300, 5))
    better = Scores(base.aligned, base.reward + 2.0, base.features, base.reward_01, base.attributes)
    p = paired_metrics(better, base, real)
    assert p["reward"]["outcome"] == "better" and p["reward"]["diff"][0] == pytest.approx(2.0)
    assert p["alignment"]["diff"] == [0.0, 0.0, 0.0] and p["alignment"]["mde"] > 0  # ties: resolution floor
    assert p["attr_relation"]["n"] == n // 2
    assert p["kid"]["diff"][0] == 0.0
    assert verdict(p)[0] == "helps"
    worse_feats = Scores(base.aligned, base.reward, base.features + 1.5, base.reward_01, base.attributes)
    pw = paired_metrics(worse_feats, base, real)
    assert pw["kid"]["outcome"] == "worse" and verdict(pw)[0] == "hurts"
    same = verdict(paired_metrics(base, base, real))
    assert same[0] == "no detectable difference" and "MDE" in same[1]
    # Scores survive a save/load round trip (benchmarks resume from them).
    base.save(tmp_path / "s.npz")
    back = Scores.load(tmp_path / "s.npz")
    assert np.array_equal(back.reward, base.reward) and np.array_equal(back.aligned, base.aligned)
    assert all(np.array_equal(back.attributes[a], base.attributes[a], equal_nan=True) for a in ATTRIBUTES)
