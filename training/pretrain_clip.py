"""Pretrain a ToyWorld CLIP contrastively on image-caption pairs that cover every class.

This is the web-scale pretraining analog of the zero-shot protocol: the captions name every
ToyWorld class, seen and unseen alike, while segmentation heads later see masks of seen classes
only. Images are single things or stuff patches (with captions like "a photo of a cat") and whole
scenes (with captions listing what is in them). Pretraining runs at a lower resolution than
segmentation, as real CLIPs do; the ViT also sees some batches at 1.5× size so its position
embeddings interpolate well to segmentation inputs.

    python training/pretrain_clip.py --model toy-vit --out assets/clip-toy-vit \
        --steps 1100 --minutes 85 --large-fraction 0.15
    python training/pretrain_clip.py --model toy-convnext --out runs/clip-toy-convnext \
        --steps 1800 --minutes 80

(the ViT's first run, then the ConvNeXt's first stage; the shipped ConvNeXt continues from it in
three more stages with the options below, README "Shipped weights and how they were made").

``--init-text`` / ``--init-image`` start a tower from another toy CLIP's weights (the text towers
of the toy CLIPs share one config), and ``--lock-text`` freezes the text tower, as open_clip's
``--lock-text`` does: the image tower then learns to land on text embeddings that already tell
all 312 classes apart (LiT's recipe with the towers' roles swapped). ``--distill-from`` adds a
teacher CLIP whose text tower is the one locked in: the loss gains ``--distill-weight`` × (1 −
cosine) between the student's and the teacher's image embeddings of the same images (the teacher
sees them at its own pretraining size), as in CLIP distillation (TinyCLIP, CLIP-KD).

With the text tower locked, the caption embeddings of every class are fixed, so two more terms
can use all 312 at once rather than the classes a batch happens to hold: ``--vocabulary-weight``
× the cross-entropy of each single-class image over every class's caption embedding (in-batch
InfoNCE with the whole caption vocabulary as negatives), and ``--distill-logits-weight`` × the
KL divergence from the teacher's class distribution to the student's over that vocabulary
(CLIP-KD's relation distillation with the classes as the shared text side).

The output folder is an open_clip ``local-dir:`` model (``open_clip_config.json`` and
``open_clip_model.safetensors``) and ``metrics.json``; checkpoints (for ``--resume`` after an
interruption: just run the same command again) and ``train_log.csv`` go to ``--run-dir``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from common import (
    BudgetSchedule,
    add_budget_arguments,
    load_checkpoint,
    save_checkpoint,
    start_process,
)
from safetensors.torch import save_file
from tqdm import tqdm

from ovseg.backbones import TOY_CLIPS, ClipBackbone, load_backbone, load_clip
from ovseg.data.toyworld import SINGLE_CAPTION_TEMPLATES, TRAIN_SEED_LIMIT, ToyWorld
from ovseg.devices import autocast
from ovseg.eval.gap import evaluate_clip


def batches(
    world: ToyWorld, *, batch_size: int, image_size: int, scene_fraction: float, seed: int
) -> Iterator[tuple[torch.Tensor, list[str], torch.Tensor]]:
    """Endless batches of (images B×3×S×S in [0, 1], captions, keys).

    Images with equal non-negative keys show the same single class, so their captions are
    interchangeable positives; scenes get unique negative keys.
    """
    rng = np.random.default_rng(seed)
    world_at_size = ToyWorld(image_size=image_size) if image_size != world.image_size else world
    step = 0
    while True:
        images, captions, keys = [], [], []
        for index in range(batch_size):
            sample_seed = int(rng.integers(TRAIN_SEED_LIMIT))
            if rng.random() < scene_fraction:
                scene = world_at_size.scene(sample_seed)
                images.append(scene.image)
                captions.append(scene.caption)
                keys.append(-1 - step * batch_size - index)
            else:
                class_id = int(rng.integers(len(world.classes)))
                images.append(world_at_size.sprite_image(class_id, sample_seed))
                captions.append(world.single_caption(class_id, rng))
                keys.append(class_id)
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
        yield pixels, captions, torch.tensor(keys)
        step += 1


def contrastive_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    keys: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets: pairs that share a class key are all positives."""
    logits = scale * F.normalize(image_embeddings, dim=-1) @ F.normalize(text_embeddings, dim=-1).T
    targets = (keys[:, None] == keys[None, :]).float()
    targets = targets / targets.sum(dim=1, keepdim=True)
    image_to_text = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    text_to_image = -(targets * logits.log_softmax(dim=0)).sum(dim=0).mean()
    return (image_to_text + text_to_image) / 2


