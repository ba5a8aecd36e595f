"""ToyWorld's Stable Diffusion: a small pixel-space text-to-image diffusion model via diffusers.

DPSeg draws a visual prompt for every (class, template) with Stable Diffusion. In ToyWorld that
part is played by a ``diffusers.UNet2DConditionModel`` that denoises 32×32 pixels (no VAE: the
images are already tiny), conditioned by cross-attention on the per-token states of a frozen toy
CLIP text tower, as SD is on its frozen CLIP text encoder. It is trained by
``training/pretrain_diffusion.py`` on ToyWorld's "web images" (sprites and stuff patches of all
312 classes with varied captions), so it draws any typed name: ToyWorld names as what they are,
other names as whatever the model makes of their words.

- :class:`ToyTextToImagePipeline`: the ``DiffusionPipeline`` (registered modules ``unet`` and
  ``scheduler``; the CLIP is held beside them, never saved with them).
- :func:`load_toy_diffusion` / :func:`save_toy_diffusion`: the weights folder (default
  ``assets/diffusion-toy``): ``unet/`` (diffusers format, fp16 safetensors),
  ``scheduler/scheduler_config.json`` and ``text_encoder.json`` (the CLIP's name, the
  fingerprint of the text tower the UNet was trained on, training facts).
- :class:`ToyDiffusionGenerator`: :class:`~ovseg.prompts.visual.StableDiffusionGenerator` over
  that pipeline, loaded on first use; what ``make_generator("toy-diffusion")`` returns.

Example::

    pipeline = load_toy_diffusion()
    images = pipeline(["a photo of a cat.", "a photo of a person."],
                      generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    images.shape  # (2, 32, 32, 3), float in [0, 1]
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import diffusers
import torch
import torch.nn.functional as F
from diffusers import (
    DiffusionPipeline,
    ImagePipelineOutput,
    SchedulerMixin,
    UNet2DConditionModel,
)
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from ovseg.backbones import ASSETS_DIR, ClipBackbone, load_backbone
from ovseg.data.toyworld import TRAIN_SEED_LIMIT
from ovseg.prompts.visual import StableDiffusionGenerator, VisualPromptError

__all__ = [
    "DEFAULT_TEXT_ENCODER",
    "DEFAULT_TOY_DIFFUSION_DIR",
    "TOY_DIFFUSION_GUIDANCE",
    "TOY_DIFFUSION_STEPS",
    "ToyDiffusionGenerator",
    "ToyTextToImagePipeline",
    "caption_states",
    "evaluate_toy_diffusion",
    "load_toy_diffusion",
    "save_toy_diffusion",
    "text_tower_fingerprint",
    "weights_digest",
]

DEFAULT_TOY_DIFFUSION_DIR = ASSETS_DIR / "diffusion-toy"
DEFAULT_TEXT_ENCODER = "toy-vit"
TEXT_ENCODER_FILE = "text_encoder.json"
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
UNET_CONFIG = Path("unet") / "config.json"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
# Every file of a folder, and all that changes the pixels it draws.
FOLDER_FILES = (UNET_WEIGHTS, UNET_CONFIG, SCHEDULER_CONFIG, Path(TEXT_ENCODER_FILE))
# Sampling defaults of the pipeline itself (the generator of DPSeg's prompts picks its own, for
# speed): DPM-Solver++ is close to converged at 20 steps on 32×32 pixels.
TOY_DIFFUSION_STEPS = 20
TOY_DIFFUSION_GUIDANCE = 3.0
# The parts of an open_clip CLIP that make the per-token text states; the projection and the
# logit scale do not enter them, so retraining only those keeps a diffusion model valid.
TEXT_STATE_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.")


def _check_text_tower(clip: ClipBackbone) -> None:
    model = clip.model
    if not hasattr(model, "token_embedding") or not isinstance(
        getattr(model, "attn_mask", None), Tensor
    ):
        raise VisualPromptError(
            f"The toy diffusion model conditions on a causal open_clip text tower "
            f"(token_embedding, transformer, ln_final); {clip.name} has "
            f"{type(model).__name__}, which does not expose one."
        )


def text_tower_fingerprint(clip: ClipBackbone) -> str:
    """SHA-256 (hex) of the text-tower tensors that make the per-token states, as float32.

    Hashed as float32 so the fp16 weights file and the float32 model loaded from it agree.
    """
    _check_text_tower(clip)
    digest = hashlib.sha256()
    for name, tensor in clip.model.state_dict().items():
        if not name.startswith(TEXT_STATE_PREFIXES):
            continue
        values = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(values.shape)}".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def caption_states(clip: ClipBackbone, captions: Sequence[str]) -> Tensor:
    """Per-token states of captions: ``N×context×width``, the text tower's output after
    ``ln_final`` at every position of the full (zero-padded) context, as SD's
    ``encoder_hidden_states`` are. On the CLIP's device, in its dtype, without gradient."""
    _check_text_tower(clip)
    model = clip.model
    tokens = clip.tokenizer(list(captions)).to(model.token_embedding.weight.device)
    cast_dtype = model.transformer.get_cast_dtype()
    with torch.no_grad():
        hidden = model.token_embedding(tokens).to(cast_dtype)
        hidden = hidden + model.positional_embedding.to(cast_dtype)
        hidden = model.transformer(hidden, attn_mask=model.attn_mask)
        return model.ln_final(hidden)


