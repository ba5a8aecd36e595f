"""Which models the demo loads, from command-line flags and environment variables.

Every flag has an environment variable, so a Hugging Face Space (which runs ``app.py`` without
arguments) is configured in its settings. Per-method values are written ``METHOD=VALUE``; a value
without ``METHOD=`` applies to every method.

- ``--methods a,b`` / ``OVSEG_METHODS``: methods to load (default: all).
- ``--backbone [M=]NAME`` / ``OVSEG_BACKBONE``: CLIP alias or open_clip name.
- ``--pretrained [M=]TAG`` / ``OVSEG_PRETRAINED``: CLIP weights, an open_clip tag or a path.
- ``--weights M=PATH`` / ``OVSEG_WEIGHTS``: a trained head (``.safetensors``).
- ``--sam-checkpoint PATH`` / ``OVSEG_SAM_CHECKPOINT``: SAM weights for ESC-Net.
- ``--device DEVICE`` / ``OVSEG_DEVICE``: ``cpu`` (default), ``cuda``, ``mps``.
- ``--concurrency N`` / ``OVSEG_CONCURRENCY``: requests run at once (default 1).
- ``--max-sessions N`` / ``OVSEG_MAX_SESSIONS``: visitor sessions kept in memory (default 64; the
  oldest is dropped, with its files, when a new one would exceed it).

Environment variables take the same syntax, with several assignments separated by spaces or
commas: ``OVSEG_WEIGHTS="dpseg=heads/dpseg-b.safetensors ldvc=heads/ldvc.safetensors"``. Flags
are read after the variables, so a flag wins over a variable for the same method.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ovseg
from ovseg.backbones import WeightsError
from ovseg.methods import SegmentationMethod

ALL_METHODS = "*"
# Methods that cannot segment at all without trained head weights (DESIGN.md §5).
NO_TRAINING_FREE_PATH = ("ldvc",)


@dataclass
class DemoSettings:
    """What to load and how to serve it.

    Attributes:
        methods: method names to load, in display order.
        backbones, pretrained, weights: method name (or ``"*"`` for all) → value.
        sam_checkpoint: SAM weights for ESC-Net (None: the shipped toy SAM).
        device: torch device for every model.
        concurrency: how many requests run at once (the queue holds the rest).
        max_sessions: visitor sessions kept in memory; each holds its image's features.
    """

    methods: list[str] = field(default_factory=ovseg.list_methods)
    backbones: dict[str, str] = field(default_factory=dict)
    pretrained: dict[str, str] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)
    sam_checkpoint: str | None = None
    device: str = "cpu"
    concurrency: int = 1
    max_sessions: int = 64

    def value_for(self, table: Mapping[str, str], method: str) -> str | None:
        """A per-method value, falling back to the one given for all methods."""
        return table.get(method, table.get(ALL_METHODS))


@dataclass
class LoadedMethods:
    """The methods that loaded and a plain-language status line for every method asked for.

    Attributes:
        methods: display name → method, ready to run.
        status: method name → status (trained head, training-free, or why it is unavailable).
    """

    methods: dict[str, SegmentationMethod]
    status: dict[str, str]


def parse_assignments(values: Sequence[str], *, option: str) -> dict[str, str]:
    """``["dpseg=a", "b"]`` → ``{"dpseg": "a", "*": "b"}``, checking the method names."""
    known = set(ovseg.list_methods())
    table = {}
    for value in values:
        method, separator, setting = value.partition("=")
        if not separator:
            method, setting = ALL_METHODS, value
        method, setting = method.strip(), setting.strip()
        if method != ALL_METHODS and method not in known:
            raise ValueError(
                f"{option} {value!r} names the unknown method {method!r}; "
                f"known: {', '.join(sorted(known))}."
            )
        if not setting:
            raise ValueError(f"{option} {value!r} has no value.")
        table[method] = setting
    return table


def _environment_list(name: str) -> list[str]:
    return os.environ.get(name, "").replace(",", " ").split()


def argument_parser() -> argparse.ArgumentParser:
    """The demo's command line (``python app.py --help``)."""
    parser = argparse.ArgumentParser(
        description="Launch the ovseg demo.",
        epilog="Every option also reads an environment variable; see ovseg/demo/settings.py.",
    )
    # Hugging Face Spaces set GRADIO_SERVER_NAME/PORT; locally the demo stays on loopback.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument(
        "--methods",
        default=os.environ.get("OVSEG_METHODS", ",".join(ovseg.list_methods())),
        help="comma-separated methods to load (default: all)",
    )
    parser.add_argument(
        "--backbone",
        action="append",
        default=_environment_list("OVSEG_BACKBONE"),
        metavar="[METHOD=]NAME",
        help="CLIP alias or open_clip name, e.g. vit-b-16, or dpseg=convnext-b (repeatable)",
    )
    parser.add_argument(
        "--pretrained",
        action="append",
        default=_environment_list("OVSEG_PRETRAINED"),
        metavar="[METHOD=]TAG",
        help="CLIP weights: open_clip tag (openai) or a checkpoint path (repeatable)",
    )
    parser.add_argument(
        "--weights",
        action="append",
        default=_environment_list("OVSEG_WEIGHTS"),
        metavar="METHOD=PATH",
        help="trained head weights (.safetensors written by training/train.py; repeatable)",
    )
    parser.add_argument(
        "--sam-checkpoint",
        default=os.environ.get("OVSEG_SAM_CHECKPOINT"),
        help="SAM weights for ESC-Net (e.g. sam_vit_b_01ec64.pth; default: the toy SAM)",
    )
    parser.add_argument("--device", default=os.environ.get("OVSEG_DEVICE", "cpu"))
    parser.add_argument(
        "--concurrency",
        type=int,
        default=int(os.environ.get("OVSEG_CONCURRENCY", 1)),
        help="requests processed at once; the queue holds the others (default 1)",
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=int(os.environ.get("OVSEG_MAX_SESSIONS", 64)),
        help="visitor sessions kept in memory; the oldest is dropped first (default 64)",
    )
    return parser


