"""DPSeg's published numbers: Table 1's mIoU, the ablations of Tables 2-5 and the training recipe
of §5 (Zhao et al., CVPR 2025). The reproduction targets and the paper configs are checked
against them (tests/test_dpseg.py)."""

from __future__ import annotations

from typing import Any

PAPER_DATASETS = ("A-847", "PC-459", "A-150", "PC-59", "PAS-20")

# Table 1 (mIoU, columns as PAPER_DATASETS): the reproduction targets.
PAPER_RESULTS: dict[str, tuple[float, ...]] = {
    "convnext-b/inference-I": (12.0, 19.5, 32.9, 58.1, 96.0),
    "convnext-b/inference-II": (12.5, 20.1, 33.3, 58.4, 96.9),
    "convnext-l/inference-I": (14.9, 23.5, 36.4, 62.0, 97.4),
    "convnext-l/inference-II": (15.7, 24.1, 37.1, 62.3, 98.5),
    "sed/convnext-b": (11.4, 18.6, 31.6, 57.3, 94.4),
    "sed/convnext-l": (13.9, 22.6, 35.2, 60.6, 96.1),
}

# Tables 2-5 (ConvNeXt-B, Inference I): (table, row, DPSegConfig changes, mIoU). Rows without a
# config change here need another prompt bank (generator or noise) or are SED itself.
PAPER_ABLATIONS: tuple[tuple[str, str, dict[str, Any], tuple[float, ...]], ...] = (
    ("2a", "T", {"prompt_mode": "text"}, (10.4, 17.4, 30.6, 56.2, 93.4)),
    ("2a", "V", {"prompt_mode": "visual"}, (11.1, 18.0, 31.2, 56.9, 94.5)),
    ("2a", "Avg(T, V)", {}, (12.0, 19.5, 32.9, 58.1, 96.0)),
    ("2b", "Cat(cos(T,E), cos(V,E))", {"cost_fusion": "cat"}, (11.7, 19.2, 32.3, 57.8, 95.4)),
    ("2b", "Avg(cos(T,E), cos(V,E))", {"cost_fusion": "avg_cos"}, (11.9, 19.4, 32.7, 58.0, 95.7)),
    ("2b", "cos(Avg(T,V), E)", {}, (12.0, 19.5, 32.9, 58.1, 96.0)),
    ("3", "F_c", {"visual_cost_scales": ()}, (10.6, 17.9, 31.6, 57.0, 94.9)),
    ("3", "F_c, F_v^2", {"visual_cost_scales": (2,)}, (11.4, 18.8, 32.1, 57.6, 95.5)),
    ("3", "F_c, F_v^{2,3}", {"visual_cost_scales": (2, 3)}, (11.7, 19.2, 32.5, 57.9, 95.7)),
    ("3", "F_c, F_v^{2,3,4}", {}, (12.0, 19.5, 32.9, 58.1, 96.0)),
    (
        "3",
        "F_c, F_c(2x, 4x, 8x)",
        {"visual_cost_scales": (), "upsampled_cost_guidance": True},
        (11.4, 19.0, 32.4, 58.0, 95.6),
    ),
    ("4", "1 template", {"num_templates": 1}, (3.6, 7.8, 15.6, 32.1, 72.3)),
    ("4", "10 templates", {"num_templates": 10}, (6.9, 11.2, 20.3, 41.3, 81.7)),
    ("4", "20 templates", {"num_templates": 20}, (7.8, 14.9, 27.9, 47.3, 86.7)),
    ("4", "40 templates", {"num_templates": 40}, (10.1, 16.8, 29.6, 55.9, 91.8)),
    ("4", "80 templates", {}, (12.0, 19.5, 32.9, 58.1, 96.0)),
    ("5", "20% Gaussian noise", {"prompt_noise": 0.2}, (12.0, 19.2, 32.5, 57.9, 95.5)),
    ("5", "60% Gaussian noise", {"prompt_noise": 0.6}, (11.6, 18.8, 32.9, 57.6, 95.0)),
    ("5", "80% Gaussian noise", {"prompt_noise": 0.8}, (11.5, 18.7, 31.7, 57.3, 94.7)),
    ("5", "LayerDiffuse", {"prompt_generator": "layerdiffuse"}, (12.1, 19.4, 32.7, 58.0, 95.8)),
    ("5", "SD-V1.5", {}, (12.0, 19.5, 32.9, 58.1, 96.0)),
    ("5", "SD-V3", {"prompt_generator": "sd3"}, (12.2, 19.6, 32.8, 58.3, 96.3)),
    ("5", "SED (text prompt only)", {}, (11.4, 18.6, 31.6, 57.3, 94.4)),
)

# §5: the paper's optimiser and schedule, for training configs (the trainer owns the loop).
TRAINING_RECIPE: dict[str, Any] = {
    "optimizer": "AdamW",
    "base_lr": 2e-4,
    "weight_decay": 1e-4,
    "encoder_lr_multiplier": 0.01,
    "grad_clip": 0.01,
    "schedule": "cosine",
    "warmup": 0,
    "iterations": 80_000,
    "batch_size": 4,
    "crop_size": 768,
    "dataset": "coco-stuff-171",
}
