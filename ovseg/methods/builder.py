"""The registry of methods, and building one from a backbone name or object with trained weights
or the shipped head.

:data:`METHODS` maps a method's name to its builder, as segment-anything's ``sam_model_registry``
does; ``ovseg.load(name, ...)`` calls it. Every builder is :func:`build_with_weights` (most are
made by :func:`method_builder`), so the rules below hold for all of them:

- ``backbone`` is a loaded :class:`ClipBackbone` (shared with the caller) or a name or alias for
  :func:`ovseg.backbones.load_backbone` (default: the config's ``backbone``).
- ``weights`` names a file written by :func:`~ovseg.methods.weights.save_weights`; its saved config
  is the base the caller's settings override. Without it, the shipped ToyWorld head is used when
  the method has one and the CLIP is the shipped toy CLIP it was trained on
  (:func:`~ovseg.methods.weights.shipped_weights_for`), else the method keeps an untrained head.
- Weights hold a fine-tuned CLIP (or parts of one), so a shared backbone is copied before they
  load: the caller's backbone is never changed.
- A shipped head that does not fit the caller's settings is skipped with a warning; weights the
  caller named must fit (:class:`WeightsError` otherwise).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ovseg.backbones import ClipBackbone, WeightsError, load_backbone
from ovseg.errors import UnknownMethodError
from ovseg.methods.base import MethodConfig, SegmentationMethod
from ovseg.methods.weights import (
    load_head_weights,
    saved_config,
    settings_for_weights,
    shipped_weights_for,
    weights_file,
)

Method = TypeVar("Method", bound=SegmentationMethod)
# (settings, CLIP, whether head weights will be loaded) → the method, built on that CLIP.
MethodFactory = Callable[[MethodConfig, ClipBackbone, bool], Method]
# fn(*, backbone=None, weights=None, device=None, **config) → a method.
MethodBuilder = Callable[..., SegmentationMethod]
METHODS: dict[str, MethodBuilder] = {}


def register_method(name: str) -> Callable[[MethodBuilder], MethodBuilder]:
    """Register a builder: ``fn(*, backbone=None, weights=None, device=None, **config)``."""

    def decorator(builder: MethodBuilder) -> MethodBuilder:
        if name in METHODS:
            raise ValueError(f"A method named {name!r} is already registered.")
        METHODS[name] = builder
        return builder

    return decorator


def list_methods() -> list[str]:
    return list(METHODS)


def build_method(name: str, **kwargs: Any) -> SegmentationMethod:
    """Build a registered method; unknown names get a message listing the known ones."""
    if name not in METHODS:
        raise UnknownMethodError(f"Unknown method {name!r}; available: {', '.join(METHODS)}.")
    method = METHODS[name](**kwargs)
    return method.eval()


def method_builder(
    method_class: type[Method],
    *,
    shipped: str | None = None,
    factory: MethodFactory | None = None,
) -> Callable[..., Method]:
    """The builder of a method that takes nothing beyond the common arguments and its config:
    ``build(*, backbone=None, weights=None, device=None, **config)``, which is
    :func:`build_with_weights` with ``shipped`` and ``factory`` (see there)."""

    def build(
        *,
        backbone: str | ClipBackbone | None = None,
        weights: str | None = None,
        device: str | torch.device | None = None,
        **config: Any,
    ) -> Method:
        return build_with_weights(
            method_class,
            backbone=backbone,
            weights=weights,
            device=device,
            config=config,
            shipped=shipped,
            factory=factory,
        )

    default = (
        f"the shipped assets/{shipped} on the toy CLIP it was trained on" if shipped else "none"
    )
    build.__doc__ = (
        f"Build {method_class.__name__} (:mod:`ovseg.methods.builder`): ``backbone`` a loaded "
        f"CLIP or a name to load, ``weights`` a file from ``save_weights`` (None: {default}), "
        f"``config`` any :class:`{method_class.config_class.__name__}` field."
    )
    return build


def build_with_weights(
    method_class: type[Method],
    *,
    backbone: str | ClipBackbone | None,
    weights: str | None,
    device: str | torch.device | None,
    config: dict[str, Any],
    shipped: str | None = None,
    factory: MethodFactory | None = None,
) -> Method:
    """Build ``method_class`` on a CLIP, with its weights (see the module docstring).

    Arguments:
        method_class: the method; its ``config_class`` and ``name`` say how to read records.
        backbone: a :class:`ClipBackbone` to share, or a name or alias to load.
        weights: a weights file or ``save_weights`` stem (None: the shipped head, if any).
        device: where to build it.
        config: the caller's settings, any field of ``method_class.config_class``.
        shipped: the file name of the method's shipped toy head in the assets folder (None: it
            has none).
        factory: builds the method from (settings, CLIP, whether weights will be loaded); by
            default ``method_class(config=settings, backbone=clip)``. A factory that builds
            differently for a trained head (ESC-Net skips SAM's checkpoint) is called again
            without weights when a shipped head is skipped.

    Raises:
        WeightsError: ``weights`` is missing or does not fit.
    """
    config_class = method_class.config_class
    shared = isinstance(backbone, ClipBackbone)
    if isinstance(backbone, str):
        config = {**config, "backbone": backbone}
    if weights is not None:
        weights_path = weights_file(weights)
        if not weights_path.is_file():
            raise WeightsError(f"No {method_class.name} weights file at {weights_path}.")
    elif shipped is not None:
        # The shipped head belongs to the trained toy CLIP, not to a random or other one.
        weights_path = shipped_weights_for(
            backbone if shared else config.get("backbone", config_class.backbone),
            config.get("pretrained"),
            shipped,
        )
    else:
        weights_path = None
    saved = saved_config(weights_path, method_class.name, config_class)
    settings, keep = settings_for_weights(
        config_class, saved, config, shipped=weights is None, name=method_class.name
    )
    if not keep:
        weights_path = None
    if not shared:
        clip = load_backbone(settings.backbone, settings.pretrained, device=device)
    elif weights_path is not None:
        clip = copy.deepcopy(backbone)
        clip.clear_text_cache()
    else:
        clip = backbone
    if factory is None:
        factory = _default_factory(method_class)
    method = factory(settings, clip, weights_path is not None)
    if device is not None:
        method = method.to(device)
    if weights_path is not None:
        method.trained_head = load_head_weights(method, weights_path, shipped=weights is None)
        if not method.trained_head:
            # A skipped shipped head: the method is built as it is without one.
            method = factory(settings, clip, False)
            if device is not None:
                method = method.to(device)
    return method.eval()


def require_vit(backbone: ClipBackbone, input_size: int, *, method: str) -> int:
    """The side of the patch grid a ViT CLIP gives square ``input_size`` images, for a method
    (named ``method`` in the errors) that needs one.

    Raises:
        ValueError: ``backbone`` is not a ViT, or ``input_size`` is not a multiple of its patch
            size.
    """
    if backbone.kind != "vit":
        raise ValueError(
            f"{method} needs a ViT CLIP; {backbone.name} has a {backbone.kind} image tower."
        )
    if input_size % backbone.stride:
        raise ValueError(
            f"input_size {input_size} is not a multiple of the patch size {backbone.stride}."
        )
    return input_size // backbone.stride


def _default_factory(method_class: type[Method]) -> MethodFactory:
    def factory(settings: MethodConfig, clip: ClipBackbone, head: bool) -> Method:
        return method_class(config=settings, backbone=clip)

    return factory
