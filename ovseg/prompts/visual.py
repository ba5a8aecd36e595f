"""Visual prompts: images that show a class, made from its text prompts, and their disk cache.

DPSeg (Zhao et al., CVPR 2025) pairs every text prompt ``template.format(class)`` with an image a
text-to-image model draws from that same text, and encodes it with a frozen copy of the CLIP image
encoder. This module makes those images and caches them with their embeddings:

- :class:`VisualPromptGenerator`: the interface. ``generate(synonyms, template_index, template,
  seed)`` returns one ``H×W×3`` uint8 image.
- :class:`StableDiffusionGenerator`: any ``diffusers`` text-to-image pipeline (Stable Diffusion
  v1.5 by default, the paper's choice), loaded on first use, never at import.
- :class:`ToyWorldSpriteGenerator`: ToyWorld's stand-in; a sprite (or stuff patch) of the class in
  a random pose, drawn by :meth:`ovseg.data.toyworld.ToyWorld.sprite_image`.
- :class:`NoisyPromptGenerator`: the Table 5 ablation; variance-preserving Gaussian noise mixed
  into another generator's images.
- :class:`VisualPromptBank`: the disk cache (default ``~/.cache/ovseg/visual_prompts``) of images
  and of their frozen-encoder embeddings ``V`` (``D``) and pooled stage features ``V̄_j``
  (``D_j``), returning ``K×M×D`` and ``K×M×D_j`` tensors for a vocabulary. Missing entries are
  generated or reported, never zero-filled; black (safety-filtered) images are refused.

Example::

    bank = VisualPromptBank(generator=ToyWorldSpriteGenerator(), encoder=encode,
                            encoder_id="toy-convnext")
    prompts = bank.embeddings([("cat",), ("grass",)], ["a photo of a {}."] * 4)
    prompts.embeddings.shape  # (2, 4, D)
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from ovseg.caching import LruCache, WeightsFingerprint
from ovseg.errors import OvsegError

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DEFAULT_SD_MODEL",
    "BlackPromptImageError",
    "MissingVisualPromptsError",
    "NoisyPromptGenerator",
    "PromptEncoderId",
    "PromptEntry",
    "PromptGallery",
    "PromptMemo",
    "ShippedEmbeddings",
    "StableDiffusionGenerator",
    "ToyWorldSpriteGenerator",
    "VisualPromptBank",
    "VisualPromptEmbeddings",
    "VisualPromptError",
    "VisualPromptGenerator",
    "add_prompt_noise",
    "is_black_image",
    "make_generator",
    "prompt_defaults",
    "shipped_toy_prompts",
]

DEFAULT_SD_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_CACHE_DIR = Path(
    os.environ.get("OVSEG_VISUAL_PROMPT_CACHE", Path.home() / ".cache" / "ovseg" / "visual_prompts")
)
# Aliases for the generators of the paper's Table 5 that diffusers can run.
SD_ALIASES: dict[str, str] = {
    "sd15": DEFAULT_SD_MODEL,
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
}
BLACK_LEVEL = 2  # a safety-filtered image is all zeros; allow for rounding in the conversion
MEMORY_CACHE_ENTRIES = 50_000
# ToyWorld sprites ignore the template text, so a few distinct images per class are enough, and
# they are drawn small.
TOY_PROMPTS_PER_CLASS = 16
TOY_PROMPT_RESOLUTION = 128
# The prompt embeddings of every ToyWorld class for the shipped toy DPSeg
# (training/make_prompt_bank.py --export), so that known names cost nothing on a first call.
SHIPPED_TOY_PROMPTS = "visual-prompts-toy.safetensors"
# The toy diffusion model's sampler for DPSeg's prompts, chosen so that a first call on new names
# stays interactive on 2 CPU cores: 10 DPM-Solver++ steps drew the 160 prompts of 10 new names
# (16 each) in 15 s on one core, the UNet's forward passes being all but all of it
# (benchmarks/toy_diffusion.py). The guidance scale is not tuned yet: compare scales on the
# trained model with that benchmark's --guidance.
TOY_DIFFUSION_PROMPT_STEPS = 10
TOY_DIFFUSION_PROMPT_GUIDANCE = 3.0

# The encoder a bank uses: ``N×3×S×S`` images in [0, 1] → (``N×D`` embeddings, ``N×D_j`` pooled
# stage features for each stage j).
PromptEncoder = Callable[[Tensor], tuple[Tensor, Sequence[Tensor]]]


class VisualPromptError(OvsegError, RuntimeError):
    """A visual prompt could not be made, encoded or found."""


class MissingVisualPromptsError(VisualPromptError):
    """Cache entries that are needed but absent (and were not to be generated).

    Attributes:
        missing: the absent entries.
    """

    def __init__(self, missing: Sequence[PromptEntry], where: str) -> None:
        self.missing = list(missing)
        shown = ", ".join(repr(entry.prompt) for entry in self.missing[:5])
        more = f" and {len(self.missing) - 5} more" if len(self.missing) > 5 else ""
        super().__init__(
            f"{len(self.missing)} visual prompt(s) missing from {where}: {shown}{more}. "
            "Generate them (generate=True) or fill the cache with the bank on a machine that has "
            "the generator."
        )


class BlackPromptImageError(VisualPromptError):
    """The generator returned all-black images (Stable Diffusion's safety filter does that).

    Attributes:
        entries: the entries whose image was black.
    """

    def __init__(self, entries: Sequence[PromptEntry]) -> None:
        self.entries = list(entries)
        shown = ", ".join(f"{e.prompt!r} (seed {e.seed})" for e in self.entries[:5])
        super().__init__(
            f"{len(self.entries)} visual prompt image(s) came back black, probably "
            f"safety-filtered: {shown}. They were not cached; a black image would silently "
            "become a meaningless prompt."
        )


def is_black_image(image: np.ndarray) -> bool:
    """Whether an ``H×W×3`` uint8 image is (almost) all black, as safety-filtered images are."""
    return int(image.max()) <= BLACK_LEVEL


def add_prompt_noise(image: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """Variance-preserving Gaussian noise in pixel space (the Table 5 ablation, spec §3).

    ``x' = clip(√(1-p)·x + √p·ε, -1, 1)`` with ``x`` the image scaled to [-1, 1] and
    ``ε ~ N(0, I)`` drawn from ``seed``; ``p = 1`` is pure noise, the "maximum".

    Arguments:
        image: ``H×W×3`` uint8.
        noise: ``p`` in [0, 1].
        seed: fixes ``ε``.
    """
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1]; got {noise}.")
    pixels = image.astype(np.float32) / 127.5 - 1.0
    epsilon = np.random.default_rng([seed, 0x5EED]).standard_normal(pixels.shape, np.float32)
    mixed = np.clip(np.sqrt(1.0 - noise) * pixels + np.sqrt(noise) * epsilon, -1.0, 1.0)
    return np.round((mixed + 1.0) * 127.5).astype(np.uint8)


def _synonyms(entry: str | Sequence[str]) -> tuple[str, ...]:
    synonyms = (entry,) if isinstance(entry, str) else tuple(entry)
    if not synonyms or not all(isinstance(s, str) and s.strip() for s in synonyms):
        raise ValueError(f"Each class needs at least one non-empty name; got {entry!r}.")
    return synonyms


def _stable_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


def _slug(text: str) -> str:
    """A folder name for an identifier: readable prefix plus a hash, so no two ids collide."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60]
    return f"{readable}-{_stable_hash(text)[:10]}"


@runtime_checkable
class VisualPromptGenerator(Protocol):
    """Makes one image per (class, template, seed).

    Attributes:
        id: identifies everything that changes the images (model, sampler, resolution, noise);
            part of every cache key.
        resolution: side of the square images it returns.
    """

    id: str
    resolution: int

    def subject(self, synonyms: str | Sequence[str]) -> str:
        """The name the generator draws for a class given by its synonyms (part of cache keys)."""
        ...

    def generate(
        self, synonyms: str | Sequence[str], template_index: int, template: str, seed: int
    ) -> np.ndarray:
        """One ``resolution×resolution×3`` uint8 image for ``template.format(subject)``."""
        ...


@dataclass(frozen=True)
class PromptEntry:
    """One visual prompt: class, template and seed.

    Attributes:
        synonyms: the class as given in the vocabulary.
        subject: the name the generator draws (see :meth:`VisualPromptGenerator.subject`).
        template_index: index of the template in the template list.
        template: the template text, with ``{}`` for the class.
        seed: the generator seed, derived from (subject, template index, bank seed).
    """

    synonyms: tuple[str, ...]
    subject: str
    template_index: int
    template: str
    seed: int

    @property
    def prompt(self) -> str:
        """The text the image is drawn from (grammar is not fixed up, spec §8.15)."""
        return self.template.format(self.subject)


class NoisyPromptGenerator:
    """Another generator's images with Gaussian noise mixed in (Table 5, rows 1-3)."""

    def __init__(self, base: VisualPromptGenerator, *, noise: float) -> None:
        """
        Arguments:
            base: the generator whose images are corrupted.
            noise: ``p``, the noise variance as a fraction of the maximum (see
                :func:`add_prompt_noise`).
        """
        if not 0.0 < noise <= 1.0:
            raise ValueError(f"noise must be in (0, 1]; got {noise}.")
        self.base = base
        self.noise = noise
        self.resolution = base.resolution
        self.id = f"{base.id}|noise={noise:g}"

    def subject(self, synonyms: str | Sequence[str]) -> str:
        return self.base.subject(synonyms)

    def generate(
        self, synonyms: str | Sequence[str], template_index: int, template: str, seed: int
    ) -> np.ndarray:
        image = self.base.generate(synonyms, template_index, template, seed)
        return add_prompt_noise(image, self.noise, seed)

    def generate_many(self, entries: Sequence[PromptEntry]) -> list[np.ndarray]:
        many = getattr(self.base, "generate_many", None)
        images = (
            many(entries)
            if many is not None
            else [
                self.base.generate(e.synonyms, e.template_index, e.template, e.seed)
                for e in entries
            ]
        )
        return [
            add_prompt_noise(i, self.noise, e.seed) for i, e in zip(images, entries, strict=True)
        ]


class StableDiffusionGenerator:
    """Visual prompts from a ``diffusers`` text-to-image pipeline (Stable Diffusion v1.5 default).

    The pipeline is loaded on the first call to :meth:`generate`, not at construction and never at
    import. Each image is drawn from ``template.format(first synonym)`` with a
    ``torch.Generator`` seeded by the entry's seed, so a bank can be reproduced. An all-black
    image (what the safety checker returns) is re-seeded up to ``reseeds`` times, recorded in
    :attr:`black_images` and warned about; if it stays black, :class:`BlackPromptImageError`.
    """

    # Where the seeded noise is drawn; None: on the pipeline's device. CUDA and CPU generators
    # give different streams for one seed, which is harmless here because the id already differs
    # by dtype (float16 on CUDA). A generator whose id is the same on every device sets "cpu",
    # so that its cached images are what any device draws.
    seed_device: str | None = None

    def __init__(
        self,
        *,
        model: str | os.PathLike = DEFAULT_SD_MODEL,
        pipeline: Any = None,
        resolution: int = 768,
        steps: int = 50,
        guidance_scale: float = 7.5,
        scheduler: Literal["default", "dpm-solver++"] = "default",
        negative_prompt: str | None = None,
        safety_checker: bool = True,
        reseeds: int = 2,
        batch_size: int = 4,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        progress: bool = True,
    ) -> None:
        """
        Arguments:
            model: a hub id (``"sd15"`` and ``"sd3"`` are aliases) or a local pipeline folder;
                with ``pipeline`` given, only its name in cache keys.
            pipeline: an already built text-to-image pipeline (e.g. a tiny one in tests).
            resolution: side of the square images (the paper: 768, the network input size).
            steps: denoising steps (diffusers' default for SD1.5: 50).
            guidance_scale: classifier-free guidance (7.5).
            scheduler: ``"default"`` (the pipeline's own, PNDM for SD1.5) or ``"dpm-solver++"``
                (DPMSolverMultistep, good at about 25 steps).
            negative_prompt: optional; the spec uses none.
            safety_checker: keep the pipeline's safety checker (False loads it without one).
                With ``pipeline`` given, read from it, as is ``dtype``.
            reseeds: how often to retry a black image with a new seed.
            batch_size: images per pipeline call.
            device: where to run (default: CUDA if available, else CPU).
            dtype: weights dtype (default float16 on CUDA, float32 elsewhere).
            progress: show a tqdm bar over the images of a :meth:`generate_many` call.
        """
        self.model = SD_ALIASES.get(str(model), str(model))
        self.resolution = resolution
        self.steps = steps
        self.guidance_scale = guidance_scale
        if scheduler not in ("default", "dpm-solver++"):
            raise ValueError(f"scheduler must be 'default' or 'dpm-solver++'; got {scheduler!r}.")
        self.scheduler = scheduler
        self.negative_prompt = negative_prompt
        self.safety_checker = safety_checker
        self.reseeds = reseeds
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.progress = progress
        if pipeline is not None:
            # A ready pipeline runs in its own dtype, with or without its own safety checker.
            self.dtype = getattr(pipeline, "dtype", self.dtype)
            if hasattr(pipeline, "safety_checker"):
                self.safety_checker = pipeline.safety_checker is not None
        self._pipeline = None if pipeline is None else self._configure(pipeline)
        self.black_images: list[tuple[str, int]] = []
        # Everything that changes the pixels: half and full precision draw different images, and
        # without the safety checker an image it would have blacked out (and re-seeded) is kept.
        self.id = (
            f"diffusers:{self.model}:res{resolution}:steps{steps}:cfg{guidance_scale:g}:"
            f"{scheduler}:neg={negative_prompt or ''}:{str(self.dtype).removeprefix('torch.')}:"
            f"safety={'on' if self.safety_checker else 'off'}"
        )

    @property
    def pipeline(self) -> Any:
        """The diffusers pipeline, loaded on first access."""
        if self._pipeline is None:
            self._pipeline = self._load_pipeline()
        return self._pipeline

    def _load_pipeline(self) -> Any:
        try:
            from diffusers import AutoPipelineForText2Image
        except ImportError as error:
            raise VisualPromptError(
                "Stable Diffusion visual prompts need diffusers and transformers: "
                "pip install 'ovseg[diffusion]'."
            ) from error
        kwargs: dict[str, Any] = {}
        if not self.safety_checker:
            kwargs |= {"safety_checker": None, "requires_safety_checker": False}
        try:
            pipeline = AutoPipelineForText2Image.from_pretrained(self.model, **kwargs)
        except Exception as error:
            raise VisualPromptError(
                f"Could not load the text-to-image pipeline {self.model!r}: {error}. Without "
                "network access, pass a local pipeline folder as `model`."
            ) from error
        # Converted after loading: the dtype keyword of from_pretrained changed name in diffusers.
        return self._configure(pipeline.to(self.device, self.dtype))

    def _configure(self, pipeline: Any) -> Any:
        if self.scheduler == "dpm-solver++":
            from diffusers import DPMSolverMultistepScheduler

            pipeline.scheduler = DPMSolverMultistepScheduler.from_config(
                pipeline.scheduler.config, algorithm_type="dpmsolver++"
            )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def subject(self, synonyms: str | Sequence[str]) -> str:
        """The first synonym (spec §8.15); the text prompts keep all of them."""
        return _synonyms(synonyms)[0]

    def generate(
        self, synonyms: str | Sequence[str], template_index: int, template: str, seed: int
    ) -> np.ndarray:
        entry = PromptEntry(
            _synonyms(synonyms), self.subject(synonyms), template_index, template, seed
        )
        return self.generate_many([entry])[0]

    def generate_many(self, entries: Sequence[PromptEntry]) -> list[np.ndarray]:
        """Images for many entries, ``batch_size`` per pipeline call, in order."""
        images: list[np.ndarray] = []
        bar = tqdm(
            total=len(entries),
            desc="Stable Diffusion prompts",
            unit="image",
            disable=not self.progress or len(entries) < 2,
        )
        for start in range(0, len(entries), self.batch_size):
            batch = entries[start : start + self.batch_size]
            images += self._generate_batch(batch)
            bar.update(len(batch))
        bar.close()
        return images

    def _generate_batch(self, entries: Sequence[PromptEntry]) -> list[np.ndarray]:
        seeds = [entry.seed for entry in entries]
        results = self._draw([e.prompt for e in entries], seeds)
        for attempt in range(1, self.reseeds + 1):
            black = [i for i, image in enumerate(results) if is_black_image(image)]
            if not black:
                break
            for i in black:
                self.black_images.append((entries[i].prompt, seeds[i]))
                warnings.warn(
                    f"Stable Diffusion returned a black (safety-filtered) image for "
                    f"{entries[i].prompt!r} with seed {seeds[i]}; re-seeding.",
                    stacklevel=3,
                )
                seeds[i] = int(_stable_hash("reseed", entries[i].seed, attempt)[:15], 16)
            redrawn = self._draw([entries[i].prompt for i in black], [seeds[i] for i in black])
            for i, image in zip(black, redrawn, strict=True):
                results[i] = image
        still_black = [entries[i] for i, image in enumerate(results) if is_black_image(image)]
        if still_black:
            self.black_images += [(e.prompt, e.seed) for e in still_black]
            raise BlackPromptImageError(still_black)
        return results

    def _draw(self, prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        pipeline = self.pipeline
        device = self.seed_device or self.device
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        kwargs: dict[str, Any] = {}
        if self.negative_prompt:
            kwargs["negative_prompt"] = [self.negative_prompt] * len(prompts)
        output = pipeline(
            prompt=prompts,
            height=self.resolution,
            width=self.resolution,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            generator=generators,
            output_type="np",
            **kwargs,
        )
        pixels = np.asarray(output.images, dtype=np.float32)  # N×H×W×3 in [0, 1]
        return list(np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8))


class ToyWorldSpriteGenerator:
    """ToyWorld's stand-in for Stable Diffusion: the class drawn alone in a random pose.

    A class is found by any of its synonyms matching a ToyWorld class name or synonym
    (case-insensitive). The template text is not used (sprites have no "bad photo" or "many"
    variants); the template index and the seed change the pose, colour, background and noise.

    A name ToyWorld does not know raises a :class:`VisualPromptError` that suggests close names
    (``unknown="error"``, the default: a prompt that shows nothing of the class would bias ``R``
    without a word of warning). ``unknown="noise"`` instead draws pure Gaussian noise from the
    seed: an image with no information about the class, Table 5's "maximum" noise.
    """

    def __init__(
        self,
        *,
        world: Any = None,
        resolution: int = 128,
        background: Literal["random", "plain", "white"] = "random",
        unknown: Literal["error", "noise"] = "error",
    ) -> None:
        """
        Arguments:
            world: a :class:`ovseg.data.toyworld.ToyWorld` (built on first use if None).
            resolution: side of the square sprite images.
            background: passed to ``ToyWorld.sprite_image``.
            unknown: what to do with a class ToyWorld does not know: ``"error"`` or ``"noise"``.
        """
        if unknown not in ("error", "noise"):
            raise ValueError(f"unknown must be 'error' or 'noise'; got {unknown!r}.")
        self._world = world
        self.resolution = resolution
        self.background = background
        self.unknown = unknown
        self.id = f"toyworld-sprites:{background}:res{resolution}"
        self._index: dict[str, int] | None = None

    @property
    def world(self) -> Any:
        if self._world is None:
            from ovseg.data.toyworld import ToyWorld

            self._world = ToyWorld(image_size=self.resolution)
        return self._world

    def _names(self) -> dict[str, int]:
        if self._index is None:
            index: dict[str, int] = {}
            for class_id, toy_class in enumerate(self.world.classes):
                index.setdefault(_normalise_name(toy_class.name), class_id)
            for class_id, toy_class in enumerate(self.world.classes):
                for synonym in toy_class.synonyms:
                    index.setdefault(_normalise_name(synonym), class_id)
            self._index = index
        return self._index

    def class_id(self, synonyms: str | Sequence[str]) -> int | None:
        """The ToyWorld class id of the first synonym ToyWorld knows, or None."""
        names = self._names()
        for synonym in _synonyms(synonyms):
            class_id = names.get(_normalise_name(synonym))
            if class_id is not None:
                return class_id
        return None

    def subject(self, synonyms: str | Sequence[str]) -> str:
        class_id = self.class_id(synonyms)
        if class_id is not None:
            return self.world.classes[class_id].name
        if self.unknown == "noise":
            return f"<noise:{_synonyms(synonyms)[0]}>"
        close = difflib.get_close_matches(_normalise_name(_synonyms(synonyms)[0]), self._names(), 3)
        hint = f" Close ToyWorld names: {', '.join(close)}." if close else ""
        raise VisualPromptError(
            f"ToyWorld has no class named {' / '.join(_synonyms(synonyms))!r}, so there is no "
            f"sprite to use as its visual prompt.{hint} Use ToyWorld class names, or "
            "ToyWorldSpriteGenerator(unknown='noise') for noise prompts."
        )

    def generate(
        self, synonyms: str | Sequence[str], template_index: int, template: str, seed: int
    ) -> np.ndarray:
        class_id = self.class_id(synonyms)
        if class_id is None:
            subject = self.subject(synonyms)  # raises unless unknown == "noise"
            rng = np.random.default_rng([seed, int(_stable_hash(subject)[:8], 16)])
            noise = rng.normal(0.5, 0.25, (self.resolution, self.resolution, 3))
            return np.round(np.clip(noise, 0.0, 1.0) * 255.0).astype(np.uint8)
        return self.world.sprite_image(
            class_id, seed, size=self.resolution, background=self.background
        )


def make_generator(
    generator: str | VisualPromptGenerator,
    *,
    resolution: int,
    dtype: str | None = None,
    noise: float = 0.0,
) -> VisualPromptGenerator:
    """The generator a ``prompt_generator`` setting names, with Table 5's noise mixed in.

    Arguments:
        generator: "toyworld", "toy-diffusion" (:mod:`ovseg.prompts.toy_diffusion`, shipped in
            ``assets/diffusion-toy``), "sd15", "sd3", a diffusers model id or folder, or a
            generator.
        resolution: side of the images (of a named generator).
        dtype: what a diffusers generator draws in ("float16", "bfloat16", "float32"; None: its
            default). The toy diffusion model draws in float32 only.
        noise: Gaussian noise mixed into every image (:class:`NoisyPromptGenerator`; 0: none).
    """
    if generator == "layerdiffuse":
        raise ValueError(
            "LayerDiffuse (Table 5) has no diffusers pipeline; generate its images "
            "elsewhere and pass a VisualPromptGenerator that returns them to "
            "DPSeg(prompt_generator=...)."
        )
    if generator == "toyworld":
        generator = ToyWorldSpriteGenerator(resolution=resolution)
    elif generator == "toy-diffusion":
        if dtype not in (None, "float32"):
            raise ValueError(
                f"The toy diffusion model draws in float32 only (its cache keys do not name a "
                f"dtype); got dtype={dtype!r}. Leave it unset or pass 'float32'."
            )
        try:
            from ovseg.prompts.toy_diffusion import ToyDiffusionGenerator
        except ImportError as error:
            raise VisualPromptError(
                "The toy diffusion model runs on diffusers: pip install 'ovseg[diffusion]'."
            ) from error
        generator = ToyDiffusionGenerator(
            resolution=resolution,
            steps=TOY_DIFFUSION_PROMPT_STEPS,
            guidance_scale=TOY_DIFFUSION_PROMPT_GUIDANCE,
        )
    elif isinstance(generator, str):
        generator = StableDiffusionGenerator(
            model=generator,
            resolution=resolution,
            dtype=getattr(torch, dtype) if dtype else None,
        )
    if noise > 0:
        generator = NoisyPromptGenerator(generator, noise=noise)
    return generator


def shipped_toy_prompts() -> Path | None:
    """The shipped toy prompt embeddings (:data:`SHIPPED_TOY_PROMPTS` in the assets folder), or
    None where they are not installed."""
    from ovseg.backbones import ASSETS_DIR

    path = ASSETS_DIR / SHIPPED_TOY_PROMPTS
    return path if path.is_file() else None


def prompt_defaults(
    generator: str,
    prompts_per_class: int | None,
    resolution: int | None,
    *,
    toy: bool,
    templates: int,
    input_size: int,
) -> dict[str, Any]:
    """A method's visual-prompt settings with "auto" and None resolved, as config fields.

    Arguments:
        generator: "auto" (ToyWorld sprites, "toyworld", for a toy CLIP, else "sd15") or any
            name :func:`make_generator` takes.
        prompts_per_class: G distinct images per class; None: one per template, or at most
            :data:`TOY_PROMPTS_PER_CLASS` for ToyWorld's generators (sprites, toy diffusion).
        resolution: side of the images; None: ``input_size``, or :data:`TOY_PROMPT_RESOLUTION`
            for ToyWorld's generators.
        toy: whether the CLIP is one of ovseg's toy CLIPs.
        templates: M, the number of text templates.

    Raises:
        ValueError: ``prompts_per_class`` is not between 1 and ``templates``.
    """
    if generator == "auto":
        generator = "toyworld" if toy else "sd15"
    # ToyWorld's generators draw small images of a world with no "bad photo" or "many" variants,
    # so a few per class are enough (and a first call on new names stays short).
    toyworld = generator in ("toyworld", "toy-diffusion")
    prompts_per_class = prompts_per_class or (
        min(TOY_PROMPTS_PER_CLASS, templates) if toyworld else templates
    )
    if not 1 <= prompts_per_class <= templates:
        raise ValueError(
            f"prompts_per_class must be between 1 and the {templates} templates; "
            f"got {prompts_per_class}."
        )
    return {
        "prompt_generator": generator,
        "prompts_per_class": prompts_per_class,
        "prompt_resolution": resolution or (TOY_PROMPT_RESOLUTION if toyworld else input_size),
    }


def _normalise_name(name: str) -> str:
    return " ".join(name.casefold().split())


@dataclass
class VisualPromptEmbeddings:
    """Encoded visual prompts of a vocabulary.

    Attributes:
        embeddings: ``V``, ``K×M×D``: the CLIP image embedding of each class's prompt per
            template (not normalised).
        pooled: ``V̄_j`` for each encoder stage j, ``K×M×D_j``: the spatial mean of the prompt's
            stage-j feature map.
        entries: per class, the ``G`` distinct prompts; template ``m`` uses entry ``m mod G``.
    """

    embeddings: Tensor
    pooled: tuple[Tensor, ...]
    entries: tuple[tuple[PromptEntry, ...], ...]

    def to(
        self, device: torch.device | str, dtype: torch.dtype | None = None
    ) -> VisualPromptEmbeddings:
        return VisualPromptEmbeddings(
            embeddings=self.embeddings.to(device, dtype),
            pooled=tuple(p.to(device, dtype) for p in self.pooled),
            entries=self.entries,
        )


class PromptGallery:
    """Lazy access to the prompt images of a vocabulary: ``gallery[k]`` reads class k's from disk.

    Holding every image of a large vocabulary (K × 80 at 768 px) in memory is out of the question,
    so the demo asks for the classes it shows.
    """

    def __init__(self, bank: VisualPromptBank, entries: Sequence[Sequence[PromptEntry]]) -> None:
        self.bank = bank
        self.entries = tuple(tuple(e) for e in entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, class_index: int) -> list[np.ndarray]:
        """The ``G`` prompt images (``S×S×3`` uint8) of one class, generated if missing."""
        return self.bank.load_images(self.entries[class_index])


class VisualPromptBank:
    """Disk cache of visual prompt images and of their frozen-encoder embeddings.

    Layout under ``cache_dir``: ``images/<generator>/<key>.png`` (keyed by generator id, subject,
    template index and text, seed, resolution) and ``embeddings/<encoder>/<generator>/<key>
    .safetensors`` (the same plus the encoder id and encoding resolution), written atomically.
    The same (class, template, seed, generator, encoder) always gives the same image and
    embedding: seeds come from a stable hash, files are lossless, and a cached entry is read
    back rather than recomputed.
    """

    def __init__(
        self,
        *,
        generator: VisualPromptGenerator,
        encoder: PromptEncoder,
        encoder_id: str | Callable[[], str],
        cache_dir: str | os.PathLike | None = None,
        seed: int = 0,
        resolution: int | None = None,
        batch_size: int = 16,
        progress: bool = True,
        shipped: str | os.PathLike | None = None,
    ) -> None:
        """
        Arguments:
            generator: makes the images.
            encoder: frozen encoder, ``N×3×S×S`` images in [0, 1] → (``N×D``, [``N×D_j``]).
            encoder_id: identifies the encoder's weights (or a function computing it on demand);
                part of the embedding keys.
            cache_dir: root folder (default ``$OVSEG_VISUAL_PROMPT_CACHE`` or
                ``~/.cache/ovseg/visual_prompts``).
            seed: base seed; each entry's seed is a hash of (subject, template index, seed).
            resolution: side the images are resized to before encoding (default: the
                generator's resolution).
            batch_size: images per generator/encoder batch.
            progress: show a tqdm bar while filling the cache.
            shipped: a read-only file of embeddings written by :meth:`export_embeddings` (e.g.
                shipped beside a model), read on first use; an entry found there is neither
                drawn nor encoded. Its keys are the cache's, so entries of another generator,
                encoder or resolution are simply not found in it.
        """
        self.generator = generator
        self.encoder = encoder
        self._encoder_id = encoder_id
        self.cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
        self.seed = seed
        self.resolution = resolution or generator.resolution
        self.batch_size = batch_size
        self.progress = progress
        self._memory: LruCache[tuple[Tensor, tuple[Tensor, ...]]] = LruCache(MEMORY_CACHE_ENTRIES)
        self.shipped = None if shipped is None else Path(shipped)
        self._shipped: ShippedEmbeddings | None = None

    @property
    def encoder_id(self) -> str:
        return self._encoder_id() if callable(self._encoder_id) else self._encoder_id

    # -------------------------------------------------------------------------------- entries
    def entry_seed(self, subject: str, template_index: int) -> int:
        """The generator seed of one entry: a stable 60-bit hash, the same on every machine."""
        return int(_stable_hash("visual-prompt", subject, template_index, self.seed)[:15], 16)

    def entries(
        self,
        vocabulary: Sequence[str | Sequence[str]],
        templates: Sequence[str],
        prompts_per_class: int | None = None,
    ) -> list[list[PromptEntry]]:
        """The ``K×G`` entries of a vocabulary: one per class and template, for the first ``G``
        templates (``G = prompts_per_class``, default all ``M``)."""
        count = len(templates) if prompts_per_class is None else prompts_per_class
        if not 1 <= count <= len(templates):
            raise ValueError(
                f"prompts_per_class must be between 1 and the {len(templates)} templates; "
                f"got {prompts_per_class}."
            )
        rows = []
        for entry in vocabulary:
            synonyms = _synonyms(entry)
            subject = self.generator.subject(synonyms)
            rows.append(
                [
                    PromptEntry(synonyms, subject, m, templates[m], self.entry_seed(subject, m))
                    for m in range(count)
                ]
            )
        if not rows:
            raise ValueError("The vocabulary is empty.")
        return rows

    def _image_key(self, entry: PromptEntry) -> str:
        return _stable_hash(
            self.generator.id,
            self.generator.resolution,
            entry.subject,
            entry.template_index,
            entry.template,
            entry.seed,
        )

    def image_path(self, entry: PromptEntry) -> Path:
        key = self._image_key(entry)
        return self.cache_dir / "images" / _slug(self.generator.id) / key[:2] / f"{key}.png"

    def _embedding_key(self, entry: PromptEntry, encoder_id: str) -> str:
        return _stable_hash(encoder_id, self.resolution, self._image_key(entry))

    def embedding_path(self, entry: PromptEntry, encoder_id: str | None = None) -> Path:
        encoder_id = encoder_id or self.encoder_id
        key = self._embedding_key(entry, encoder_id)
        folder = self.cache_dir / "embeddings" / _slug(encoder_id) / _slug(self.generator.id)
        return folder / key[:2] / f"{key}.safetensors"

    def missing(
        self,
        vocabulary: Sequence[str | Sequence[str]],
        templates: Sequence[str],
        prompts_per_class: int | None = None,
        *,
        kind: Literal["embeddings", "images"] = "embeddings",
    ) -> list[PromptEntry]:
        """Entries of a vocabulary whose embedding is neither shipped, in memory nor in the
        cache (or whose image is not in the cache)."""
        rows = self.entries(vocabulary, templates, prompts_per_class)
        if kind == "images":
            return [e for row in rows for e in row if not self.image_path(e).is_file()]
        encoder_id = self.encoder_id
        return [e for row in rows for e in row if not self._has_embedding(e, encoder_id)]

    # --------------------------------------------------------------------------------- images
    def load_images(
        self, entries: Sequence[PromptEntry], *, generate: bool = True
    ) -> list[np.ndarray]:
        """The images of ``entries`` (``S×S×3`` uint8), generated and cached where missing.

        Raises:
            MissingVisualPromptsError: if some are missing and ``generate`` is False.
            BlackPromptImageError: if the generator returned black images (not cached).
        """
        absent = [e for e in entries if not self.image_path(e).is_file()]
        if absent and not generate:
            raise MissingVisualPromptsError(absent, f"{self.cache_dir / 'images'}")
        if absent:
            self._generate(list(dict.fromkeys(absent)))
        return [self._read_image(e, generate=generate) for e in entries]

    def _read_image(self, entry: PromptEntry, *, generate: bool = True) -> np.ndarray:
        """A cached image, checked; an unreadable or wrong one is made again, never used."""
        path = self.image_path(entry)
        image = _read_png(path, entry, self.generator.resolution)
        if image is not None:
            return image
        path.unlink(missing_ok=True)
        if not generate:
            raise MissingVisualPromptsError([entry], f"{self.cache_dir / 'images'} (corrupt)")
        self._generate([entry])
        image = _read_png(path, entry, self.generator.resolution)
        if image is None:
            raise VisualPromptError(f"{path} is unreadable right after it was written.")
        return image

    def images(
        self,
        vocabulary: Sequence[str | Sequence[str]],
        templates: Sequence[str],
        prompts_per_class: int | None = None,
        *,
        generate: bool = True,
    ) -> list[list[np.ndarray]]:
        """``K×G`` prompt images of a vocabulary."""
        rows = self.entries(vocabulary, templates, prompts_per_class)
        flat = self.load_images([e for row in rows for e in row], generate=generate)
        count = len(rows[0])
        return [flat[k * count : (k + 1) * count] for k in range(len(rows))]

    def gallery(
        self,
        vocabulary: Sequence[str | Sequence[str]],
        templates: Sequence[str],
        prompts_per_class: int | None = None,
    ) -> PromptGallery:
        return PromptGallery(self, self.entries(vocabulary, templates, prompts_per_class))

    def _generate(self, entries: list[PromptEntry]) -> None:
        many = getattr(self.generator, "generate_many", None)
        black: list[PromptEntry] = []
        bar = tqdm(
            total=len(entries),
            desc=f"visual prompts ({self.generator.id})",
            unit="image",
            disable=not self.progress or len(entries) < self.batch_size,
        )
        for start in range(0, len(entries), self.batch_size):
            batch = entries[start : start + self.batch_size]
            if many is not None:
                images = many(batch)
            else:
                images = [
                    self.generator.generate(e.synonyms, e.template_index, e.template, e.seed)
                    for e in batch
                ]
            for entry, image in zip(batch, images, strict=True):
                self._check_image(entry, image)
                if is_black_image(image):
                    black.append(entry)
                else:
                    _write_png(self.image_path(entry), image, entry)
            bar.update(len(batch))
        bar.close()
        if black:
            raise BlackPromptImageError(black)

    def _check_image(self, entry: PromptEntry, image: np.ndarray) -> None:
        size = self.generator.resolution
        if not (
            isinstance(image, np.ndarray)
            and image.dtype == np.uint8
            and image.shape == (size, size, 3)
        ):
            got = (
                f"{image.dtype} {image.shape}"
                if isinstance(image, np.ndarray)
                else type(image).__name__
            )
            raise VisualPromptError(
                f"{self.generator.id} returned {got} for {entry.prompt!r}; expected uint8 of "
                f"shape {(size, size, 3)}."
            )

    # ----------------------------------------------------------------------------- embeddings
    def embeddings(
        self,
        vocabulary: Sequence[str | Sequence[str]],
        templates: Sequence[str],
        prompts_per_class: int | None = None,
        *,
        generate: bool = True,
    ) -> VisualPromptEmbeddings:
        """``V`` (``K×M×D``) and ``V̄_j`` (``K×M×D_j``) of a vocabulary with ``M`` templates.

        With ``G = prompts_per_class < M``, template ``m`` reuses prompt ``m mod G`` (the spec's
        cyclic reuse, §8.22). Entries missing from the cache are generated and encoded when
        ``generate`` is True; otherwise :class:`MissingVisualPromptsError` lists them.
        """
        rows = self.entries(vocabulary, templates, prompts_per_class)
        encoder_id = self.encoder_id
        flat = [e for row in rows for e in row]
        absent = [e for e in dict.fromkeys(flat) if not self._has_embedding(e, encoder_id)]
        if absent and not generate:
            raise MissingVisualPromptsError(absent, f"{self.cache_dir / 'embeddings'}")
        if absent:
            self._encode_entries(absent, encoder_id)
        loaded = [self._load_embedding(e, encoder_id) for e in flat]
        count, num_templates = len(rows[0]), len(templates)
        order = torch.tensor(
            [k * count + m % count for k in range(len(rows)) for m in range(num_templates)]
        )
        embeddings = torch.stack([item[0] for item in loaded])[order]
        pooled = tuple(
            torch.stack([item[1][j] for item in loaded])[order] for j in range(len(loaded[0][1]))
        )
        shape = (len(rows), num_templates)
        return VisualPromptEmbeddings(
            embeddings=embeddings.view(*shape, -1),
            pooled=tuple(p.view(*shape, -1) for p in pooled),
            entries=tuple(tuple(row) for row in rows),
        )

    def encode_images(self, images: Sequence[np.ndarray]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Encode uint8 ``S×S×3`` images with the bank's encoder at its resolution (no cache)."""
        pixels = torch.stack([torch.from_numpy(np.ascontiguousarray(i)) for i in images])
        pixels = pixels.permute(0, 3, 1, 2).float() / 255.0
        if pixels.shape[-1] != self.resolution or pixels.shape[-2] != self.resolution:
            pixels = F.interpolate(
                pixels,
                size=(self.resolution, self.resolution),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        with torch.no_grad():
            embedding, pooled = self.encoder(pixels)
        return embedding.float().cpu(), tuple(p.float().cpu() for p in pooled)

    def _has_embedding(self, entry: PromptEntry, encoder_id: str) -> bool:
        key = self._embedding_key(entry, encoder_id)
        return (
            key in self._memory
            or key in self._shipped_embeddings()
            or self.embedding_path(entry, encoder_id).is_file()
        )

    def _shipped_embeddings(self) -> ShippedEmbeddings:
        if self._shipped is None:
            self._shipped = ShippedEmbeddings.read(self.shipped)
        return self._shipped

    def export_embeddings(
        self,
        path: str | os.PathLike,
        vocabulary: Sequence[str | Sequence[str]],
        templates: Sequence[str],
        prompts_per_class: int | None = None,
    ) -> int:
        """Write the embeddings of a vocabulary's entries (generated and encoded where missing)
        to one file that a bank given ``shipped=path`` reads; returns how many entries.

        Stored in float16, which halves the file: a shipped embedding differs from a freshly
        encoded one by float16 rounding (about 1e-3 relative).
        """
        rows = self.entries(vocabulary, templates, prompts_per_class)
        entries = list(dict.fromkeys(e for row in rows for e in row))
        encoder_id = self.encoder_id
        self.embeddings(vocabulary, templates, prompts_per_class)
        loaded = [self._load_embedding(e, encoder_id) for e in entries]
        tensors = {"embedding": torch.stack([item[0] for item in loaded]).half()}
        for j in range(len(loaded[0][1])):
            tensors[f"pooled{j}"] = torch.stack([item[1][j] for item in loaded]).half()
        keys = [self._embedding_key(e, encoder_id) for e in entries]
        ShippedEmbeddings.write(
            Path(path),
            tensors,
            keys,
            {"generator": self.generator.id, "encoder": encoder_id, "resolution": self.resolution},
        )
        return len(entries)

    def _encode_entries(self, entries: list[PromptEntry], encoder_id: str) -> None:
        absent = [e for e in entries if not self.image_path(e).is_file()]
        if absent:
            self._generate(absent)
        bar = tqdm(
            total=len(entries),
            desc="encoding visual prompts",
            unit="image",
            disable=not self.progress or len(entries) < self.batch_size,
        )
        for start in range(0, len(entries), self.batch_size):
            batch = entries[start : start + self.batch_size]
            embedding, pooled = self.encode_images([self._read_image(e) for e in batch])
            for index, entry in enumerate(batch):
                tensors = {"embedding": embedding[index].contiguous()}
                tensors |= {f"pooled{j}": p[index].contiguous() for j, p in enumerate(pooled)}
                _write_safetensors(self.embedding_path(entry, encoder_id), tensors, entry)
            bar.update(len(batch))
        bar.close()

    def _load_embedding(
        self, entry: PromptEntry, encoder_id: str
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        key = self._embedding_key(entry, encoder_id)
        item = self._memory.get(key)
        if item is not None:
            return item
        shipped = self._shipped_embeddings().get(key)
        if shipped is not None:
            return shipped
        path = self.embedding_path(entry, encoder_id)
        tensors = _read_embedding(path, entry)
        if tensors is None:
            # Unreadable (a crash mid-write by an older version, a bad disk) or not this entry's:
            # computed again, never trusted.
            path.unlink(missing_ok=True)
            self._encode_entries([entry], encoder_id)
            tensors = _read_embedding(path, entry)
            if tensors is None:
                raise VisualPromptError(f"{path} is unreadable right after it was written.")
        stages = sorted(
            (name for name in tensors if name.startswith("pooled")), key=lambda n: int(n[6:])
        )
        return self._memory.put(
            key, (tensors["embedding"], tuple(tensors[name] for name in stages))
        )


class ShippedEmbeddings:
    """A read-only set of prompt embeddings in one safetensors file, keyed like the bank's cache.

    The file holds ``embedding`` (``N×D``) and ``pooled<j>`` (``N×D_j``) in float16, and in its
    metadata the format, the ``N`` cache keys in row order, and the generator, encoder and
    resolution they were made with (for people; the keys already include them).
    """

    FORMAT = "ovseg-visual-prompt-embeddings/1"

    def __init__(self, rows: dict[str, int], tensors: dict[str, Tensor]) -> None:
        self._rows = rows
        self._embedding = tensors.get("embedding")
        stages = sorted((n for n in tensors if n.startswith("pooled")), key=lambda n: int(n[6:]))
        self._pooled = [tensors[name] for name in stages]

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: str) -> tuple[Tensor, tuple[Tensor, ...]] | None:
        row = self._rows.get(key)
        if row is None:
            return None
        return self._embedding[row].float(), tuple(p[row].float() for p in self._pooled)

    @classmethod
    def read(cls, path: Path | None) -> ShippedEmbeddings:
        """The file's embeddings; none for ``path=None``.

        Raises:
            VisualPromptError: the file is missing, unreadable or inconsistent.
        """
        if path is None:
            return cls({}, {})
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        try:
            with safe_open(path, "pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(path)
            keys = json.loads(metadata.get("keys", "null"))
        except (OSError, SafetensorError, json.JSONDecodeError) as error:
            raise VisualPromptError(
                f"Could not read the shipped prompt embeddings {path}: {error}"
            ) from error
        rows = len(keys) if isinstance(keys, list) else -1
        if (
            metadata.get("format") != cls.FORMAT
            or "embedding" not in tensors
            or any(t.ndim != 2 or t.shape[0] != rows for t in tensors.values())
        ):
            raise VisualPromptError(
                f"{path} is not a {cls.FORMAT} file with one row per key in every tensor; "
                "write it with VisualPromptBank.export_embeddings."
            )
        return cls({key: row for row, key in enumerate(keys)}, tensors)

    @classmethod
    def write(
        cls, path: Path, tensors: dict[str, Tensor], keys: list[str], made_with: dict[str, Any]
    ) -> None:
        from safetensors.torch import save_file

        metadata = {"format": cls.FORMAT, "keys": json.dumps(keys)}
        metadata |= {name: str(value) for name, value in made_with.items()}
        tensors = {name: t.contiguous() for name, t in tensors.items()}
        with _atomic_path(path) as temporary:
            save_file(tensors, temporary, metadata=metadata)


class PromptEncoderId:
    """A frozen prompt encoder's part of the bank's embedding keys: ``"<CLIP name>@<digest>"``,
    the digest being the first 16 hex digits of the SHA-256 of the encoder's weights (hashed again
    only when they change: a bank read with other weights is encoded again, never reused)."""

    def __init__(self, clip_name: str, encoder: nn.Module) -> None:
        """
        Arguments:
            clip_name: the name of the CLIP the encoder is a copy of.
            encoder: the frozen image tower that encodes the prompts.
        """
        self.clip_name = clip_name
        self.encoder = encoder
        self._fingerprint = WeightsFingerprint()

    def __call__(self) -> str:
        return f"{self.clip_name}@{self._fingerprint(self.encoder)}"


class PromptMemo:
    """The visual prompts of the last few vocabularies, on a model's device and in its dtype.

    A repeated vocabulary (the next image of a demo user, every step of a training run) skips
    reading, stacking and moving the bank's entries. The key holds everything the bank's answer
    depends on: the vocabulary, templates and prompt count, the encoder's weights, the generator,
    and the bank's seed (which picks the images) and resolution (at which they are encoded), both
    of which can be set on a ready bank.
    """

    def __init__(self, max_entries: int = 8) -> None:
        self._cache: LruCache[VisualPromptEmbeddings] = LruCache(max_entries)

    def embeddings(
        self,
        bank: VisualPromptBank,
        vocabulary: Sequence[str | Sequence[str]],
        templates: Sequence[str],
        prompts_per_class: int | None,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> VisualPromptEmbeddings:
        """:meth:`VisualPromptBank.embeddings` on ``device`` in ``dtype``, remembered."""
        key = (
            tuple(tuple([c] if isinstance(c, str) else c) for c in vocabulary),
            tuple(templates),
            prompts_per_class,
            bank.encoder_id,
            bank.generator.id,
            bank.seed,
            bank.resolution,
            device,
            dtype,
        )
        found = self._cache.get(key)
        if found is not None:
            return found
        # Built outside inference mode so that the remembered tensors can enter a later training
        # step.
        with torch.inference_mode(False):
            prompts = bank.embeddings(vocabulary, templates, prompts_per_class).to(device, dtype)
        return self._cache.put(key, prompts)

    def clear(self) -> None:
        self._cache.clear()


def _entry_metadata(entry: PromptEntry) -> dict[str, str]:
    return {
        "synonyms": json.dumps(entry.synonyms, ensure_ascii=False),
        "subject": entry.subject,
        "template_index": str(entry.template_index),
        "template": entry.template,
        "seed": str(entry.seed),
    }


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that is renamed onto it once written.

    A writer that crashes (or is killed) midway leaves at most a hidden ``.tmp`` file, never a
    truncated entry under the real name; concurrent writers (threads or processes) each have
    their own temporary file and the last rename wins with a complete file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_png(path: Path, image: np.ndarray, entry: PromptEntry) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for name, value in _entry_metadata(entry).items():
        info.add_itxt(name, value)
    with _atomic_path(path) as temporary:
        Image.fromarray(image).save(temporary, format="PNG", pnginfo=info)


def _read_png(path: Path, entry: PromptEntry, resolution: int) -> np.ndarray | None:
    """The cached image of ``entry``, or None if it is unreadable, the wrong size or another
    entry's (its metadata names the entry it was made for)."""
    try:
        with Image.open(path) as image:
            image.load()
            metadata = dict(getattr(image, "text", {}) or {})
            array = np.array(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError):
        return None
    if array.shape != (resolution, resolution, 3) or not _matches(metadata, entry):
        return None
    return array


def _write_safetensors(path: Path, tensors: dict[str, Tensor], entry: PromptEntry) -> None:
    from safetensors.torch import save_file

    with _atomic_path(path) as temporary:
        save_file(tensors, temporary, metadata=_entry_metadata(entry))


def _read_embedding(path: Path, entry: PromptEntry) -> dict[str, Tensor] | None:
    """The cached embedding tensors of ``entry``, or None if the file is unreadable, lacks the
    embedding, holds non-finite values or was written for another entry."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    except Exception:
        return None
    if "embedding" not in tensors or not _matches(metadata, entry):
        return None
    if not all(bool(torch.isfinite(tensor).all()) for tensor in tensors.values()):
        return None
    return tensors


def _matches(metadata: dict[str, str], entry: PromptEntry) -> bool:
    """Whether a cached file's metadata names ``entry``."""
    expected = _entry_metadata(entry)
    return all(metadata.get(key) == expected[key] for key in ("subject", "template", "seed"))
