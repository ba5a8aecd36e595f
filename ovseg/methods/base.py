"""The interface every ovseg method implements, and the registry that builds them.

A method is an ``nn.Module`` with two steps, split the way segment-anything splits its predictor:
``encode_image`` (expensive, cached by the Predictor) and ``segment`` (cheap, repeated for every
vocabulary). ``forward`` chains the two.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.backbones import ClipBackbone
from ovseg.backbones.finetune import (
    set_finetuning_scope,
)
from ovseg.errors import OptionError
from ovseg.methods.chunking import resize_logits

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

    # Fields that describe the machine a method ran on, not the model (a cache folder, a chunk
    # size): a saved record's values for them are never restored (weights.saved_config).
    machine_settings: ClassVar[tuple[str, ...]] = ()

    # Declarative checks, run when a config is made (and by ``replace``); a subclass lists its
    # fields here and adds cross-field rules in :meth:`problems`.
    #   tuple_fields: sequences stored as tuples (a JSON record gives lists); None stays None.
    #   choices:      field -> the values it may take.
    #   at_least:     field -> its smallest value (None values are not checked).
    #   within:       field -> (low, high), both included.
    tuple_fields: ClassVar[tuple[str, ...]] = ()
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {}
    at_least: ClassVar[dict[str, float]] = {}
    within: ClassVar[dict[str, tuple[float, float]]] = {}

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            if isinstance(getattr(self, item.name), os.PathLike):  # the saved record is JSON
                setattr(self, item.name, os.fspath(getattr(self, item.name)))
        for name in self.tuple_fields:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                setattr(self, name, tuple(value))
        problems = [*self._declared_problems(), *self.problems()]
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems) + ".")

    def _declared_problems(self) -> list[str]:
        problems = []
        for name, allowed in self.choices.items():
            if getattr(self, name) not in allowed:
                problems.append(
                    f"{name} must be one of {list(allowed)}; got {getattr(self, name)!r}"
                )
        for name, low in self.at_least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                problems.append(f"{name} must be at least {low}; got {value}")
        for name, (low, high) in self.within.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                problems.append(f"{name} must be in [{low}, {high}]; got {value}")
        return problems

    def problems(self) -> list[str]:
        """What is wrong with this config beyond the declared checks (rules joining fields);
        each problem is one clause of the ``ValueError`` the config raises when made."""
        return []

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
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
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

    def check_options(self, options: dict[str, Any], known: Sequence[str] = ()) -> None:
        """Refuse :meth:`segment` options the method does not know (a typo must not be ignored).

        Raises:
            OptionError: naming the unknown options and the known ones.
        """
        unknown = sorted(set(options) - set(known))
        if unknown and not known:
            raise OptionError(f"{self.name} takes no options; got {unknown}.")
        if unknown:
            raise OptionError(f"Unknown {self.name} option(s) {unknown}; known: {list(known)}.")

    def config_with_options(self, options: dict[str, Any], known: Sequence[str]) -> MethodConfig:
        """The config with this call's ``options`` (among ``known``, each a config field) in
        place of its own, checked as a config is.

        Raises:
            OptionError: an unknown option, or a value the config refuses.
        """
        self.check_options(options, known)
        try:
            return self.config.replace(**options)
        except ValueError as error:
            raise OptionError(str(error)) from None

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
        logits = resize_logits(output.logits, target.shape[-2:])
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