@torch.no_grad()
def teacher_embeddings(teacher: ClipBackbone, pixels: torch.Tensor) -> torch.Tensor:
    """The teacher's image embeddings of images B×3×S×S in [0, 1], resized to its pretraining
    size."""
    if pixels.shape[-1] != teacher.image_size:
        size = (teacher.image_size, teacher.image_size)
        pixels = F.interpolate(pixels, size, mode="bilinear", antialias=True).clamp(0, 1)
    return teacher.encode_image(teacher.normalize(pixels)).global_embedding


def distillation_loss(
    image_embeddings: torch.Tensor,
    teacher: ClipBackbone,
    pixels: torch.Tensor,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean (1 − cosine) between the student's image embeddings and the teacher's of the same
    images (B×3×S×S in [0, 1]), resized to the teacher's pretraining size (or ``target``, the
    teacher's embeddings when already computed)."""
    if target is None:
        target = teacher_embeddings(teacher, pixels)
    cosine = F.cosine_similarity(image_embeddings, target, dim=-1)
    return (1 - cosine).mean()


def vocabulary_losses(
    image_embeddings: torch.Tensor,
    vocabulary: torch.Tensor,
    keys: torch.Tensor,
    scale: torch.Tensor,
    teacher_targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, teacher KL) of image embeddings B×D against the class embeddings K×D.

    The cross-entropy covers the single-class images (``keys >= 0``; zero when there are none);
    the KL from the softmax of the teacher's image embeddings ``teacher_targets`` to the student's
    covers every image (zero without them). Both use the same logit ``scale``.
    """
    logits = scale * F.normalize(image_embeddings, dim=-1) @ F.normalize(vocabulary, dim=-1).T
    single = keys >= 0
    cross_entropy = (
        F.cross_entropy(logits[single], keys[single]) if single.any() else logits.sum() * 0
    )
    if teacher_targets is None:
        return cross_entropy, logits.sum() * 0
    with torch.no_grad():
        target = scale * F.normalize(teacher_targets, dim=-1) @ F.normalize(vocabulary, dim=-1).T
    kl = F.kl_div(
        logits.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    return cross_entropy, kl


def is_text_parameter(name: str) -> bool:
    """Whether an open_clip CLIP state-dict key belongs to the text tower (``logit_scale`` and
    ``logit_bias`` belong to neither)."""
    return not name.startswith("visual.") and not name.startswith("logit_")


def initialise_tower(backbone: ClipBackbone, source: Path, *, text: bool) -> int:
    """Copy the text (or image) tower of the toy CLIP at ``source`` (an open_clip local-dir
    folder or its ``.safetensors``) into ``backbone``; returns how many tensors were copied.

    Raises ValueError when ``source`` has no such tower or its shapes differ.
    """
    from safetensors.torch import load_file

    path = source / "open_clip_model.safetensors" if source.is_dir() else source
    weights = load_file(path)
    own = backbone.model.state_dict()
    part = {k: v for k, v in weights.items() if is_text_parameter(k) == text and k in own}
    mismatched = [k for k, v in part.items() if v.shape != own[k].shape]
    wanted = [k for k in own if is_text_parameter(k) == text]
    if not part or mismatched or len(part) != len(wanted):
        tower = "text" if text else "image"
        detail = f"shapes differ for {mismatched[:3]}" if mismatched else "keys differ"
        raise ValueError(f"{path} has no {tower} tower matching --model's ({detail})")
    with torch.no_grad():
        for name, value in part.items():
            own[name].copy_(value)
    return len(part)


def save_model(backbone: ClipBackbone, config_name: str, out: Path) -> None:
    """Write an open_clip local-dir folder: config with preprocessing, fp16 weights."""
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": open_clip.get_model_config(config_name),
        "preprocess_cfg": {
            "mean": backbone.image_mean.flatten().tolist(),
            "std": backbone.image_std.flatten().tolist(),
        },
    }
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # fp16 halves the shipped size; open_clip casts back to the model's fp32 on load.
    state = {
        k: v.detach().to(torch.float16).cpu().contiguous()
        for k, v in backbone.model.state_dict().items()
    }
    save_file(state, out / "open_clip_model.safetensors", metadata={"config": config_name})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(TOY_CLIPS), default="toy-vit")
    parser.add_argument("--out", type=Path, required=True, help="the shipped model folder")
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="checkpoint and log folder (default: runs/pretrain-<model>)",
    )
    add_budget_arguments(parser, steps=1500, lr=1e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=None, help="default: the config's size")
    parser.add_argument(
        "--large-fraction",
        type=float,
        default=0.25,
        help="share of ViT batches at 1.5× size (position-embedding interpolation)",
    )
    parser.add_argument("--scene-fraction", type=float, default=0.35)
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="fix the softmax temperature τ (logit scale 1/τ) instead of learning it; CLIP's "
        "ends at 0.01, and a low fixed τ keeps the modality gap open (README)",
    )
    parser.add_argument(
        "--eval-images-per-class",
        type=int,
        default=4,
        help="held-out images per class (at least 2: the gap compares same-class images)",
    )
    parser.add_argument(
        "--eval-templates",
        choices=["imagenet", "short", "single"],
        default="imagenet",
        help="prompt templates of the zero-shot evaluation (imagenet: CLIP's 80)",
    )
    parser.add_argument(
        "--init-text", type=Path, default=None, help="start the text tower from this toy CLIP"
    )
    parser.add_argument(
        "--init-image", type=Path, default=None, help="start the image tower from this toy CLIP"
    )
    parser.add_argument(
        "--lock-text", action="store_true", help="freeze the text tower (use with --init-text)"
    )
    parser.add_argument(
        "--distill-from",
        type=Path,
        default=None,
        help="teacher toy CLIP folder (open_clip local-dir) whose image embeddings to match",
    )
    parser.add_argument("--distill-weight", type=float, default=1.0)
    parser.add_argument(
        "--vocabulary-weight",
        type=float,
        default=0.0,
        help="weight of the cross-entropy over every class's caption embedding (needs --lock-text)",
    )
    parser.add_argument(
        "--distill-logits-weight",
        type=float,
        default=0.0,
        help="weight of the teacher-to-student KL over the class vocabulary (needs --distill-from)",
    )
    args = parser.parse_args()
    if args.eval_images_per_class < 2:
        parser.error("--eval-images-per-class must be at least 2 (same-class image pairs)")
    if (args.vocabulary_weight or args.distill_logits_weight) and not args.lock_text:
        parser.error("--vocabulary-weight and --distill-logits-weight need --lock-text")
    if args.distill_logits_weight and args.distill_from is None:
        parser.error("--distill-logits-weight needs --distill-from")

    device = start_process(args)
    config_name = TOY_CLIPS[args.model][0]
    backbone = load_backbone(args.model, "random")
    backbone.train()
    size = args.image_size or backbone.image_size
    world = ToyWorld(image_size=size)
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir = args.run_dir or Path("runs") / f"pretrain-{args.model}"
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / "checkpoint.pt"
    if args.init_text is not None:
        initialise_tower(backbone, args.init_text, text=True)
    if args.init_image is not None:
        initialise_tower(backbone, args.init_image, text=False)
    if args.temperature is not None:
        with torch.no_grad():
            backbone.model.logit_scale.fill_(math.log(1 / args.temperature))
        backbone.model.logit_scale.requires_grad_(False)
    if args.lock_text:
        for name, parameter in backbone.model.named_parameters():
            if is_text_parameter(name):
                parameter.requires_grad_(False)
    backbone.to(device)

    teacher = None
    if args.distill_from is not None:
        teacher = load_clip(f"local-dir:{args.distill_from}").eval().requires_grad_(False)
        teacher.to(device)
        if teacher.embed_dim != backbone.embed_dim:
            raise ValueError(
                f"the teacher embeds in {teacher.embed_dim} dimensions, the student in "
                f"{backbone.embed_dim}"
            )

    vocabulary = None
    if args.vocabulary_weight or args.distill_logits_weight:
        # Fixed while the text tower is locked: every class's names under the caption templates.
        with torch.no_grad():
            names = tuple((c.name, *c.synonyms) for c in world.classes)
            vocabulary = backbone.encode_text(names, SINGLE_CAPTION_TEMPLATES).mean

    trained = [(n, p) for n, p in backbone.model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trained if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in trained if p.ndim < 2 or "embedding" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    step, previous_seconds = load_checkpoint(checkpoint_path, backbone.model, optimizer)
    schedule = BudgetSchedule(
        steps=args.steps, minutes=args.minutes, warmup=args.warmup, lr=args.lr,
        previous_seconds=previous_seconds,
    )  # fmt: skip

    small = batches(
        world,
        batch_size=args.batch_size,
        image_size=size,
        scene_fraction=args.scene_fraction,
        seed=args.seed + step,
    )
    large_size = int(size * 1.5) // backbone.stride * backbone.stride
    large = batches(
        world,
        batch_size=args.batch_size,
        image_size=large_size,
        scene_fraction=args.scene_fraction,
        seed=args.seed + 10**6 + step,
    )
    rng = np.random.default_rng(args.seed + step)
    log_path = run_dir / "train_log.csv"
    new_log = not log_path.is_file()
    with log_path.open("a", newline="") as log_file:
        log = csv.writer(log_file)
        if new_log:
            log.writerow(["step", "loss", "lr", "logit_scale", "image_size", "seconds"])
        progress = tqdm(total=args.steps, initial=step, desc=f"pretrain {args.model}")
        while step < args.steps:
            lr = schedule.learning_rate(step)
            if lr is None:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr
            use_large = backbone.kind == "vit" and rng.random() < args.large_fraction
            pixels, captions, keys = next(large if use_large else small)
            pixels, keys = pixels.to(device), keys.to(device)
            tokens = backbone.tokenizer(captions).to(device)
            with autocast(args.amp, device):
                image_embeddings = backbone.encode_image(backbone.normalize(pixels))
                image_embeddings = image_embeddings.global_embedding.float()
                with torch.set_grad_enabled(not args.lock_text):
                    text_embeddings = backbone._encode_tokens(tokens).float()
                scale = backbone.model.logit_scale.exp().clamp(max=100)
                loss = contrastive_loss(image_embeddings, text_embeddings, keys, scale)
                if teacher is not None:
                    target = teacher_embeddings(teacher, pixels).float()
                    loss = loss + args.distill_weight * distillation_loss(
                        image_embeddings, teacher, pixels, target
                    )
                if vocabulary is not None:
                    cross_entropy, kl = vocabulary_losses(
                        image_embeddings,
                        vocabulary,
                        keys,
                        scale,
                        target if args.distill_logits_weight else None,  # needs --distill-from
                    )
                    loss = loss + args.vocabulary_weight * cross_entropy
                    loss = loss + args.distill_logits_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in trained], 1.0)
            optimizer.step()
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
            log.writerow(
                [
                    step,
                    f"{loss.item():.4f}",
                    f"{lr:.6f}",
                    f"{scale.item():.2f}",
                    pixels.shape[-1],
                    f"{schedule.elapsed():.1f}",
                ]
            )
            if step % args.checkpoint_every == 0:
                log_file.flush()
                save_checkpoint(
                    checkpoint_path,
                    backbone.model,
                    optimizer,
                    step=step,
                    seconds=schedule.elapsed(),
                )
                save_model(backbone, config_name, args.out)
        progress.close()

    save_model(backbone, config_name, args.out)
    metrics = evaluate_clip(
        backbone,
        world,
        images_per_class=args.eval_images_per_class,
        image_size=size,
        templates=args.eval_templates,
    ).metrics
    metrics.update(
        {
            "steps": step,
            "batch_size": args.batch_size,
            "image_size": size,
            "model": config_name,
            "temperature": args.temperature,
        }
    )
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
