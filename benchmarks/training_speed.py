"""Training throughput of every shipped training config: scenes per second and seconds per step.

Usage::

    python benchmarks/training_speed.py                               # this tree, every config
    python benchmarks/training_speed.py --baseline /tmp/before        # and the same on a worktree
    python benchmarks/training_speed.py --configs dpseg ldvc --steps 4 --warmup 2

``--baseline`` names a checkout of the code to compare with (``git worktree add /tmp/before
<rev>``); every config then runs on both, one after the other, in the same run, so that the
ratio is honest on a shared, noisy machine. Each run is the shipped command itself (the training
scripts' own command lines, README "Shipped weights and how they were made") in a fresh
subprocess, cut to ``--warmup`` + ``--steps`` steps with checkpoints off and the end-of-run
evaluation as small as each script allows. The time of a step is read from the script's own
training log (its ``seconds`` column: wall-clock since the start, data generation included), over
the steps after the warm-up; the step count is ``--steps``, so a step's time has the log's 0.1 s
resolution divided by it. "Scenes" are what one step consumes: ToyWorld scenes for the heads and
SAM, images (single-class crops and whole scenes) for the CLIPs.

``--threads`` (default 2: this machine's cores) is given to every run, before and after alike.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TrainingConfig:
    """One shipped training command, as a function of the run folder, steps and threads.

    ``scenes_per_step`` is the batch the command sets (0 for a head: its JSON config says). Every
    script writes ``train_log.csv`` into its run folder.
    """

    name: str
    scenes_per_step: int

    def command(self, run: Path, steps: int, threads: int) -> list[str]:
        raise NotImplementedError

    def log(self, run: Path) -> Path:
        return run / "run" / "train_log.csv"


@dataclass(frozen=True)
class PretrainConfig(TrainingConfig):
    """A pretraining script (training/common.py's budget options), with its own batch flag and
    the flags that make its final evaluation as small as it allows."""

    script: str = ""
    batch_flag: str = ""
    small_evaluation: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()

    def command(self, run: Path, steps: int, threads: int) -> list[str]:
        return [
            self.script, *self.extra, *self.small_evaluation,
            "--out", str(run / "model"), "--run-dir", str(run / "run"),
            "--steps", str(steps), "--threads", str(threads),
            self.batch_flag, str(self.scenes_per_step), "--checkpoint-every", "100000",
        ]  # fmt: skip


def clip_config(name: str, extra: tuple[str, ...]) -> PretrainConfig:
    return PretrainConfig(
        name,
        128,
        "training/pretrain_clip.py",
        "--batch-size",
        ("--eval-images-per-class", "1"),
        extra,
    )


@dataclass(frozen=True)
class HeadConfig(TrainingConfig):
    config: str = ""

    def command(self, run: Path, steps: int, threads: int) -> list[str]:
        return [
            "training/train.py", "--config", self.config,
            "--set", f"iterations={steps}", "--set", "minutes=null",
            "--set", f"threads={threads}", "--set", "log_every=1",
            "--set", "checkpoint_every=100000", "--set", "eval_sets=[]",
            "--set", f"run_dir={run / 'run'}", "--set", f"output={run / 'final'}",
        ]  # fmt: skip


# The ConvNeXt's distillation stage: the ViT's text tower locked in, the ViT as the teacher.
KNOWLEDGE_DISTILLATION = (
    "--model", "toy-convnext", "--init-text", "assets/clip-toy-vit", "--lock-text",
    "--distill-from", "assets/clip-toy-vit", "--lr", "5e-4",
)  # fmt: skip

CONFIGS: dict[str, TrainingConfig] = {
    config.name: config
    for config in (
        clip_config("clip-vit", ("--model", "toy-vit", "--large-fraction", "0.15")),
        clip_config("clip-convnext", ("--model", "toy-convnext")),
        clip_config("clip-convnext-kd", KNOWLEDGE_DISTILLATION),
        PretrainConfig("sam", 8, "training/pretrain_sam.py", "--scenes", ("--eval-scenes", "1")),
        *(
            HeadConfig(name, 0, f"training/configs/{name}-toy.json")
            for name in ("dense-clip", "dpseg", "dcp-clip", "esc-net", "ldvc")
        ),
    )
}


def batch_size(config: TrainingConfig, root: Path) -> int:
    """A head's batch size from its JSON config (the others set theirs on the command line)."""
    if isinstance(config, HeadConfig):
        return int(json.loads((root / config.config).read_text()).get("batch_size", 4))
    return config.scenes_per_step


def seconds_per_step(
    config: TrainingConfig, root: Path, *, warmup: int, steps: int, threads: int
) -> float:
    """Run ``config`` from ``root`` for ``warmup + steps`` steps; the mean time of the last
    ``steps``."""
    with tempfile.TemporaryDirectory(prefix=f"speed-{config.name}-") as folder:
        run = Path(folder)
        environment = {
            **os.environ,
            "PYTHONPATH": str(root),
            "OMP_NUM_THREADS": str(threads),
            "TQDM_DISABLE": "1",
        }
        command = [sys.executable, *config.command(run, warmup + steps, threads)]
        result = subprocess.run(
            command, cwd=root, env=environment, capture_output=True, text=True, check=False
        )
        log = config.log(run)
        if result.returncode != 0 or not log.is_file():
            raise RuntimeError(
                f"{config.name} failed in {root} ({' '.join(command)}):\n{result.stderr[-3000:]}"
            )
        with log.open() as file:
            rows = list(csv.DictReader(file))
    step_key = "step" if "step" in rows[0] else "iteration"
    clock = {int(row[step_key]): float(row["seconds"]) for row in rows}
    return (clock[warmup + steps] - clock[warmup]) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout to compare with")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    roots = {"after": ROOT} if args.baseline is None else {"before": args.baseline, "after": ROOT}
    header = ["config", "scenes/step"]
    for label in roots:
        header += [f"{label} s/step", f"{label} scenes/s"]
    if args.baseline is not None:
        header.append("speed-up")
    print(f"{args.threads} threads, {args.warmup} warm-up + {args.steps} timed steps per run")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    started = time.perf_counter()
    for name in args.configs:
        config = CONFIGS[name]
        cells: list[str] = [name]
        rates = []
        for root in roots.values():
            scenes = batch_size(config, root)
            seconds = seconds_per_step(
                config, root, warmup=args.warmup, steps=args.steps, threads=args.threads
            )
            rates.append(scenes / seconds)
            if len(cells) == 1:
                cells.append(str(scenes))
            cells += [f"{seconds:.2f}", f"{scenes / seconds:.2f}"]
        if args.baseline is not None:
            cells.append(f"{rates[1] / rates[0]:.2f}×")
        print("| " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
