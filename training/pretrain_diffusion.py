"""Pretrain ToyWorld's text-to-image diffusion model, the Stable Diffusion of DPSeg's prompts.

The "web images" are ToyWorld's single-class renders, things (on a flat colour by default,
``--background``) and stuff patches, of all 312 classes (seen and unseen alike, as in CLIP
pretraining), at the model's resolution, each with a varied caption
(``ToyWorld.single_caption``, as in CLIP pretraining).
A pixel-space ``diffusers.UNet2DConditionModel`` learns DDPM's noise prediction (cosine
schedule, which suits small pixel images) conditioned by cross-attention on the per-token
states of the frozen toy ViT CLIP's text tower; ``--caption-dropout`` of the captions are
replaced by "" so that the same model gives the unconditional prediction of classifier-free
guidance. The shipped weights are the EMA of the trained ones.

The default UNet (1.45 M parameters, 2.9 MB in fp16) has levels of 32, 64 and 64 channels at
32, 16 and 8 pixels, one ResNet layer per block, and attention (self, then cross to the text)
at 8×8 and in the middle only: attention at 16×16 as well nearly doubled the step (1.0 → 1.8 s
for a batch of 64 on one thread, the other core busy). The run below is therefore bounded by its
minutes, not its steps (about 4,500 steps).

    python training/pretrain_diffusion.py --out assets/diffusion-toy \
        --run-dir runs/pretrain-diffusion --steps 6000 --minutes 90 --threads 1

The output folder (:func:`ovseg.prompts.toy_diffusion.save_toy_diffusion`) holds ``unet/``
(fp16), ``scheduler/`` (DPM-Solver++ over the training schedule), ``text_encoder.json`` and
``metrics.json``: how often the toy ViT CLIP classifies generated images as their class over all
312 classes, and seconds per image. It is written once, after training and evaluation, into a
temporary sibling folder that then replaces ``--out``: a run that stops early never touches the
shipped weights, and ``metrics.json`` always describes the weights beside it.

Checkpoints, ``train_log.csv`` and the interim models (``model/``, the EMA weights at each
checkpoint, for a look during a long run) go to ``--run-dir``. An interrupted run resumes where
its last checkpoint was when the same command is run again; a finished one is saved at its last
step, so running its command again trains nothing and rewrites the same weights.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    BudgetSchedule,
    add_budget_arguments,
    load_checkpoint,
    save_checkpoint,
    start_process,
)
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from ovseg.backbones import TOY_CLIPS, ClipBackbone, load_backbone
from ovseg.data.toyworld import TRAIN_SEED_LIMIT, ToyWorld
from ovseg.devices import autocast
from ovseg.prompts.toy_diffusion import (
    ToyTextToImagePipeline,
    caption_states,
    evaluate_toy_diffusion,
    save_toy_diffusion,
)

TRAIN_TIMESTEPS = 1000


def build_unet(
    *,
    image_size: int,
    channels: tuple[int, ...],
    layers_per_block: int,
    attention_levels: int,
    heads: int,
    text_width: int,
) -> UNet2DConditionModel:
    """A pixel-space UNet: plain ResNet blocks at the higher resolutions, cross-attention to the
    text states (after self-attention, as in SD's transformer blocks) at the ``attention_levels``
    lowest ones and in the middle."""
    plain = len(channels) - attention_levels
    if not 0 <= plain < len(channels):
        raise ValueError(
            f"attention_levels must be between 1 and the {len(channels)} levels; "
            f"got {attention_levels}."
        )
    return UNet2DConditionModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * attention_levels,
        up_block_types=("CrossAttnUpBlock2D",) * attention_levels + ("UpBlock2D",) * plain,
        layers_per_block=layers_per_block,
        cross_attention_dim=text_width,
        attention_head_dim=heads,
        norm_num_groups=min(32, channels[0] // 2),
    )


def batches(
    world: ToyWorld,
    *,
    batch_size: int,
    image_size: int,
    caption_dropout: float,
    background: str,
    seed: int,
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Endless batches of (images B×3×S×S in [-1, 1], captions), "" for dropped captions."""
    rng = np.random.default_rng(seed)
    while True:
        images, captions = [], []
        for _ in range(batch_size):
            class_id = int(rng.integers(len(world.classes)))
            sample_seed = int(rng.integers(TRAIN_SEED_LIMIT))
            images.append(
                world.sprite_image(class_id, sample_seed, size=image_size, background=background)
            )
            caption = world.single_caption(class_id, rng)
            captions.append("" if rng.random() < caption_dropout else caption)
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        yield pixels, captions


class CaptionStates:
    """The frozen text tower's per-token states of each caption, computed once: the captions are
    a few thousand strings (templates × names and synonyms)."""

    def __init__(self, clip: ClipBackbone, device: torch.device) -> None:
        self.clip = clip
        self.device = device
        self._states: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(c for c in captions if c not in self._states))
        if missing:
            for caption, states in zip(missing, caption_states(self.clip, missing), strict=True):
                self._states[caption] = states.float()
        return torch.stack([self._states[c] for c in captions]).to(self.device)


