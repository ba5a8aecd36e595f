"""Segmentation methods. Importing this package registers every method with the registry."""

# Importing a method module registers it; the order is the demo's column order.
from ovseg.methods import dense_clip  # noqa: F401, I001  (registers "dense-clip")
from ovseg.methods import dpseg  # noqa: F401  (registers "dpseg")
from ovseg.methods import dcp_clip  # noqa: F401  (registers "dcp-clip")
from ovseg.methods import esc_net  # noqa: F401  (registers "esc-net")
from ovseg.methods import ldvc  # noqa: F401  (registers "ldvc")
from ovseg.methods.base import IGNORE_INDEX, MethodConfig, SegmentationMethod, SegmentationOutput
from ovseg.methods.builder import METHODS, build_method, list_methods, register_method

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
