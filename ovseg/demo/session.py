"""One visitor's state and the work behind every button: all of it goes through a Predictor.

Models are loaded once and shared read-only by every visitor. A :class:`Session` (kept in
``gr.State``, so per browser session) owns a :class:`~ovseg.Predictor` over those models, the
digest of the image it holds and the last result of every method. Changing only the vocabulary
or an inference option re-runs the heads on the cached image features; only a new image (or a
new input size) encodes again.

Files a session writes (its downloads) live in its own folder inside the app's
:class:`ScratchSpace`; the folder goes when the session ends, when Gradio evicts it, or when the
app exits.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import json
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import ovseg
from ovseg.demo.settings import NO_TRAINING_FREE_PATH, describe
from ovseg.errors import OvsegError
from ovseg.methods import SegmentationMethod
from ovseg.prompts.visual import VisualPromptError
from ovseg.viz import label_image, overlay

INFERENCE_PASSES = ("I", "II")
ESC_PROMPT_TYPES = ("point", "box", "mask")
# Methods whose heads run at any input size; the others keep the size they were built for.
RESIZABLE_METHODS = ("dense-clip", "dpseg")


class DemoInputError(OvsegError, ValueError):
    """Input the visitor can fix (no image, no method, a bad vocabulary); shown as is."""


@dataclass(frozen=True)
class RunOptions:
    """The options of the Options accordion.

    Attributes:
        input_size: square side images are encoded at (None: each method's own).
        dpseg_inference: DPSeg's "I" (one pass) or "II" (refined visual prompts).
        dcp_theta: DCP-CLIP's image-level selection threshold θ (None: its config).
        esc_prompt_types: the pseudo prompts ESC-Net gives SAM (None: its config). The trained
            head embeds any of points, boxes and masks; the training-free path always prompts
            the full SAM with points and adds boxes when "box" is chosen.
        ldvc_top_m: LDVC's routed windows per window (None: its config).
    """

    input_size: int | None = None
    dpseg_inference: str = "II"
    dcp_theta: float | None = None
    esc_prompt_types: tuple[str, ...] | None = None
    ldvc_top_m: int | None = None

    def __post_init__(self) -> None:
        if self.dpseg_inference not in INFERENCE_PASSES:
            raise DemoInputError(f"DPSeg pass must be I or II; got {self.dpseg_inference!r}.")
        if self.esc_prompt_types is not None and (
            not self.esc_prompt_types or set(self.esc_prompt_types) - set(ESC_PROMPT_TYPES)
        ):
            raise DemoInputError(
                f"Choose at least one ESC-Net prompt type of {', '.join(ESC_PROMPT_TYPES)}."
            )
        if self.dcp_theta is not None and not 0 <= self.dcp_theta <= 1:
            raise DemoInputError(f"DCP-CLIP θ must be in [0, 1]; got {self.dcp_theta}.")
        if self.ldvc_top_m is not None and self.ldvc_top_m < 1:
            raise DemoInputError(f"LDVC top-m must be at least 1; got {self.ldvc_top_m}.")
        if self.input_size is not None and (self.input_size < 64 or self.input_size % 32):
            raise DemoInputError(
                f"Input size must be a multiple of 32 of at least 64; got {self.input_size}."
            )

    def segment_options(self, name: str) -> dict[str, Any]:
        """The per-call ``segment`` options of method ``name``."""
        if name == "dpseg":
            return {"inference": self.dpseg_inference}
        if name == "dcp-clip" and self.dcp_theta is not None:
            return {"theta": float(self.dcp_theta)}
        if name == "ldvc" and self.ldvc_top_m is not None:
            return {"top_m": int(self.ldvc_top_m)}
        return {}

    def variant(self, method: SegmentationMethod) -> dict[str, Any]:
        """The config changes ``method`` needs for these options (input size, prompt types)."""
        changes: dict[str, Any] = {}
        if self.input_size is not None and method.name in RESIZABLE_METHODS:
            changes["input_size"] = self.input_size
        if method.name == "esc-net" and self.esc_prompt_types is not None:
            if method.trained_head:
                changes["prompt_types"] = tuple(
                    kind for kind in ESC_PROMPT_TYPES if kind in self.esc_prompt_types
                )
            else:
                changes["training_free_box"] = "box" in self.esc_prompt_types
        return {
            key: value for key, value in changes.items() if getattr(method.config, key) != value
        }


def esc_net_prompt_types(method: SegmentationMethod) -> tuple[str, ...]:
    """The prompt types an ESC-Net uses by default: its head's, or those of its training-free
    path (points, plus boxes when ``training_free_box``)."""
    if method.trained_head:
        return tuple(method.config.prompt_types)
    return ("point", "box") if method.config.training_free_box else ("point",)


def method_variant(method: SegmentationMethod, changes: dict[str, Any]) -> SegmentationMethod:
    """A copy of ``method`` with other config values that shares every parameter and buffer.

    Only settings read at call time can change this way: the input size of size-agnostic heads
    and ESC-Net's prompt types (read by its prompt encoding on every call). The shared model is
    never modified, so other sessions keep their settings.
    """
    if not changes:
        return method
    variant = copy.copy(method)
    # copy.copy shares the submodule table; give the variant its own before replacing entries.
    variant.__dict__["_modules"] = dict(method._modules)
    variant.config = method.config.replace(**changes)
    encoding = method._modules.get("prompt_encoding")
    if "prompt_types" in changes and encoding is not None:
        encoding = copy.copy(encoding)
        encoding.prompt_types = tuple(changes["prompt_types"])
        variant.prompt_encoding = encoding
    return variant


@dataclass
class MethodResult:
    """One method's latest run.

    Attributes:
        name: the method.
        prediction: its prediction with intermediates (None when it could not run).
        error: why it could not run, in words.
        seconds: wall time of the run, encoding included when it happened.
        encoded: whether the image was encoded in this run.
        key: vocabulary and options the result is for.
    """

    name: str
    prediction: ovseg.Prediction | None
    error: str | None
    seconds: float
    encoded: bool
    key: tuple


def image_digest(image: np.ndarray) -> str:
    """A fingerprint of an image's pixels and shape."""
    data = np.ascontiguousarray(image)
    return hashlib.sha1(data.tobytes() + str(data.shape).encode()).hexdigest()


class ScratchSpace:
    """A private temporary folder for one app, holding one folder per session.

    Everything under it is removed when the app exits (and each session's folder when the session
    ends). Folder names are random, never derived from anything a visitor typed or uploaded.

    Arguments:
        parent: where to create it (default: the system's temporary directory).
    """

    def __init__(self, parent: str | Path | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ovseg-demo-", dir=parent))
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.root, True)
        atexit.register(self._finalizer)

    def folder(self, prefix: str) -> Path:
        """A new, empty folder of its own (mode 0700)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.root))

    def remove(self) -> None:
        """Delete the whole space now."""
        self._finalizer()


_DEFAULT_SPACE: ScratchSpace | None = None


def default_scratch_space() -> ScratchSpace:
    """The process-wide space for sessions created without one (tests, scripts)."""
    global _DEFAULT_SPACE
    if _DEFAULT_SPACE is None:
        _DEFAULT_SPACE = ScratchSpace()
    return _DEFAULT_SPACE


@dataclass
class Session:
    """One visitor's predictor, image, vocabulary and results.

    Attributes:
        models: the shared, read-only models (display name → method).
        predictor: this session's predictor over the models (or per-session variants of them).
        digest: fingerprint of the image the predictor holds.
        vocabulary: the vocabulary of the last run.
        options: the options of the last run.
        results: method name → its latest :class:`MethodResult`.
        installed: method name → config changes of the variant installed in the predictor.
        space: the app's scratch space; this session's folder in it is made on first use.
    """

    models: dict[str, SegmentationMethod]
    predictor: ovseg.Predictor
    digest: str = ""
    vocabulary: ovseg.Vocabulary | None = None
    options: RunOptions = field(default_factory=RunOptions)
    results: dict[str, MethodResult] = field(default_factory=dict)
    installed: dict[str, dict[str, Any]] = field(default_factory=dict)
    space: ScratchSpace = field(default_factory=default_scratch_space, repr=False)
    _scratch: Path | None = field(default=None, init=False, repr=False)
    _cleanup: weakref.finalize | None = field(default=None, init=False, repr=False)

    @classmethod
    def create(
        cls, models: dict[str, SegmentationMethod], space: ScratchSpace | None = None
    ) -> Session:
        """A fresh session over the shared models (its files in ``space``)."""
        return cls(
            models=models,
            predictor=ovseg.Predictor(dict(models)),
            space=space or default_scratch_space(),
        )

    @property
    def scratch(self) -> Path:
        """This session's folder for downloadable files, made on first use."""
        if self._scratch is None or not self._scratch.is_dir():
            self._scratch = self.space.folder("session-")
            # Gradio drops sessions it evicts without a callback; collecting them cleans up too.
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._scratch, True)
        return self._scratch

    def close(self) -> None:
        """Delete this session's files (Gradio calls it when the session ends or expires)."""
        if self._cleanup is not None:
            self._cleanup()
        self._scratch = None

    @property
    def image(self) -> np.ndarray | None:
        return self.predictor.image

    def set_image(self, image: Any) -> bool:
        """Hold ``image``; returns whether it differs from the one held (features dropped).

        Raises:
            DemoInputError: no image, or one that cannot be read.
        """
        if image is None:
            raise DemoInputError("Give an image first: upload one, paste one or pick an example.")
        try:
            array = ovseg.load_image(image)
        except ovseg.ImageError as error:
            raise DemoInputError(str(error)) from error
        digest = image_digest(array)
        if digest == self.digest:
            return False
        self.predictor.set_image(array)
        self.digest = digest
        self.results.clear()
        return True

    def _install(self, name: str, options: RunOptions) -> None:
        """Put the variant ``options`` call for into the predictor, re-encoding only if the input
        size changed."""
        base = self.models[name]
        changes = options.variant(base)
        if changes == self.installed.get(name, {}):
            return
        previous_size = self.predictor.methods[name].config.input_size
        variant = method_variant(base, changes)
        self.predictor.replace_method(
            name, variant, keep_features=variant.config.input_size == previous_size
        )
        self.installed[name] = changes

    def run(self, name: str, vocabulary: ovseg.Vocabulary, options: RunOptions) -> MethodResult:
        """Segment the held image with one method (reusing its last result if nothing changed)."""
        if self.image is None:
            raise DemoInputError("Give an image first: upload one, paste one or pick an example.")
        if name not in self.models:
            raise DemoInputError(f"{name} is not loaded here; loaded: {', '.join(self.models)}.")
        key = (
            vocabulary.classes,
            tuple(sorted(options.segment_options(name).items())),
            tuple(sorted(options.variant(self.models[name]).items())),
        )
        cached = self.results.get(name)
        if cached is not None and cached.key == key:
            return cached
        self._install(name, options)
        method = self.predictor.methods[name]
        if name in NO_TRAINING_FREE_PATH and not method.trained_head:
            # Say so at once instead of encoding the image for a head that will refuse to run.
            result = MethodResult(name, None, describe(method), 0.0, False, key)
            self.results[name] = result
            return result
        encoded = not self.predictor.is_encoded(name)
        start = time.perf_counter()
        try:
            prediction = self.predictor.predict(
                vocabulary,
                methods=[name],
                return_intermediates=True,
                options={name: options.segment_options(name)},
            )[name]
            error = None
        except (ValueError, VisualPromptError) as failure:  # e.g. a name ToyWorld cannot draw
            prediction, error = None, str(failure)
        result = MethodResult(
            name=name,
            prediction=prediction,
            error=error,
            seconds=time.perf_counter() - start,
            encoded=encoded,
            key=key,
        )
        self.results[name] = result
        return result

    def ordered_results(self) -> list[MethodResult]:
        """The results for the current vocabulary, in the display order of the models (not the
        order they ran); results for an earlier vocabulary are left out."""
        order = list(self.models)
        current = [
            result
            for result in self.results.values()
            if self.vocabulary is not None and result.key[0] == self.vocabulary.classes
        ]
        return sorted(current, key=lambda result: order.index(result.name))

    def result(self, name: str) -> MethodResult | None:
        """The latest result of one method if it is for the current vocabulary."""
        return next((r for r in self.ordered_results() if r.name == name), None)

    def predictions(self) -> dict[str, ovseg.Prediction]:
        """The latest successful prediction of every method that ran."""
        return {
            result.name: result.prediction
            for result in self.ordered_results()
            if result.prediction is not None
        }

    def write_downloads(self, alpha: float) -> list[str]:
        """Label PNG and overlay per method and one JSON for all, in this session's folder."""
        if self.image is None or self.vocabulary is None:
            return []
        # Only the latest run's files are kept: Gradio has its own copy of what it served.
        for previous in self.scratch.glob("run-*"):
            shutil.rmtree(previous, ignore_errors=True)
        folder = self.scratch / f"run-{time.time_ns()}"
        folder.mkdir()
        files, summary = [], {"vocabulary": [list(c) for c in self.vocabulary], "methods": {}}
        for result in self.ordered_results():
            name = result.name
            if result.prediction is None:
                summary["methods"][name] = {"error": result.error}
                continue
            prediction = result.prediction
            labels_path = folder / f"{name}-labels.png"
            label_image(prediction.label_map, len(self.vocabulary)).save(labels_path)
            overlay_path = folder / f"{name}-overlay.png"
            Image.fromarray(
                overlay(self.image, prediction.label_map, self.vocabulary.names, alpha=alpha)
            ).save(overlay_path)
            files += [str(labels_path), str(overlay_path)]
            summary["methods"][name] = {
                **prediction.summary(),
                "wall_time_s": round(result.seconds, 4),
            }
        json_path = folder / "ovseg-results.json"
        json_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        return [str(json_path), *files]
