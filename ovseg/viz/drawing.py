"""Drawings on top of an image: pseudo prompts, attention windows, label changes, label PNGs.

Everything takes and returns ``H×W×3`` uint8 arrays; coordinates given on a feature grid are
scaled to the image, so a drawing works at any input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ovseg.viz.overlay import class_color

CHANGED_COLOUR = (255, 0, 255)
QUERY_COLOUR = (255, 40, 40)
ROUTED_COLOUR = (255, 215, 0)


def label_image(label_map: np.ndarray, num_classes: int) -> Image.Image:
    """A label map as a lossless single-channel PNG image: 8-bit up to 256 classes, else 16-bit."""
    if num_classes <= 256:
        return Image.fromarray(label_map.astype(np.uint8), mode="L")
    return Image.fromarray(label_map.astype(np.uint16))


def changed_pixels(image: np.ndarray, before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The image in grey with the pixels whose label differs between two label maps in magenta."""
    if before.shape != after.shape or before.shape != image.shape[:2]:
        raise ValueError(
            f"Label maps {before.shape} and {after.shape} must match the image {image.shape[:2]}."
        )
    grey = image.astype(np.float32).mean(axis=2, keepdims=True).repeat(3, axis=2) * 0.6
    grey[before != after] = CHANGED_COLOUR
    return grey.round().astype(np.uint8)


def _grid_scale(image: np.ndarray, grid: tuple[int, int]) -> tuple[float, float]:
    """Image pixels per grid cell along x and y."""
    return image.shape[1] / grid[1], image.shape[0] / grid[0]


def _region_colours(count: int) -> list[tuple[int, int, int]]:
    return [class_color(f"region {index}") for index in range(count)]


def draw_pseudo_prompts(
    image: np.ndarray,
    regions: np.ndarray,
    points: np.ndarray,
    boxes: np.ndarray | None = None,
    *,
    alpha: float = 0.45,
) -> np.ndarray:
    """ESC-Net's pseudo prompts of one class (Fig. 3 d–e) drawn over the image.

    Arguments:
        image: ``H×W×3`` uint8.
        regions: ``N_o×h×w`` bool k-means regions on the feature grid.
        points: ``N_o×2`` peak of each region as (x, y) grid cells.
        boxes: ``N_o×4`` (x0, y0, x1, y1) in grid units, inclusive corner cells (SAM's
            ``batched_mask_to_box`` convention).
        alpha: opacity of the region fills.
    """
    count, height, width = regions.shape
    scale_x, scale_y = _grid_scale(image, (height, width))
    rows = (np.arange(image.shape[0]) / scale_y).astype(int).clip(0, height - 1)
    cols = (np.arange(image.shape[1]) / scale_x).astype(int).clip(0, width - 1)
    colours = _region_colours(count)
    canvas = image.astype(np.float32)
    for region, colour in zip(regions, colours, strict=True):
        mask = region.astype(bool)[rows][:, cols]
        canvas[mask] = canvas[mask] * (1 - alpha) + np.array(colour, np.float32) * alpha
    drawing = Image.fromarray(canvas.round().astype(np.uint8))
    draw = ImageDraw.Draw(drawing)
    radius = max(3, round(min(image.shape[:2]) / 60))
    for index in range(count):
        colour = colours[index]
        if boxes is not None:
            x0, y0, x1, y1 = boxes[index]
            draw.rectangle(
                [x0 * scale_x, y0 * scale_y, (x1 + 1) * scale_x - 1, (y1 + 1) * scale_y - 1],
                outline=colour,
                width=2,
            )
        x, y = (points[index][0] + 0.5) * scale_x, (points[index][1] + 0.5) * scale_y
        draw.ellipse(
            [x - radius, y - radius, x + radius, y + radius],
            fill=colour,
            outline=(255, 255, 255),
            width=2,
        )
        draw.text((x + radius + 1, y - radius), str(index + 1), fill=(255, 255, 255))
    return np.asarray(drawing)


def draw_window_routing(
    image: np.ndarray, grid: tuple[int, int], query: int, routed: Sequence[int]
) -> np.ndarray:
    """LDVC's route attention for one window: the window grid, the query window (red) and the
    windows it attends to (yellow, numbered by rank).

    Arguments:
        image: ``H×W×3`` uint8.
        grid: ``(rows, cols)`` of windows.
        query: row-major index of the query window.
        routed: row-major indices of its routed windows, most similar first.
    """
    rows, cols = grid
    scale_x, scale_y = _grid_scale(image, grid)
    canvas = (image.astype(np.float32) * 0.55).round().astype(np.uint8)
    drawing = Image.fromarray(canvas)
    overlay = Image.new("RGBA", drawing.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)

    def box(window: int) -> list[float]:
        row, col = divmod(int(window), cols)
        return [col * scale_x, row * scale_y, (col + 1) * scale_x - 1, (row + 1) * scale_y - 1]

    for rank, window in enumerate(routed, start=1):
        draw.rectangle(box(window), fill=(*ROUTED_COLOUR, 110), outline=(*ROUTED_COLOUR, 255))
        corner = box(window)
        draw.text((corner[0] + 2, corner[1] + 1), str(rank), fill=(0, 0, 0, 255))
    draw.rectangle(box(query), outline=(*QUERY_COLOUR, 255), width=3)
    for row in range(1, rows):
        draw.line([(0, row * scale_y), (image.shape[1], row * scale_y)], fill=(255, 255, 255, 70))
    for col in range(1, cols):
        draw.line([(col * scale_x, 0), (col * scale_x, image.shape[0])], fill=(255, 255, 255, 70))
    return np.asarray(Image.alpha_composite(drawing.convert("RGBA"), overlay).convert("RGB"))
