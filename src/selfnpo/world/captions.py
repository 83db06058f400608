"""Caption grammar for world scenes: generation, parsing and label checking.

Every caption names each object's colour and shape. Size, absolute cell, a spatial
relation between the two objects, the background colour and the texture are stated
only sometimes; `CaptionLabels` records exactly what a caption states (None = unstated).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from selfnpo.world.render import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZES,
    Scene,
    cell_rc,
)

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
RELATION_TEXT = {"left of": "to the left of", "right of": "to the right of"}
TEXTURE_ADJ = {"plain": "plain", "stripes": "striped", "dots": "dotted", "gradient": "gradient"}
TEXTURE_NOUN = {"stripes": "stripes", "dots": "dots", "gradient": "a gradient"}
ARTICLES = ("a", "an", "the", "one")

# Probabilities of stating optional attributes; chosen so that every form is common.
P_SIZE = 0.7
P_POSITION_SINGLE = 0.75
P_RELATION = 0.6
P_BACKGROUND = 0.5
P_TEXTURE = 0.7
P_TEXTURE_PLAIN = 0.15


@dataclass(frozen=True)
class ObjLabel:
    """What a caption states about one object (size/position None when unstated)."""

    shape: str
    colour: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class CaptionLabels:
    """Everything a caption states. `relation` is object 0 relative to object 1."""

    objects: tuple[ObjLabel, ...]
    relation: str | None = None
    background: str | None = None
    texture: str | None = None

    def n_attributes(self) -> int:
        """Number of stated attributes, counting 'no other objects' as one."""
        n = 1 + sum(2 + (o.size is not None) + (o.position is not None) for o in self.objects)
        return n + sum(x is not None for x in (self.relation, self.background, self.texture))


def relation_holds(relation: str, pos0: str, pos1: str) -> bool:
    """Whether the object in cell `pos0` is `relation` the object in cell `pos1`."""
    (r0, c0), (r1, c1) = cell_rc(pos0), cell_rc(pos1)
    return {
        "left of": c0 < c1,
        "right of": c0 > c1,
        "above": r0 < r1,
        "below": r0 > r1,
    }[relation]


def labels_of(scene: Scene) -> CaptionLabels:
    """Full labels of a scene (relation None: the absolute cells already imply it)."""
    objs = tuple(ObjLabel(o.shape, o.colour, o.size, o.position) for o in scene.objects)
    return CaptionLabels(objs, None, scene.background, scene.texture)


def _obj_matches(label: ObjLabel, obj) -> bool:
    return (
        label.shape == obj.shape
        and label.colour == obj.colour
        and label.size in (None, obj.size)
        and label.position in (None, obj.position)
    )


def consistent(labels: CaptionLabels, scene: Scene) -> bool:
    """Does the scene satisfy everything the labels state (object count included)?"""
    if len(labels.objects) != len(scene.objects):
        return False
    if labels.background not in (None, scene.background):
        return False
    if labels.texture not in (None, scene.texture):
        return False
    # Caption order need not follow scene order, so try every matching.
    for perm in itertools.permutations(scene.objects):
        if not all(_obj_matches(lab, obj) for lab, obj in zip(labels.objects, perm, strict=True)):
            continue
        if labels.relation is None or relation_holds(labels.relation, perm[0].position, perm[1].position):
            return True
    return False


# ---------------------------------------------------------------- generation


def _choose_labels(scene: Scene, rng: np.random.Generator) -> CaptionLabels:
    """Decide which attributes a caption states."""
    objs = list(scene.objects)
    if len(objs) == 2 and rng.random() < 0.5:
        objs.reverse()
    relation = None
    with_pos = len(objs) == 2 or rng.random() < P_POSITION_SINGLE
    if len(objs) == 2 and rng.random() < P_RELATION:
        true_rel = [r for r in RELATIONS if relation_holds(r, objs[0].position, objs[1].position)]
        relation = true_rel[int(rng.integers(len(true_rel)))]
        with_pos = False
    labels = tuple(
        ObjLabel(
            o.shape,
            o.colour,
            o.size if rng.random() < P_SIZE else None,
            o.position if with_pos else None,
        )
        for o in objs
    )
    background = scene.background if rng.random() < P_BACKGROUND else None
    p_tex = P_TEXTURE_PLAIN if scene.texture == "plain" else P_TEXTURE
    texture = scene.texture if rng.random() < p_tex else None
    return CaptionLabels(labels, relation, background, texture)


def _with_article(words: list[str], rng: np.random.Generator, optional: bool) -> list[str]:
    if optional and rng.random() < 0.15:
        return words
    article = "an" if words[0][0] in "aeiou" else "a"
    return [article, *words]


def _object_words(lab: ObjLabel, rng: np.random.Generator, first: bool) -> list[str]:
    words = ([lab.size] if lab.size else []) + [lab.colour, lab.shape]
    return _with_article(words, rng, optional=first)


def _position_words(position: str, rng: np.random.Generator) -> list[str]:
    if position == "center":
        return ["in", "the", "center" if rng.random() < 0.6 else "middle"]
    if " " in position:
        corner = ["corner"] if rng.random() < 0.3 else []
        return [["in", "at"][int(rng.integers(2))], "the", *position.split(), *corner]
    if position in ("top", "bottom"):
        return ["at", "the", position]
    return [["on", "at"][int(rng.integers(2))], "the", position]


def _background_words(labels: CaptionLabels, rng: np.random.Generator) -> list[str]:
    bg, tex = labels.background, labels.texture
    if bg is None and tex is None:
        return []
    if bg is not None and tex in TEXTURE_NOUN and rng.random() < 0.4:
        return ["on", "a", bg, "background", "with", *TEXTURE_NOUN[tex].split()]
    adjectives = [w for w in (TEXTURE_ADJ.get(tex), bg) if w is not None]
    if rng.random() < 0.5:
        adjectives.reverse()
    if rng.random() < 0.5:
        return [",", *adjectives, "background"]
    return ["on", "a", *adjectives, "background"]


def caption_from_labels(labels: CaptionLabels, rng: np.random.Generator) -> str:
    """Text that states exactly `labels` (e.g. to write a deliberately wrong caption)."""
    objs = labels.objects
    if len(objs) not in (1, 2):
        raise ValueError(f"captions state one or two objects, got {len(objs)}")
    if len(objs) == 2 and labels.relation is None and None in (o.position for o in objs):
        raise ValueError("two objects need a relation or both positions")
    if labels.relation is not None and (len(objs) != 2 or objs[0].position or objs[1].position):
        raise ValueError("a relation needs two objects without positions")
    words = _object_words(objs[0], rng, first=True)
    if labels.relation is not None:
        words += RELATION_TEXT.get(labels.relation, labels.relation).split()
        words += _object_words(objs[1], rng, first=False)
    else:
        if objs[0].position is not None:
            words += _position_words(objs[0].position, rng)
        if len(objs) == 2:
            words += ["and", *_object_words(objs[1], rng, first=False)]
            words += _position_words(objs[1].position, rng)
    words += _background_words(labels, rng)
    return " ".join(words).replace(" ,", ",")


def caption_with_labels(scene: Scene, rng: np.random.Generator) -> tuple[str, CaptionLabels]:
    """A random caption of the scene together with the labels it states."""
    labels = _choose_labels(scene, rng)
    return caption_from_labels(labels, rng), labels


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random caption of the scene from the grammar (see docs/world.md)."""
    return caption_with_labels(scene, rng)[0]