class ToyTextToImagePipeline(DiffusionPipeline):
    """Text to ``H×W×3`` images with a pixel-space UNet conditioned on a frozen CLIP text tower.

    Registered modules: ``unet`` (a ``UNet2DConditionModel`` over RGB in [-1, 1], with
    ``cross_attention_dim`` equal to the text width) and ``scheduler`` (one of SD's; DPM-Solver++
    with dynamic thresholding as shipped). The CLIP is held as :attr:`clip`, outside the
    registered modules, which has three consequences:

    - Load and save with :func:`load_toy_diffusion` and :func:`save_toy_diffusion`, not with
      diffusers' ``from_pretrained`` / ``save_pretrained``: those know nothing of the CLIP (the
      constructor refuses to run without one), and only :func:`save_toy_diffusion` records the
      fingerprint of the text tower the UNet was trained on, which loading checks.
    - ``.to(device)`` moves the UNet, not the CLIP. The text states are computed where the CLIP
      is and then moved to the UNet's device, so a CPU CLIP with a CUDA UNet works; to run the
      text tower on the GPU too, move the CLIP yourself (or let :func:`load_toy_diffusion` load
      it on ``device``).
    - The constructor puts the given CLIP in eval mode with ``requires_grad_(False)``, in place:
      a CLIP shared with a training loop comes back frozen.
    """

    # Not a component: there is no safety checker, and StableDiffusionGenerator keys its cache on
    # whether there is one.
    safety_checker = None

    def __init__(
        self, unet: UNet2DConditionModel, scheduler: Any, clip: ClipBackbone | None = None
    ) -> None:
        """
        Arguments:
            unet: predicts the noise of ``B×3×S×S`` pixels given ``B×L×W`` text states.
            scheduler: a diffusers scheduler (its ``prediction_type`` must be the UNet's).
            clip: the frozen CLIP whose text tower makes the states; its ``width`` must be
                ``unet.config.cross_attention_dim``.
        """
        super().__init__()
        if clip is None:
            raise VisualPromptError(
                "ToyTextToImagePipeline needs the CLIP whose text tower conditions its UNet; "
                "load it with load_toy_diffusion()."
            )
        self.register_modules(unet=unet, scheduler=scheduler)
        width = clip.model.ln_final.normalized_shape[0]
        if width != unet.config.cross_attention_dim:
            raise VisualPromptError(
                f"The UNet cross-attends to {unet.config.cross_attention_dim}-dimensional text "
                f"states; the text tower of {clip.name} makes {width}-dimensional ones."
            )
        self.clip = clip.eval().requires_grad_(False)

    def encode_prompt(self, prompts: Sequence[str]) -> Tensor:
        """``B×L×W`` text states of ``prompts`` on the UNet's device and dtype."""
        states = caption_states(self.clip, prompts)
        return states.to(self.unet.device, self.unet.dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = TOY_DIFFUSION_STEPS,
        guidance_scale: float = TOY_DIFFUSION_GUIDANCE,
        negative_prompt: str | Sequence[str] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: Literal["np", "pil", "pt"] = "np",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Draw one image per prompt.

        Arguments:
            prompt: one caption or a batch of them.
            height, width: size of the returned images (default: the UNet's ``sample_size``).
                The UNet always draws at its training size and the result is resized: a
                pixel-space model run far from the size it learned draws repeated fragments,
                and 4× the side costs 16× the time.
            num_inference_steps: denoising steps of the scheduler.
            guidance_scale: classifier-free guidance weight ``w`` in
                ``ε_u + w (ε_c − ε_u)``; ``≤ 1`` skips the unconditional pass.
            negative_prompt: the unconditional caption(s) (default ``""``, what training dropped
                captions to).
            generator: a generator for the whole batch, or one per prompt (then each image
                depends only on its own generator, whatever the batch).
            output_type: ``"np"`` (``N×H×W×3`` float32 in [0, 1]), ``"pt"`` (``N×3×H×W`` in
                [0, 1]) or ``"pil"`` (a list of images).
            return_dict: return an ``ImagePipelineOutput`` rather than a 1-tuple.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        if batch == 0:
            raise ValueError("prompt is empty; give at least one caption.")
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"Got {len(generator)} generators for {batch} prompts.")
        if output_type not in ("np", "pil", "pt"):
            raise ValueError(f"output_type must be 'np', 'pil' or 'pt'; got {output_type!r}.")
        negatives = self._negatives(negative_prompt, batch)
        size = self.unet.config.sample_size
        height, width = height or size, width or size
        device, dtype = self.unet.device, self.unet.dtype

        # SD's conditioning: the text states, and for guidance the unconditional caption's first.
        guided = guidance_scale > 1.0
        states = self.encode_prompt(prompts)
        if guided:
            states = torch.cat([self.encode_prompt(negatives), states])

        # Reverse diffusion from Gaussian noise in pixel space.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (batch, self.unet.config.in_channels, size, size)
        sample = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        sample = sample * self.scheduler.init_noise_sigma
        step_kwargs = (
            {"generator": generator}
            if "generator" in inspect.signature(self.scheduler.step).parameters
            else {}
        )
        for timestep in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([sample, sample]) if guided else sample
            model_input = self.scheduler.scale_model_input(model_input, timestep)
            noise = self.unet(model_input, timestep, encoder_hidden_states=states).sample
            if guided:
                unconditional, conditional = noise.chunk(2)
                noise = unconditional + guidance_scale * (conditional - unconditional)
            sample = self.scheduler.step(noise, timestep, sample, **step_kwargs).prev_sample

        images = (sample.float() / 2 + 0.5).clamp(0, 1)
        if (height, width) != (size, size):
            images = F.interpolate(
                images, size=(height, width), mode="bicubic", align_corners=False
            ).clamp(0, 1)
        self.maybe_free_model_hooks()
        if output_type == "pt":
            result: Any = images
        else:
            result = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        return ImagePipelineOutput(images=result) if return_dict else (result,)

    @staticmethod
    def _negatives(negative_prompt: str | Sequence[str] | None, batch: int) -> list[str]:
        if negative_prompt is None:
            return [""] * batch
        if isinstance(negative_prompt, str):
            return [negative_prompt] * batch
        negatives = list(negative_prompt)
        if len(negatives) != batch:
            raise ValueError(f"Got {len(negatives)} negative prompts for {batch} prompts.")
        return negatives


def save_toy_diffusion(
    folder: str | os.PathLike,
    *,
    unet: UNet2DConditionModel,
    scheduler: Any,
    clip: ClipBackbone,
    clip_name: str = DEFAULT_TEXT_ENCODER,
    facts: dict[str, Any] | None = None,
) -> Path:
    """Write a toy diffusion folder: ``unet/`` (fp16 safetensors, which halves the shipped size),
    ``scheduler/`` and ``text_encoder.json`` (``clip_name``, the fingerprint of ``clip``'s text
    tower, and ``facts`` about training). The CLIP itself is not copied."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(unet).half().save_pretrained(folder / "unet", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    record = {
        "text_encoder": clip_name,
        "text_encoder_fingerprint": text_tower_fingerprint(clip),
        "training": facts or {},
    }
    (folder / TEXT_ENCODER_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return folder


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise VisualPromptError(
            f"{path} is not valid JSON ({error}); the folder is damaged."
        ) from error


def _read_record(folder: Path) -> dict[str, Any]:
    absent = [str(part) for part in FOLDER_FILES if not (folder / part).is_file()]
    if absent:
        raise VisualPromptError(
            f"No toy diffusion model in {folder} (missing {', '.join(absent)}). Train it with "
            "`python training/pretrain_diffusion.py --out assets/diffusion-toy` (see README)."
        )
    path = folder / TEXT_ENCODER_FILE
    record = _read_json(path)
    expected = {"text_encoder": str, "text_encoder_fingerprint": str, "training": dict}
    wrong = [
        key for key, kind in expected.items()
        if not isinstance(record, dict) or not isinstance(record.get(key), kind)
    ]  # fmt: skip
    if wrong:
        raise VisualPromptError(
            f"{path} lacks {', '.join(wrong)} (or has the wrong type): expected "
            + ", ".join(f"{key} ({kind.__name__})" for key, kind in expected.items())
            + ", as save_toy_diffusion writes. The folder is damaged; train or copy it again."
        )
    return record


def _scheduler_class(folder: Path) -> tuple[type[SchedulerMixin], dict[str, Any]]:
    """The diffusers scheduler class a folder's scheduler config names, and that config."""
    path = folder / SCHEDULER_CONFIG
    config = _read_json(path)
    name = config.get("_class_name") if isinstance(config, dict) else None
    scheduler_class = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
        raise VisualPromptError(
            f"{path} names _class_name={name!r}, which is not a diffusers scheduler "
            "(a SchedulerMixin subclass such as 'DPMSolverMultistepScheduler')."
        )
    return scheduler_class, config


def load_toy_diffusion(
    path: str | os.PathLike = DEFAULT_TOY_DIFFUSION_DIR,
    *,
    clip: ClipBackbone | None = None,
    device: str | torch.device | None = None,
) -> ToyTextToImagePipeline:
    """The toy text-to-image pipeline stored in ``path``, in float32 on ``device`` (default CPU).

    Arguments:
        path: a folder written by :func:`save_toy_diffusion`.
        clip: the CLIP whose text tower conditions the UNet; default: the one the folder names,
            loaded with :func:`ovseg.backbones.load_backbone`.
        device: where the UNet (and a CLIP loaded here) runs.

    Raises:
        VisualPromptError: the folder is incomplete or damaged (a record without its keys, a
            scheduler that is not a diffusers one), or the text tower is not the one the UNet
            was trained on (its fingerprint differs).
    """
    folder = Path(path)
    record = _read_record(folder)
    # A damaged scheduler is refused before a CLIP is loaded for nothing.
    scheduler_class, scheduler_config = _scheduler_class(folder)
    name = record["text_encoder"]
    if clip is None:
        clip = load_backbone(name, device=device)
    fingerprint = text_tower_fingerprint(clip)
    if fingerprint != record["text_encoder_fingerprint"]:
        raise VisualPromptError(
            f"The toy diffusion model in {folder} was trained on the text tower of {name!r} "
            f"with fingerprint {record['text_encoder_fingerprint'][:16]}; the CLIP given "
            f"({clip.name}) has {fingerprint[:16]}. Its text states would mean nothing to the "
            "UNet: load the CLIP it was trained on, or retrain it with "
            "training/pretrain_diffusion.py."
        )
    # Without accelerate installed, the default low-memory loading only warns and falls back.
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False).float()
    scheduler = scheduler_class.from_config(scheduler_config)
    pipeline = ToyTextToImagePipeline(unet=unet.eval(), scheduler=scheduler, clip=clip)
    return pipeline.to(torch.device(device or "cpu"))


