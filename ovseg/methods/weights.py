"""Method weights on disk: a ``.safetensors`` file of what training changed, with the config
that built the method in a ``.json`` beside it.

:func:`save_weights` writes the pair and :func:`load_weights` reads it back, checking everything
before it copies anything. The shipped ToyWorld heads are found with :func:`shipped_weights_for`,
and a builder combines a record's config with the caller's settings through
:func:`saved_config` and :func:`settings_for_weights` (:mod:`ovseg.methods.builder` does it for
every method).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

import ovseg.backbones
from ovseg.backbones import ClipBackbone, WeightsError
from ovseg.backbones.finetune import fused_state_name, trainable_state_names
from ovseg.methods.base import MethodConfig, SegmentationMethod


def frozen_pretrained_keys(method: SegmentationMethod) -> set[str]:
    """State-dict keys of frozen tensors in the method's pretrained submodules (the CLIP, and
    frozen copies of it): the builder recreates them from the backbone's own weights, so saved
    method weights leave them out. Trainable tensors there (e.g. fine-tuned Q/V) are kept."""
    keys = set()
    for prefix in method.pretrained_prefixes:
        try:
            module = method.get_submodule(prefix)
        except AttributeError:
            continue
        if prefix == "backbone" and method.clip_finetuning_scope is not None:
            trainable = trainable_state_names(module.state_dict(), method.clip_finetuning_scope)
        else:
            trainable = {
                fused_state_name(name) for name, p in module.named_parameters() if p.requires_grad
            }
        keys.update(f"{prefix}.{name}" for name in module.state_dict() if name not in trainable)
    return keys


def save_weights(
    method: SegmentationMethod, path: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> Path:
    """Save a method's weights as ``<path>.safetensors`` with its config in ``<path>.json``.

    Frozen pretrained tensors (:func:`frozen_pretrained_keys`) are left out: they come back from
    the backbone named in the config, and shipping a second copy of the CLIP would only cost space.
    ``dtype`` (e.g. ``torch.float16`` for the shipped toy heads) casts floating-point tensors;
    loading casts them back to the method's own dtype.
    """
    from safetensors.torch import save_file

    stem = Path(path)
    stem = stem.with_suffix("") if stem.suffix == ".safetensors" else stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    frozen = frozen_pretrained_keys(method)
    state = {
        name: tensor.detach().contiguous()
        for name, tensor in method.state_dict().items()
        if name not in frozen
    }
    if dtype is not None:
        state = {
            name: tensor.to(dtype) if tensor.is_floating_point() else tensor
            for name, tensor in state.items()
        }
    weights_path = stem.with_name(stem.name + ".safetensors")
    save_file(state, weights_path, metadata={"method": method.name})
    record = {"method": method.name, "config": dataclasses.asdict(method.config)}
    stem.with_name(stem.name + ".json").write_text(json.dumps(record, indent=2) + "\n")
    return weights_path


def load_weights(method: SegmentationMethod, path: str | os.PathLike) -> None:
    """Load weights written by :func:`save_weights` into ``method``.

    Every key of the file must fit, and every key the file lacks must be a frozen pretrained
    tensor the method already holds from its backbone (full state dicts load too).

    Raises:
        WeightsError: missing, unreadable or corrupt file, another method's weights, or a state
            dict that does not fit this method's architecture.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = Path(path)
    if weights_path.suffix != ".safetensors":
        weights_path = weights_path.with_name(weights_path.name + ".safetensors")
    if not weights_path.is_file():
        raise WeightsError(f"No weights file at {weights_path}.")
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise WeightsError(
            f"{weights_path} is not a readable safetensors file: {error}."
        ) from error
    # Check everything before copying anything, so a file that does not fit leaves the method
    # exactly as it was.
    own = method.state_dict()
    missing = sorted(set(own) - set(state) - frozen_pretrained_keys(method))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"{weights_path} does not fit {method.name} with its current config: "
            + "; ".join(
                f"{what} {keys[:3]}{' ...' if len(keys) > 3 else ''}"
                for what, keys in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("different shapes for", mismatched),
                )
                if keys
            )
            + "."
        )
    method.load_state_dict(state, strict=False)


