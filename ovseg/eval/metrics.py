"""Semantic segmentation metrics from a confusion matrix, as detectron2's evaluator defines them.

A class's IoU is ``TP / (TP + FP + FN)``. mIoU averages over the classes that occur in the ground
truth or the prediction of the evaluated images (others have no defined IoU). For the zero-shot
protocol, seen and unseen mIoU average over those subsets and hIoU is their harmonic mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ovseg.methods.base import IGNORE_INDEX


def harmonic_iou(seen_miou: float, unseen_miou: float) -> float:
    """hIoU = 2·S·U / (S + U); 0 when both are 0."""
    total = seen_miou + unseen_miou
    return 0.0 if total == 0 else 2 * seen_miou * unseen_miou / total


@dataclass
class SegmentationScores:
    """Metrics in percent. IoU of a class that never occurred is NaN."""

    per_class_iou: np.ndarray
    miou: float
    pixel_accuracy: float
    seen_miou: float | None = None
    unseen_miou: float | None = None
    hiou: float | None = None

    def as_dict(self) -> dict[str, float]:
        result = {"mIoU": self.miou, "pAcc": self.pixel_accuracy}
        if self.seen_miou is not None:
            result.update(
                {"mIoU(S)": self.seen_miou, "mIoU(U)": self.unseen_miou, "hIoU": self.hiou}
            )
        return result


class ConfusionMatrix:
    """Accumulates a ``K×K`` confusion matrix (rows: ground truth, columns: prediction).

    Arguments:
        num_classes: K.
        ignore_index: ground-truth value of unlabelled pixels (255; 65535 for ADE-847 / PC-459).
    """

    def __init__(self, num_classes: int, *, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1; got {num_classes}.")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(
        self, prediction: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor
    ) -> None:
        """Add one or a batch of ``(…×)H×W`` label maps. Predictions must lie in [0, K)."""
        prediction = np.asarray(torch.as_tensor(prediction).cpu(), dtype=np.int64).ravel()
        target = np.asarray(torch.as_tensor(target).cpu(), dtype=np.int64).ravel()
        if prediction.shape != target.shape:
            raise ValueError(f"Prediction has {prediction.size} pixels, target {target.size}.")
        valid = target != self.ignore_index
        prediction, target = prediction[valid], target[valid]
        if target.size and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(
                f"Target labels must be in [0, {self.num_classes}) or {self.ignore_index}; "
                f"found {target.min()}..{target.max()}."
            )
        if prediction.size and (prediction.min() < 0 or prediction.max() >= self.num_classes):
            raise ValueError(f"Predicted labels must be in [0, {self.num_classes}).")
        counts = np.bincount(target * self.num_classes + prediction, minlength=self.num_classes**2)
        self.matrix += counts.reshape(self.num_classes, self.num_classes)

    def scores(
        self, *, seen: Sequence[int] | None = None, unseen: Sequence[int] | None = None
    ) -> SegmentationScores:
        """Per-class IoU, mIoU and pixel accuracy; with ``seen``/``unseen`` class ids, also hIoU."""
        true_positive = np.diag(self.matrix).astype(np.float64)
        ground_truth = self.matrix.sum(axis=1)
        predicted = self.matrix.sum(axis=0)
        union = ground_truth + predicted - true_positive
        iou = np.full(self.num_classes, np.nan)
        defined = union > 0
        iou[defined] = true_positive[defined] / union[defined] * 100
        total = self.matrix.sum()
        result = SegmentationScores(
            per_class_iou=iou,
            miou=_nanmean(iou),
            pixel_accuracy=float(true_positive.sum() / total * 100) if total else float("nan"),
        )
        if seen is not None or unseen is not None:
            if seen is None or unseen is None:
                raise ValueError("Give both seen and unseen class ids for seen/unseen mIoU.")
            result.seen_miou = _nanmean(iou[list(seen)])
            result.unseen_miou = _nanmean(iou[list(unseen)])
            result.hiou = harmonic_iou(result.seen_miou, result.unseen_miou)
        return result


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")