def settings_from_arguments(arguments: argparse.Namespace) -> DemoSettings:
    """Check parsed arguments and turn them into :class:`DemoSettings`."""
    methods = [name.strip() for name in arguments.methods.split(",") if name.strip()]
    unknown = [name for name in methods if name not in ovseg.list_methods()]
    if unknown or not methods:
        raise ValueError(
            f"--methods must name some of {', '.join(ovseg.list_methods())}; got "
            f"{arguments.methods!r}."
        )
    if arguments.concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1; got {arguments.concurrency}.")
    if arguments.max_sessions < 1:
        raise ValueError(f"--max-sessions must be at least 1; got {arguments.max_sessions}.")
    weights = parse_assignments(arguments.weights, option="--weights")
    if ALL_METHODS in weights:
        raise ValueError("--weights must name its method: --weights dpseg=PATH.")
    return DemoSettings(
        methods=methods,
        backbones=parse_assignments(arguments.backbone, option="--backbone"),
        pretrained=parse_assignments(arguments.pretrained, option="--pretrained"),
        weights=weights,
        sam_checkpoint=arguments.sam_checkpoint,
        device=arguments.device,
        concurrency=arguments.concurrency,
        max_sessions=arguments.max_sessions,
    )


def describe(method: SegmentationMethod) -> str:
    """One line saying which path a loaded method runs."""
    if method.trained_head:
        return "trained head"
    if method.name in NO_TRAINING_FREE_PATH:
        return (
            f"{method.name.upper()} has no trained weights here and no training-free path; "
            f"train with `python training/train.py --config training/configs/"
            f"{method.name}-toy.json` and start the demo with `--weights "
            f"{method.name}=PATH`"
        )
    return "training-free path (no trained head weights here)"


def load_methods(settings: DemoSettings) -> LoadedMethods:
    """Load every method the settings name; a method that cannot load is reported, not raised."""
    methods, status = {}, {}
    for name in settings.methods:
        options: dict[str, Any] = {"device": settings.device}
        backbone = settings.value_for(settings.backbones, name)
        pretrained = settings.value_for(settings.pretrained, name)
        if backbone is not None:
            options["backbone"] = backbone
        if pretrained is not None:
            options["pretrained"] = pretrained
        if name in settings.weights:
            options["weights"] = settings.weights[name]
        if name == "esc-net" and settings.sam_checkpoint is not None:
            options["sam_checkpoint"] = settings.sam_checkpoint
        try:
            method = ovseg.load(name, **options)
        except (WeightsError, ValueError, OSError, RuntimeError) as error:
            status[name] = f"unavailable: {error}"
            continue
        methods[name] = method
        status[name] = describe(method)
    return LoadedMethods(methods=methods, status=status)
