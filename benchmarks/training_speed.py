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

``--layouts`` says how the runs use the cores, as processes × threads: ``1x2`` (default) is one
process on both cores, ``1x1`` one core (its scenes per second are scenes per CPU-second), ``2x1``
two DDP processes of one thread (torchrun, gloo; heads only), each with half the batch, so a step
still consumes the config's scenes. The last column divides scenes per second by the cores used.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


sys.path.insert(0, str(ROOT))
from training.recipes import RECIPES, Recipe  # noqa: E402


def seconds_per_step(
    recipe: Recipe, root: Path, *, warmup: int, steps: int, layout: tuple[int, int]
) -> float | None:
    """Run ``recipe`` from ``root`` for ``warmup + steps`` steps with ``layout`` = (processes,
    threads); the mean time of the last ``steps`` (None: the layout does not apply)."""
    processes, threads = layout
    if processes > 1 and not recipe.is_head:
        return None
    with tempfile.TemporaryDirectory(prefix=f"speed-{recipe.name}-") as folder:
        out = Path(folder)
        environment = {
            **os.environ,
            "PYTHONPATH": str(root),
            "OMP_NUM_THREADS": str(threads),
            "TQDM_DISABLE": "1",
        }
        overrides = ()
        launcher = [sys.executable]
        if processes > 1:
            batch = recipe.scenes_per_step(root)
            overrides = (f"batch_size={batch // processes}",)
            launcher += ["-m", "torch.distributed.run", "--standalone"]
            launcher += [f"--nproc_per_node={processes}"]
        command = launcher + recipe.command(
            out,
            steps=warmup + steps,
            threads=threads,
            small_evaluation=True,
            checkpoint_every=100_000,
            overrides=overrides,
        )
        result = subprocess.run(
            command, cwd=root, env=environment, capture_output=True, text=True, check=False
        )
        log = recipe.log(out)
        if result.returncode != 0 or not log.is_file():
            raise RuntimeError(
                f"{recipe.name} failed in {root} ({' '.join(command)}):\n{result.stderr[-3000:]}"
            )
        with log.open() as file:
            rows = list(csv.DictReader(file))
    step_key = "step" if "step" in rows[0] else "iteration"
    clock = {int(row[step_key]): float(row["seconds"]) for row in rows}
    return (clock[warmup + steps] - clock[warmup]) / steps


def parse_layout(text: str) -> tuple[int, int]:
    processes, _, threads = text.partition("x")
    return int(processes), int(threads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout to compare with")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--layouts", nargs="+", type=parse_layout, default=[(1, 2)], help="processes x threads"
    )
    args = parser.parse_args(argv)

    roots = {"after": ROOT} if args.baseline is None else {"before": args.baseline, "after": ROOT}
    header = ["config", "layout", "scenes/step"]
    for label in roots:
        header += [f"{label} s/step", f"{label} scenes/s", f"{label} scenes/core-s"]
    if args.baseline is not None:
        header.append("speed-up")
    print(f"{args.warmup} warm-up + {args.steps} timed steps per run")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    started = time.perf_counter()
    for name in args.configs:
        recipe = RECIPES[name]
        for layout in args.layouts:
            scenes = recipe.scenes_per_step(ROOT)
            cells: list[str] = [name, f"{layout[0]}x{layout[1]}", str(scenes)]
            rates = []
            for root in roots.values():
                seconds = seconds_per_step(
                    recipe, root, warmup=args.warmup, steps=args.steps, layout=layout
                )
                if seconds is None:
                    cells += ["n/a"] * 3
                    continue
                rates.append(scenes / seconds)
                cores = layout[0] * layout[1]
                cells += [
                    f"{seconds:.2f}",
                    f"{scenes / seconds:.2f}",
                    f"{scenes / seconds / cores:.2f}",
                ]
            if args.baseline is not None:
                cells.append(f"{rates[1] / rates[0]:.2f}×" if len(rates) == 2 else "n/a")
            print("| " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
