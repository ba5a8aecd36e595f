"""Train the ToyWorld SAM: a promptable, class-agnostic segmenter (the SA-1B analog).

Every ToyWorld scene has pixel-exact instance masks; each thing instance and each stuff region is
a segment to recover from a prompt, with no class given. Prompts follow SAM's training recipe:
one or a few points (with multimask output, the loss taken on the best of the three masks), a
jittered box, or a noisy low-resolution mask plus a point. Losses are SAM's: focal (×20) plus dice
on the masks, and MSE between predicted and actual IoU. ESC-Net then reuses the trained prompt
encoder and mask-decoder blocks.

    python training/pretrain_sam.py --out assets/sam-toy/sam-toy --steps 2000 --minutes 100
"""

from __future__ import annotations

import argparse
import csv
import json
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
from tqdm import tqdm

from ovseg.backbones import build_sam
from ovseg.backbones.sam import SamBackbone
from ovseg.data.toyworld import TRAIN_SEED_LIMIT, Scene, ToyWorld
from ovseg.devices import autocast

EVAL_SEED = TRAIN_SEED_LIMIT + 8_000_000
MIN_SEGMENT_PIXELS = 48


def segments(scene: Scene) -> np.ndarray:
    """All segments of a scene as ``N×H×W`` bool: thing instances, then stuff regions."""
    thing_pixels = scene.instance_masks.any(axis=0) if len(scene.instance_masks) else None
    stuff = []
    for class_id in np.unique(scene.labels):
        mask = scene.labels == class_id
        if thing_pixels is not None:
            mask &= ~thing_pixels
        stuff.append(mask)
    masks = [*scene.instance_masks, *stuff]
    masks = [m for m in masks if m.sum() >= MIN_SEGMENT_PIXELS]
    return np.stack(masks)


