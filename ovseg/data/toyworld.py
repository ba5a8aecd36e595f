"""ToyWorld: a small synthetic world that ovseg can generate and learn end to end on a CPU.

A scene is a few procedural *stuff* regions (sky, grass, road, brick wall, ...) with emoji *things*
(cat, bicycle, pizza, ...) pasted on top, together with a pixel-exact semantic label map, instance
masks and a caption naming what is in it. Everything follows from an integer seed, so no dataset
lives on disk; the only files read are the sprite sheet and its metadata in ``assets/sprites``
(rendered once by ``training/make_sprites.py``).

Classes are numbered stuff first, then things in sprite-sheet order. About a quarter of the
things and exactly two stuff classes are *unseen*: they appear in captions (to pretrain the toy
CLIP) and in the evaluation sets, but never in the scenes used to train segmentation heads. A class
is unseen when the SHA-256 of ``"toyworld-split:" + name`` falls in the lowest quarter of the hash
range (things) or is among the two smallest (stuff), so the split does not depend on the order of
the sprite list. The unseen stuff classes are "water" and "gravel".

Example::

    world = ToyWorld(image_size=256)
    scene = world.scene(7, classes=world.seen_class_ids)
    scene.image.shape, scene.labels.shape, scene.caption  # (256, 256, 3), (256, 256), "a photo ..."
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import itertools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

__all__ = [
    "EVAL_SETS",
    "IGNORE_INDEX",
    "TRAIN_SEED_LIMIT",
    "EvalSetSpec",
    "Scene",
    "ToyClass",
    "ToyWorld",
    "ToyWorldDataset",
    "eval_set",
    "eval_vocabulary",
]

IGNORE_INDEX = 255  # label value for "no class"; generated scenes label every pixel
TRAIN_SEED_LIMIT = 10**9  # training scenes use seeds below this, evaluation scenes seeds above
DEFAULT_ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets" / "sprites"

_UNSEEN_THING_FRACTION = 0.25
_NUM_UNSEEN_STUFF = 2

Array = np.ndarray
Rng = np.random.Generator


# --------------------------------------------------------------------------------------------
# Public types


@dataclass(frozen=True)
class ToyClass:
    """One ToyWorld class.

    Attributes:
        name: lower-case class name, unique across ToyWorld ("cat", "brick wall").
        synonyms: other names for the same class; never equal to another class's name.
        kind: "stuff" (procedural texture region) or "thing" (emoji sprite).
        seen: whether scenes for head training may contain the class.
        group: coarse category ("animal", "vehicle", ...; "stuff" for stuff classes).
    """

    name: str
    synonyms: tuple[str, ...]
    kind: Literal["stuff", "thing"]
    seen: bool
    group: str


@dataclass
class Scene:
    """One generated scene.

    Attributes:
        image: (H, W, 3) uint8 RGB image.
        labels: (H, W) int64 semantic labels, indices into ``ToyWorld.classes``.
        instance_masks: (N, H, W) bool visible pixels of each thing; masks never overlap.
        instance_classes: (N,) int64 class index of each instance.
        caption: a sentence naming every class present in ``labels``.
    """

    image: Array
    labels: Array
    instance_masks: Array
    instance_classes: Array
    caption: str


# --------------------------------------------------------------------------------------------
# Procedural stuff textures. Each takes (rng, h, w, side) and returns a (3, h, w) float32 RGB
# image in roughly [0, 1]. ``side`` is the side of the whole image: pattern sizes (bricks, planks,
# waves) are fractions of it, so a texture looks the same whether it fills the frame or a strip.
# Colours and pattern sizes are drawn from per-class ranges so no two patches look the same,
# while the pattern (bricks, planks, lane marks, waves ...) keeps the class recognisable.
# Images are channel-first while they are built because numpy broadcasts a (3, 1, 1) colour over
# an (h, w) map much faster than a (3,) colour over (h, w, 1).


def _hsv(h: float, s: float, v: float) -> Array:
    """An RGB colour of shape (3, 1, 1), ready to broadcast over (h, w) maps."""
    rgb = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return np.array(rgb, dtype=np.float32).reshape(3, 1, 1)


def _noise(rng: Rng, h: int, w: int, cell: tuple[float, float]) -> Array:
    """Smooth value noise in about [0, 1], shape (h, w), with features of about ``cell`` =
    (height, width) pixels: a random grid upsampled bicubically."""
    rows, cols = math.ceil(h / cell[0]) + 1, math.ceil(w / cell[1]) + 1
    grid = rng.random((rows, cols), dtype=np.float32)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC))


def _fractal(rng: Rng, h: int, w: int, cell: float, octaves: int) -> Array:
    """Sum of noise octaves, the first with features of ``cell`` pixels, rescaled to [0, 1]."""
    total = sum(0.5**o * _noise(rng, h, w, (cell / 2**o, cell / 2**o)) for o in range(octaves))
    low, high = total.min(), total.max()
    return (total - low) / max(high - low, 1e-6)


def _smoothstep(lo: float, hi: float, x: Array) -> Array:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _mix(a: Array, b: Array, t: Array) -> Array:
    """Blend colours a and b ((3, 1, 1) or (3, h, w)) by weights t of shape (h, w)."""
    return a + (b - a) * t


def _grain(rng: Rng, h: int, w: int) -> Array:
    """Per-pixel uniform noise in [-0.5, 0.5), shape (h, w)."""
    return rng.random((h, w), dtype=np.float32) - 0.5


def _coords(h: int, w: int) -> tuple[Array, Array]:
    """Pixel row and column coordinates, shapes (h, 1) and (1, w)."""
    return np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]


def _sky(rng: Rng, h: int, w: int, side: int) -> Array:
    hue, sat, val = rng.uniform(0.55, 0.63), rng.uniform(0.5, 0.85), rng.uniform(0.7, 0.95)
    zenith, horizon = _hsv(hue, sat, val), _hsv(hue, sat * 0.3, val + 0.12)
    t = (np.arange(h, dtype=np.float32) / max(h - 1, 1)) ** rng.uniform(0.6, 1.6)
    haze = 0.05 * (_noise(rng, h, w, (side / 2, side / 3)) - 0.5)
    return zenith + (horizon - zenith) * t[:, None] + haze


def _clouds(rng: Rng, h: int, w: int, side: int) -> Array:
    puffs = _fractal(rng, h, w, side / rng.uniform(2, 4.5), 4)
    cover = _smoothstep(rng.uniform(0.15, 0.35), rng.uniform(0.45, 0.6), puffs)
    sky = _hsv(rng.uniform(0.55, 0.62), rng.uniform(0.35, 0.6), rng.uniform(0.8, 0.95))
    white = _hsv(0.6, rng.uniform(0.0, 0.06), rng.uniform(0.92, 1.0))
    shadow = _hsv(0.6, rng.uniform(0.08, 0.2), rng.uniform(0.5, 0.72))
    billows = _smoothstep(0.2, 0.8, _fractal(rng, h, w, side / 4, 3))
    return _mix(sky, _mix(shadow, white, billows), cover)


def _grass(rng: Rng, h: int, w: int, side: int) -> Array:
    hue = rng.uniform(0.2, 0.32)
    dark = _hsv(hue, rng.uniform(0.6, 0.9), rng.uniform(0.18, 0.3))
    tips = _hsv(hue - rng.uniform(0.0, 0.05), rng.uniform(0.45, 0.75), rng.uniform(0.55, 0.8))
    blades = _noise(rng, h, w, (side / 25, side / 128))  # tall, thin features: grass blades
    patches = _noise(rng, h, w, (side / 3, side / 3))
    return _mix(dark, tips, np.clip(0.75 * blades + 0.5 * patches - 0.1, 0.0, 1.0))


def _water(rng: Rng, h: int, w: int, side: int) -> Array:
    hue, sat, val = rng.uniform(0.48, 0.62), rng.uniform(0.55, 0.9), rng.uniform(0.35, 0.6)
    deep, light = _hsv(hue, sat, val), _hsv(hue, sat * 0.55, val + 0.3)
    rows, _ = _coords(h, w)
    period = side / rng.uniform(10, 22)
    wobble = _noise(rng, h, w, (side / 4, side / 6))
    waves = np.sin(2 * np.pi * (rows / period + 1.2 * wobble))
    streaks = _noise(rng, h, w, (side / 64, side / 10))  # wide, flat features: ripples
    crests = 0.35 * _smoothstep(0.8, 1.0, waves * streaks * 1.6)
    return _mix(deep, light, 0.35 + 0.3 * waves + 0.35 * (streaks - 0.5)) + crests


def _sand(rng: Rng, h: int, w: int, side: int) -> Array:
    base = _hsv(rng.uniform(0.08, 0.13), rng.uniform(0.25, 0.5), rng.uniform(0.72, 0.92))
    angle = rng.uniform(0, math.pi)
    ys, xs = _coords(h, w)
    across = xs * math.cos(angle) + ys * math.sin(angle)
    period = side / rng.uniform(8, 16)
    ripples = np.sin(2 * np.pi * (across / period + _noise(rng, h, w, (side / 3, side / 3))))
    dunes = _noise(rng, h, w, (side / 3, side / 3)) - 0.5
    return base * (1 + 0.06 * ripples + 0.16 * _grain(rng, h, w) + 0.12 * dunes)


def _snow(rng: Rng, h: int, w: int, side: int) -> Array:
    white = _hsv(rng.uniform(0.55, 0.62), rng.uniform(0.0, 0.05), rng.uniform(0.94, 1.0))
    shadow = _hsv(rng.uniform(0.57, 0.64), rng.uniform(0.12, 0.25), rng.uniform(0.72, 0.85))
    # Wind-blown drifts: soft shadows stretched along the ground.
    drifts = 0.6 * _noise(rng, h, w, (side / 6, side / 2)) + 0.4 * _fractal(rng, h, w, side / 2, 3)
    image = _mix(shadow, white, _smoothstep(0.2, 0.75, drifts)) + 0.04 * _grain(rng, h, w)
    glitter = (rng.random((h, w), dtype=np.float32) > 0.996).astype(np.float32)  # ice crystals
    return np.maximum(image, glitter)


def _road(rng: Rng, h: int, w: int, side: int) -> Array:
    asphalt = _hsv(rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.08), rng.uniform(0.22, 0.42))
    shade = (
        0.9
        + 0.35 * _grain(rng, h, w)
        + 0.25 * (_noise(rng, h, w, (side / 85, side / 85)) - 0.5)
        + 0.25 * (_noise(rng, h, w, (side / 3, side / 3)) - 0.5)
    )
    # Lane marks repeat at most ~0.8 image widths apart so that any sizeable road patch shows one.
    angle = rng.uniform(0, math.pi)
    ys, xs = _coords(h, w)
    along = xs * math.cos(angle) + ys * math.sin(angle)
    across = ys * math.cos(angle) - xs * math.sin(angle)
    spacing = side * rng.uniform(0.35, 0.8)
    distance = np.abs((across - rng.uniform(0, spacing)) % spacing - spacing / 2)
    mark = distance < max(1.0, side * rng.uniform(0.006, 0.012))
    if rng.random() < 0.7:
        dash = side * rng.uniform(0.06, 0.15)
        mark &= (along % (2 * dash)) < dash
    paint = _hsv(0.12, 0.05, 0.92) if rng.random() < 0.6 else _hsv(0.13, 0.8, 0.95)
    return _mix(asphalt * shade, paint * (0.9 + 0.1 * shade), mark.astype(np.float32))


def _brick_wall(rng: Rng, h: int, w: int, side: int) -> Array:
    brick_h = side / rng.uniform(9, 16)
    brick_w = brick_h * rng.uniform(2.0, 2.7)
    mortar_w = max(1.0, brick_h * rng.uniform(0.1, 0.17))
    ys, xs = _coords(h, w)
    ys, xs = ys + rng.uniform(0, brick_h), xs + rng.uniform(0, brick_w)
    row = np.floor(ys / brick_h).astype(np.int64)
    xs = xs + (row % 2) * (brick_w / 2)  # every other course is offset by half a brick
    col = np.floor(xs / brick_w).astype(np.int64)
    hue, sat, val = rng.uniform(0.0, 0.07), rng.uniform(0.45, 0.75), rng.uniform(0.42, 0.68)
    palette = np.concatenate(
        [
            _hsv(
                hue + rng.uniform(-0.02, 0.02),
                sat + rng.uniform(-0.1, 0.1),
                val + rng.uniform(-0.12, 0.1),
            )[:, :, 0]
            for _ in range(31)
        ],
        axis=1,
    )
    bricks = palette[:, (row * 7 + col * 13) % palette.shape[1]]
    mortar = ((ys % brick_h) < mortar_w) | ((xs % brick_w) < mortar_w)
    image = _mix(bricks, np.float32(rng.uniform(0.6, 0.8)), mortar.astype(np.float32))
    weathering = _noise(rng, h, w, (side / 64, side / 64)) - 0.5
    return image * (1 + 0.15 * _grain(rng, h, w) + 0.2 * weathering)


def _wooden_floor(rng: Rng, h: int, w: int, side: int) -> Array:
    vertical = rng.random() < 0.5
    if vertical:  # draw horizontal planks on the transposed canvas
        h, w = w, h
    plank_w = side / rng.uniform(4.5, 9)
    plank_len = plank_w * rng.uniform(4, 9)
    ys, xs = _coords(h, w)
    ys = ys + rng.uniform(0, plank_w)
    row = np.floor(ys / plank_w).astype(np.int64)
    shifts = rng.uniform(0, plank_len, row.max() + 1).astype(np.float32)
    xs = xs + shifts[row]  # staggered plank ends
    seg = np.floor(xs / plank_len).astype(np.int64)
    tones = rng.uniform(0.75, 1.15, 17).astype(np.float32)[(row * 5 + seg * 11) % 17]
    base = _hsv(rng.uniform(0.05, 0.1), rng.uniform(0.45, 0.75), rng.uniform(0.45, 0.78))
    rings = plank_w / rng.uniform(1.5, 3.5)
    wobble = _noise(rng, h, w, (side / 85, side / 5))
    grain = np.sin(2 * np.pi * (ys / rings + 3 * wobble))
    seam = (((ys % plank_w) < 1.2) | ((xs % plank_len) < 1.2)).astype(np.float32)
    image = base * (tones * (0.9 + 0.1 * grain + 0.1 * _grain(rng, h, w)) * (1 - 0.55 * seam))
    return np.ascontiguousarray(image.transpose(0, 2, 1)) if vertical else image


def _carpet(rng: Rng, h: int, w: int, side: int) -> Array:
    hue = rng.random()
    base = _hsv(hue, rng.uniform(0.35, 0.8), rng.uniform(0.3, 0.62))
    pile = (
        0.8
        + 0.45 * _grain(rng, h, w)
        + 0.3 * (_noise(rng, h, w, (side / 85, side / 85)) - 0.5)
        + 0.15 * (_noise(rng, h, w, (side / 2, side / 2)) - 0.5)
    )
    if rng.random() < 0.4:
        return base * pile
    # A woven lattice of diamonds in a contrasting colour.
    period = side / rng.uniform(4, 9)
    ys, xs = _coords(h, w)
    d1 = np.abs((xs + ys) % period - period / 2)
    d2 = np.abs((xs - ys) % period - period / 2)
    lattice = (np.minimum(d1, d2) < period * rng.uniform(0.06, 0.12)).astype(np.float32)
    accent = _hsv(
        hue + rng.choice([0.0, 0.5, 0.15]), rng.uniform(0.3, 0.7), rng.uniform(0.55, 0.85)
    )
    return _mix(base, accent, lattice) * pile


def _gravel(rng: Rng, h: int, w: int, side: int) -> Array:
    # Cellular noise on a jittered grid: one pebble per grid cell, found among the 3 x 3
    # neighbouring cells. Shifting whole pixel-resolution arrays by one cell per neighbour keeps
    # this at a few array operations per neighbour.
    cell = max(int(side / rng.uniform(18, 30)), 4)
    rows, cols = -(-h // cell) + 2, -(-w // cell) + 2
    jitter = rng.uniform(0.15, 0.85, (2, rows, cols)).astype(np.float32) * cell
    tone = rng.random((rows, cols), dtype=np.float32)

    def upsample(grid: Array, dy: int, dx: int) -> Array:  # grid value of the neighbour cell
        big = grid.repeat(cell, 0).repeat(cell, 1)
        return big[(1 + dy) * cell : (1 + dy) * cell + h, (1 + dx) * cell : (1 + dx) * cell + w]

    ys, xs = _coords(h, w)
    local_y, local_x = ys % cell, xs % cell
    nearest = np.full((h, w), np.inf, np.float32)
    second = np.full((h, w), np.inf, np.float32)
    pebble_tone = np.zeros((h, w), np.float32)
    for dy, dx in itertools.product((-1, 0, 1), repeat=2):
        distance = (local_y - dy * cell - upsample(jitter[0], dy, dx)) ** 2 + (
            local_x - dx * cell - upsample(jitter[1], dy, dx)
        ) ** 2
        closer = distance < nearest
        second = np.minimum(second, np.maximum(nearest, distance))
        nearest = np.where(closer, distance, nearest)
        pebble_tone = np.where(closer, upsample(tone, dy, dx), pebble_tone)
    # Dark crevices where two pebbles meet, a rounded highlight at each pebble's centre.
    crevice = _smoothstep(0.0, 0.35 * cell, np.sqrt(second) - np.sqrt(nearest))
    dome = 1 - 0.35 * np.sqrt(nearest) / cell
    hue = rng.uniform(0.05, 0.12)
    light = _hsv(hue, rng.uniform(0.03, 0.2), rng.uniform(0.68, 0.88))
    dark = _hsv(hue, rng.uniform(0.1, 0.35), rng.uniform(0.3, 0.5))
    shade = (0.2 + 0.8 * crevice) * dome * (1 + 0.15 * _grain(rng, h, w))
    return _mix(dark, light, pebble_tone) * shade


def _dirt(rng: Rng, h: int, w: int, side: int) -> Array:
    base = _hsv(rng.uniform(0.05, 0.1), rng.uniform(0.35, 0.65), rng.uniform(0.3, 0.5))
    clods = _noise(rng, h, w, (side / 51, side / 51)) - 0.5
    blotches = _fractal(rng, h, w, side / 3, 4)
    return base * (0.6 + 0.6 * blotches + 0.3 * clods + 0.25 * _grain(rng, h, w))


def _tiled_floor(rng: Rng, h: int, w: int, side: int) -> Array:
    tile = side / rng.uniform(3.5, 8)
    grout_w = max(1.0, tile * rng.uniform(0.04, 0.08))
    ys, xs = _coords(h, w)
    ys, xs = ys + rng.uniform(0, tile), xs + rng.uniform(0, tile)
    row, col = np.floor(ys / tile).astype(np.int64), np.floor(xs / tile).astype(np.int64)
    palette = np.array(
        [
            [0.93, 0.9, 0.82],
            [0.92, 0.93, 0.94],
            [0.75, 0.42, 0.3],
            [0.55, 0.65, 0.72],
            [0.16, 0.16, 0.17],
            [0.85, 0.78, 0.6],
        ],
        dtype=np.float32,
    )
    first, second = rng.choice(len(palette), 2, replace=False)
    checker = rng.random() < 0.4
    colours = palette[[first, second if checker else first]].T  # (3, 2)
    variation = rng.uniform(0.93, 1.07, 7).astype(np.float32)[(row * 3 + col * 5) % 7]
    # A soft gradient across each tile and a broad sheen make the surface read as glazed.
    sheen = (
        0.94
        + 0.08 * (xs % tile + ys % tile) / (2 * tile)
        + 0.12 * (_noise(rng, h, w, (side / 2, side / 2)) - 0.5)
    )
    tiles = colours[:, (row + col) % 2] * (variation * sheen)
    grout = (((ys % tile) < grout_w) | ((xs % tile) < grout_w)).astype(np.float32)
    image = _mix(tiles, np.float32(rng.uniform(0.35, 0.7)), grout)
    return image * (1 + 0.04 * _grain(rng, h, w))


def _lava(rng: Rng, h: int, w: int, side: int) -> Array:
    field = _fractal(rng, h, w, side / rng.uniform(3, 6), 3)
    ridge = 1 - np.abs(2 * field - 1)  # close to 1 along a network of thin lines: the cracks
    pools = _smoothstep(0.6, 0.8, _fractal(rng, h, w, side / 2, 2))
    heat = np.maximum(_smoothstep(0.8, 0.97, ridge), pools)
    crust = _hsv(0.03, 0.35, 0.14) * (0.6 + 0.8 * _noise(rng, h, w, (side / 43, side / 43)))
    orange = _hsv(rng.uniform(0.03, 0.07), 0.97, 1.0)
    yellow = _hsv(0.13, 0.65, 1.0)
    molten = _mix(orange, yellow, _smoothstep(0.9, 1.0, np.maximum(ridge, pools * 0.95)))
    return _mix(crust, molten, heat)


@dataclass(frozen=True)
class _Stuff:
    """A stuff class: caption phrases (the first gives the name) and its texture."""

    phrases: tuple[str, ...]  # "the road", "the street", "asphalt"
    texture: Callable[[Rng, int, int, int], Array]  # (rng, h, w, image side) -> (3, h, w)
    place: Literal["upper", "ground"]  # upper classes go above the horizon in horizon layouts


_STUFF = (
    _Stuff(("the sky", "a blue sky"), _sky, "upper"),
    _Stuff(("clouds", "a cloudy sky"), _clouds, "upper"),
    _Stuff(("grass", "a lawn", "a meadow"), _grass, "ground"),
    _Stuff(("water", "the sea", "a lake"), _water, "ground"),
    _Stuff(("sand", "the beach"), _sand, "ground"),
    _Stuff(("snow", "a snowfield"), _snow, "ground"),
    _Stuff(("the road", "the street", "asphalt"), _road, "ground"),
    _Stuff(("a brick wall", "bricks", "brickwork"), _brick_wall, "upper"),
    _Stuff(("a wooden floor", "floorboards", "a parquet floor"), _wooden_floor, "ground"),
    _Stuff(("a carpet", "a rug"), _carpet, "ground"),
    _Stuff(("gravel", "pebbles"), _gravel, "ground"),
    _Stuff(("dirt", "soil", "mud"), _dirt, "ground"),
    _Stuff(("a tiled floor", "tiles", "floor tiles"), _tiled_floor, "ground"),
    _Stuff(("lava", "magma"), _lava, "ground"),
)


def _strip_article(phrase: str) -> str:
    for article in ("a ", "an ", "the "):
        if phrase.startswith(article):
            return phrase[len(article) :]
    return phrase


# --------------------------------------------------------------------------------------------
# Captions

# Mass nouns and proper names take no article ("bread and a cat").
# fmt: off
_NO_ARTICLE = frozenset({
    "bread", "cheese", "spaghetti", "pasta", "corn", "maize", "broccoli", "wheat", "luggage",
    "cash", "milk", "wine", "honey", "chocolate", "sushi", "coffee", "champagne", "firewood",
    "timber", "sunshine", "lightning", "beer", "fire", "salad", "chilli", "cattle", "earth",
    "planet earth", "saturn", "toilet paper", "ping pong",
})
# fmt: on


def _with_article(word: str) -> str:
    """'a cat', 'an apple', 'grapes', 'bread', 'a bunch of grapes'."""
    head = word.split(" of ")[0]
    plural = head.endswith("s") and not head.endswith(("ss", "us", "os"))
    if word in _NO_ARTICLE or plural:
        return word
    vowel = word[0] in "aeio" or (word[0] == "u" and not word.startswith(("ufo", "uni")))
    return ("an " if vowel else "a ") + word


def _pick(rng: Rng, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# Templates that mention things and every stuff class in the scene.
_SCENE_TEMPLATES = (
    "a photo of {things} with {stuff} in the background",
    "{things} in front of {stuff}",
    "{things} seen against {stuff}",
    "an image showing {things}. the background is {stuff}",
    "there is {things} in front of {stuff}",
)
# Templates that put the things on the largest ground region; other stuff goes to the end.
_GROUND_TEMPLATES = (
    "a photo of {things} on {ground}",
    "there is {things} on {ground}",
    "{things} on {ground}",
    "a picture of {things} lying on {ground}",
)
_STUFF_TEMPLATES = (
    "a photo of {stuff}",
    "a view of {stuff}",
    "{stuff}",
    "a picture showing {stuff}",
)
_SYNONYM_PROBABILITY = 0.3
# Captions of a single class on its own ("web images" for CLIP and the toy diffusion model).
SINGLE_CAPTION_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
    "a close-up photo of a {}.",
    "a {} on its own.",
    "this is a {}.",
    "there is a {} in the picture.",
)


# --------------------------------------------------------------------------------------------
# Assets


@functools.lru_cache(maxsize=4)
def _load_sprites(assets_dir: Path) -> tuple[tuple[dict, ...], tuple[Image.Image, ...]]:
    """Sprite metadata and one premultiplied-alpha ("RGBa") cell image per sprite, read once."""
    meta_path, sheet_path = assets_dir / "sprites.json", assets_dir / "sheet.png"
    if not meta_path.is_file() or not sheet_path.is_file():
        raise FileNotFoundError(
            f"ToyWorld sprites not found in {assets_dir} (expected sprites.json and sheet.png; "
            "run `python training/make_sprites.py --out assets/sprites`)"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    cell, columns = meta["cell"], meta["columns"]
    # Premultiplied alpha lets resizing, rotation and colour jitter treat colour linearly without
    # dark fringes from the transparent pixels.
    sheet = Image.open(sheet_path).convert("RGBa")
    corners = [((i % columns) * cell, (i // columns) * cell) for i in range(len(meta["sprites"]))]
    cells = tuple(sheet.crop((x, y, x + cell, y + cell)) for x, y in corners)
    return tuple(meta["sprites"]), cells


def _split_score(name: str) -> float:
    """A fixed pseudo-random number in [0, 1) per class name; low scores are unseen."""
    digest = hashlib.sha256(f"toyworld-split:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _colour_jitter_matrix(rng: Rng) -> Array:
    """A 3x3 matrix that changes brightness, saturation and hue of (premultiplied) RGB."""
    brightness = rng.uniform(0.8, 1.15)
    saturation = rng.uniform(0.7, 1.3)
    angle = rng.uniform(-0.2, 0.2)  # hue rotation in radians about the grey axis
    luma = np.array([0.299, 0.587, 0.114])
    saturate = saturation * np.eye(3) + (1 - saturation) * np.tile(luma, (3, 1))
    cross = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]]) / np.sqrt(3)
    rotate = np.cos(angle) * np.eye(3) + (1 - np.cos(angle)) / 3 + np.sin(angle) * cross
    return (brightness * saturate @ rotate).astype(np.float32)


# --------------------------------------------------------------------------------------------
# The world


class ToyWorld:
    """Deterministic generator of ToyWorld scenes, single-object images and the class list.

    Args:
        image_size: side of the square images, in pixels.
        assets_dir: folder with ``sheet.png`` and ``sprites.json``; defaults to the repository's
            ``assets/sprites``.

    Attributes:
        classes: all classes, stuff first then things; list indices are the label values.
    """

    def __init__(self, *, image_size: int = 256, assets_dir: Path | None = None) -> None:
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
        self.image_size = image_size
        self._sprite_meta, self._sprites = _load_sprites(Path(assets_dir or DEFAULT_ASSETS_DIR))

        stuff_names = [_strip_article(s.phrases[0]) for s in _STUFF]
        unseen_stuff = set(sorted(stuff_names, key=_split_score)[:_NUM_UNSEEN_STUFF])
        self.classes: list[ToyClass] = [
            ToyClass(
                name=name,
                synonyms=tuple(_strip_article(p) for p in stuff.phrases[1:]),
                kind="stuff",
                seen=name not in unseen_stuff,
                group="stuff",
            )
            for name, stuff in zip(stuff_names, _STUFF, strict=True)
        ]
        self.classes += [
            ToyClass(
                name=m["name"],
                synonyms=tuple(m["synonyms"]),
                kind="thing",
                seen=_split_score(m["name"]) >= _UNSEEN_THING_FRACTION,
                group=m["group"],
            )
            for m in self._sprite_meta
        ]
        self._num_stuff = len(_STUFF)
        # Caption phrases per class: the name first, then the synonyms.
        self._phrases: list[tuple[str, ...]] = [s.phrases for s in _STUFF] + [
            tuple(_with_article(w) for w in (m["name"], *m["synonyms"])) for m in self._sprite_meta
        ]

    # ---- class list -----------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        """Names of all classes, in label order."""
        return [c.name for c in self.classes]

    @property
    def stuff_class_ids(self) -> list[int]:
        """Ids of the procedural texture classes: 0 .. number of stuff classes - 1."""
        return list(range(self._num_stuff))

    @property
    def thing_class_ids(self) -> list[int]:
        """Ids of the sprite classes, after the stuff classes."""
        return list(range(self._num_stuff, len(self.classes)))

    @property
    def seen_class_ids(self) -> list[int]:
        """Classes that head-training scenes may contain."""
        return [i for i, c in enumerate(self.classes) if c.seen]

    @property
    def unseen_class_ids(self) -> list[int]:
        """Classes held out from head training (zero-shot evaluation)."""
        return [i for i, c in enumerate(self.classes) if not c.seen]

    # ---- scenes ---------------------------------------------------------------------------

    def scene(
        self,
        seed: int,
        *,
        classes: Sequence[int] | None = None,
        num_things: tuple[int, int] | None = None,
        clutter: bool = False,
    ) -> Scene:
        """Generate the scene for ``seed``; the same arguments always give identical arrays.

        Args:
            seed: non-negative integer that fixes everything in the scene.
            classes: class ids that may appear (e.g. ``seen_class_ids``); at least one must be a
                stuff class. ``None`` allows all classes.
            num_things: inclusive (min, max) number of pasted sprites; defaults to (1, 8), or
                (8, 16) with ``clutter``. Fully occluded sprites are dropped, so fewer may show.
            clutter: more stuff classes and regions and more, smaller things (the ``toy-full``
                evaluation set).

        Returns:
            A :class:`Scene` of ``image_size`` x ``image_size`` pixels.
        """
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        allowed = self._check_class_ids(classes)
        stuff_pool = [c for c in allowed if c < self._num_stuff]
        thing_pool = [c for c in allowed if c >= self._num_stuff]
        if not stuff_pool:
            raise ValueError("classes must include at least one stuff class to fill the background")
        low, high = num_things or ((8, 16) if clutter else (1, 8))
        if not 0 <= low <= high:
            raise ValueError(
                f"num_things must be (min, max) with 0 <= min <= max, got {num_things}"
            )

        rng = np.random.default_rng(seed)
        size = self.image_size
        labels = self._layout(rng, stuff_pool, clutter)
        image = self._paint_stuff(rng, labels)

        # Paste things in order; later pastes cover earlier ones. instance_map holds, per pixel,
        # the index of the topmost instance, or -1.
        instance_map = np.full((size, size), -1, dtype=np.int64)
        count = int(rng.integers(low, high + 1)) if thing_pool else 0
        pasted = rng.choice(thing_pool, count) if count else np.zeros(0, np.int64)
        scale = (0.08, 0.3) if clutter else (0.12, 0.5)
        for index, class_id in enumerate(pasted):
            side = size * rng.uniform(*scale)
            centre = rng.uniform(0.1 * size, 0.9 * size, 2)
            self._paste(rng, image, int(class_id), side, centre, instance_map, index)

        visible = np.flatnonzero(np.bincount(instance_map.ravel() + 1, minlength=count + 1)[1:])
        instance_classes = pasted[visible].astype(np.int64)
        instance_masks = instance_map[None] == visible[:, None, None]
        covered = instance_map >= 0
        labels[covered] = pasted[instance_map[covered]]
        caption = self._caption(rng, labels, instance_classes)
        return Scene(_to_uint8(image), labels, instance_masks, instance_classes, caption)

    def sprite_image(
        self,
        class_id: int,
        seed: int,
        *,
        size: int | None = None,
        background: Literal["random", "plain", "white"] = "random",
    ) -> Array:
        """One class alone: a thing centred on a background, or a patch of stuff.

        Used for zero-shot classification of the toy CLIP and as DPSeg's visual prompts (the
        ToyWorld stand-in for Stable Diffusion images). Pose (scale, rotation, flip), colour and
        pixel noise are random but fixed by ``(class_id, seed)``.

        Args:
            class_id: index into ``classes``.
            seed: non-negative integer.
            size: side of the square output; defaults to ``image_size``.
            background: for things, "random" (a random stuff texture or flat colour), "plain" (a
                random flat colour) or "white". Stuff patches fill the whole image.

        Returns:
            (size, size, 3) uint8 RGB image.
        """
        (class_id,) = self._check_class_ids([class_id])
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if background not in ("random", "plain", "white"):
            raise ValueError(f"background must be 'random', 'plain' or 'white', got {background!r}")
        size = size or self.image_size
        rng = np.random.default_rng([seed, class_id])
        if class_id < self._num_stuff:
            image = _STUFF[class_id].texture(rng, size, size, size)
        else:
            if background == "random" and rng.random() < 0.7:
                image = _STUFF[int(rng.integers(self._num_stuff))].texture(rng, size, size, size)
            elif background == "white":
                image = np.ones((3, size, size), np.float32)
            else:
                colour = _hsv(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.5, 1.0))
                image = np.broadcast_to(colour, (3, size, size)).copy()
            centre = size / 2 + rng.uniform(-0.05, 0.05, 2) * size
            self._paste(rng, image, class_id, size * rng.uniform(0.6, 0.9), centre)
        image += rng.uniform(0.0, 0.03) * rng.standard_normal(image.shape, dtype=np.float32)
        return _to_uint8(image)

    def single_caption(self, class_id: int, rng: Rng) -> str:
        """A varied caption of one class on its own (as in :meth:`sprite_image`), naming the class
        or, sometimes, one of its synonyms."""
        toy_class = self.classes[class_id]
        name = toy_class.name
        if toy_class.synonyms and rng.random() < _SYNONYM_PROBABILITY:
            name = _pick(rng, toy_class.synonyms)
        return _pick(rng, SINGLE_CAPTION_TEMPLATES).format(name)

    # ---- internals ------------------------------------------------------------------------

    def _check_class_ids(self, classes: Sequence[int] | None) -> list[int]:
        if classes is None:
            return list(range(len(self.classes)))
        ids = sorted({int(c) for c in classes})
        if not ids or ids[0] < 0 or ids[-1] >= len(self.classes):
            raise ValueError(
                f"class ids must be non-empty and in [0, {len(self.classes)}), got {list(classes)}"
            )
        return ids

    def _layout(self, rng: Rng, stuff_pool: list[int], clutter: bool) -> Array:
        """Stuff label map (H, W) int64: a wavy horizon with upper classes (sky, clouds, walls)
        above ground classes when both are chosen, otherwise one partition of the whole frame."""
        size = self.image_size
        low, high = (3, 6) if clutter else (1, 4)
        count = min(int(rng.integers(low, high + 1)), len(stuff_pool))
        chosen = [int(c) for c in rng.choice(stuff_pool, count, replace=False)]
        upper = [c for c in chosen if _STUFF[c].place == "upper"]
        ground = [c for c in chosen if _STUFF[c].place == "ground"]
        if not (upper and ground):
            return self._partition(rng, chosen, clutter)
        knots = rng.uniform(-1, 1, 6) * rng.uniform(0, 0.06) * size
        horizon = rng.uniform(0.25, 0.6) * size + np.interp(
            np.arange(size), np.linspace(0, size - 1, len(knots)), knots
        )
        above = np.arange(size)[:, None] < horizon[None, :]
        return np.where(
            above, self._partition(rng, upper, clutter), self._partition(rng, ground, clutter)
        )

    def _partition(self, rng: Rng, classes: list[int], clutter: bool) -> Array:
        """Split the frame among ``classes``: parallel bands at a random angle, or Voronoi blobs,
        both with edges displaced by smooth noise. Returns (H, W) int64 labels."""
        size = self.image_size
        if len(classes) == 1:
            return np.full((size, size), classes[0], dtype=np.int64)
        amplitude = rng.uniform(0.0, 0.12)
        coords = np.linspace(0, 1, size, dtype=np.float32)
        warp = (size / 3, size / 3)
        ys = coords[:, None] + amplitude * (_noise(rng, size, size, warp) - 0.5)
        xs = coords[None, :] + amplitude * (_noise(rng, size, size, warp) - 0.5)
        if rng.random() < 0.5:
            angle = rng.uniform(0, np.pi)
            position = (xs - 0.5) * math.cos(angle) + (ys - 0.5) * math.sin(angle)
            # Evenly spaced cuts, jittered, so that every band keeps a visible share.
            cuts = np.linspace(-0.4, 0.4, len(classes) + 1)[1:-1]
            cuts = cuts + rng.uniform(-0.25, 0.25, len(cuts)) * 0.8 / len(classes)
            return np.asarray(classes, dtype=np.int64)[np.searchsorted(cuts, position)]
        extra = int(rng.integers(0, 5 if clutter else 3))
        owners = np.asarray(classes + [int(c) for c in rng.choice(classes, extra)], dtype=np.int64)
        seeds = rng.uniform(0.05, 0.95, (len(owners), 2)).astype(np.float32)
        distance = (ys[None] - seeds[:, 0, None, None]) ** 2 + (
            xs[None] - seeds[:, 1, None, None]
        ) ** 2
        return owners[np.argmin(distance, axis=0)]

    def _paint_stuff(self, rng: Rng, labels: Array) -> Array:
        """Fill each stuff region with its texture; textures are drawn only over the region's
        bounding box. Returns (3, H, W) float32."""
        image = np.zeros((3, *labels.shape), dtype=np.float32)
        for class_id in np.flatnonzero(np.bincount(labels.ravel(), minlength=len(_STUFF))):
            mask = labels == class_id
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
            texture = _STUFF[class_id].texture(rng, height, width, self.image_size)
            # Regions are disjoint, so adding masked textures to zeros composites them; this is
            # much faster than a masked copy broadcast over channels.
            image[:, box[0], box[1]] += texture * mask[box]
        return image

    def _paste(
        self,
        rng: Rng,
        image: Array,
        class_id: int,
        side: float,
        centre: Array,
        instance_map: Array | None = None,
        index: int = 0,
    ) -> None:
        """Composite one posed, colour-jittered sprite onto ``image`` (3, H, W) in place.

        The sprite's cell is scaled to ``side`` pixels, flipped with probability 1/2, rotated by
        up to 30 degrees and centred at ``centre`` (x, y). Pixels with alpha above 1/2 are written
        as ``index`` into ``instance_map`` (H, W), hiding earlier instances.
        """
        sprite = self._sprites[class_id - self._num_stuff]
        pixels = max(round(side), 4)
        sprite = sprite.resize((pixels, pixels), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            sprite = sprite.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        sprite = sprite.rotate(rng.uniform(-30, 30), Image.Resampling.BILINEAR, expand=True)
        # Clip the sprite to the image; sprites may hang over the border.
        height, width = image.shape[1:]
        top = round(centre[1]) - sprite.height // 2
        left = round(centre[0]) - sprite.width // 2
        y0, y1 = max(top, 0), min(top + sprite.height, height)
        x0, x1 = max(left, 0), min(left + sprite.width, width)
        if y0 >= y1 or x0 >= x1:
            return
        patch = np.asarray(sprite)[y0 - top : y1 - top, x0 - left : x1 - left]
        patch = patch.transpose(2, 0, 1).astype(np.float32) * np.float32(1 / 255)
        alpha = patch[3:]
        jittered = _colour_jitter_matrix(rng) @ patch[:3].reshape(3, -1)
        colour = np.clip(jittered.reshape(3, *alpha.shape[1:]), 0.0, alpha)
        target = image[:, y0:y1, x0:x1]
        target *= 1.0 - alpha
        target += colour
        if instance_map is not None:
            instance_map[y0:y1, x0:x1][alpha[0] > 0.5] = index

    def _caption(self, rng: Rng, labels: Array, instance_classes: Array) -> str:
        """A sentence naming every class in ``labels``, things and stuff each by area, largest
        first; a synonym sometimes replaces a name."""
        areas = np.bincount(labels.ravel(), minlength=len(self.classes))
        things = sorted({int(c) for c in instance_classes}, key=lambda c: -areas[c])
        stuff = sorted((c for c in range(self._num_stuff) if areas[c]), key=lambda c: -areas[c])

        def phrase(class_id: int) -> str:
            options = self._phrases[class_id]
            if len(options) > 1 and rng.random() < _SYNONYM_PROBABILITY:
                return options[int(rng.integers(1, len(options)))]
            return options[0]

        thing_text = _join([phrase(c) for c in things]) if things else ""
        stuff_phrases = [phrase(c) for c in stuff]
        if not thing_text:
            return _pick(rng, _STUFF_TEMPLATES).format(stuff=_join(stuff_phrases))
        if not stuff_phrases:
            return f"a photo of {thing_text}"
        ground = [i for i, c in enumerate(stuff) if _STUFF[c].place == "ground"]
        if ground and rng.random() < 0.5:
            rest = stuff_phrases[: ground[0]] + stuff_phrases[ground[0] + 1 :]
            text = _pick(rng, _GROUND_TEMPLATES).format(
                things=thing_text, ground=stuff_phrases[ground[0]]
            )
            return text + (f", with {_join(rest)} in the background" if rest else "")
        return _pick(rng, _SCENE_TEMPLATES).format(things=thing_text, stuff=_join(stuff_phrases))


def _to_uint8(image: Array) -> Array:
    """(3, H, W) float image in [0, 1] to (H, W, 3) uint8."""
    channels = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.stack(list(channels), axis=-1)  # faster than a transposed copy


# --------------------------------------------------------------------------------------------
# Streaming dataset


class ToyWorldDataset(torch.utils.data.IterableDataset):
    """An endless (or ``num_scenes`` long) stream of ToyWorld scenes for training.

    Scene ``i`` of the stream uses seed ``base_seed + i``. DataLoader workers and DDP ranks take
    interleaved, disjoint subsets of the stream, so together they see every scene once. Pass a
    different ``base_seed`` for fresh scenes. Seeds stay below ``TRAIN_SEED_LIMIT``, which keeps
    training scenes apart from the evaluation sets.

    Args:
        split: "seen" (only seen classes appear; the head-training set) or "all".
        image_size: side of the square images.
        base_seed: seed of the first scene.
        num_scenes: length of the stream; ``None`` streams forever.
        clutter: generate cluttered scenes (see :meth:`ToyWorld.scene`).
        assets_dir: sprite folder, as for :class:`ToyWorld`.

    Yields:
        dict with ``image`` (3, H, W) float32 in [0, 1], ``labels`` (H, W) int64 and ``caption``.
    """

    def __init__(
        self,
        *,
        split: Literal["seen", "all"] = "seen",
        image_size: int = 256,
        base_seed: int = 0,
        num_scenes: int | None = None,
        clutter: bool = False,
        assets_dir: Path | None = None,
    ) -> None:
        super().__init__()
        if split not in ("seen", "all"):
            raise ValueError(f"split must be 'seen' or 'all', got {split!r}")
        last_seed = base_seed + (num_scenes or 1) - 1
        if base_seed < 0 or last_seed >= TRAIN_SEED_LIMIT:
            raise ValueError(
                f"training seeds must lie in [0, {TRAIN_SEED_LIMIT}), got {base_seed}..{last_seed}"
            )
        self.split, self.image_size, self.base_seed = split, image_size, base_seed
        self.num_scenes, self.clutter, self.assets_dir = num_scenes, clutter, assets_dir

    def __len__(self) -> int:
        if self.num_scenes is None:
            raise TypeError("an endless ToyWorldDataset has no length; pass num_scenes")
        return self.num_scenes

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | str]]:
        world = ToyWorld(image_size=self.image_size, assets_dir=self.assets_dir)
        classes = world.seen_class_ids if self.split == "seen" else None
        shard, num_shards = _shard()
        if self.num_scenes is None:
            indices: Iterator[int] = itertools.count(shard, num_shards)
        else:
            indices = iter(range(shard, self.num_scenes, num_shards))
        for index in indices:
            seed = self.base_seed + index
            if seed >= TRAIN_SEED_LIMIT:
                return
            scene = world.scene(seed, classes=classes, clutter=self.clutter)
            yield {
                "image": torch.from_numpy(scene.image).permute(2, 0, 1).float().div_(255.0),
                "labels": torch.from_numpy(scene.labels),
                "caption": scene.caption,
            }


def _shard() -> tuple[int, int]:
    """(index, count) of this process's share of a stream across DDP ranks and loader workers."""
    rank, world_size = 0, 1
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    info = torch.utils.data.get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
    return rank * num_workers + worker, world_size * num_workers