# ---------------------------------------------------------------- parsing


class _Words:
    """A cursor over the caption's words that raises ValueError on mismatch."""

    def __init__(self, text: str):
        self.text = text
        self.words = text.lower().replace(",", " , ").rstrip().rstrip(".").split()
        self.i = 0

    def peek(self, k: int = 0) -> str | None:
        j = self.i + k
        return self.words[j] if j < len(self.words) else None

    def take(self, options) -> str:
        word = self.peek()
        if word not in options:
            self.fail(f"expected one of {sorted(options)}")
        self.i += 1
        return word

    def accept(self, options) -> str | None:
        return self.take(options) if self.peek() in options else None

    def fail(self, what: str):
        got = self.peek() or "end of caption"
        raise ValueError(f"caption {self.text!r} is outside the grammar: {what}, got {got!r}")


def _parse_object(w: _Words) -> ObjLabel:
    w.accept(ARTICLES)
    size = w.accept(SIZES)
    colour = w.take(COLOURS)
    return ObjLabel(w.take(SHAPES), colour, size)


def _parse_position(w: _Words) -> str:
    w.take(("in", "at", "on"))
    w.take(("the",))
    first = w.take(("top", "bottom", "left", "right", "center", "middle"))
    if first == "middle":
        return "center"
    if first in ("top", "bottom") and w.peek() in ("left", "right"):
        first = f"{first} {w.take(('left', 'right'))}"
        w.accept(("corner",))
    return first


def _at_position(w: _Words) -> bool:
    return w.peek() in ("in", "at", "on") and w.peek(1) == "the"


def _parse_relation(w: _Words) -> str | None:
    if w.accept(("above", "below")) is not None:
        return w.words[w.i - 1]
    if w.peek() == "to" or w.peek() in ("left", "right"):
        if w.accept(("to",)):
            w.take(("the",))
        side = w.take(("left", "right"))
        w.take(("of",))
        return f"{side} of"
    return None


def _parse_background(w: _Words) -> tuple[str | None, str | None]:
    if w.accept((",",)) is None:
        w.take(("on",))
        w.take(("a", "an"))
    adj_to_texture = {v: k for k, v in TEXTURE_ADJ.items()}
    bg = tex = None
    while w.peek() != "background":
        word = w.take(set(BACKGROUNDS) | set(adj_to_texture))
        if word in BACKGROUNDS and bg is None:
            bg = word
        elif word in adj_to_texture and tex is None:
            tex = adj_to_texture[word]
        else:
            w.fail("a single background colour and texture")
    w.take(("background",))
    if tex is None and w.accept(("with",)):
        w.accept(("a",))
        tex = w.take(("stripes", "dots", "gradient"))
    if bg is None and tex is None:
        w.fail("a background colour or texture")
    return bg, tex


def parse_caption(text: str) -> CaptionLabels:
    """Recover exactly the labels a grammar caption states; ValueError otherwise."""
    w = _Words(text)
    first = _parse_object(w)
    objects, relation = [first], _parse_relation(w)
    if relation is not None:
        objects.append(_parse_object(w))
    else:
        if _at_position(w):
            objects[0] = ObjLabel(first.shape, first.colour, first.size, _parse_position(w))
        if w.accept(("and",)):
            if objects[0].position is None:
                w.fail("a position for the first object before 'and'")
            second = _parse_object(w)
            objects.append(ObjLabel(second.shape, second.colour, second.size, _parse_position(w)))
            if objects[0].position == objects[1].position:
                raise ValueError(f"caption {text!r} puts both objects in the same cell")
    bg = tex = None
    if w.peek() is not None:
        bg, tex = _parse_background(w)
    if w.peek() is not None:
        w.fail("end of caption")
    return CaptionLabels(tuple(objects), relation, bg, tex)
