"""Predictor: encode an image once, then segment it with any vocabulary, many times.

The pattern is segment-anything's ``SamPredictor``: :meth:`Predictor.set_image` does the
expensive image encoding for every method and caches it; :meth:`Predictor.predict` only encodes
the (cached) vocabulary and runs the cheap heads.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.errors import NoImageError, UnknownMethodError
from ovseg.images import ImageSource, load_image
from ovseg.methods.base import SegmentationMethod
from ovseg.vocabulary import Vocabulary, parse_vocabulary


@dataclass
class Prediction:
    """One method's answer for the current image and vocabulary.

    Attributes:
        method: the method's registry name.
        vocabulary: the parsed vocabulary (``K`` classes).
        label_map: ``H×W`` int64 class index per pixel, at the size of the image given.
        scores: ``K`` mean softmax probability of each class over the image.
        areas: ``K`` fraction of pixels labelled with each class.
        intermediates: the method's named intermediates (only when asked for).
        timings: seconds spent in ``encode_image`` (0 when cached), ``segment`` and ``postprocess``.
        trained_head: whether the method ran trained head weights.
    """

    method: str
    vocabulary: Vocabulary
    label_map: np.ndarray
    scores: np.ndarray
    areas: np.ndarray
    intermediates: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    trained_head: bool = False

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description: classes present with their areas and scores, and timings."""
        present = np.flatnonzero(self.areas > 0)
        order = present[np.argsort(-self.areas[present])]
        return {
            "method": self.method,
            "trained_head": self.trained_head,
            "image_size": list(self.label_map.shape),
            "vocabulary": list(self.vocabulary.names),
            "classes": [
                {
                    "index": int(index),
                    "name": self.vocabulary.names[index],
                    "area": round(float(self.areas[index]), 6),
                    "score": round(float(self.scores[index]), 6),
                }
                for index in order
            ],
            "timings_s": {name: round(seconds, 4) for name, seconds in self.timings.items()},
        }


