"""Train one shipped recipe for a fixed number of minutes on the accelerator at hand, into one
folder: the command to run when a GPU machine is lent (one H200, 16 cores, no network) for
about 15 minutes at a time.

    python training/accelerator.py dpseg --minutes 8 --out runs/gpu/dpseg
    python training/accelerator.py clip-vit --minutes 8 --out runs/gpu/clip-vit --batch 512
    python training/accelerator.py ldvc --minutes 8 --out runs/gpu/ldvc --set batch_size=16

Recipes are those of ``training/recipes.py`` (the shipped commands). The run stops at its time
budget, and its learning-rate schedule anneals over it; ``--steps`` caps it as well. On CUDA it
runs with bf16 autocast and DataLoader workers rendering scenes beside the step; on a CPU it is the
shipped command with a time budget, which is what CI runs (tests/test_training.py).

Everything lands in ``--out``: ``run/`` (``train_log.csv``, checkpoints: rerunning the same
command resumes), ``model/`` (the weights, and the CLIPs' ``metrics.json``), ``train.log`` (the
script's output) and ``summary.json`` (the command, the machine, steps, scenes per second and the
evaluation). The machine has PyTorch but no network: ``--wheels DIR`` first installs what is
missing from wheels fetched here without PyTorch (``pip download --no-deps -d wheels
open_clip_torch timm segment-anything diffusers safetensors ftfy regex huggingface_hub``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.recipes import RECIPES, ROOT, Recipe

# What ovseg imports beyond PyTorch and NumPy, by module name → the wheel that provides it.
REQUIRED_MODULES = {
    "open_clip": "open_clip_torch",
    "timm": "timm",
    "segment_anything": "segment-anything",
    "diffusers": "diffusers",
    "safetensors": "safetensors",
}


def install_missing(wheels: Path) -> list[str]:
    """Install, from the wheel folder ``wheels`` and without network, the packages whose modules
    are missing (ovseg itself runs from this checkout); returns what was installed."""
    missing = [
        package
        for module, package in REQUIRED_MODULES.items()
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--no-index",
                "--find-links",
                str(wheels),
                *missing,
            ],
            check=True,
        )
    return missing


def machine() -> dict[str, object]:
    info: dict[str, object] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def read_log(recipe: Recipe, out: Path) -> tuple[int, float]:
    """(steps, seconds) of the last row of the run's training log."""
    log = recipe.log(out)
    if not log.is_file():
        return 0, 0.0
    with log.open() as file:
        rows = list(csv.DictReader(file))
    if not rows:
        return 0, 0.0
    step_key = "step" if "step" in rows[-1] else "iteration"
    return int(rows[-1][step_key]), float(rows[-1]["seconds"])


def read_metrics(recipe: Recipe, out: Path) -> object:
    """The run's end-of-training evaluation, wherever its script writes it."""
    model = recipe.model_path(out)
    for path in (
        out / "run" / "evaluation.json",  # the heads
        model / "metrics.json" if model.is_dir() else model.with_suffix(".metrics.json"),
    ):
        if path.is_file():
            return json.loads(path.read_text())
    return None


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe", choices=sorted(RECIPES))
    parser.add_argument("--minutes", type=float, required=True, help="the time budget")
    parser.add_argument("--out", type=Path, required=True, help="the one output folder")
    parser.add_argument("--steps", type=int, default=1_000_000, help="a step cap as well")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: every core)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="a head's scene-rendering DataLoader workers (default: cores - 2 on CUDA, 0 on CPU)",
    )
    parser.add_argument("--batch", type=int, default=None, help="a pretraining script's batch")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a head's config setting"
    )
    parser.add_argument("--wheels", type=Path, default=None, help="offline wheels to install")
    parser.epilog = "Arguments after -- go to a pretraining script as they are."
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.extra = argv[cut + 1 :]

    recipe = RECIPES[args.recipe]
    if args.wheels is not None:
        install_missing(args.wheels)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    cores = os.cpu_count() or 1
    threads = args.threads or (min(4, cores) if cuda else cores)
    if recipe.is_head:
        if args.batch is not None:
            parser.error("a head's batch is a config setting: --set batch_size=N")
        workers = args.workers if args.workers is not None else (max(0, cores - 2) if cuda else 0)
        overrides = (*args.set, f"num_workers={workers}")
    else:
        if args.set:
            parser.error("--set is for heads; pass a pretraining script's options after --")
        overrides = tuple(args.extra)
        if args.batch is not None:
            recipe = dataclasses.replace(recipe, batch=args.batch)
    args.out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        *recipe.command(
            args.out.resolve(),
            steps=args.steps,
            minutes=args.minutes,
            threads=threads,
            device=args.device,
            overrides=overrides,
        ),
    ]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_MININTERVAL": "10"}
    started = time.perf_counter()
    with (args.out / "train.log").open("a") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        result = subprocess.run(command, cwd=ROOT, env=environment, stdout=log, stderr=log)
    wall = time.perf_counter() - started
    steps, seconds = read_log(recipe, args.out)
    scenes = recipe.scenes_per_step(ROOT)
    if recipe.is_head:
        for override in args.set:
            key, _, value = override.partition("=")
            if key == "batch_size":
                scenes = int(value)
    summary = {
        "recipe": recipe.name,
        "command": command,
        "returncode": result.returncode,
        "machine": machine(),
        "wall_seconds": round(wall, 1),
        "steps": steps,
        "training_seconds": seconds,
        "scenes_per_step": scenes,
        "scenes_per_second": round(steps * scenes / seconds, 2) if seconds else None,
        "evaluation": read_metrics(recipe, args.out),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "command"}, indent=2))
    if result.returncode != 0:
        raise SystemExit(
            f"{recipe.name} failed (exit {result.returncode}); see {args.out}/train.log"
        )
    return summary


if __name__ == "__main__":
    main()