# --------------------------------------------------------------------------------------------
# Evaluation sets


@dataclass(frozen=True)
class EvalSetSpec:
    """A fixed evaluation set: scenes ``first_seed .. first_seed + num_images - 1``.

    Attributes:
        vocabulary: "seen" (scenes and vocabulary use seen classes only) or "all".
        clutter: whether scenes are cluttered.
        first_seed: seed of the first scene; at least ``TRAIN_SEED_LIMIT``.
        num_images: default number of scenes.
        max_images: seeds reserved for the set.
        description: what the set stands for.
    """

    vocabulary: Literal["seen", "all"]
    clutter: bool
    first_seed: int
    num_images: int
    description: str
    max_images: int = 10**6


EVAL_SETS: dict[str, EvalSetSpec] = {
    "toy-seen": EvalSetSpec(
        vocabulary="seen",
        clutter=False,
        first_seed=TRAIN_SEED_LIMIT,
        num_images=500,
        description="seen classes only, vocabulary = seen classes (in-domain check)",
    ),
    "toy-open": EvalSetSpec(
        vocabulary="all",
        clutter=False,
        first_seed=TRAIN_SEED_LIMIT + 10**6,
        num_images=500,
        description="any class, vocabulary = all classes; report seen/unseen mIoU and hIoU",
    ),
    "toy-full": EvalSetSpec(
        vocabulary="all",
        clutter=True,
        first_seed=TRAIN_SEED_LIMIT + 2 * 10**6,
        num_images=300,
        description="cluttered scenes, vocabulary = all classes (the ADE-847 analog)",
    ),
}