class Predictor:
    """Segments one image with one or more methods and any number of vocabularies.

    Arguments:
        methods: a method, or a mapping of display names to methods.
    """

    def __init__(self, methods: SegmentationMethod | Mapping[str, SegmentationMethod]) -> None:
        if isinstance(methods, SegmentationMethod):
            methods = {methods.name: methods}
        if not methods:
            raise UnknownMethodError("A Predictor needs at least one method.")
        self.methods: dict[str, SegmentationMethod] = dict(methods)
        self.image: np.ndarray | None = None
        self._features: dict[str, Any] = {}
        self._encode_seconds: dict[str, float] = {}

    def set_image(self, image: ImageSource) -> np.ndarray:
        """Validate an image and forget the previous one's features.

        Encoding happens lazily, once per method, on the first :meth:`predict` that uses it.

        Returns:
            The image as the ``H×W×3`` uint8 array predictions refer to.

        Raises:
            ovseg.images.ImageError: if the image cannot be read or is too small.
        """
        self.image = load_image(image)
        self._features.clear()
        self._encode_seconds.clear()
        return self.image

    def reset_image(self) -> None:
        self.image = None
        self._features.clear()
        self._encode_seconds.clear()

    def replace_method(
        self, name: str, method: SegmentationMethod, *, keep_features: bool = False
    ) -> None:
        """Swap the method run under ``name`` (e.g. a variant with other inference settings).

        Arguments:
            name: one of this predictor's method names.
            method: the replacement.
            keep_features: keep the image features already encoded for ``name``; only correct
                when ``method`` encodes images exactly as the old one did (same backbone, weights
                and input size).

        Raises:
            ValueError: for an unknown name.
        """
        if name not in self.methods:
            raise UnknownMethodError(
                f"Unknown method {name!r}; this predictor has {list(self.methods)}."
            )
        self.methods[name] = method
        if not keep_features:
            self._features.pop(name, None)
            self._encode_seconds.pop(name, None)

    def features(self, name: str) -> Any:
        """The current image's features for method ``name``, encoded now if not cached yet.

        Raises:
            RuntimeError: if no image was set.
            ValueError: for an unknown method.
        """
        if self.image is None:
            raise NoImageError("Call set_image(image) before asking for its features.")
        if name not in self.methods:
            raise UnknownMethodError(
                f"Unknown method {name!r}; this predictor has {list(self.methods)}."
            )
        return self._encode(name)[0]

    def is_encoded(self, name: str) -> bool:
        """Whether the current image's features for ``name`` are cached."""
        return name in self._features

    @torch.inference_mode()
    def _encode(self, name: str) -> tuple[Any, float]:
        if name in self._features:
            return self._features[name], 0.0
        method = self.methods[name]
        start = time.perf_counter()
        size = method.config.input_size
        parameter = next(method.parameters())
        pixels = torch.from_numpy(self.image).permute(2, 0, 1)[None].to(parameter.device)
        pixels = pixels.to(parameter.dtype) / 255.0
        pixels = F.interpolate(
            pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        self._features[name] = method.encode_image(pixels)
        seconds = time.perf_counter() - start
        self._encode_seconds[name] = seconds
        return self._features[name], seconds

    @torch.inference_mode()
    def predict(
        self,
        vocabulary: str | Vocabulary | Sequence[str | Sequence[str]],
        *,
        methods: Sequence[str] | None = None,
        return_intermediates: bool = False,
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> dict[str, Prediction]:
        """Segment the current image with each method.

        Arguments:
            vocabulary: typed text (``"cat, car; automobile, sky"``), a list of names or synonym
                lists, or a :class:`Vocabulary`.
            methods: which methods to run (default: all of this predictor's).
            return_intermediates: also return each method's intermediates.
            options: per-method keyword options, e.g. ``{"dcp-clip": {"theta": 0.3}}``.

        Returns:
            Method name → :class:`Prediction`, in the order asked.

        Raises:
            RuntimeError: if no image was set.
            ovseg.vocabulary.VocabularyError: if the vocabulary is empty or too long.
            ValueError: for an unknown method or option.
        """
        if self.image is None:
            raise NoImageError("Call set_image(image) before predict(vocabulary).")
        parsed = parse_vocabulary(vocabulary)
        names = list(methods) if methods is not None else list(self.methods)
        unknown = [name for name in names if name not in self.methods]
        if unknown:
            raise UnknownMethodError(
                f"Unknown method(s) {unknown}; this predictor has {list(self.methods)}."
            )
        options = dict(options or {})
        height, width = self.image.shape[:2]
        results = {}
        for name in names:
            method = self.methods[name]
            features, encode_seconds = self._encode(name)
            start = time.perf_counter()
            output = method.segment(
                features,
                parsed.classes,
                return_intermediates=return_intermediates,
                **dict(options.get(name, {})),
            )
            segment_seconds = time.perf_counter() - start
            start = time.perf_counter()
            label_map, scores, areas = _postprocess(output.logits[0], (height, width))
            results[name] = Prediction(
                method=name,
                vocabulary=parsed,
                label_map=label_map,
                scores=scores,
                areas=areas,
                intermediates=output.intermediates,
                timings={
                    "encode_image": encode_seconds,
                    "segment": segment_seconds,
                    "postprocess": time.perf_counter() - start,
                },
                trained_head=method.trained_head,
            )
        return results


def _postprocess(
    logits: torch.Tensor, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``K×h×w`` logits → label map at ``size``, mean class probabilities and class areas."""
    num_classes = logits.shape[0]
    scores = _mean_probabilities(logits)
    # Upsampling K score maps to a large image costs K×H×W floats; the argmax is taken on the
    # upsampled scores in row bands to keep that bounded for big vocabularies and photos.
    labels = torch.empty(size, dtype=torch.int64)
    candidates = _possible_winners(logits)
    band = max(1, 2**22 // max(1, len(candidates) * size[1]))
    # Indexing copies; with every class a candidate (typical of small vocabularies) use the
    # logits as they are.
    kept = logits if len(candidates) == num_classes else logits[candidates]
    full = kept.float()[None]
    for top in range(0, size[0], band):
        bottom = min(size[0], top + band)
        labels[top:bottom] = candidates[_band_argmax(full, size, top, bottom)]
    areas = torch.bincount(labels.flatten(), minlength=num_classes).double() / labels.numel()
    return labels.numpy(), scores.cpu().numpy(), areas.numpy()


def _possible_winners(logits: torch.Tensor) -> torch.Tensor:
    """Indices (ascending) of the classes that can win the argmax anywhere after upsampling.

    Bilinear upsampling takes convex combinations of neighbouring logits, so a class whose
    highest logit is below another class's lowest one loses to it at every output pixel; leaving
    it out changes no label (ties cannot involve it) and makes large vocabularies cheap, where
    most classes are absent.
    """
    flat = logits.flatten(1)
    floor = flat.amin(dim=1).max()
    return torch.nonzero(flat.amax(dim=1) >= floor).flatten()


def _mean_probabilities(logits: torch.Tensor, floats: int = 2**22) -> torch.Tensor:
    """``softmax(logits, dim=0).mean(dim=(1, 2))`` of ``K×h×w`` logits, computed over chunks of
    classes (at most ``floats`` values at a time) instead of a full ``K×h×w`` copy."""
    num_classes = logits.shape[0]
    chunk = max(1, floats // max(1, logits[0].numel()))
    chunks = [slice(start, start + chunk) for start in range(0, num_classes, chunk)]
    maximum = logits[chunks[0]].float().amax(dim=0)
    for c in chunks[1:]:  # a running maximum: no stack of one h×w map per chunk
        torch.maximum(maximum, logits[c].float().amax(dim=0), out=maximum)

    def exp(x: torch.Tensor) -> torch.Tensor:
        # Below e^-87 float32 turns subnormal, which CPUs compute many times slower (DCP-CLIP's
        # unselected classes sit at -100); such terms are < 2e-38 and are counted as that.
        return x.clamp_min_(-87.0).exp_()

    total = sum(exp(logits[c].float() - maximum).sum(dim=0) for c in chunks)
    log_normaliser = maximum + total.log()
    return torch.cat([exp(logits[c].float() - log_normaliser).mean(dim=(1, 2)) for c in chunks])


def _band_argmax(
    logits: torch.Tensor, size: tuple[int, int], top: int, bottom: int
) -> torch.Tensor:
    """Argmax of bilinearly upsampled ``1×K×h×w`` logits for output rows ``top:bottom``."""
    height, width = size
    # Pixel centres in normalised coordinates: with align_corners=False and border padding,
    # grid_sample samples exactly where F.interpolate(mode="bilinear") would.
    grid_y = (torch.arange(top, bottom, dtype=torch.float32) + 0.5) / height * 2 - 1
    grid_x = (torch.arange(width, dtype=torch.float32) + 0.5) / width * 2 - 1
    grid = torch.stack(torch.meshgrid(grid_y, grid_x, indexing="ij")[::-1], dim=-1)[None]
    sampled = F.grid_sample(
        logits, grid.to(logits.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )
    return sampled[0].argmax(dim=0).cpu()
