"""The toy diffusion model as DPSeg's Stable Diffusion: what it draws, and what a new name costs.

Prints two tables:

1. How often the toy ViT CLIP classifies a generated image as its class, zero-shot over all 312
   ToyWorld classes (seen and unseen separately), with ``--images-per-class`` images of each class
   drawn from "a photo of a {name}.". The same CLIP on ToyWorld's own renders at the model's size,
   on the background the model was trained on (``text_encoder.json``'s training facts), is the
   ceiling that size allows.
2. Seconds to draw the demo's default visual prompts for 10 names that are not ToyWorld classes
   (``TOY_PROMPTS_PER_CLASS`` per class, at ``TOY_PROMPT_RESOLUTION``, with the sampler settings
   ``make_generator("toy-diffusion")`` uses), on ``--threads`` cores. What is timed is drawing
   only: ``VisualPromptBank.images`` into an empty cache, in pipeline calls of the generator's
   batch size (32 images), which covers the text states, the sampler, the resizing and writing
   the PNG files. Not timed: loading the pipeline (the demo does it once) and encoding the
   prompts with DPSeg's CLIP, which a first call also pays. The floor is the UNet alone, measured
   in the same run: the number of batches × sampler steps × one forward pass of a full batch
   (twice the images, for guidance). The ratio says what the rest costs.

    python benchmarks/toy_diffusion.py                      # the shipped assets/diffusion-toy
    python benchmarks/toy_diffusion.py --model runs/diffusion-b --images-per-class 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ovseg.backbones import load_backbone
from ovseg.data.toyworld import ToyWorld
from ovseg.prompts.templates import resolve_templates
from ovseg.prompts.toy_diffusion import (
    DEFAULT_TOY_DIFFUSION_DIR,
    ToyDiffusionGenerator,
    evaluate_toy_diffusion,
    load_toy_diffusion,
)
from ovseg.prompts.visual import (
    TOY_DIFFUSION_PROMPT_GUIDANCE,
    TOY_DIFFUSION_PROMPT_STEPS,
    TOY_PROMPT_RESOLUTION,
    TOY_PROMPTS_PER_CLASS,
    VisualPromptBank,
)

# The vocabulary of the demo's photograph example, then five more names ToyWorld lacks.
NEW_NAMES = (
    "person", "necktie", "flag", "wall", "uniform",
    "stapler", "robot", "hoodie", "wizard", "lighthouse",
)  # fmt: skip


def first_call_seconds(model: Path, *, steps: int, guidance: float) -> dict[str, float]:
    """Time to fill an empty bank with the default prompts of :data:`NEW_NAMES`, and the floor."""
    generator = ToyDiffusionGenerator(
        path=model,
        resolution=TOY_PROMPT_RESOLUTION,
        steps=steps,
        guidance_scale=guidance,
        progress=False,
    )
    pipeline = generator.pipeline  # loaded before the clock starts: the demo loads it once
    templates = resolve_templates("imagenet")
    with tempfile.TemporaryDirectory() as cache:
        bank = VisualPromptBank(
            generator=generator,
            encoder=lambda images: (images.mean(dim=(2, 3)), []),
            encoder_id="none",
            cache_dir=cache,
            batch_size=generator.batch_size,
            progress=False,
        )
        began = time.perf_counter()
        images = bank.images(list(NEW_NAMES), templates, TOY_PROMPTS_PER_CLASS)
        seconds = time.perf_counter() - began
    count = sum(len(row) for row in images)

    size = pipeline.unet.config.sample_size
    factor = 2 if guidance > 1 else 1
    sample = torch.randn(generator.batch_size * factor, 3, size, size)
    states = pipeline.encode_prompt([""] * len(sample))
    timestep = torch.full((len(sample),), 500)
    with torch.no_grad():
        pipeline.unet(sample, timestep, encoder_hidden_states=states)  # warm-up
        began = time.perf_counter()
        pipeline.unet(sample, timestep, encoder_hidden_states=states)
        forward = time.perf_counter() - began
    batches = -(-count // generator.batch_size)
    floor = batches * steps * forward
    return {
        "images": count,
        "batch_size": generator.batch_size,
        "seconds": seconds,
        "forward": forward,
        "floor": floor,
    }


def trained_background(model: Path) -> str:
    """The background the model's ToyWorld renders had in training, from its record."""
    record = json.loads((model / "text_encoder.json").read_text())
    background = record.get("training", {}).get("background")
    if background is None:
        raise SystemExit(
            f"{model / 'text_encoder.json'} does not say which background the model was trained "
            "on (training.background), so the rendered ceiling would be measured on a guess."
        )
    return background


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_TOY_DIFFUSION_DIR)
    parser.add_argument("--images-per-class", type=int, default=2)
    parser.add_argument("--templates", default="imagenet", choices=["imagenet", "short", "single"])
    parser.add_argument("--steps", type=int, default=TOY_DIFFUSION_PROMPT_STEPS)
    parser.add_argument("--guidance", type=float, default=TOY_DIFFUSION_PROMPT_GUIDANCE)
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (2: the project's laptop CPU)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    world = ToyWorld()
    known = {c.name for c in world.classes} | {s for c in world.classes for s in c.synonyms}
    if known & set(NEW_NAMES):
        raise SystemExit(f"ToyWorld knows {sorted(known & set(NEW_NAMES))}; pick other names.")
    pipeline = load_toy_diffusion(args.model)
    background = trained_background(args.model)
    pipeline.set_progress_bar_config(disable=True)
    classifier = load_backbone("toy-vit")
    metrics = evaluate_toy_diffusion(
        pipeline,
        classifier,
        world,
        images_per_class=args.images_per_class,
        steps=args.steps,
        guidance_scale=args.guidance,
        templates=args.templates,
        background=background,
    )
    print(
        f"{args.model}: {len(world.classes)} classes × {args.images_per_class} images, "
        f"{args.steps} DPM-Solver++ steps, guidance {args.guidance:g}; toy ViT CLIP zero-shot "
        f"({args.templates} templates); renders on a {background} background\n"
    )
    print("| images | top-1 all % | top-1 seen % | top-1 unseen % |")
    print("|---|---:|---:|---:|")
    for kind, title in (("generated", "generated"), ("rendered", "ToyWorld renders (ceiling)")):
        cells = [f"{metrics[f'{kind}_top1_{part}']:.1f}" for part in ("all", "seen", "unseen")]
        print(f"| {title} | " + " | ".join(cells) + " |")

    cost = first_call_seconds(args.model, steps=args.steps, guidance=args.guidance)
    print(
        f"\nDrawing the prompts of {len(NEW_NAMES)} new names ({', '.join(NEW_NAMES)}): "
        f"{TOY_PROMPTS_PER_CLASS} prompts each at {TOY_PROMPT_RESOLUTION} px, "
        f"{cost['batch_size']} images per pipeline call, {args.threads} thread(s). Timed: "
        "drawing and writing the images only (pipeline already loaded; encoding the prompts "
        "with DPSeg's CLIP not included)\n"
    )
    print("| images | batch | seconds | floor (UNet only) s | ratio | one forward s |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {cost['images']} | {cost['batch_size']} | {cost['seconds']:.1f} | "
        f"{cost['floor']:.1f} | {cost['seconds'] / cost['floor']:.2f} | {cost['forward']:.3f} |"
    )


if __name__ == "__main__":
    main()
