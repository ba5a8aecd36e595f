"""ovseg: open-vocabulary semantic segmentation, four published methods side by side.

>>> import ovseg
>>> predictor = ovseg.Predictor(ovseg.load("dense-clip"))
>>> predictor.set_image("scene.png")
>>> prediction = predictor.predict("cat, bicycle, grass, sky")["dense-clip"]
>>> prediction.label_map.shape
"""

from __future__ import annotations

import contextlib
from typing import Any

from ovseg.backbones import WeightsError
from ovseg.errors import NoImageError, OptionError, OvsegError, UnknownMethodError
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
        weights: the method's trained weights (``.safetensors`` from :func:`save_weights`, with
            its ``.json`` config beside it), as a local path or ``hf-hub:org/repo/path/stem``
            (both files are downloaded from the Hugging Face Hub); the backbone's own weights are
            the ``pretrained`` config field.
        device: where to put it (default CPU).
        config: any field of the method's config dataclass.
    """
    if weights is not None and str(weights).startswith(HF_HUB_PREFIX):
        weights = download_weights(str(weights))
    return build_method(name, backbone=backbone, weights=weights, device=device, **config)


HF_HUB_PREFIX = "hf-hub:"


def download_weights(name: str) -> str:
    """Fetch ``hf-hub:org/repo/path/stem`` (``stem.safetensors`` and ``stem.json``) into the Hub
    cache and return the local path stem that :func:`load` and the methods' builders read.

    Raises:
        WeightsError: a malformed name, or a file the Hub (or its offline cache) cannot provide.
    """
    from huggingface_hub import hf_hub_download

    parts = name.removeprefix(HF_HUB_PREFIX).removesuffix(".safetensors").split("/")
    if len(parts) < 3 or not all(parts):
        raise WeightsError(
            f"{name!r} is not a hub weights name; expected hf-hub:org/repo/stem "
            "(e.g. hf-hub:me/ovseg-heads/dcp-clip-vit-b-16)."
        )
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        weights_file = hf_hub_download(repo_id, filename + ".safetensors")
    except Exception as error:  # the hub raises many types: offline, missing, unauthorised
        raise WeightsError(
            f"Could not fetch {filename}.safetensors from {repo_id}: {error}"
        ) from error
    # The config sits beside the weights in the same snapshot folder; without it the builder
    # uses the settings passed to load().
    with contextlib.suppress(Exception):
        hf_hub_download(repo_id, filename + ".json")
    return weights_file.removesuffix(".safetensors")


__all__ = [
    "IGNORE_INDEX",
    "ImageError",
    "NoImageError",
    "OptionError",
    "OvsegError",
    "Prediction",
    "Predictor",
    "SegmentationMethod",
    "SegmentationOutput",
    "UnknownMethodError",
    "Vocabulary",
    "VocabularyError",
    "WeightsError",
    "build_method",
    "list_methods",
    "list_vocabularies",
    "load",
    "load_image",
    "load_vocabulary",
    "parse_vocabulary",
]
