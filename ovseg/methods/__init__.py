"""Segmentation methods. Importing this package registers every method with the registry."""

from ovseg.methods import dense_clip  # noqa: F401  (registers "dense-clip")
from ovseg.methods.base import (
    IGNORE_INDEX,
    METHODS,
    MethodConfig,
    SegmentationMethod,
    SegmentationOutput,
    build_method,
    list_methods,
    register_method,
)

__all__ = [
    "IGNORE_INDEX",
    "METHODS",
    "MethodConfig",
    "SegmentationMethod",
    "SegmentationOutput",
    "build_method",
    "list_methods",
    "register_method",
]
