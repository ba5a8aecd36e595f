"""The evaluation loop: run a method over a named evaluation set and score it.

ToyWorld sets are scored the way the papers score theirs: the prediction is the argmax over the
set's whole vocabulary at the label resolution; ``toy-open`` and ``toy-full`` also report seen
and unseen mIoU and their harmonic mean.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ovseg.data.toyworld import EVAL_SETS, ToyWorld, eval_set, eval_vocabulary
from ovseg.eval.metrics import ConfusionMatrix, SegmentationScores
from ovseg.methods.base import SegmentationMethod


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
    progress: bool = False,
) -> EvaluationResult:
    """Score ``method`` on a ToyWorld evaluation set (``toy-seen``, ``toy-open``, ``toy-full``).

    Arguments:
        method: any registered method, in eval mode.
        set_name: a key of :data:`ovseg.data.toyworld.EVAL_SETS`.
        num_images: how many scenes (default: the set's size).
        image_size: the scenes' side; they are resized to the method's input size for encoding.
        batch_size: scenes per forward pass.
        segment_options: method options, e.g. ``{"inference": "II"}``.
        progress: show a progress bar.
    """
    if set_name not in EVAL_SETS:
        raise ValueError(f"Unknown evaluation set {set_name!r}; known: {sorted(EVAL_SETS)}.")
    method.eval()
    world = ToyWorld(image_size=image_size)
    class_ids = eval_vocabulary(set_name)
    vocabulary = toyworld_vocabulary(world, class_ids)
    to_index = np.full(len(world.classes), 255, dtype=np.int64)
    to_index[class_ids] = np.arange(len(class_ids))
    seen_ids = set(world.seen_class_ids)
    seen = [i for i, class_id in enumerate(class_ids) if class_id in seen_ids]
    unseen = [i for i, class_id in enumerate(class_ids) if class_id not in seen_ids]

    scenes = eval_set(set_name, image_size=image_size, num_images=num_images)
    matrix = ConfusionMatrix(len(class_ids))
    parameter = next(method.parameters())
    size = method.config.input_size
    started = time.perf_counter()
    batches = range(0, len(scenes), batch_size)
    for start in tqdm(batches, desc=f"{method.name} on {set_name}", disable=not progress):
        chunk = scenes[start : start + batch_size]
        pixels = torch.from_numpy(np.stack([s.image for s in chunk])).permute(0, 3, 1, 2)
        pixels = pixels.to(device=parameter.device, dtype=parameter.dtype) / 255.0
        if size != image_size:
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True)
        output = method(pixels, vocabulary, **(segment_options or {}))
        logits = output.logits
        if logits.shape[-1] != image_size:
            logits = F.interpolate(logits, size=(image_size, image_size), mode="bilinear")
        prediction = logits.argmax(dim=1).cpu().numpy()
        target = to_index[np.stack([s.labels for s in chunk])]
        matrix.update(prediction, target)
    elapsed = time.perf_counter() - started
    if EVAL_SETS[set_name].vocabulary == "seen":
        scores = matrix.scores()
    else:
        scores = matrix.scores(seen=seen, unseen=unseen)
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