def weights_digest(path: str | os.PathLike = DEFAULT_TOY_DIFFUSION_DIR) -> str:
    """First 16 hex digits of the SHA-256 of every file of a folder (UNet weights and config,
    scheduler config, text-encoder record): all that changes what it draws, so what tells one
    model from another in cache keys, without loading it."""
    folder = Path(path)
    _read_record(folder)
    digest = hashlib.sha256()
    for part in FOLDER_FILES:
        content = (folder / part).read_bytes()
        digest.update(f"{part.as_posix()}:{len(content)}:".encode())
        digest.update(content)
    return digest.hexdigest()[:16]


class ToyDiffusionGenerator(StableDiffusionGenerator):
    """DPSeg's visual prompts from the toy diffusion model: the Stable Diffusion code path and disk
    cache, with the pipeline loaded from ``path`` on first use (not at construction).

    The id names the weights (:func:`weights_digest`), so a retrained model never reuses the
    cached images of another; a folder rewritten between construction and first use is refused
    rather than cached under the old digest. The id names no device, so the noise is drawn from
    CPU generators, which give the same images on CPU and CUDA up to float32 rounding.
    """

    seed_device = "cpu"

    def __init__(
        self,
        *,
        path: str | os.PathLike | None = None,
        clip: ClipBackbone | None = None,
        resolution: int,
        steps: int,
        guidance_scale: float,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        progress: bool = True,
    ) -> None:
        """
        Arguments:
            path: the weights folder (:func:`load_toy_diffusion`; default
                :data:`DEFAULT_TOY_DIFFUSION_DIR`, read when called).
            clip: the CLIP to condition on (default: the one the folder names).
            resolution: side of the returned images (drawn at the UNet's size, then resized).
            steps, guidance_scale: the sampler's (see :class:`ToyTextToImagePipeline`).
            batch_size: images per pipeline call.
            device: where to run (default: CUDA if available, else CPU).
            progress: show a tqdm bar over many images.
        """
        self.path = Path(DEFAULT_TOY_DIFFUSION_DIR if path is None else path)
        self._clip = clip
        self.digest = weights_digest(self.path)
        super().__init__(
            model=f"toy-diffusion@{self.digest}",
            resolution=resolution,
            steps=steps,
            guidance_scale=guidance_scale,
            safety_checker=False,
            batch_size=batch_size,
            device=device,
            dtype=torch.float32,
            progress=progress,
        )

    def _load_pipeline(self) -> ToyTextToImagePipeline:
        pipeline = load_toy_diffusion(self.path, clip=self._clip, device=self.device)
        # Hashed after loading: a folder rewritten before or while it was read differs now.
        digest = weights_digest(self.path)
        if digest != self.digest:
            raise VisualPromptError(
                f"The toy diffusion model in {self.path} changed after this generator was made "
                f"(weights digest {self.digest}, now {digest}); its images would be cached "
                "under the old model's id. Make a new generator (e.g. restart the demo)."
            )
        return self._configure(pipeline)