def weights_file(path: str | os.PathLike) -> Path:
    """``path`` as a ``.safetensors`` file (``save_weights`` stems work too)."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


def shipped_weights_for(
    backbone: str | ClipBackbone | None, pretrained: str | None, filename: str
) -> Path | None:
    """The shipped toy head ``assets/<filename>`` if it belongs to the CLIP the method is built
    on, else None.

    A shipped head was trained on one shipped ToyWorld CLIP, the one named in the config saved
    beside it (``"toy-vit"``). A random CLIP of the same architecture has the same open_clip name
    but none of the features the head learnt, so the check is on where the CLIP's weights came
    from, not on its name.

    Arguments:
        backbone: the :class:`ClipBackbone` the method will share (its recorded source must be
            the shipped folder that :func:`ovseg.backbones.load_backbone` loads,
            ``local-dir:<assets>/clip-toy-vit``; ``pretrained`` is then ignored), or the name or
            alias the builder will load with ``pretrained`` (the shipped CLIP's alias with
            ``pretrained=None``, or its ``local-dir:`` folder).
        pretrained: the weights setting a named backbone is loaded with.
        filename: the head's file name in the assets folder.

    Raises:
        WeightsError: the head's saved config is unreadable.
    """
    path = ovseg.backbones.ASSETS_DIR / filename
    record = path.with_suffix(".json")
    if not path.is_file() or not record.is_file():
        return None
    try:
        alias = json.loads(record.read_text()).get("config", {}).get("backbone")
    except (OSError, ValueError, AttributeError) as error:
        raise WeightsError(f"{record} is not a readable config: {error}.") from error
    if alias not in ovseg.backbones.TOY_CLIPS:
        return None
    if isinstance(backbone, ClipBackbone):
        backbone, pretrained = backbone.name, backbone.pretrained
    if backbone == alias and pretrained is None:
        return path
    if isinstance(backbone, str) and backbone.startswith("local-dir:"):
        folder = Path(backbone.removeprefix("local-dir:")).resolve()
        if folder == ovseg.backbones.toy_clip_dir(alias).resolve():
            return path
    return None


def saved_config(
    weights: Path | None, method_name: str, config_class: type[MethodConfig]
) -> dict[str, Any]:
    """The config :func:`save_weights` wrote beside ``weights`` (empty if there is none, or no
    weights), limited to ``config_class``'s fields but for its ``machine_settings``, with JSON
    lists back as tuples.

    Raises:
        WeightsError: an unreadable record, or one written for another method.
    """
    if weights is None:
        return {}
    record_path = weights.with_suffix(".json")
    if not record_path.is_file():
        return {}
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as error:
        raise WeightsError(f"{record_path} is not a readable config: {error}.") from error
    if record.get("method") != method_name:
        raise WeightsError(f"{weights} holds {record.get('method')!r} weights, not {method_name}.")
    known = {f.name for f in dataclasses.fields(config_class)} - set(config_class.machine_settings)
    return {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in record.get("config", {}).items()
        if key in known
    }


def settings_for_weights(
    config_class: type[MethodConfig],
    saved: dict[str, Any],
    config: dict[str, Any],
    *,
    shipped: bool,
    name: str,
) -> tuple[MethodConfig, bool]:
    """The settings a builder uses: the weights' saved config overridden by the caller's.

    Returns the settings and whether to load the weights. When the caller's settings cannot be
    combined with the *shipped* head's (a ``ValueError`` from the config), the shipped head is
    skipped with a warning and the caller's settings are used on their own; with weights the
    caller named, the error propagates.
    """
    try:
        return config_class(**saved).replace(**config), True
    except ValueError as error:
        if not shipped or not saved:
            raise
        warnings.warn(
            f"Not using the shipped {name} head: the settings given do not fit it ({error}).",
            stacklevel=3,
        )
        return config_class().replace(**config), False


def load_head_weights(method: SegmentationMethod, path: Path, *, shipped: bool) -> bool:
    """Load head weights into a freshly built method and say whether it now has a trained head.

    Weights the caller named must fit (:class:`WeightsError` otherwise). The shipped toy head is
    only a default: when the settings given change its architecture (another ``cost_dim``, say),
    it is skipped with a warning and the method keeps its untrained head and training-free path.
    """
    try:
        load_weights(method, path)
    except WeightsError as error:
        if not shipped:
            raise
        warnings.warn(
            f"Not using the shipped {method.name} head: {error} The method runs with an "
            "untrained head.",
            stacklevel=3,
        )
        return False
    return True
