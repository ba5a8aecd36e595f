"""Evaluation: confusion-matrix metrics (mIoU, seen/unseen mIoU, hIoU)."""

from ovseg.eval.metrics import ConfusionMatrix, SegmentationScores, harmonic_iou

__all__ = ["ConfusionMatrix", "SegmentationScores", "harmonic_iou"]
