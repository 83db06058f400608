import numpy as np
import pytest

from selfnpo.world.render import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    HELDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    TEXTURES,
    Obj,
    Scene,
    cell_centre,
    is_heldout,
    render,
    render_batch,
    sample_scene,
)


def test_render_is_deterministic_per_seed():
    a, scenes_a = render_batch(123, 16)
    b, scenes_b = render_batch(123, 16)
    c, _ = render_batch(124, 16)
    assert a.dtype == np.uint8 and a.shape == (16, 32, 32, 3)
    assert np.array_equal(a, b) and scenes_a == scenes_b
    assert not np.array_equal(a, c)


def test_render_batch_from_seed_list_matches_single_scenes():
    images, scenes = render_batch([5, 6, 7])
    assert images.shape == (3, 32, 32, 3)
    for seed, img, scene in zip([5, 6, 7], images, scenes, strict=True):
        assert scene == sample_scene(np.random.default_rng(seed), "any")
        assert np.array_equal(img, render(scene))


@pytest.mark.parametrize("shape", SHAPES)
def test_large_object_has_its_colour_at_the_cell_centre(shape):
    for i, (colour, position) in enumerate(zip(COLOURS, POSITIONS, strict=False)):
        bg = BACKGROUNDS[i % len(BACKGROUNDS)]
        img = render(Scene((Obj(shape, colour, "large", position),), bg, "plain"))
        cx, cy = cell_centre(position)
        if shape == "ring":  # the centre is the hole; the band is at 3/4 of the radius
            assert tuple(img[int(cy), int(cx)]) == BACKGROUND_RGB[bg]
            cx += 3.75
        assert tuple(img[int(cy), int(cx)]) == COLOUR_RGB[colour]


def test_object_stays_inside_its_cell():
    for position in POSITIONS:
        img = render(Scene((Obj("square", "red", "large", position),), "white", "plain"))
        ys, xs = np.nonzero((img != BACKGROUND_RGB["white"]).any(-1))
        cx, cy = cell_centre(position)
        assert np.abs(xs + 0.5 - cx).max() < 32 / 6 and np.abs(ys + 0.5 - cy).max() < 32 / 6


def test_textures_are_subtle_but_visible():
    plain = render(Scene((), "gray", "plain")).astype(int)
    for texture in TEXTURES[1:]:
        diff = np.abs(render(Scene((), "gray", texture)).astype(int) - plain)
        assert diff.max() > 20 and diff.mean() < 40


def test_object_colours_are_far_from_backgrounds():
    for c in COLOUR_RGB.values():
        for b in BACKGROUND_RGB.values():
            assert np.abs(np.subtract(c, b)).sum() > 80


def test_samples_have_one_or_two_objects_in_distinct_cells():
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(2000):
        scene = sample_scene(rng, "any")
        counts.add(len(scene.objects))
        assert len({o.position for o in scene.objects}) == len(scene.objects)
        assert scene.background in BACKGROUNDS and scene.texture in TEXTURES
    assert counts == {1, 2}


def test_heldout_pairs_cover_every_shape_and_colour():
    assert {s for s, _ in HELDOUT_PAIRS} == set(SHAPES)
    assert {c for _, c in HELDOUT_PAIRS} == set(COLOURS)
    assert 0.15 <= len(HELDOUT_PAIRS) / (len(SHAPES) * len(COLOURS)) <= 0.2


def test_train_split_never_contains_heldout_pairs():
    rng = np.random.default_rng(1)
    assert not any(is_heldout(sample_scene(rng, "train")) for _ in range(5000))


def test_heldout_split_first_object_is_heldout():
    rng = np.random.default_rng(2)
    for _ in range(500):
        scene = sample_scene(rng, "heldout")
        first = scene.objects[0]
        assert (first.shape, first.colour) in HELDOUT_PAIRS and is_heldout(scene)


def test_unknown_split_raises():
    with pytest.raises(ValueError):
        sample_scene(np.random.default_rng(0), "validation")