def _eval_spec(name: str) -> EvalSetSpec:
    if name not in EVAL_SETS:
        raise ValueError(f"unknown ToyWorld eval set {name!r}; choose from {sorted(EVAL_SETS)}")
    return EVAL_SETS[name]


def eval_vocabulary(name: str, *, assets_dir: Path | None = None) -> list[int]:
    """Class ids a method is asked to segment on eval set ``name``."""
    world = ToyWorld(assets_dir=assets_dir)
    if _eval_spec(name).vocabulary == "seen":
        return world.seen_class_ids
    return list(range(len(world.classes)))


def eval_set(
    name: str,
    *,
    image_size: int = 256,
    num_images: int | None = None,
    assets_dir: Path | None = None,
) -> list[Scene]:
    """The scenes of eval set ``name`` ("toy-seen", "toy-open" or "toy-full"), always the same.

    Args:
        name: a key of ``EVAL_SETS``.
        image_size: side of the square images.
        num_images: number of scenes; defaults to the set's ``num_images``.
        assets_dir: sprite folder, as for :class:`ToyWorld`.
    """
    spec = _eval_spec(name)
    count = spec.num_images if num_images is None else num_images
    if not 0 < count <= spec.max_images:
        raise ValueError(f"num_images must be in [1, {spec.max_images}], got {count}")
    world = ToyWorld(image_size=image_size, assets_dir=assets_dir)
    classes = world.seen_class_ids if spec.vocabulary == "seen" else None
    return [
        world.scene(spec.first_seed + i, classes=classes, clutter=spec.clutter)
        for i in range(count)
    ]