def random_points(mask: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random (x, y) pixel centres inside a mask."""
    ys, xs = np.nonzero(mask)
    picks = rng.integers(len(xs), size=count)
    return np.stack([xs[picks], ys[picks]], axis=1).astype(np.float32) + 0.5


def central_point(mask: np.ndarray) -> np.ndarray:
    """The mask pixel farthest from the mask border (a deterministic single-point prompt)."""
    from scipy.ndimage import distance_transform_edt

    distance = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(distance.argmax()), mask.shape)
    return np.array([[x + 0.5, y + 0.5]], dtype=np.float32)


def box_of(mask: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)
    if rng is not None:
        # SAM jitters boxes by 10% of the side, at most 20 px at 1024 (5 px at our 256).
        side = np.array([box[2] - box[0], box[3] - box[1]] * 2)
        box += np.clip(rng.normal(0, 0.1, 4) * side, -5, 5)
    return box.clip(0, mask.shape[0])


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Per-mask sigmoid focal loss, mean over pixels: ``P×M×H×W`` → ``P×M``.

    No alpha balancing: with detectron2's alpha = 0.25 the short toy schedule collapsed to empty
    masks (train IoU 0 after 100 steps), which SAM's long schedule can afford and ours cannot.
    """
    probabilities = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probabilities * targets + (1 - probabilities) * (1 - targets)
    return (ce * (1 - p_t) ** gamma).mean(dim=(-2, -1))


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    probabilities = logits.sigmoid().flatten(-2)
    targets = targets.flatten(-2)
    numerator = 2 * (probabilities * targets).sum(-1)
    denominator = probabilities.sum(-1) + targets.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    predicted = logits > 0
    intersection = (predicted & (targets > 0.5)).flatten(-2).sum(-1).float()
    union = (predicted | (targets > 0.5)).flatten(-2).sum(-1).float()
    return intersection / union.clamp(min=1)


def training_batch(
    world: ToyWorld,
    sam: SamBackbone,
    *,
    scenes: int,
    prompts_per_scene: int,
    rng: np.random.Generator,
) -> dict:
    """Images, per-row prompts of one randomly chosen kind, and low-resolution target masks."""
    images, row_image, targets, points, boxes = [], [], [], [], []
    kind = rng.choice(["points", "box", "mask"], p=[0.5, 0.3, 0.2])
    num_points = int(rng.integers(1, 4)) if kind == "points" else 1
    for index in range(scenes):
        scene = world.scene(int(rng.integers(TRAIN_SEED_LIMIT)))
        images.append(scene.image)
        masks = segments(scene)
        chosen = rng.choice(len(masks), size=min(prompts_per_scene, len(masks)), replace=False)
        for mask in masks[chosen]:
            row_image.append(index)
            targets.append(mask)
            points.append(random_points(mask, num_points, rng))
            boxes.append(box_of(mask, rng))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    full_targets = torch.from_numpy(np.stack(targets)).float()[:, None]
    low_size = sam.embedding_size * 4
    low_targets = F.interpolate(full_targets, size=(low_size, low_size), mode="area")
    batch = {
        "pixels": pixels,
        "row_image": torch.tensor(row_image),
        "targets": low_targets,
        "kind": kind,
    }
    if kind == "points":
        batch["points"] = (torch.from_numpy(np.stack(points)), torch.ones(len(points), num_points))
    elif kind == "box":
        batch["boxes"] = torch.from_numpy(np.stack(boxes))
    else:
        noisy = (low_targets > 0.5).float() * 2 - 1
        flips = torch.rand_like(noisy) < 0.1
        noisy = torch.where(flips, -noisy, noisy) * 4.0
        batch["masks"] = F.avg_pool2d(noisy, 3, stride=1, padding=1)
        batch["points"] = (torch.from_numpy(np.stack(points)), torch.ones(len(points), 1))
    return batch


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch`` with its tensors (also those inside tuples) on ``device``."""

    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, tuple):
            return tuple(move(item) for item in value)
        return value

    return {name: move(value) for name, value in batch.items()}


def train_step(sam: SamBackbone, batch: dict) -> tuple[torch.Tensor, dict]:
    embeddings = sam.encode_image(batch["pixels"])[batch["row_image"]]
    multimask = batch["kind"] == "points" and batch["points"][0].shape[1] == 1
    logits, predicted_iou = sam.decode(
        embeddings,
        points=batch.get("points"),
        boxes=batch.get("boxes"),
        masks=batch.get("masks"),
        multimask_output=multimask,
    )
    targets = batch["targets"].expand_as(logits)
    mask_losses = 20 * focal_loss(logits, targets) + dice_loss(logits, targets)
    best = mask_losses.argmin(dim=1, keepdim=True)  # SAM back-propagates only the best of M masks
    mask_loss = mask_losses.gather(1, best).mean()
    actual_iou = mask_iou(logits.detach(), targets)
    # Every mask's IoU is predicted, not only the best one's: at inference the predicted IoU
    # picks among the masks, so it must learn that the others are worse. (Trained on the best
    # mask alone, the toy SAM scored its stuff-sized mask 0.85 for a point on a thing and chose
    # it, 0.5% thing mIoU, although its smallest mask reached 13%.)
    iou_loss = F.mse_loss(predicted_iou, actual_iou)
    stats = {
        "mask_loss": mask_loss.item(),
        "iou_loss": iou_loss.item(),
        "iou": actual_iou.gather(1, best).mean().item(),
    }
    return mask_loss + iou_loss, stats


@torch.no_grad()
def evaluate(sam: SamBackbone, *, num_scenes: int, image_size: int) -> dict:
    """Single-point mIoU on held-out scenes: the most central point of every segment, the mask
    with the highest predicted IoU, compared at full resolution."""
    sam.eval()
    device = next(sam.parameters()).device
    world = ToyWorld(image_size=image_size)
    thing_ious, stuff_ious = [], []
    for index in range(num_scenes):
        scene = world.scene(EVAL_SEED + index)
        masks = segments(scene)
        num_things = sum(m.sum() >= MIN_SEGMENT_PIXELS for m in scene.instance_masks)
        pixels = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 255.0
        embedding = sam.encode_image(pixels.to(device))
        coordinates = torch.from_numpy(np.stack([central_point(m) for m in masks]))
        coordinates = (coordinates * sam.image_size / image_size).to(device)
        labels = torch.ones(len(masks), 1, device=device)
        logits, predicted_iou = sam.decode(
            embedding, points=(coordinates, labels), multimask_output=True
        )
        best = predicted_iou.argmax(dim=1)
        chosen = logits[torch.arange(len(masks), device=device), best][:, None]
        full = sam.postprocess_masks(chosen, original_size=(image_size, image_size))[:, 0] > 0
        full = full.cpu()
        truth = torch.from_numpy(masks)
        ious = (
            (full & truth).flatten(1).sum(1) / (full | truth).flatten(1).sum(1).clamp(min=1)
        ).tolist()
        thing_ious += ious[:num_things]
        stuff_ious += ious[num_things:]
    all_ious = thing_ious + stuff_ious
    return {
        "single_point_miou": float(np.mean(all_ious)) * 100,
        "single_point_miou_things": float(np.mean(thing_ious)) * 100,
        "single_point_miou_stuff": float(np.mean(stuff_ious)) * 100,
        "eval_scenes": num_scenes,
        "eval_segments": len(all_ious),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="weights path stem (writes .safetensors + .json)"
    )
    parser.add_argument("--run-dir", type=Path, default=Path("runs/pretrain-sam"))
    parser.add_argument("--config", default="toy")
    add_budget_arguments(parser, steps=1500, lr=4e-4)
    parser.add_argument("--scenes", type=int, default=8, help="scenes per batch")
    parser.add_argument("--prompts-per-scene", type=int, default=8)
    parser.add_argument("--eval-scenes", type=int, default=100)
    parser.add_argument(
        "--init", type=Path, default=None, help="start from these SAM weights (path stem)"
    )
    parser.add_argument(
        "--train-parts",
        choices=["all", "iou-head"],
        default="all",
        help="iou-head: train only the IoU prediction head, everything else frozen",
    )
    args = parser.parse_args()

    device = start_process(args)
    sam = build_sam(args.config, args.init) if args.init else build_sam(args.config)
    sam.to(device).train()
    if args.train_parts == "iou-head":
        for name, parameter in sam.named_parameters():
            parameter.requires_grad_("iou_prediction_head" in name)
    trained = [p for p in sam.parameters() if p.requires_grad]
    world = ToyWorld(image_size=sam.image_size)
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = args.run_dir / "checkpoint.pt"
    step, previous_seconds = load_checkpoint(checkpoint_path, sam, optimizer)
    schedule = BudgetSchedule(
        steps=args.steps, minutes=args.minutes, warmup=args.warmup, lr=args.lr,
        previous_seconds=previous_seconds,
    )  # fmt: skip
    rng = np.random.default_rng(args.seed + step)
    log_path = args.run_dir / "train_log.csv"
    new_log = not log_path.is_file()
    with log_path.open("a", newline="") as log_file:
        log = csv.writer(log_file)
        if new_log:
            log.writerow(
                ["step", "loss", "mask_loss", "iou_loss", "train_iou", "lr", "prompt", "seconds"]
            )
        progress = tqdm(total=args.steps, initial=step, desc="pretrain sam")
        while step < args.steps:
            lr = schedule.learning_rate(step)
            if lr is None:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = training_batch(
                world, sam, scenes=args.scenes, prompts_per_scene=args.prompts_per_scene, rng=rng
            )
            with autocast(args.amp, device):
                loss, stats = train_step(sam, to_device(batch, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}", iou=f"{stats['iou']:.2f}")
            log.writerow(
                [
                    step,
                    f"{loss.item():.4f}",
                    f"{stats['mask_loss']:.4f}",
                    f"{stats['iou_loss']:.4f}",
                    f"{stats['iou']:.3f}",
                    f"{lr:.6f}",
                    batch["kind"],
                    f"{schedule.elapsed():.1f}",
                ]
            )
            if step % args.checkpoint_every == 0:
                log_file.flush()
                save_checkpoint(
                    checkpoint_path, sam, optimizer, step=step, seconds=schedule.elapsed()
                )
                sam.save(args.out)
        progress.close()
    sam.save(args.out)
    metrics = evaluate(sam, num_scenes=args.eval_scenes, image_size=sam.image_size)
    metrics.update(
        {
            "steps": step,
            "scenes_per_batch": args.scenes,
            "prompts_per_scene": args.prompts_per_scene,
            "init": str(args.init) if args.init else None,
            "train_parts": args.train_parts,
        }
    )
    args.out.with_name(args.out.name + ".metrics.json").write_text(
        json.dumps(metrics, indent=2) + "\n"
    )
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
