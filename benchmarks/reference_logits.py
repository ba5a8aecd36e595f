"""Every method's logits on fixed scenes and vocabularies, saved once and compared later.

A refactor that must not change behaviour (one file per paper, shared machinery written once)
is checked by saving the logits at the commit before it and comparing after::

    git worktree add /tmp/before <commit>   # the code before the change
    (cd /tmp/before && python /path/to/benchmarks/reference_logits.py --save /tmp/refs.safetensors)
    python benchmarks/reference_logits.py --check /tmp/refs.safetensors

It prints one row per case: the largest absolute difference of the logits and whether it is
within ``--tolerance`` (1e-6). The cases are the shipped heads (DPSeg pass I and pass II), the
training-free paths (dense CLIP; DPSeg, DCP-CLIP and ESC-Net with their heads off) and a head
built on a random toy CLIP with a fixed seed, on 2 ToyWorld scenes with a short vocabulary and
all 312 classes. Everything runs on one thread so that reductions run in the same order.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import ovseg
from ovseg.backbones import load_backbone
from ovseg.data.toyworld import ToyWorld

SHORT = ["cat", "dog", "sky", "grass", "road", "brick wall", "car", "tree", "water", "pizza"]


def scenes(count: int = 2, size: int = 256) -> torch.Tensor:
    world = ToyWorld(image_size=size)
    images = [world.scene(seed).image for seed in range(count)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def all_classes() -> list[tuple[str, ...]]:
    world = ToyWorld(image_size=32)
    return [(c.name, *c.synonyms) for c in world.classes]


def shipped(name: str, **options) -> Callable[[], ovseg.SegmentationMethod]:
    return lambda: ovseg.load(name, **options)


def training_free(name: str, **options) -> Callable[[], ovseg.SegmentationMethod]:
    def build() -> ovseg.SegmentationMethod:
        method = ovseg.load(name, **options)
        method.trained_head = False
        return method

    return build


def random_head(name: str, backbone: str, **options) -> Callable[[], ovseg.SegmentationMethod]:
    def build() -> ovseg.SegmentationMethod:
        torch.manual_seed(0)
        clip = load_backbone(backbone, "random")
        torch.manual_seed(1)
        method = ovseg.load(name, backbone=clip, **options)
        method.trained_head = True
        return method

    return build


# case name → (builder, segment options, vocabularies)
CASES: dict[str, tuple[Callable[[], ovseg.SegmentationMethod], dict, tuple[str, ...]]] = {
    "dense-clip": (shipped("dense-clip"), {}, ("short", "all")),
    "dpseg I": (shipped("dpseg"), {"inference": "I"}, ("short", "all")),
    "dpseg II": (shipped("dpseg"), {"inference": "II"}, ("short",)),
    "dpseg training-free": (training_free("dpseg"), {}, ("short",)),
    "dcp-clip": (shipped("dcp-clip"), {}, ("short", "all")),
    "dcp-clip training-free": (training_free("dcp-clip"), {}, ("short",)),
    "esc-net": (shipped("esc-net"), {}, ("short",)),
    "esc-net training-free": (training_free("esc-net"), {}, ("short",)),
    "ldvc": (shipped("ldvc"), {}, ("short", "all")),
    "dcp-clip random head": (
        random_head("dcp-clip", "toy-vit", input_size=128, window_size=8),
        {},
        ("short",),
    ),
    "esc-net random head": (
        random_head("esc-net", "toy-vit", input_size=128, window_size=8),
        {},
        ("short",),
    ),
    "ldvc random head": (
        random_head("ldvc", "toy-vit", input_size=128, visual_prompt_tokens=16, top_m=4),
        {},
        ("short",),
    ),
}


def compute(cases: list[str]) -> dict[str, torch.Tensor]:
    images = scenes()
    vocabularies = {"short": SHORT, "all": all_classes()}
    results = {}
    for case in cases:
        build, options, names = CASES[case]
        method = build().eval()
        size = method.config.input_size
        pixels = F.interpolate(  # as the Predictor resizes an image
            images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        for vocabulary in names:
            with torch.no_grad():
                output = method(pixels, vocabularies[vocabulary], **options)
            results[f"{case} | {vocabulary}"] = output.logits.float().contiguous()
            print(f"computed {case} | {vocabulary}", file=sys.stderr, flush=True)
        del method
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--save", type=Path, help="write the references to this file")
    action.add_argument("--check", type=Path, help="compare with the references in this file")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument(
        "--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="CASE",
        help=f"which cases (default: all of {', '.join(CASES)})",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    from safetensors.torch import load_file, save_file

    results = compute(args.cases)
    if args.save is not None:
        save_file(results, args.save)
        print(f"saved {len(results)} logit tensors to {args.save}")
        return
    references = {
        key: value
        for key, value in load_file(args.check).items()
        if key.split(" | ")[0] in args.cases
    }
    print("| case | vocabulary | shape | max abs diff | within tolerance |")
    print("|---|---|---|---:|---|")
    failed = 0
    for key in sorted(set(references) | set(results)):
        case, vocabulary = key.split(" | ")
        if key not in results or key not in references:
            print(f"| {case} | {vocabulary} | – | missing | no |")
            failed += 1
            continue
        ours, theirs = results[key], references[key]
        if ours.shape != theirs.shape:
            print(
                f"| {case} | {vocabulary} | {tuple(ours.shape)} ≠ {tuple(theirs.shape)} | – | no |"
            )
            failed += 1
            continue
        difference = float((ours - theirs).abs().max())
        within = difference <= args.tolerance
        failed += not within
        print(
            f"| {case} | {vocabulary} | {tuple(ours.shape)} | {difference:.2e} "
            f"| {'yes' if within else 'no'} |"
        )
    print(f"\n{len(results) - failed} of {len(results)} within {args.tolerance:g}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
