"""The interface every ovseg method implements, and the registry that builds them.

A method is an ``nn.Module`` with two steps, split the way segment-anything splits its predictor:
``encode_image`` (expensive, cached by the Predictor) and ``segment`` (cheap, repeated for every
vocabulary). ``forward`` chains the two.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ovseg.backbones
from ovseg.backbones import ClipBackbone, WeightsError
from ovseg.backbones.finetune import (
    fused_state_name,
    set_finetuning_scope,
    trainable_state_names,
)
from ovseg.errors import OptionError, UnknownMethodError

IGNORE_INDEX = 255

VocabularyLike = Sequence[str | Sequence[str]]


@dataclass
class MethodConfig:
    """Settings shared by every method; each method extends it with its own.

    Attributes:
        backbone: CLIP name or alias understood by :func:`ovseg.backbones.load_backbone`.
        pretrained: weights tag or path for the backbone (None: the alias's default).
        templates: text template set name or explicit templates.
        input_size: square side the image is resized to before encoding.
    """

    backbone: str = "toy-vit"
    pretrained: str | None = None
    templates: str | tuple[str, ...] = "imagenet"
    input_size: int = 256

    def replace(self, **changes: Any) -> MethodConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise OptionError(
                f"{type(self).__name__} has no option(s) {sorted(unknown)}; "
                f"known: {[f.name for f in dataclasses.fields(self)]}."
            )
        return dataclasses.replace(self, **changes)


@dataclass
class SegmentationOutput:
    """What a method returns.

    Attributes:
        logits: ``B×K×H×W`` class scores at the input image resolution; larger is more likely.
        intermediates: named tensors (cost volumes, prompts, selections, attention maps) for the
            demo; empty unless ``return_intermediates=True``.
    """

    logits: Tensor
    intermediates: dict[str, Any] = field(default_factory=dict)


class SegmentationMethod(nn.Module):
    """Base class: subclasses implement :meth:`encode_image` and :meth:`segment`.

    Attributes:
        name: the registry name (``"dense-clip"``).
        config: the method's configuration dataclass.
        backbone: the CLIP backbone whose text tower encodes the vocabulary.
        trained_head: whether the method's head weights were trained (False: training-free path or
            random head; the demo says so).
    """

    name: ClassVar[str]
    config: MethodConfig
    backbone: ClipBackbone
    trained_head: bool = False
    # Submodules rebuilt from pretrained weights at load time: their frozen tensors are not saved
    # with the method's weights (see :func:`save_weights`).
    pretrained_prefixes: ClassVar[tuple[str, ...]] = ("backbone",)
    # What of the CLIP a method fine-tunes, for methods that set it when trained
    # (ovseg.backbones.finetune); None: the CLIP's ``requires_grad`` flags say it.
    clip_finetuning_scope: str | None = None

    def clear_caches(self) -> None:
        """Forget the vocabulary encodings cached in memory (text embeddings, and for DPSeg its
        visual prompts), so that the next call encodes its vocabulary from scratch."""
        self.backbone.clear_text_cache()

    def encode_image(self, images: Tensor) -> Any:
        """Encode ``B×3×H×W`` images in [0, 1]; the result is what :meth:`segment` consumes."""
        raise NotImplementedError

    def segment(
        self,
        image_features: Any,
        vocabulary: VocabularyLike,
        *,
        return_intermediates: bool = False,
        target: Tensor | None = None,
        **options: Any,
    ) -> SegmentationOutput:
        """Segment already-encoded images with a vocabulary of ``K`` classes.

        Arguments:
            image_features: what :meth:`encode_image` returned.
            vocabulary: ``K`` class names or synonym tuples.
            return_intermediates: also return named intermediates for the demo.
            target: ``B×H×W`` ground-truth indices into the vocabulary (255: ignore), given only
                in training, for methods whose training differs (DCP-CLIP forces ground-truth
                classes into its selection); others ignore it.
            options: method-specific inference options (e.g. DCP-CLIP's ``theta``).
        """
        raise NotImplementedError

    def forward(
        self,
        images: Tensor,
        vocabulary: VocabularyLike,
        *,
        return_intermediates: bool = False,
        **options: Any,
    ) -> SegmentationOutput:
        """Segment ``B×3×H×W`` images in [0, 1] with a vocabulary; see :meth:`segment`."""
        features = self.encode_image(images)
        return self.segment(
            features, vocabulary, return_intermediates=return_intermediates, **options
        )

    def loss(self, output: SegmentationOutput, target: Tensor) -> dict[str, Tensor]:
        """Per-pixel cross-entropy; methods with a paper loss override this.

        Arguments:
            output: the method's output for a batch.
            target: ``B×H×W`` class indices into the vocabulary, ``IGNORE_INDEX`` where unlabelled.
        """
        logits = _resize_to(output.logits, target.shape[-2:])
        return {"loss_ce": F.cross_entropy(logits, target.long(), ignore_index=IGNORE_INDEX)}

    def train(self, mode: bool = True) -> SegmentationMethod:
        if mode:
            self.set_clip_finetuning_scope()
        return super().train(mode)

    def set_clip_finetuning_scope(self) -> None:
        """Set :attr:`clip_finetuning_scope` on the CLIP (:mod:`ovseg.backbones.finetune`), when
        the method has one. Called when the method is trained (``train()``, and by methods'
        ``parameter_groups``), never when it is built, so a backbone shared for inference is
        left untouched."""
        if self.clip_finetuning_scope is not None:
            set_finetuning_scope(self.backbone.model, self.clip_finetuning_scope)

    def parameter_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups; methods override this with their paper's learning rates."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": base_lr}]


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
    weights), limited
    to ``config_class``'s fields, with JSON lists back as tuples.

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
    known = {f.name for f in dataclasses.fields(config_class)}
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


def _resize_to(logits: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


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


def upsample_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinearly resize ``B×K×h×w`` logits to ``size``, chunked over K to bound peak memory."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    chunks = [_resize_to(chunk, size) for chunk in logits.split(64, dim=1)]
    return torch.cat(chunks, dim=1)
