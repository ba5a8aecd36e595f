"""What the pretraining scripts share: a step-or-time budget schedule and resumable checkpoints."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

from ovseg.devices import DEVICES, PRECISIONS, keep_freed_memory, resolve_device


def start_process(args: argparse.Namespace) -> torch.device:
    """Seed, threads and allocator of a pretraining process from its budget arguments; returns
    the device it trains on."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    return resolve_device(args.device)


def add_budget_arguments(parser: argparse.ArgumentParser, *, steps: int, lr: float) -> None:
    """The options every pretraining script takes: budget, optimiser, seed, device,
    checkpoints."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="time budget; the schedule ends at the steps or the minutes, whichever is first",
    )
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--device", choices=DEVICES, default="auto", help="auto: CUDA when there is a GPU"
    )
    parser.add_argument(
        "--amp", choices=PRECISIONS, default="auto", help="auto: bf16 autocast on CUDA, off on CPU"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=100)


class BudgetSchedule:
    """Linear warm-up, then cosine decay over whichever budget runs out first, steps or minutes,
    so a time-boxed run still anneals its learning rate to zero. Time spent before a resume
    counts (``previous_seconds``)."""

    def __init__(
        self,
        *,
        steps: int,
        minutes: float | None,
        warmup: int,
        lr: float,
        previous_seconds: float = 0.0,
    ) -> None:
        self.steps, self.minutes, self.warmup, self.lr = steps, minutes, warmup, lr
        self.previous_seconds = previous_seconds
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return self.previous_seconds + time.perf_counter() - self.started

    def learning_rate(self, step: int) -> float | None:
        """The rate for ``step``, or None once the budget is spent."""
        done = step / self.steps
        if self.minutes is not None:
            done = max(done, self.elapsed() / (self.minutes * 60))
        if done >= 1.0:
            return None
        return self.lr * min(1.0, (step + 1) / self.warmup) * 0.5 * (1 + math.cos(math.pi * done))


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, float]:
    """Resume from ``path`` if it exists; return (step, seconds already spent)."""
    if not path.is_file():
        return 0, 0.0
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), float(state.get("seconds", 0.0))


def save_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, step: int, seconds: float
) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "seconds": seconds,
    }
    torch.save(state, path)