def sampling_scheduler(training: DDPMScheduler) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (SD's fast sampler) over the training noise schedule, with dynamic
    thresholding: pixel-space models drift out of [-1, 1] under guidance, and thresholding (Imagen)
    pulls each step's clean-image estimate back. The first step starts where the cosine
    schedule's log-SNR/2 is -5.1 rather than at its near-infinite end, which diffusers documents
    as needed for that schedule's numerical stability."""
    return DPMSolverMultistepScheduler.from_config(
        training.config,
        algorithm_type="dpmsolver++",
        thresholding=True,
        sample_max_value=1.0,
        timestep_spacing="trailing",
        lambda_min_clipped=-5.1,
    )


def save_ema(path: Path, ema: EMAModel) -> None:
    torch.save(ema.state_dict(), path)


def replace_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Put what ``write`` writes into an empty folder in place of ``folder``: written in a
    temporary sibling first, so a run that stops while writing (or while evaluating, inside
    ``write``) leaves ``folder`` as it was, never half old and half new."""
    staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    retired = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if folder.exists():
        folder.rename(retired)
    staging.rename(folder)
    shutil.rmtree(retired, ignore_errors=True)


def trim_log(path: Path, step: int) -> None:
    """Drop the rows of ``train_log.csv`` after ``step``, the last checkpoint: an interrupted
    run logged steps that its resumption trains again."""
    if not path.is_file():
        return
    with path.open(newline="") as log_file:
        rows = list(csv.reader(log_file))
    kept = rows[:1] + [row for row in rows[1:] if row and int(row[0]) <= step]
    if len(kept) < len(rows):
        with path.open("w", newline="") as log_file:
            csv.writer(log_file).writerows(kept)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="the shipped model folder")
    parser.add_argument(
        "--run-dir", type=Path, default=Path("runs") / "pretrain-diffusion",
        help="checkpoint and log folder",
    )  # fmt: skip
    parser.add_argument(
        "--clip", choices=sorted(TOY_CLIPS), default="toy-vit", help="the frozen text tower"
    )
    add_budget_arguments(parser, steps=6000, lr=5e-4)
    parser.set_defaults(weight_decay=0.01)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument(
        "--channels",
        type=int,
        nargs="+",
        default=[32, 64, 64],
        help="UNet block_out_channels, one per level, highest resolution first",
    )
    parser.add_argument("--layers-per-block", type=int, default=1)
    parser.add_argument(
        "--attention-levels",
        type=int,
        default=1,
        help="how many of the lowest levels have attention blocks (1: only 8×8 at 32 px; a "
        "second, at 16×16, nearly doubles the step time)",
    )
    parser.add_argument("--heads", type=int, default=4, help="attention heads per block")
    parser.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction"],
        default="epsilon",
        help="what the UNet predicts: the noise (DDPM, SD 1.x) or v = αε − σx₀ (SD 2.x)",
    )
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument(
        "--background",
        choices=["random", "plain", "white"],
        default="plain",
        help="behind a thing: a flat colour (plain, the default: a model this small learns the "
        "things, not the 14 stuff textures behind them, and draws what Stable Diffusion often "
        "does, the object alone), a random stuff texture or flat colour (random), or white",
    )
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--eval-images-per-class", type=int, default=4)
    parser.add_argument(
        "--eval-classes",
        type=int,
        default=None,
        help="evaluate every class (default) or the first N",
    )
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--eval-guidance", type=float, default=3.0)
    parser.add_argument(
        "--eval-templates",
        choices=["imagenet", "short", "single"],
        default="imagenet",
        help="prompt templates of the zero-shot classifier (imagenet: CLIP's 80)",
    )
    args = parser.parse_args()

    device = start_process(args)
    clip = load_backbone(args.clip, device=device).eval().requires_grad_(False)
    text_width = clip.model.ln_final.normalized_shape[0]
    unet = build_unet(
        image_size=args.image_size,
        channels=tuple(args.channels),
        layers_per_block=args.layers_per_block,
        attention_levels=args.attention_levels,
        heads=args.heads,
        text_width=text_width,
    ).to(device)
    noise_schedule = DDPMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=args.prediction_type,
        clip_sample=False,
    )
    world = ToyWorld()
    args.run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = args.run_dir / "checkpoint.pt"
    ema_path = args.run_dir / "ema.pt"
    log_path = args.run_dir / "train_log.csv"

    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay
    )
    step, seconds = load_checkpoint(checkpoint_path, unet, optimizer)
    saved_step = step
    trim_log(log_path, step)
    # Warm-up of the decay: early in a short run the average is mostly of recent weights.
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=3 / 4)
    if step and ema_path.is_file():
        ema.load_state_dict(torch.load(ema_path, map_location="cpu", weights_only=True))
    ema.to(device)
    schedule = BudgetSchedule(
        steps=args.steps, minutes=args.minutes, warmup=args.warmup, lr=args.lr,
        previous_seconds=seconds,
    )  # fmt: skip
    stream = batches(
        world, batch_size=args.batch_size, image_size=args.image_size,
        caption_dropout=args.caption_dropout, background=args.background,
        seed=args.seed + step,
    )  # fmt: skip
    states_of = CaptionStates(clip, device)
    generator = torch.Generator(device).manual_seed(args.seed + step)

    def shipped_unet() -> UNet2DConditionModel:
        averaged = copy.deepcopy(unet)
        ema.copy_to(averaged.parameters())
        return averaged.eval()

    def facts() -> dict:
        return {
            "steps": step,
            "seed": args.seed,
            "prediction_type": args.prediction_type,
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "channels": args.channels,
            "layers_per_block": args.layers_per_block,
            "attention_levels": args.attention_levels,
            "heads": args.heads,
            "parameters": sum(p.numel() for p in unet.parameters()),
            "caption_dropout": args.caption_dropout,
            "background": args.background,
            "ema_decay": args.ema_decay,
            "lr": args.lr,
            "warmup": args.warmup,
            "minutes": args.minutes,
            "amp": args.amp,
            "train_seconds": round(seconds, 1),
        }

    def save_model(folder: Path) -> None:
        save_toy_diffusion(
            folder,
            unet=shipped_unet(),
            scheduler=sampling_scheduler(noise_schedule),
            clip=clip,
            clip_name=args.clip,
            facts=facts(),
        )

    def save_run() -> None:
        save_checkpoint(checkpoint_path, unet, optimizer, step=step, seconds=seconds)
        save_ema(ema_path, ema)

    unet.train()
    new_log = not log_path.is_file()
    with log_path.open("a", newline="") as log_file:
        log = csv.writer(log_file)
        if new_log:
            log.writerow(["step", "loss", "lr", "seconds"])
        progress = tqdm(total=args.steps, initial=step, desc="pretrain diffusion")
        while step < args.steps:
            lr = schedule.learning_rate(step)
            if lr is None:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr
            pixels, captions = next(stream)
            pixels = pixels.to(device)
            states = states_of(captions)
            # DDPM (Ho et al. 2020, Eq. 14): noise a clean image to a random step, predict the
            # noise.
            timesteps = torch.randint(
                0, TRAIN_TIMESTEPS, (len(pixels),), generator=generator, device=device
            )
            noise = torch.randn(pixels.shape, generator=generator, device=device)
            noisy = noise_schedule.add_noise(pixels, noise, timesteps)
            if args.prediction_type == "epsilon":
                target = noise
            else:
                target = noise_schedule.get_velocity(pixels, noise, timesteps)
            with autocast(args.amp, device):
                predicted = unet(noisy, timesteps, encoder_hidden_states=states).sample
            loss = F.mse_loss(predicted.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            ema.step(unet.parameters())
            step += 1
            seconds = schedule.elapsed()
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            log.writerow([step, f"{loss.item():.5f}", f"{lr:.6f}", f"{seconds:.1f}"])
            if step % args.checkpoint_every == 0:
                log_file.flush()
                save_run()
                saved_step = step
                replace_folder(args.run_dir / "model", save_model)
        progress.close()
    # Saved before the model is: run again, the finished command resumes here and trains nothing.
    if step != saved_step:
        save_run()

    def save_evaluated(folder: Path) -> None:
        save_model(folder)
        pipeline = ToyTextToImagePipeline(
            unet=shipped_unet(), scheduler=sampling_scheduler(noise_schedule), clip=clip
        )
        pipeline.set_progress_bar_config(disable=True)
        began = time.perf_counter()
        metrics = evaluate_toy_diffusion(
            pipeline,
            clip,
            world,
            class_ids=None if args.eval_classes is None else range(args.eval_classes),
            images_per_class=args.eval_images_per_class,
            steps=args.eval_steps,
            guidance_scale=args.eval_guidance,
            templates=args.eval_templates,
            background=args.background,
        )
        metrics |= {
            **facts(),
            "eval_steps": args.eval_steps,
            "eval_guidance": args.eval_guidance,
            "eval_templates": args.eval_templates,
            "eval_threads": args.threads,
            "eval_seconds": round(time.perf_counter() - began, 1),
        }
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(json.dumps(metrics, indent=2))

    replace_folder(args.out, save_evaluated)


if __name__ == "__main__":
    main()