@torch.no_grad()
def evaluate_toy_diffusion(
    pipeline: ToyTextToImagePipeline,
    classifier: ClipBackbone,
    world: Any,
    *,
    class_ids: Sequence[int] | None = None,
    images_per_class: int = 4,
    steps: int = TOY_DIFFUSION_STEPS,
    guidance_scale: float = TOY_DIFFUSION_GUIDANCE,
    batch_size: int = 64,
    templates: str | Sequence[str] = "imagenet",
    seed: int = 0,
    background: Literal["random", "plain", "white"],
) -> dict[str, float]:
    """How often a CLIP recognises what the model draws: each class of ``world`` (a
    :class:`~ovseg.data.toyworld.ToyWorld`) drawn ``images_per_class`` times from
    ``"a photo of a {name}."``, classified zero-shot by ``classifier`` over all of ``world``'s
    classes (resized to its pretraining size).

    Returns top-1 in % over the classes drawn (``class_ids``, default all), and separately over
    seen and unseen classes; the same for ToyWorld's own renders at the model's size on
    ``background``, the one the model was trained on (the ceiling the classifier allows at that
    size); and seconds per generated image. The noise comes from CPU generators seeded
    ``seed + repeat``, so the images do not depend on the pipeline's device.
    """
    class_ids = list(range(len(world.classes))) if class_ids is None else list(class_ids)
    names = [(c.name, *c.synonyms) for c in world.classes]
    text = classifier.encode_text(names, templates).mean.float()
    size = pipeline.unet.config.sample_size
    labels = [k for k in class_ids for _ in range(images_per_class)]
    seeds = [seed + repeat for _ in class_ids for repeat in range(images_per_class)]
    generated, seconds = [], 0.0
    for start in range(0, len(labels), batch_size):
        chunk = range(start, min(start + batch_size, len(labels)))
        began = time.perf_counter()
        images = pipeline(
            [f"a photo of a {world.classes[labels[i]].name}." for i in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(seeds[i]) for i in chunk],
            output_type="pt",
        ).images
        seconds += time.perf_counter() - began
        generated.append(images.float().cpu())
    rendered = torch.stack(
        [
            torch.from_numpy(
                world.sprite_image(
                    label, TRAIN_SEED_LIMIT + image_seed, size=size, background=background
                )
            )
            for label, image_seed in zip(labels, seeds, strict=True)
        ]
    )
    rendered = rendered.permute(0, 3, 1, 2).float() / 255.0
    target = torch.tensor(labels)
    seen = torch.tensor([world.classes[label].seen for label in labels])
    metrics: dict[str, float] = {}
    for kind, pixels in (("generated", torch.cat(generated)), ("rendered", rendered)):
        correct = _zero_shot(classifier, pixels, text) == target
        metrics[f"{kind}_top1_all"] = correct.float().mean().item() * 100
        for part, mask in (("seen", seen), ("unseen", ~seen)):
            if mask.any():
                metrics[f"{kind}_top1_{part}"] = correct[mask].float().mean().item() * 100
    metrics["seconds_per_image"] = seconds / len(labels)
    metrics["images"] = len(labels)
    return metrics


def _zero_shot(classifier: ClipBackbone, pixels: Tensor, text: Tensor) -> Tensor:
    """Zero-shot argmax over ``text`` (``K×D``) of ``N×3×S×S`` images in [0, 1]."""
    size = classifier.image_size
    parameter = next(classifier.model.parameters())
    predictions = []
    for chunk in pixels.split(256):
        chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False)
        chunk = classifier.normalize(chunk.clamp(0, 1).to(parameter.device, parameter.dtype))
        embedding = F.normalize(classifier.encode_image(chunk).global_embedding.float(), dim=-1)
        predictions.append((embedding @ text.to(embedding.device).T).argmax(dim=1).cpu())
    return torch.cat(predictions)
