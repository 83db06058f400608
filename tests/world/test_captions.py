import dataclasses

import numpy as np
import pytest

from selfnpo.world.captions import (
    CaptionLabels,
    ObjLabel,
    caption,
    caption_from_labels,
    caption_with_labels,
    consistent,
    labels_of,
    parse_caption,
)
from selfnpo.world.render import COLOURS, Obj, Scene, sample_scene


@pytest.mark.parametrize("split", ["any", "heldout"])
def test_round_trip_over_random_scenes(split):
    rng = np.random.default_rng(0)
    for _ in range(3000):
        scene = sample_scene(rng, split)
        text, labels = caption_with_labels(scene, rng)
        parsed = parse_caption(text)
        assert parsed == labels, text
        assert consistent(parsed, scene), text
        assert consistent(labels_of(scene), scene)


def test_captions_are_short_plain_words():
    rng = np.random.default_rng(1)
    for _ in range(1000):
        text = caption(sample_scene(rng, "any"), rng)
        assert text.replace(",", "").replace(" ", "").isalpha()
        assert len(text.replace(",", " ,").split()) <= 26


def test_parser_normalises_case_and_whitespace():
    labels = parse_caption("  A Large RED star   in the TOP left Corner.  ")
    assert labels == CaptionLabels((ObjLabel("star", "red", "large", "top left"),))


def test_parser_examples():
    two = parse_caption("a blue ring to the right of a small yellow square, striped background")
    assert two == CaptionLabels(
        (ObjLabel("ring", "blue"), ObjLabel("square", "yellow", "small")),
        "right of",
        None,
        "stripes",
    )
    bg = parse_caption("red heart on a beige background with dots")
    assert bg == CaptionLabels((ObjLabel("heart", "red"),), None, "beige", "dots")
    assert parse_caption("a green ring in the middle").objects[0].position == "center"


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "hello world",
        "a red cube",
        "a star",
        "a red star to the left of",
        "a red star in the top left and a blue ring",
        "a red star in the center and a blue ring in the middle",
        "a red star on a background",
        "a red star, white white background",
        "a red star in the top left please",
    ],
)
def test_parser_rejects_text_outside_the_grammar(junk):
    with pytest.raises(ValueError):
        parse_caption(junk)


def test_consistent_detects_wrong_attributes():
    scene = Scene(
        (Obj("star", "red", "large", "top left"), Obj("ring", "blue", "small", "bottom right")),
        "white",
        "dots",
    )
    assert consistent(parse_caption("a red star above a blue ring, white background"), scene)
    assert consistent(parse_caption("a small blue ring to the right of a red star"), scene)
    assert not consistent(parse_caption("a red star below a blue ring"), scene)
    assert not consistent(parse_caption("a red star to the left of a large blue ring"), scene)
    assert not consistent(parse_caption("a red star in the top left"), scene)  # object count
    assert not consistent(parse_caption("a red star left of a blue ring, black background"), scene)
    assert not consistent(parse_caption("a red star left of a blue ring, striped background"), scene)


def test_wrong_colour_labels_are_inconsistent():
    rng = np.random.default_rng(3)
    for _ in range(300):
        scene = sample_scene(rng, "any")
        labels = labels_of(scene)
        obj = labels.objects[0]
        other = COLOURS[(COLOURS.index(obj.colour) + 1) % len(COLOURS)]
        wrong = dataclasses.replace(obj, colour=other)
        assert not consistent(dataclasses.replace(labels, objects=(wrong, *labels.objects[1:])), scene)


def test_caption_from_labels_round_trips_full_and_edited_labels():
    rng = np.random.default_rng(4)
    for _ in range(500):
        labels = labels_of(sample_scene(rng, "any"))
        assert parse_caption(caption_from_labels(labels, rng)) == labels
        bare = CaptionLabels((ObjLabel("heart", "green"),), None, "gray", None)
        assert parse_caption(caption_from_labels(bare, rng)) == bare
    with pytest.raises(ValueError):
        caption_from_labels(CaptionLabels((ObjLabel("star", "red"),) * 2), rng)
