"""Command line.

ovseg segment IMAGE --vocab "cat, grass, sky" --method dense-clip --out mask.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import ovseg
from ovseg.viz import overlay


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovseg", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    segment = commands.add_parser("segment", help="segment an image with a typed vocabulary")
    segment.add_argument("image", type=Path, help="the image file")
    vocab = segment.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--vocab", help="classes separated by commas or newlines, synonyms by ';'")
    vocab.add_argument("--vocab-file", type=Path, help="a text file with the vocabulary")
    vocab.add_argument(
        "--vocab-name", help=f"a bundled vocabulary: {', '.join(ovseg.list_vocabularies())}"
    )
    segment.add_argument(
        "--method", default="dense-clip", help=f"one of: {', '.join(ovseg.list_methods())}"
    )
    segment.add_argument(
        "--backbone", default=None, help="CLIP alias or open_clip name (default: the method's)"
    )
    segment.add_argument("--weights", default=None, help="method weights (.safetensors)")
    segment.add_argument(
        "--pretrained",
        default=None,
        help="CLIP weights: open_clip tag ('openai') or checkpoint path",
    )
    segment.add_argument(
        "--input-size", type=int, default=None, help="square side the image is resized to"
    )
    segment.add_argument(
        "--templates", default=None, help="text template set: imagenet (80), short (7) or single"
    )
    segment.add_argument("--device", default="cpu")
    segment.add_argument(
        "--out", type=Path, required=True, help="label PNG to write (class index per pixel)"
    )
    segment.add_argument("--alpha", type=float, default=0.55, help="overlay opacity")
    return parser


def segment(args: argparse.Namespace) -> dict:
    if args.vocab_name:
        vocabulary = ovseg.load_vocabulary(args.vocab_name)
    elif args.vocab_file:
        vocabulary = ovseg.parse_vocabulary(args.vocab_file.read_text(encoding="utf-8"))
    else:
        vocabulary = ovseg.parse_vocabulary(args.vocab)
    config = {
        "input_size": args.input_size,
        "templates": args.templates,
        "pretrained": args.pretrained,
    }
    config = {key: value for key, value in config.items() if value is not None}
    method = ovseg.load(
        args.method, backbone=args.backbone, weights=args.weights, device=args.device, **config
    )
    predictor = ovseg.Predictor(method)
    image = predictor.set_image(args.image)
    prediction = predictor.predict(vocabulary)[method.name]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint8 if len(vocabulary) <= 256 else np.uint16
    Image.fromarray(prediction.label_map.astype(dtype)).save(args.out)
    overlay_path = args.out.with_name(f"{args.out.stem}_overlay.png")
    Image.fromarray(overlay(image, prediction.label_map, vocabulary.names, alpha=args.alpha)).save(
        overlay_path
    )
    summary = prediction.summary()
    summary.update(
        {"image": str(args.image), "label_png": str(args.out), "overlay_png": str(overlay_path)}
    )
    if vocabulary.dropped_duplicates:
        summary["dropped_duplicates"] = list(vocabulary.dropped_duplicates)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = segment(args)
    except (ovseg.OvsegError, ValueError, OSError) as error:
        print(f"ovseg: error: {error}", file=sys.stderr)
        return 2
    present = ", ".join(f"{c['name']} {c['area'] * 100:.1f}%" for c in summary["classes"])
    print(f"{summary['method']}: {present}")
    print(
        f"wrote {summary['label_png']}, {summary['overlay_png']} and "
        f"{Path(summary['label_png']).with_suffix('.json')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
