"""Overlays of label maps and heatmaps on images.

Colours are a function of the class *name*, not its index, so a class keeps its colour across
methods, vocabularies and sessions (a side-by-side view needs one shared legend).
"""

from __future__ import annotations

import colorsys
import hashlib
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps


def class_color(name: str) -> tuple[int, int, int]:
    """A saturated, stable RGB colour for a class name."""
    digest = hashlib.sha1(name.strip().lower().encode("utf-8")).digest()
    hue = int.from_bytes(digest[:2], "big") / 65535
    saturation = 0.55 + 0.4 * digest[2] / 255
    value = 0.75 + 0.25 * digest[3] / 255
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
    return round(red * 255), round(green * 255), round(blue * 255)


def class_palette(names: Sequence[str]) -> np.ndarray:
    """``K×3`` uint8 colours for a list of class names."""
    return np.array([class_color(name) for name in names], dtype=np.uint8).reshape(-1, 3)


def colorize(label_map: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """``H×W`` class indices → ``H×W×3`` uint8 colour image."""
    return class_palette(names)[label_map]


def overlay(
    image: np.ndarray, label_map: np.ndarray, names: Sequence[str], *, alpha: float = 0.55
) -> np.ndarray:
    """Blend the colourised label map over an ``H×W×3`` uint8 image, with class borders drawn."""
    if image.shape[:2] != label_map.shape:
        raise ValueError(f"Image {image.shape[:2]} and label map {label_map.shape} differ in size.")
    colours = colorize(label_map, names).astype(np.float32)
    blended = image.astype(np.float32) * (1 - alpha) + colours * alpha
    edges = np.zeros(label_map.shape, dtype=bool)
    edges[1:] |= label_map[1:] != label_map[:-1]
    edges[:, 1:] |= label_map[:, 1:] != label_map[:, :-1]
    blended[edges] = 255
    return blended.round().astype(np.uint8)


def heatmap(
    image: np.ndarray,
    scores: np.ndarray,
    *,
    alpha: float = 0.6,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "inferno",
) -> np.ndarray:
    """Overlay an ``h×w`` score map (any resolution, nearest-resized) on an ``H×W×3`` image."""
    scores = np.asarray(scores, dtype=np.float32)
    height, width = image.shape[:2]
    rows = (np.arange(height) * scores.shape[0] // height).clip(0, scores.shape[0] - 1)
    cols = (np.arange(width) * scores.shape[1] // width).clip(0, scores.shape[1] - 1)
    resized = scores[rows][:, cols]
    low = float(resized.min()) if vmin is None else vmin
    high = float(resized.max()) if vmax is None else vmax
    normalised = np.clip((resized - low) / max(high - low, 1e-8), 0, 1)
    colours = colormaps[cmap](normalised)[..., :3] * 255
    return (image.astype(np.float32) * (1 - alpha) + colours * alpha).round().astype(np.uint8)


def legend_entries(names: Sequence[str], areas: np.ndarray | None = None) -> list[tuple[str, str]]:
    """(label, hex colour) pairs for the classes, largest area first when areas are given."""
    order = range(len(names)) if areas is None else np.argsort(-np.asarray(areas))
    entries = []
    for index in order:
        if areas is not None and areas[index] <= 0:
            continue
        red, green, blue = class_color(names[index])
        label = names[index] if areas is None else f"{names[index]} ({areas[index] * 100:.1f}%)"
        entries.append((label, f"#{red:02x}{green:02x}{blue:02x}"))
    return entries
