"""Backbones: CLIP through open_clip (dense features, text cache), SAM through segment_anything."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ovseg.backbones.clip import (
    PAPER_CLIPS,
    ClipBackbone,
    DenseFeatures,
    TextEmbeddings,
    WeightsError,
    load_clip,
)
from ovseg.backbones.sam import SAM_CONFIGS, SamBackbone, SamConfig, build_sam, register_sam_config

ASSETS_DIR = Path(os.environ.get("OVSEG_ASSETS", Path(__file__).resolve().parents[2] / "assets"))

# ToyWorld CLIPs trained by training/pretrain_clip.py and shipped in assets/ as open_clip folders.
TOY_CLIPS: dict[str, tuple[str, str]] = {
    "toy-vit": ("ovseg-toy-vit", "clip-toy-vit"),
    "toy-convnext": ("ovseg-toy-convnext", "clip-toy-convnext"),
}


def toy_clip_dir(alias: str) -> Path:
    return ASSETS_DIR / TOY_CLIPS[alias][1]


def is_toy_clip(backbone: ClipBackbone) -> bool:
    """Whether ``backbone`` is a ToyWorld CLIP (shipped, in a folder of its own, or random):
    its text tower knows ToyWorld's names, not the real world's."""
    folder = Path(backbone.name.removeprefix("local-dir:")).name
    return backbone.name.startswith("ovseg-toy") or folder.startswith("clip-toy")


def load_backbone(
    name: str,
    pretrained: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    image_size: int | None = None,
) -> ClipBackbone:
    """Load a CLIP backbone by ovseg alias or open_clip name.

    ``"toy-vit"`` and ``"toy-convnext"`` are the shipped ToyWorld CLIPs (``pretrained="random"``
    builds them untrained, for tests); ``"vit-b-16"``, ``"convnext-b"`` ... are the papers' CLIPs
    (:data:`PAPER_CLIPS`); anything else goes to :func:`load_clip` unchanged.
    """
    if name in TOY_CLIPS:
        config_name, _ = TOY_CLIPS[name]
        if pretrained == "random":
            return load_clip(config_name, None, device=device, image_size=image_size)
        if pretrained is None:
            folder = toy_clip_dir(name)
            if not (folder / "open_clip_config.json").is_file():
                raise WeightsError(
                    f"The ToyWorld CLIP {name!r} is not in {folder}; train it with "
                    "`python training/pretrain_clip.py` (see README) or pass pretrained='random'."
                )
            return load_clip(f"local-dir:{folder}", device=device, image_size=image_size)
        return load_clip(config_name, pretrained, device=device, image_size=image_size)
    return load_clip(name, pretrained, device=device, image_size=image_size)


__all__ = [
    "ASSETS_DIR",
    "PAPER_CLIPS",
    "SAM_CONFIGS",
    "TOY_CLIPS",
    "ClipBackbone",
    "DenseFeatures",
    "SamBackbone",
    "SamConfig",
    "TextEmbeddings",
    "WeightsError",
    "build_sam",
    "is_toy_clip",
    "load_backbone",
    "load_clip",
    "register_sam_config",
    "toy_clip_dir",
]
