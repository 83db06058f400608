import numpy as np
import pytest
import torch

from selfnpo.world.captions import caption_with_labels, consistent, parse_caption
from selfnpo.world.classifier import (
    alignment,
    images_to_tensor,
    load_classifier,
    reward,
    reward_01,
    scene_accuracy,
)
from selfnpo.world.render import COLOURS, render_batch

# Training used default_rng((0, 0)) and its evaluation default_rng((0, 1)).
TEST_RNG_SEED = (20240601, 7)


@pytest.fixture(scope="module")
def clf():
    return load_classifier()


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(TEST_RNG_SEED)
    images, scenes = render_batch(rng, 256, "any")
    captions = [caption_with_labels(s, rng)[0] for s in scenes]
    return images_to_tensor(images), scenes, captions


def _wrong_colour(text, scene):
    for colour in COLOURS:
        if colour in text.split():
            other = COLOURS[(COLOURS.index(colour) + 1) % len(COLOURS)]
            wrong = " ".join(other if w == colour else w for w in text.split())
            if not consistent(parse_caption(wrong), scene):
                return wrong
    raise AssertionError(text)


def test_shipped_weights_are_accurate(clf, batch):
    x, scenes, captions = batch
    assert alignment(clf, x, captions).float().mean() >= 0.97
    acc = scene_accuracy(clf, x, scenes)
    assert acc["scene"] >= 0.95 and min(acc.values()) >= 0.95


def test_alignment_rejects_wrong_colours(clf, batch):
    x, scenes, captions = batch
    wrong = [_wrong_colour(c.replace(",", " ,"), s) for c, s in zip(captions, scenes, strict=True)]
    assert alignment(clf, x, wrong).float().mean() <= 0.03


def test_features_shape(clf, batch):
    x = batch[0][:8]
    feats = clf.features(x)
    assert feats.shape == (8, clf.feature_dim) == (8, 320)


def test_reward_is_differentiable_and_prefers_true_captions(clf, batch):
    x, scenes, captions = batch
    x = x[:64].clone().requires_grad_(True)
    r = reward(clf, x, captions[:64])
    assert r.shape == (64,) and (r <= 1e-5).all()
    r.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():
        wrong = [_wrong_colour(c.replace(",", " ,"), s) for c, s in zip(captions, scenes, strict=True)]
        better = reward(clf, x, captions[:64]) > reward(clf, x, wrong[:64])
        r01 = reward_01(clf, x, captions[:64])
    assert better.float().mean() >= 0.95
    assert ((r01 >= 0) & (r01 <= 1)).all() and r01.mean() > 0.8
