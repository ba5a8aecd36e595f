"""Train any registered method on any dataset: one trainer, configured by a JSON file.

    python training/train.py --config training/configs/dense-clip-toy.json
    torchrun --nproc_per_node=2 training/train.py --config training/configs/dense-clip-toy.json
    python training/train.py --config ... --set iterations=20 --set batch_size=2   # overrides

Runs on a CPU or on GPUs (torchrun → DistributedDataParallel, gloo on CPU, nccl on CUDA), with
mixed precision where the device has it, the method's own optimiser groups (e.g. CLIP at 2e-6,
new layers at 2e-4), a checkpoint every ``checkpoint_every`` iterations that a rerun of the same
command resumes from, a tqdm bar, a CSV of losses and learning rates, and fixed seeds. The final
weights go to ``output`` as safetensors with the config beside them; evaluation runs at the end
on the configured sets.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import ovseg
from ovseg.data.datasets import DATASETS, build_training_data
from ovseg.data.toyworld import ToyWorld, ToyWorldDataset
from ovseg.devices import DEVICES, autocast, keep_freed_memory, resolve_device
from ovseg.eval.evaluate import evaluate_toyworld, markdown_table, toyworld_vocabulary
from ovseg.methods.base import IGNORE_INDEX
from ovseg.methods.weights import save_weights


@dataclass
class TrainConfig:
    """Everything a training run needs; JSON files in ``training/configs`` fill it in.

    Attributes:
        method: registry name of the method.
        method_config: fields of the method's config dataclass (backbone, input_size, ...).
        dataset: ``{"name": "toyworld", "split": "seen", "image_size": 256}``; other datasets
            plug in through :func:`build_dataset`.
        iterations: optimiser steps.
        batch_size: images per step per process.
        base_lr: the method's base learning rate; its ``parameter_groups`` scale it per group.
        weight_decay: AdamW weight decay.
        warmup: linear warm-up steps, then cosine decay to zero (``schedule="cosine"``) or
            polynomial decay (``"poly"``, detectron2's WarmupPolyLR with power 0.9).
        device: ``"auto"`` (CUDA when there is a GPU), ``"cpu"`` or ``"cuda"``.
        amp: ``"auto"`` (bf16 autocast on CUDA, off on CPU), ``"off"``, ``"bf16"`` or ``"fp16"``.
        num_workers: DataLoader worker processes rendering scenes beside the training step (0:
            in the step; a GPU needs several to be fed, a 2-core CPU none). Workers take
            interleaved parts of the scene stream, so a batch's scenes depend on the count.
        seed: seeds Python, NumPy and torch; ranks offset it.
        checkpoint_every: iterations between checkpoints.
        run_dir: checkpoints and logs.
        output: path stem of the final weights (``<output>.safetensors`` + ``.json``).
        eval_sets: ToyWorld sets evaluated at the end.
        eval_images: images per evaluation set.
        threads: torch CPU threads per process (None: torch's default).
        classes_per_step: if set, each step trains on the classes present in the batch plus
            random other training classes up to this many (a cost measure for large training
            vocabularies on a CPU; every class still competes with many negatives).
        output_dtype: ``"float16"`` stores the final weights in half precision (the shipped toy
            heads, to keep ``assets/`` small); None keeps the training dtype.
        minutes: optional time budget; training stops at ``iterations`` or after this many
            minutes (time before a resume counts), whichever comes first, and the learning-rate
            schedule runs over that budget so a time-boxed run still decays to zero.
    """

    method: str
    method_config: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=lambda: {"name": "toyworld", "split": "seen"})
    iterations: int = 1000
    batch_size: int = 4
    base_lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup: int = 50
    schedule: str = "cosine"
    grad_clip: float | None = 1.0
    device: str = "auto"
    amp: str = "auto"
    num_workers: int = 0
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    run_dir: str = "runs/train"
    output: str | None = None
    eval_sets: list[str] = field(default_factory=lambda: ["toy-open"])
    eval_images: int = 100
    threads: int | None = None
    classes_per_step: int | None = None
    minutes: float | None = None
    output_dtype: str | None = None

    @classmethod
    def from_file(cls, path: Path, overrides: list[str]) -> TrainConfig:
        values = json.loads(path.read_text())
        for override in overrides:
            key, _, raw = override.partition("=")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            target = values
            *parents, leaf = key.split(".")
            for parent in parents:
                target = target.setdefault(parent, {})
            target[leaf] = value
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown training settings {sorted(unknown)}.")
        return cls(**values)


def setup_distributed(device_name: str = "auto") -> tuple[int, int, torch.device]:
    """Initialise torch.distributed when launched by torchrun; return (rank, world size, device).

    ``device_name`` is ``"auto"`` (CUDA when there is a GPU), ``"cpu"`` or ``"cuda"``.
    """
    device = resolve_device(device_name)
    if "RANK" not in os.environ:
        return 0, 1, device
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return rank, world_size, torch.device("cuda", local_rank)
    return rank, world_size, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_dataset(
    spec: dict[str, Any], seed: int, start: int = 0
) -> tuple[torch.utils.data.IterableDataset, list, np.ndarray]:
    """The dataset (items with "image" and "labels"), the training vocabulary, and the map from
    dataset labels to vocabulary indices (ignore for classes outside the vocabulary).

    ``start`` is how many items the run has already consumed (all ranks together): a resumed
    ToyWorld run continues the very stream it left, so it never repeats a scene and never runs
    past the training seeds however far it got. A real dataset reshuffles with ``seed + start``.

    ``spec["name"]`` is ``"toyworld"`` or a real dataset of :data:`ovseg.data.datasets.DATASETS`
    (e.g. ``{"name": "coco-stuff-164k", "split": "train2017", "crop_size": 384}``; see
    :func:`ovseg.data.datasets.build_training_data` for its keys).
    """
    name = spec.get("name", "toyworld")
    if name in DATASETS:
        return build_training_data(spec, seed + start, ignore_index=IGNORE_INDEX)
    if name != "toyworld":
        raise ValueError(f"Unknown dataset {name!r}; available: toyworld, {', '.join(DATASETS)}.")
    image_size = int(spec.get("image_size", 256))
    split = spec.get("split", "seen")
    world = ToyWorld(image_size=image_size)
    class_ids = world.seen_class_ids if split == "seen" else list(range(len(world.classes)))
    if len(class_ids) > IGNORE_INDEX:
        # Targets mark unlabelled pixels with IGNORE_INDEX, which would then also be a class.
        raise ValueError(
            f"ToyWorld's {split!r} split has {len(class_ids)} training classes; the trainer's "
            f"ignore index {IGNORE_INDEX} limits training to {IGNORE_INDEX}."
        )
    vocabulary = toyworld_vocabulary(world, class_ids)
    to_index = np.full(len(world.classes), IGNORE_INDEX, dtype=np.int64)
    to_index[class_ids] = np.arange(len(class_ids))
    dataset = ToyWorldDataset(split=split, image_size=image_size, base_seed=seed * 10**6 + start)
    return dataset, vocabulary, to_index


def sample_classes(
    target: torch.Tensor, num_classes: int, limit: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the classes present in ``target`` plus random others up to ``limit``.

    Returns the chosen vocabulary indices and ``target`` re-indexed into them.
    """
    valid = target[target != IGNORE_INDEX]
    present = torch.unique(valid.cpu())
    absent = torch.ones(num_classes, dtype=torch.bool)
    absent[present] = False
    others = torch.nonzero(absent).flatten()
    others = others[torch.randperm(len(others), generator=generator)][
        : max(0, limit - len(present))
    ]
    chosen = torch.cat([present, others])
    remap = torch.full((num_classes + 1,), IGNORE_INDEX, dtype=torch.long)
    remap[chosen] = torch.arange(len(chosen))
    safe_target = torch.where(target == IGNORE_INDEX, num_classes, target).cpu()
    return chosen, remap[safe_target].to(target.device)


def learning_rate_factor(config: TrainConfig, iteration: int, seconds: float = 0.0) -> float:
    """Warm-up then decay; progress is the larger of the step and the time fraction."""
    warm = min(1.0, (iteration + 1) / max(1, config.warmup))
    progress = iteration / max(1, config.iterations)
    if config.minutes:
        progress = max(progress, seconds / (config.minutes * 60))
    progress = min(progress, 1.0)
    if config.schedule == "poly":
        return warm * (1 - progress) ** 0.9
    return warm * 0.5 * (1 + math.cos(math.pi * progress))


def save_training_state(
    path: Path,
    method: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    iteration: int,
    seconds: float,
) -> None:
    """Write a checkpoint atomically, so an interrupted write never leaves a broken resume."""
    state = {
        "model": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "iteration": iteration,
        "seconds": seconds,
    }
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)


def train(config: TrainConfig) -> dict[str, Any]:
    rank, world_size, device = setup_distributed(config.device)
    keep_freed_memory()
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed + rank)
    run_dir = Path(config.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.__dict__, indent=2) + "\n")

    method = ovseg.load(config.method, device=device, **config.method_config)
    method.train()
    groups = method.parameter_groups(config.base_lr)
    if not any(group["params"] for group in groups):
        raise ValueError(
            f"{config.method} has nothing to train with {config.method_config}; "
            "check the method's options (e.g. dense-clip needs finetune='attention')."
        )
    for group in groups:
        group["initial_lr"] = group["lr"]
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    model = method
    if world_size > 1:
        model = DistributedDataParallel(
            method,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )

    iteration, previous_seconds = 0, 0.0
    checkpoint_path = run_dir / "checkpoint.pt"
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        iteration = int(state["iteration"])
        previous_seconds = float(state.get("seconds", 0.0))

    consumed = iteration * config.batch_size * world_size
    dataset, vocabulary, to_index = build_dataset(config.dataset, config.seed, consumed)
    loader = iter(
        torch.utils.data.DataLoader(
            dataset,
            batch_size=config.batch_size,
            num_workers=config.num_workers,
            pin_memory=device.type == "cuda",
        )
    )
    to_index = torch.from_numpy(to_index)
    input_size = method.config.input_size
    sampler = torch.Generator().manual_seed(config.seed * 1000 + rank + iteration)

    log_file = (run_dir / "train_log.csv").open("a", newline="") if rank == 0 else None
    log = csv.writer(log_file) if log_file else None
    progress = tqdm(
        total=config.iterations, initial=iteration, desc=f"train {config.method}", disable=rank != 0
    )
    started = time.perf_counter()

    def elapsed() -> float:
        return previous_seconds + time.perf_counter() - started

    budget = float("inf") if not config.minutes else config.minutes * 60
    while iteration < config.iterations:
        seconds = elapsed()
        if world_size > 1 and config.minutes:
            # Every rank must stop at the same iteration: rank 0's clock decides.
            clock = torch.tensor([seconds], dtype=torch.float64)
            dist.broadcast(clock, src=0)
            seconds = float(clock.item())
        if seconds >= budget:
            break
        factor = learning_rate_factor(config, iteration, seconds)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        batch = next(loader)
        images = batch["image"].to(device)
        target = to_index[batch["labels"]].to(device)
        if images.shape[-1] != input_size:
            images = torch.nn.functional.interpolate(
                images, size=(input_size, input_size), mode="bilinear"
            )
        step_vocabulary = vocabulary
        if config.classes_per_step:
            chosen, target = sample_classes(
                target, len(vocabulary), config.classes_per_step, sampler
            )
            step_vocabulary = [vocabulary[i] for i in chosen.tolist()]
        with autocast(config.amp, device):
            output = model(images, step_vocabulary, target=target)
            losses = method.loss(output, target)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for g in groups for p in g["params"]], config.grad_clip
            )
        scaler.step(optimizer)
        scaler.update()
        iteration += 1
        progress.update(1)
        if log is not None:
            if iteration in (1, config.iterations) or iteration % config.log_every == 0:
                row = {"iteration": iteration, "loss": f"{loss.item():.4f}"}
                row |= {name: f"{value.item():.4f}" for name, value in losses.items()}
                row |= {
                    f"lr_{g.get('name', i)}": f"{g['lr']:.2e}"
                    for i, g in enumerate(optimizer.param_groups)
                }
                row["seconds"] = f"{elapsed():.1f}"
                if log_file.tell() == 0:
                    log.writerow(list(row))
                log.writerow(list(row.values()))
                progress.set_postfix(loss=row["loss"])
            if iteration % config.checkpoint_every == 0 or iteration == config.iterations:
                log_file.flush()
                save_training_state(checkpoint_path, method, optimizer, iteration, elapsed())
    progress.close()
    if rank == 0 and iteration != config.iterations:
        # Stopped by the time budget: save the clock too, even if this iteration's checkpoint was
        # written a moment before the budget ran out, so that a rerun does not train one more step.
        save_training_state(checkpoint_path, method, optimizer, iteration, elapsed())

    results: dict[str, Any] = {"iterations": iteration, "world_size": world_size}
    if rank == 0:
        log_file.close()
        output = config.output or str(run_dir / "final")
        dtype = getattr(torch, config.output_dtype) if config.output_dtype else None
        results["weights"] = str(save_weights(method, output, dtype=dtype))
        method.eval()
        method.trained_head = True
        rows = [
            evaluate_toyworld(method, name, num_images=config.eval_images).row()
            for name in config.eval_sets
        ]
        results["evaluation"] = rows
        (run_dir / "evaluation.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(markdown_table(rows))
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting (JSON value; dotted keys reach into dicts)",
    )
    parser.add_argument(
        "--device", choices=DEVICES, default=None, help="overrides the config's device (auto)"
    )
    args = parser.parse_args(argv)
    config = TrainConfig.from_file(args.config, args.set)
    if args.device is not None:
        config.device = args.device
    return train(config)


if __name__ == "__main__":
    main()
