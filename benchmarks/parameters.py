"""Parameter counts of every method at the papers' scale, against the papers' own figures.

Usage::

    python benchmarks/parameters.py                 # every method at real scale (random weights)
    python benchmarks/parameters.py --scales toy    # the ToyWorld configurations only

Models are built with random weights (open_clip names without a pretrained tag; the count does
not depend on the weights). "Learnable" is what the
method's optimiser groups train (``requires_grad``); "total" is every parameter of the module,
including frozen CLIP towers and, for DPSeg, the frozen copy of the image tower that encodes the
visual prompts. Real CLIPs are built at the input size the paper trains at.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import ovseg
from ovseg.backbones.finetune import FrozenKeyRows

REPO = Path(__file__).resolve().parents[1]

# name: (method, settings, paper's figure or None)
REAL_SCALE = {
    "DPSeg, ConvNeXt-B @ 768": (
        "dpseg",
        {"backbone": "convnext_base_w_320", "input_size": 768},
        "not reported",
    ),
    "DCP-CLIP, ViT-B/16 @ 384": (
        "dcp-clip",
        {"backbone": "ViT-B-16", "input_size": 384},
        "80.3M learnable / 443.6M total (Table II)",
    ),
    "ESC-Net, ViT-B/16 @ 336 + SAM ViT-B blocks": (
        "esc-net",
        {
            "backbone": "ViT-B-16",
            "input_size": 336,
            "window_size": 7,  # the 21×21 grid in whole windows, as the paper config has it
            "sam": "vit_b",
            "sam_pretrained": False,
        },
        "not reported for B/16",
    ),
    "ESC-Net, ViT-L/14 @ 336 + SAM ViT-B blocks": (
        "esc-net",
        {
            "backbone": "ViT-L-14-336",
            "input_size": 336,
            "sam": "vit_b",
            "sam_pretrained": False,
        },
        "451.3M total (Table 4)",
    ),
    "LDVC, ViT-B/16 @ 512": (
        "ldvc",
        {"backbone": "ViT-B-16", "input_size": 512},
        "about 11M learnable",
    ),
}


def toy_configs() -> dict[str, tuple[str, dict, str]]:
    rows = {}
    for method in ("dpseg", "dcp-clip", "esc-net", "ldvc"):
        config = json.loads((REPO / "training" / "configs" / f"{method}-toy.json").read_text())
        settings = dict(config["method_config"]) | {"pretrained": "random"}
        rows[f"{method}, toy ({config['method_config']['backbone']})"] = (method, settings, "–")
    return rows


def count(method: torch.nn.Module) -> tuple[int, int]:
    """(learnable, total): CLIP's K projections, split off as frozen buffers while Q and V
    train (``ovseg.backbones.finetune``), count in the total."""
    parameters = {id(p): p for p in method.parameters()}.values()
    learnable = sum(p.numel() for p in parameters if p.requires_grad)
    keys = {
        id(module.key): module.key
        for module in method.modules()
        if isinstance(module, FrozenKeyRows)
    }.values()
    return learnable, sum(p.numel() for p in parameters) + sum(k.numel() for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", nargs="+", choices=["real", "toy"], default=["real", "toy"])
    args = parser.parse_args()
    rows = (REAL_SCALE if "real" in args.scales else {}) | (
        toy_configs() if "toy" in args.scales else {}
    )
    print("| model | learnable | total | paper |")
    print("|---|---:|---:|---|")
    for name, (method_name, settings, paper) in rows.items():
        method = ovseg.load(method_name, **settings)
        method.train()  # training mode: the trainable set the optimiser sees
        learnable, total = count(method)
        print(f"| {name} | {learnable / 1e6:.1f}M | {total / 1e6:.1f}M | {paper} |", flush=True)
        del method


if __name__ == "__main__":
    main()
