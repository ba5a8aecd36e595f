"""The training augmentation of the papers: scale jitter, random crop, flip, colour distortion.

The cost-volume methods (CAT-Seg, SED and so DPSeg, DCP-CLIP, ESC-Net) train with detectron2's
``ResizeShortestEdge`` → ``RandomCrop`` → ``ColorAugSSDTransform`` → ``RandomFlip`` → pad; LDVC
(through ZegCLIP) with mmseg's ``Resize(ratio_range=(0.5, 2.0))`` → ``RandomCrop(cat_max_ratio=
0.75)`` → ``RandomFlip`` → ``PhotoMetricDistortion`` → pad. Both are one pipeline here:

1. resize so the short side is ``r·short_side`` (``r`` uniform in ``scale_range``), the long side
   at most ``r·max_size``, keeping the aspect ratio (bilinear for the image, nearest for labels);
2. a random ``crop_size`` square, re-drawn up to 10 times while one class covers more than
   ``cat_max_ratio`` of its labelled pixels;
3. a horizontal flip with probability ½;
4. the SSD photometric distortion (brightness, contrast, saturation, hue; what detectron2's
   ``ColorAugSSDTransform`` and mmseg's ``PhotoMetricDistortion`` both do);
5. padding to ``crop_size`` with black pixels and ignored labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

CROP_ATTEMPTS = 10
BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA_DEGREES = 36.0  # OpenCV's 18 hue units of 2 degrees


@dataclass(frozen=True)
class TrainAugmentation:
    """Random scale, crop, flip and colour distortion of an image and its label map.

    Attributes:
        crop_size: side of the square output.
        short_side: the short side before scale jitter (None: ``crop_size``).
        max_size: the long side's limit before scale jitter (None: 4 × ``short_side``).
        scale_range: ``r`` is drawn uniformly from it ((1, 1): no jitter, detectron2's recipe;
            (0.5, 2.0): mmseg's).
        flip: random horizontal flips.
        color_jitter: the SSD photometric distortion.
        cat_max_ratio: re-draw crops in which one class has more than this share of the labelled
            pixels (1.0: never, detectron2; 0.75: mmseg).
        ignore_index: label value of padded pixels (the dataset's ignore index).
    """

    crop_size: int
    short_side: int | None = None
    max_size: int | None = None
    scale_range: tuple[float, float] = (1.0, 1.0)
    flip: bool = True
    color_jitter: bool = True
    cat_max_ratio: float = 1.0
    ignore_index: int = 255

    def __post_init__(self) -> None:
        low, high = self.scale_range
        if self.crop_size < 1 or not 0 < low <= high:
            raise ValueError(
                f"crop_size must be positive and scale_range an increasing pair of positive "
                f"numbers; got {self.crop_size} and {self.scale_range}."
            )

    def __call__(
        self, image: np.ndarray, labels: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """``H×W×3`` uint8 image and ``H×W`` integer labels → ``S×S×3`` and ``S×S`` (S: crop)."""
        if image.shape[:2] != labels.shape:
            raise ValueError(f"Image {image.shape[:2]} and labels {labels.shape} differ in size.")
        image, labels = self.rescale(image, labels, rng)
        image, labels = self.crop(image, labels, rng)
        if self.flip and rng.random() < 0.5:
            image, labels = image[:, ::-1], labels[:, ::-1]
        if self.color_jitter:
            image = photometric_distortion(image, rng)
        return pad_to(image, labels, self.crop_size, self.ignore_index)

    def rescale(
        self, image: np.ndarray, labels: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Step 1: keep the aspect ratio, short side ``r·short_side``, long ≤ ``r·max_size``."""
        short_side = self.short_side or self.crop_size
        max_size = self.max_size or 4 * short_side
        ratio = rng.uniform(*self.scale_range)
        height, width = labels.shape
        factor = min(ratio * short_side / min(height, width), ratio * max_size / max(height, width))
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        return resize_pair(image, labels, size)

    def crop(
        self, image: np.ndarray, labels: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Step 2: a random square crop (smaller images are kept whole and padded later)."""
        height, width = labels.shape
        size = self.crop_size
        for _ in range(CROP_ATTEMPTS):
            top = int(rng.integers(0, max(height - size, 0) + 1))
            left = int(rng.integers(0, max(width - size, 0) + 1))
            window = labels[top : top + size, left : left + size]
            if self.cat_max_ratio >= 1.0:
                break
            _, counts = np.unique(window[window != self.ignore_index], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return image[top : top + size, left : left + size], window


def resize_pair(
    image: np.ndarray, labels: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Resize an ``H×W×3`` uint8 image (bilinear) and ``H×W`` labels (nearest) to ``(W', H')``."""
    if (labels.shape[1], labels.shape[0]) == tuple(size):
        return image, labels
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    label_image = Image.fromarray(labels.astype(np.int32), mode="I")
    resized_labels = np.asarray(label_image.resize(size, Image.NEAREST)).astype(labels.dtype)
    return resized, resized_labels


def pad_to(
    image: np.ndarray, labels: np.ndarray, size: int, ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom and right to ``size×size``: black pixels, ``ignore_index`` labels."""
    height, width = labels.shape
    if height >= size and width >= size:
        return np.ascontiguousarray(image), np.ascontiguousarray(labels)
    padded_image = np.zeros((size, size, 3), dtype=np.uint8)
    padded_labels = np.full((size, size), ignore_index, dtype=labels.dtype)
    padded_image[:height, :width] = image
    padded_labels[:height, :width] = labels
    return padded_image, padded_labels


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The SSD colour distortion of an ``H×W×3`` uint8 image; each step applies with p = ½.

    Brightness ± 32, contrast × [0.5, 1.5] (before or after the HSV steps, at random),
    saturation × [0.5, 1.5] and hue ± 36°.
    """
    pixels = image.astype(np.float32)
    if rng.random() < 0.5:
        pixels = pixels + rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)
    contrast_first = rng.random() < 0.5
    contrast = rng.uniform(*CONTRAST_RANGE) if rng.random() < 0.5 else None
    if contrast_first and contrast is not None:
        pixels = pixels * contrast
    saturation = rng.uniform(*SATURATION_RANGE) if rng.random() < 0.5 else None
    hue_shift = rng.uniform(-HUE_DELTA_DEGREES, HUE_DELTA_DEGREES) if rng.random() < 0.5 else None
    if saturation is not None or hue_shift is not None:
        rgb = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        hsv = np.asarray(rgb.convert("HSV")).astype(np.float32)
        if saturation is not None:
            hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
        if hue_shift is not None:
            hsv[..., 0] = (hsv[..., 0] + hue_shift * 256 / 360) % 256
        hsv_image = Image.fromarray(hsv.astype(np.uint8), mode="HSV")
        pixels = np.asarray(hsv_image.convert("RGB")).astype(np.float32)
    if not contrast_first and contrast is not None:
        pixels = pixels * contrast
    return np.clip(pixels, 0, 255).astype(np.uint8)
