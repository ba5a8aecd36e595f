"""The shipped training commands, by name: what the speed benchmark times and the accelerator
command runs (README "Shipped weights and how they were made" has their full budgets).

A recipe is a script and the arguments that make it the shipped run; :meth:`Recipe.command`
adds the budget, the device, the threads and the output folder. Every run writes into one folder:
``<out>/run`` (``train_log.csv``, checkpoints, evaluation) and ``<out>/model`` (the weights and,
for the pretraining scripts, ``metrics.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Recipe:
    """One shipped training command.

    Attributes:
        name: what the command line calls it (``clip-vit``, ``sam``, ``dpseg``, ...).
        script: the training script, relative to the repository.
        arguments: what makes it the shipped run (for a head: its JSON config).
        batch: scenes (or images, for the CLIPs) per step; 0 for a head, whose config says.
        batch_flag: the pretraining script's option that sets ``batch``.
        small_evaluation: arguments that make the end-of-run evaluation as small as the script
            allows (for timing runs).
    """

    name: str
    script: str
    arguments: tuple[str, ...]
    batch: int = 0
    batch_flag: str = ""
    small_evaluation: tuple[str, ...] = ()

    @property
    def is_head(self) -> bool:
        return self.script == "training/train.py"

    def scenes_per_step(self, root: Path = ROOT) -> int:
        if self.is_head:
            return int(json.loads((root / self.arguments[1]).read_text()).get("batch_size", 4))
        return self.batch

    def log(self, out: Path) -> Path:
        return out / "run" / "train_log.csv"

    def command(
        self,
        out: Path,
        *,
        steps: int | None = None,
        minutes: float | None = None,
        threads: int | None = None,
        device: str | None = None,
        small_evaluation: bool = False,
        checkpoint_every: int | None = None,
        overrides: tuple[str, ...] = (),
    ) -> list[str]:
        """The command line (after the Python interpreter) that runs this recipe into ``out``.

        ``steps``/``minutes`` replace the shipped budget (``minutes=None`` with ``steps``: no
        time limit); ``overrides`` are extra ``--set KEY=VALUE`` for a head or extra arguments
        for a pretraining script.
        """
        if self.is_head:
            settings: dict[str, object] = {"run_dir": str(out / "run")}
            settings["output"] = str(self.model_path(out))
            if steps is not None:
                settings["iterations"] = steps
                settings["minutes"] = minutes  # None: no time limit
            elif minutes is not None:
                settings["minutes"] = minutes
            if threads is not None:
                settings["threads"] = threads
            if checkpoint_every is not None:
                settings["checkpoint_every"] = checkpoint_every
            if small_evaluation:
                settings |= {"log_every": 1, "eval_sets": []}
            command = [self.script, *self.arguments]
            for key, value in settings.items():
                command += ["--set", f"{key}={json.dumps(value)}"]
            for override in overrides:
                command += ["--set", override]
            return command + (["--device", device] if device else [])
        command = [
            self.script,
            *self.arguments,
            self.batch_flag,
        ]
        command += [
            str(self.batch),
            "--out",
            str(self.model_path(out)),
            "--run-dir",
            str(out / "run"),
        ]
        if steps is not None:
            command += ["--steps", str(steps)]
        if minutes is not None:
            command += ["--minutes", str(minutes)]
        if threads is not None:
            command += ["--threads", str(threads)]
        if checkpoint_every is not None:
            command += ["--checkpoint-every", str(checkpoint_every)]
        if device:
            command += ["--device", device]
        if small_evaluation:
            command += list(self.small_evaluation)
        return command + list(overrides)

    def model_path(self, out: Path) -> Path:
        """Where the run's weights go: a folder for a CLIP, a path stem for SAM and the heads."""
        if self.script in ("training/pretrain_clip.py", "training/pretrain_diffusion.py"):
            return out / "model"
        return out / "model" / self.name


def _clip(name: str, *arguments: str) -> Recipe:
    return Recipe(
        name,
        "training/pretrain_clip.py",
        arguments,
        batch=128,
        batch_flag="--batch-size",
        small_evaluation=("--eval-images-per-class", "2"),  # two: same-class image pairs
    )


# The ConvNeXt's distillation stage: the ViT's text tower locked in, the ViT as the teacher.
_KNOWLEDGE_DISTILLATION = (
    "--model", "toy-convnext", "--init-text", "assets/clip-toy-vit", "--lock-text",
    "--distill-from", "assets/clip-toy-vit", "--lr", "5e-4",
)  # fmt: skip

RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        _clip("clip-vit", "--model", "toy-vit", "--large-fraction", "0.15"),
        _clip("clip-convnext", "--model", "toy-convnext"),
        _clip("clip-convnext-kd", *_KNOWLEDGE_DISTILLATION),
        Recipe(
            "diffusion",
            "training/pretrain_diffusion.py",
            (),
            batch=64,
            batch_flag="--batch-size",
            small_evaluation=(
                "--eval-images-per-class",
                "1",
                "--eval-classes",
                "4",
                "--eval-steps",
                "2",
            ),
        ),
        Recipe(
            "sam",
            "training/pretrain_sam.py",
            (),
            batch=8,
            batch_flag="--scenes",
            small_evaluation=("--eval-scenes", "1"),
        ),
        *(
            Recipe(name, "training/train.py", ("--config", f"training/configs/{name}-toy.json"))
            for name in ("dense-clip", "dpseg", "dcp-clip", "esc-net", "ldvc")
        ),
    )
}
