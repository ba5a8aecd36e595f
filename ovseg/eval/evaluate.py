"""The evaluation loop: run a method over a named evaluation set and score it.

ToyWorld sets are scored the way the papers score theirs: the prediction is the argmax over the
set's whole vocabulary at the label resolution; ``toy-open`` and ``toy-full`` also report seen
and unseen mIoU and their harmonic mean.

Two test-time protocols, for every method (:func:`predict_logits`): *whole* squashes the image to
the method's square ``input_size`` (CAT-Seg, SED, DPSeg), *slide* keeps its aspect ratio, resizes
its short side and averages the logits of overlapping square windows (mmseg's ``slide`` mode, used
by ZegCLIP and LDVC; :class:`SlideWindow`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ovseg.data.toyworld import EVAL_SETS, ToyWorld, eval_set, eval_vocabulary
from ovseg.errors import OptionError
from ovseg.eval.metrics import ConfusionMatrix, SegmentationScores
from ovseg.methods.base import SegmentationMethod, VocabularyLike
from ovseg.methods.chunking import upsample_logits


@dataclass
class EvaluationResult:
    """Scores of one method on one evaluation set, and how long it took per image."""

    method: str
    eval_set: str
    num_images: int
    scores: SegmentationScores
    seconds_per_image: float

    def row(self) -> dict[str, Any]:
        values = {key: round(value, 2) for key, value in self.scores.as_dict().items()}
        return {
            "method": self.method,
            "set": self.eval_set,
            "images": self.num_images,
            **values,
            "s/img": round(self.seconds_per_image, 3),
        }


@dataclass(frozen=True)
class SlideWindow:
    """mmseg's ``slide`` test mode: resize the image, keeping its aspect ratio, so that its short
    side is ``short_side`` (and its long side at most ``max_long_side``: mmseg's ``img_scale``
    ``(2048, 512)``), cut ``crop``×``crop`` windows every ``stride`` pixels, the last one flush with
    the far edge, and average the windows' logits where they overlap. A side shorter than the
    crop (only when the long-side cap shrinks a very elongated image) is zero-padded to it and
    the padding's logits are dropped; mmseg would feed the smaller window instead.

    Each window goes through the method on its own (LDVC: with its own V_g and T_new), resized to
    the method's ``input_size`` when that differs from ``crop``.
    """

    short_side: int
    crop: int
    stride: int
    max_long_side: int | None = None

    def __post_init__(self) -> None:
        if min(self.short_side, self.crop, self.stride) < 1 or self.stride > self.crop:
            raise OptionError(
                "A sliding window needs short_side, crop and stride >= 1 and stride <= crop "
                "(no pixel left out); "
                f"got short_side={self.short_side}, crop={self.crop}, stride={self.stride}."
            )
        if self.max_long_side is not None and self.max_long_side < self.short_side:
            raise OptionError(
                f"max_long_side {self.max_long_side} is below short_side {self.short_side}."
            )

    @classmethod
    def zegclip(cls, crop: int) -> SlideWindow:
        """ZegCLIP's test setting scaled to ``crop``: short side = crop, stride 426/512 of it,
        long side at most 4× (at 512: short side 512, 512 windows, stride 426, long side
        2048, as in ZegCLIP's ``test_cfg`` and LDVC's spec §2.8)."""
        return cls(short_side=crop, crop=crop, stride=crop * 426 // 512, max_long_side=4 * crop)

    def describe(self) -> str:
        return f"slide {self.short_side}/{self.crop}/{self.stride}"


# The test-time protocol of each paper, from the method's input size. LDVC follows ZegCLIP's
# mmseg config. The others resize the whole image: DPSeg as SED; DCP-CLIP and ESC-Net as CAT-Seg,
# whose optional windows (a 640² canvas in 384 windows with overlap 1/3, plus a global view) are
# another scheme that is not implemented here.
PAPER_WINDOWS: dict[str, Callable[[int], SlideWindow]] = {"ldvc": SlideWindow.zegclip}


def paper_window(method: SegmentationMethod) -> SlideWindow | None:
    """The sliding window of ``method``'s paper protocol, or None for whole-image inference."""
    make = PAPER_WINDOWS.get(method.name)
    return None if make is None else make(method.config.input_size)


