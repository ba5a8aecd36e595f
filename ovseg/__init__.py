"""ovseg: open-vocabulary semantic segmentation, four published methods side by side.

>>> import ovseg
>>> predictor = ovseg.Predictor(ovseg.load("dense-clip"))
>>> predictor.set_image("scene.png")
>>> prediction = predictor.predict("cat, bicycle, grass, sky")["dense-clip"]
>>> prediction.label_map.shape
"""

from __future__ import annotations

from typing import Any

from ovseg.images import ImageError, load_image
from ovseg.methods import (
    IGNORE_INDEX,
    SegmentationMethod,
    SegmentationOutput,
    build_method,
    list_methods,
)
from ovseg.predictor import Prediction, Predictor
from ovseg.vocabulary import (
    Vocabulary,
    VocabularyError,
    list_vocabularies,
    load_vocabulary,
    parse_vocabulary,
)

__version__ = "0.1.0"


def load(
    name: str,
    *,
    backbone: Any = None,
    weights: str | None = None,
    device: Any = None,
    **config: Any,
) -> SegmentationMethod:
    """Build a registered method, ready for inference.

    Arguments:
        name: a method name from :func:`list_methods` (``"dense-clip"``, ...).
        backbone: a CLIP alias or open_clip name (``"toy-vit"``, ``"vit-b-16"``, ``"ViT-B-16"``), or
            an already loaded :class:`ovseg.backbones.ClipBackbone` to share between methods.
        weights: the method's trained weights (``.safetensors`` from :func:`save_weights`);
            the backbone's own weights are the ``pretrained`` config field.
        device: where to put it (default CPU).
        config: any field of the method's config dataclass.
    """
    return build_method(name, backbone=backbone, weights=weights, device=device, **config)


__all__ = [
    "IGNORE_INDEX",
    "ImageError",
    "Prediction",
    "Predictor",
    "SegmentationMethod",
    "SegmentationOutput",
    "Vocabulary",
    "VocabularyError",
    "build_method",
    "list_methods",
    "list_vocabularies",
    "load",
    "load_image",
    "load_vocabulary",
    "parse_vocabulary",
]
