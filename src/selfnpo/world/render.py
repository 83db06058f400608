"""Procedural 32x32 scenes with exact ground truth (numpy + Pillow only).

A scene is one or two coloured shapes placed in the cells of a 3x3 grid over a
(possibly textured) background. Rendering is a pure function of the `Scene`, so
the labels of every image are known exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SUPERSAMPLE = 4
CELL = SIZE / 3

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "ring")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "beige")
TEXTURES: tuple[str, ...] = ("plain", "stripes", "dots", "gradient")

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 165, 50),
    "blue": (35, 75, 230),
    "yellow": (250, 215, 0),
    "purple": (140, 40, 190),
    "orange": (255, 130, 0),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (242, 242, 242),
    "black": (22, 22, 22),
    "gray": (128, 128, 128),
    "beige": (222, 206, 172),
}
# Diameter of an object's bounding box in output pixels.
SIZE_PX: dict[str, float] = {"small": 6.0, "large": 10.0}
# How far texture marks move away from the background colour (subtle, never object-like).
TEXTURE_DELTA = 32

# One (shape, colour) pair per shape and per colour (a Latin diagonal): 6 of 36 pairs.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("circle", "purple"),
        ("square", "orange"),
        ("triangle", "blue"),
        ("star", "green"),
        ("heart", "yellow"),
        ("ring", "red"),
    }
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((s, c) for s in SHAPES for c in COLOURS)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELDOUT_PAIRS)
SPLITS = ("train", "heldout", "any")


@dataclass(frozen=True)
class Obj:
    """One object: its shape, colour, size and grid cell (a name in POSITIONS)."""

    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """One or two objects in distinct cells, a background colour and a texture."""

    objects: tuple[Obj, ...]
    background: str
    texture: str


def cell_rc(position: str) -> tuple[int, int]:
    """(row, column) of a grid cell name, each in 0..2."""
    return divmod(POSITIONS.index(position), 3)


def cell_centre(position: str) -> tuple[float, float]:
    """(x, y) centre of a grid cell in output pixel coordinates."""
    row, col = cell_rc(position)
    return (col + 0.5) * CELL, (row + 0.5) * CELL


def is_heldout(scene: Scene) -> bool:
    """True when any object of the scene uses a held-out (shape, colour) pair."""
    return any((o.shape, o.colour) in HELDOUT_PAIRS for o in scene.objects)


def _star_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else 0.45 * r
        ang = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(ang), cy + 0.08 * r + rad * math.sin(ang)))
    return pts


def _heart_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    # Classic parametric heart curve; x in [-16, 16], y in about [-17, 12].
    pts = []
    for k in range(48):
        t = 2 * math.pi * k / 48
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((cx + x * r / 16, cy - (y + 2.5) * r / 15))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    """Draw a filled shape of radius r (half its box) in white on a mask."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        hole = 0.5 * r
        draw.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=0)
    elif shape == "square":
        h = 0.85 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=255)
    elif shape == "triangle":
        top, base = cy - r, cy + 0.8 * r
        draw.polygon([(cx, top), (cx + r, base), (cx - r, base)], fill=255)
    elif shape == "star":
        draw.polygon(_star_points(cx, cy, 1.05 * r), fill=255)
    elif shape == "heart":
        draw.polygon(_heart_points(cx, cy, r), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def object_coverage(obj: Obj) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one object, float32 [32, 32]."""
    s = SUPERSAMPLE
    mask = Image.new("L", (SIZE * s, SIZE * s), 0)
    cx, cy = cell_centre(obj.position)
    r = SIZE_PX[obj.size] / 2 * s
    _draw_shape(ImageDraw.Draw(mask), obj.shape, cx * s, cy * s, r)
    small = mask.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def texture_shade(background: str) -> np.ndarray:
    """The colour texture marks are drawn in: the background nudged toward mid-gray."""
    rgb = np.array(BACKGROUND_RGB[background], dtype=np.float32)
    sign = 1.0 if rgb.mean() < 100 else -1.0
    return np.clip(rgb + sign * TEXTURE_DELTA, 0, 255)


def texture_weight(texture: str) -> np.ndarray:
    """Per-pixel blend weight in [0, 1] from background colour to its texture shade."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    if texture == "plain":
        return np.zeros((SIZE, SIZE), np.float32)
    if texture == "stripes":
        return ((x + y) % 6 < 2).astype(np.float32)
    if texture == "dots":
        return ((x % 4 == 1) & (y % 4 == 1)).astype(np.float32)
    if texture == "gradient":
        return (1.6 * y / (SIZE - 1)).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")


def render_background(background: str, texture: str) -> np.ndarray:
    """Float32 [32, 32, 3] background in 0..255 with its texture applied."""
    base = np.array(BACKGROUND_RGB[background], dtype=np.float32)
    shade = texture_shade(background)
    w = texture_weight(texture)[..., None]
    return np.clip(base + w * (shade - base), 0, 255)


def render(scene: Scene) -> np.ndarray:
    """Render a scene to a uint8 [32, 32, 3] RGB array."""
    img = render_background(scene.background, scene.texture)
    for obj in scene.objects:
        alpha = object_coverage(obj)[..., None]
        colour = np.array(COLOUR_RGB[obj.colour], dtype=np.float32)
        img = alpha * colour + (1 - alpha) * img
    return np.round(img).astype(np.uint8)


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def sample_scene(
    rng: np.random.Generator, split: str = "train", p_two: float = 0.4, p_texture: float = 0.3
) -> Scene:
    """Sample a scene; `split` controls which (shape, colour) pairs may appear.

    "train" never uses HELDOUT_PAIRS; "heldout" makes the first object a held-out pair
    (the second, if any, is unrestricted); "any" uses all pairs uniformly. `p_texture`
    is the probability of a non-plain texture.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    n = 2 if rng.random() < p_two else 1
    cells = rng.choice(len(POSITIONS), size=n, replace=False)
    objects = []
    for i, cell in enumerate(cells):
        pool = ALL_PAIRS
        if split == "train":
            pool = TRAIN_PAIRS
        elif split == "heldout" and i == 0:
            pool = tuple(sorted(HELDOUT_PAIRS))
        shape, colour = _pick(rng, pool)
        objects.append(Obj(shape, colour, _pick(rng, SIZES), POSITIONS[int(cell)]))
    background = _pick(rng, BACKGROUNDS)
    texture = _pick(rng, TEXTURES[1:]) if rng.random() < p_texture else "plain"
    return Scene(tuple(objects), background, texture)


def render_batch(
    source: int | Sequence[int] | np.random.Generator,
    n: int | None = None,
    split: str = "any",
    **sample_kwargs,
) -> tuple[np.ndarray, list[Scene]]:
    """Sample and render scenes: uint8 images [n, 32, 32, 3] and their scenes.

    `source` is a Generator (draw `n` scenes from it), an int seed (same, from
    `default_rng(seed)`), or a sequence of seeds (one scene per seed; `n` ignored).
    """
    if isinstance(source, np.random.Generator | int | np.integer):
        if n is None:
            raise ValueError("render_batch needs n when source is a Generator or a seed")
        rng = source if isinstance(source, np.random.Generator) else np.random.default_rng(int(source))
        scenes = [sample_scene(rng, split, **sample_kwargs) for _ in range(n)]
    else:
        scenes = [sample_scene(np.random.default_rng(int(s)), split, **sample_kwargs) for s in source]
    images = np.stack([render(s) for s in scenes]) if scenes else np.zeros((0, SIZE, SIZE, 3))
    return images.astype(np.uint8), scenes