def resize_short_side(images: Tensor, short_side: int, max_long_side: int | None = None) -> Tensor:
    """``B×3×H×W`` images resized (bilinear, antialiased) so the short side is ``short_side``, or
    less where the long side would pass ``max_long_side`` (mmseg's keep-ratio rescale)."""
    height, width = images.shape[-2:]
    scale = short_side / min(height, width)
    if max_long_side is not None:
        scale = min(scale, max_long_side / max(height, width))
    size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
    if size == (height, width):
        return images
    return F.interpolate(images, size=size, mode="bilinear", antialias=True)


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Where the windows of one side start (mmseg's ``slide_inference``): every ``stride`` pixels,
    the last moved back to end at the edge; a single window at 0 when the side fits one crop."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(index * stride + crop, length) - crop, 0) for index in range(count)]


def _method_logits(
    method: SegmentationMethod, images: Tensor, vocabulary: VocabularyLike, options: dict
) -> Tensor:
    """Float logits of ``images`` at their own size, through the method at its ``input_size``."""
    size = method.config.input_size
    height, width = images.shape[-2:]
    if (height, width) != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    logits = method(images, vocabulary, **options).logits.float()
    return upsample_logits(logits, (height, width))


def slide_logits(
    method: SegmentationMethod,
    images: Tensor,
    vocabulary: VocabularyLike,
    window: SlideWindow,
    *,
    options: dict[str, Any] | None = None,
    batch_size: int = 4,
) -> Tensor:
    """``B×K×H'×W'`` logits of ``B×3×H×W`` images in [0, 1] by sliding windows, at the resized
    size ``H'×W'`` (see :class:`SlideWindow`); ``batch_size`` bounds the windows per forward."""
    resized = resize_short_side(images, window.short_side, window.max_long_side)
    batch, _, height, width = resized.shape
    crop = window.crop
    padded = F.pad(resized, (0, max(0, crop - width), 0, max(0, crop - height)))
    starts = [
        (top, left)
        for top in window_starts(height, crop, window.stride)
        for left in window_starts(width, crop, window.stride)
    ]
    total: Tensor | None = None
    count = torch.zeros(height, width, device=images.device)
    step = max(1, batch_size // batch)
    for first in range(0, len(starts), step):
        chunk = starts[first : first + step]
        crops = torch.cat([padded[..., y : y + crop, x : x + crop] for y, x in chunk])
        logits = _method_logits(method, crops, vocabulary, dict(options or {}))
        if total is None:
            total = logits.new_zeros(batch, logits.shape[1], height, width)
        for (top, left), crop_logits in zip(chunk, logits.split(batch), strict=True):
            bottom, right = min(top + crop, height), min(left + crop, width)
            total[..., top:bottom, left:right] += crop_logits[..., : bottom - top, : right - left]
            count[top:bottom, left:right] += 1
    return total / count


def predict_logits(
    method: SegmentationMethod,
    images: Tensor,
    vocabulary: VocabularyLike,
    *,
    window: SlideWindow | None = None,
    options: dict[str, Any] | None = None,
    output_size: tuple[int, int] | None = None,
    batch_size: int = 4,
) -> Tensor:
    """Float ``B×K×H×W`` logits of ``B×3×H×W`` images in [0, 1] at ``output_size`` (default: the
    images' size), by whole-image inference at the method's ``input_size`` (``window=None``) or
    by sliding windows."""
    if window is None:
        logits = _method_logits(method, images, vocabulary, dict(options or {}))
    else:
        logits = slide_logits(
            method, images, vocabulary, window, options=options, batch_size=batch_size
        )
    return upsample_logits(logits, output_size or tuple(images.shape[-2:]))


def calibrated_options(
    method: SegmentationMethod, options: dict[str, Any] | None, seen_names: Iterable[str]
) -> dict[str, Any]:
    """``options`` plus the ``seen_classes`` that a seen-class calibration needs (LDVC's
    ``seen_prob_offset``, ZegCLIP's GZS3 protocol) when the option or the method's config sets
    an offset; unchanged otherwise."""
    options = dict(options or {})
    offset = options.get("seen_prob_offset", getattr(method.config, "seen_prob_offset", 0.0))
    if offset and "seen_classes" not in options:
        options["seen_classes"] = list(seen_names)
    return options


def toyworld_vocabulary(world: ToyWorld, class_ids: Iterable[int]) -> list[tuple[str, ...]]:
    """ToyWorld classes as synonym tuples (name first), in the order given."""
    return [(world.classes[i].name, *world.classes[i].synonyms) for i in class_ids]


@torch.no_grad()
def evaluate_toyworld(
    method: SegmentationMethod,
    set_name: str,
    *,
    num_images: int | None = None,
    image_size: int = 256,
    batch_size: int = 4,
    segment_options: dict[str, Any] | None = None,
    window: SlideWindow | None = None,
    progress: bool = False,
) -> EvaluationResult:
    """Score ``method`` on a ToyWorld evaluation set (``toy-seen``, ``toy-open``, ``toy-full``).

    Arguments:
        method: any registered method, in eval mode.
        set_name: a key of :data:`ovseg.data.toyworld.EVAL_SETS`.
        num_images: how many scenes (default: the set's size).
        image_size: the scenes' side; they are resized to the method's input size for encoding.
        batch_size: scenes per forward pass.
        segment_options: method options, e.g. ``{"inference": "II"}``. On sets with unseen
            classes, a seen-class calibration the method's config sets gets the seen names
            (:func:`calibrated_options`).
        window: sliding-window inference (None: whole scenes at the method's input size).
        progress: show a progress bar.
    """
    if set_name not in EVAL_SETS:
        raise ValueError(f"Unknown evaluation set {set_name!r}; known: {sorted(EVAL_SETS)}.")
    method.eval()
    world = ToyWorld(image_size=image_size)
    class_ids = eval_vocabulary(set_name)
    vocabulary = toyworld_vocabulary(world, class_ids)
    # With 312 classes, 255 is a class (sunglasses) here, not "no class": pixels of classes outside
    # the vocabulary (toy-seen scenes have none) are marked -1.
    to_index = np.full(len(world.classes), -1, dtype=np.int64)
    to_index[class_ids] = np.arange(len(class_ids))
    seen_ids = set(world.seen_class_ids)
    seen = [i for i, class_id in enumerate(class_ids) if class_id in seen_ids]
    unseen = [i for i, class_id in enumerate(class_ids) if class_id not in seen_ids]
    split = EVAL_SETS[set_name].vocabulary != "seen"
    options = dict(segment_options or {})
    if split:
        options = calibrated_options(method, options, [vocabulary[i][0] for i in seen])

    scenes = eval_set(set_name, image_size=image_size, num_images=num_images)
    matrix = ConfusionMatrix(len(class_ids), ignore_index=-1)
    parameter = next(method.parameters())
    started = time.perf_counter()
    batches = range(0, len(scenes), batch_size)
    for start in tqdm(batches, desc=f"{method.name} on {set_name}", disable=not progress):
        chunk = scenes[start : start + batch_size]
        pixels = torch.from_numpy(np.stack([s.image for s in chunk])).permute(0, 3, 1, 2)
        pixels = pixels.to(device=parameter.device, dtype=parameter.dtype) / 255.0
        logits = predict_logits(
            method, pixels, vocabulary, window=window, options=options, batch_size=batch_size
        )
        prediction = logits.argmax(dim=1).cpu().numpy()
        target = to_index[np.stack([s.labels for s in chunk])]
        matrix.update(prediction, target)
    elapsed = time.perf_counter() - started
    scores = matrix.scores(seen=seen, unseen=unseen) if split else matrix.scores()
    return EvaluationResult(
        method=method.name,
        eval_set=set_name,
        num_images=len(scenes),
        scores=scores,
        seconds_per_image=elapsed / max(1, len(scenes)),
    )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of equal keys as a markdown table."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(key, "")) for key in keys) + " |" for row in rows]
    return "\n".join(lines)
