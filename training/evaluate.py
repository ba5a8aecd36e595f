"""Print the metric table of a method (trained weights or training-free) on evaluation sets.

python training/evaluate.py --method dense-clip --sets toy-seen toy-open toy-full
python training/evaluate.py --method dcp-clip --weights runs/dcp-clip/final --sets toy-open
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import ovseg
from ovseg.eval.evaluate import evaluate_toyworld, markdown_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", required=True, help=f"one of {ovseg.list_methods()}")
    parser.add_argument(
        "--weights", default=None, help="method weights (default: shipped or training-free)"
    )
    parser.add_argument("--backbone", default=None, help="CLIP alias or open_clip name")
    parser.add_argument(
        "--pretrained", default=None, help="backbone weights: open_clip tag or path"
    )
    parser.add_argument("--sets", nargs="+", default=["toy-seen", "toy-open", "toy-full"])
    parser.add_argument("--num-images", type=int, default=None, help="default: each set's size")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a segment() option, JSON-parsed, e.g. --option inference='\"II\"'",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = json.loads(value)
    config = {}
    if args.pretrained is not None:
        config["pretrained"] = args.pretrained
    method = ovseg.load(args.method, backbone=args.backbone, weights=args.weights, **config)
    rows = []
    for set_name in args.sets:
        result = evaluate_toyworld(
            method, set_name, num_images=args.num_images, batch_size=args.batch_size,
            segment_options=options, progress=True,
        )  # fmt: skip
        rows.append(result.row() | {"trained_head": method.trained_head})
    print(markdown_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
