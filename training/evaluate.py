"""Print the metric table of a method (trained weights or training-free) on evaluation sets.

python training/evaluate.py --method dense-clip --sets toy-seen toy-open toy-full
python training/evaluate.py --method dcp-clip --weights runs/dcp-clip/final --sets toy-open

Benchmark mode: a checkpoint trained with a paper config, on the five cross-dataset benchmarks
(or ZegCLIP's seen/unseen splits), next to the paper's numbers:

python training/evaluate.py --config training/configs/paper/dcp-clip-vit-b-16-384.json \
    --weights runs/paper/dcp-clip-vit-b-16-384/final --benchmarks all --datasets-root datasets
python training/evaluate.py --config training/configs/paper/ldvc-vit-b-16-512-voc.json \
    --weights runs/paper/ldvc-vit-b-16-512-voc/final --zero-shot pascal-voc-20

Each method runs its paper's test-time protocol (``--inference paper``): LDVC slides 512 windows
with stride 426 over images whose short side is 512 (ZegCLIP's), the others squash the whole image
to their input size. The ``inference`` column says which ran. A ``seen_prob_offset`` in the
config (LDVC's seen-class calibration) applies on every zero-shot split; ``--option
seen_prob_offset=0`` turns it off.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import ovseg
from ovseg.data.datasets import BENCHMARKS, DATASETS, SegmentationDataset, zero_shot_split
from ovseg.eval.evaluate import (
    SlideWindow,
    calibrated_options,
    evaluate_toyworld,
    markdown_table,
    paper_window,
    predict_logits,
)
from ovseg.eval.metrics import ConfusionMatrix
from ovseg.methods.base import SegmentationMethod

ZERO_SHOT_METRICS = ("mIoU(S)", "mIoU(U)", "hIoU")
# The papers' numbers, keyed by paper config name: mIoU per benchmark, and (mIoU(S), mIoU(U),
# hIoU) per "zero-shot:<dataset>".
PAPER_RESULTS: dict[str, dict[str, Any]] = {
    "dpseg-convnext-b-768": dict(zip(BENCHMARKS, (12.5, 20.1, 33.3, 58.4, 96.9), strict=True)),
    "dpseg-convnext-l-768": dict(zip(BENCHMARKS, (15.7, 24.1, 37.1, 62.3, 98.5), strict=True)),
    "dcp-clip-vit-b-16-384": dict(zip(BENCHMARKS, (12.3, 19.7, 32.4, 58.1, 95.9), strict=True)),
    "dcp-clip-vit-l-14-336": dict(zip(BENCHMARKS, (16.4, 24.3, 38.1, 63.8, 97.3), strict=True)),
    "esc-net-vit-b-16-336": dict(zip(BENCHMARKS, (13.3, 21.1, 35.6, 59.0, 97.3), strict=True)),
    "esc-net-vit-l-14-336": dict(zip(BENCHMARKS, (18.1, 27.0, 41.8, 65.6, 98.3), strict=True)),
    "ldvc-vit-b-16-512-voc": {"zero-shot:pascal-voc-20": (92.5, 82.3, 87.2)},
    "ldvc-vit-b-16-512-coco-stuff": {"zero-shot:coco-stuff-164k": (43.2, 45.0, 44.1)},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", default=None, help=f"one of {ovseg.list_methods()}")
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
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method config field, JSON-parsed, e.g. --set prompt_mode='\"text\"' "
        "(architecture fields must match the weights)",
    )
    parser.add_argument(
        "--label", default=None, help="what to call this model in the table (default: the method)"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--inference", choices=("paper", "whole", "slide"), default="paper",
        help="whole: each image squashed to the method's input size; slide: sliding windows "
        "(--slide, default ZegCLIP's at the input size: short side = crop, stride 426/512 of "
        "it); paper: the method's paper protocol (slide for ldvc, whole for the others)",
    )  # fmt: skip
    parser.add_argument(
        "--slide", nargs=3, type=int, default=None, metavar=("SHORT_SIDE", "CROP", "STRIDE"),
        help="sliding windows of this size (implies --inference slide)",
    )  # fmt: skip
    parser.add_argument(
        "--config", type=Path, default=None,
        help="a training config whose method and method_config build the model",
    )  # fmt: skip
    parser.add_argument(
        "--benchmarks", nargs="+", default=None, metavar="DATASET",
        help=f"'all' or some of {', '.join(DATASETS)} (their evaluation splits)",
    )  # fmt: skip
    parser.add_argument(
        "--zero-shot", nargs="+", default=None, metavar="DATASET",
        help="seen/unseen/hIoU on ZegCLIP's splits: pascal-voc-20, coco-stuff-164k",
    )  # fmt: skip
    parser.add_argument("--datasets-root", default=None, help="default: $OVSEG_DATASETS")
    parser.add_argument(
        "--zero-shot-layout", default="mmseg", help="layout of the --zero-shot sets (ZegCLIP's)"
    )
    parser.add_argument(
        "--paper", default=None, help="PAPER_RESULTS key (default: the config's file name)"
    )
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
    config: dict[str, Any] = {}
    method_name = args.method
    if args.config is not None:
        record = json.loads(args.config.read_text())
        method_name = method_name or record["method"]
        config = dict(record.get("method_config", {}))
    if method_name is None:
        raise SystemExit("Give --method or --config.")
    if args.pretrained is not None:
        config["pretrained"] = args.pretrained
    if args.backbone is not None:
        config["backbone"] = args.backbone
    for item in args.settings:
        key, _, value = item.partition("=")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    method = ovseg.load(method_name, weights=args.weights, **config)
    window = inference_window(method, args.inference, args.slide)
    if args.benchmarks or args.zero_shot:
        paper_key = args.paper or (args.config.stem if args.config else None)
        return benchmark_mode(method, args, options, PAPER_RESULTS.get(paper_key, {}), window)
    rows = []
    for set_name in args.sets:
        result = evaluate_toyworld(
            method, set_name, num_images=args.num_images, batch_size=args.batch_size,
            segment_options=options, window=window, progress=True,
        )  # fmt: skip
        row = result.row() | {"trained_head": method.trained_head}
        row["inference"] = describe_inference(method, window)
        if args.label:
            row["method"] = args.label
        rows.append(row)
    print(markdown_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def inference_window(
    method: SegmentationMethod, mode: str, slide: list[int] | None
) -> SlideWindow | None:
    """The sliding window that ``--inference`` and ``--slide`` ask for (None: whole images)."""
    if slide is not None:
        if mode == "whole":
            raise SystemExit("--slide contradicts --inference whole.")
        short_side, crop, stride = slide
        return SlideWindow(short_side=short_side, crop=crop, stride=stride)
    if mode == "whole":
        return None
    if mode == "slide":
        return SlideWindow.zegclip(method.config.input_size)
    return paper_window(method)


def describe_inference(method: SegmentationMethod, window: SlideWindow | None) -> str:
    """The ``inference`` column: how each image went through the method."""
    if window is None:
        size = method.config.input_size
        return f"whole {size}×{size}"
    return window.describe()


@torch.no_grad()
def evaluate_benchmark(
    method: SegmentationMethod,
    dataset: SegmentationDataset,
    *,
    zero_shot: bool = False,
    num_images: int | None = None,
    segment_options: dict[str, Any] | None = None,
    window: SlideWindow | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score ``method`` on a benchmark split over its whole vocabulary: the logits of each image
    (whole, resized to the method's square input as CAT-Seg and SED do, or by sliding
    ``window``) are resized to the label size, and one confusion matrix accumulates over the
    split (the dataset's own ignore index).

    With ``zero_shot``, also mIoU over ZegCLIP's seen and unseen classes and their hIoU; a
    ``seen_prob_offset`` (option or method config: LDVC's calibration) is then given the seen
    class names.
    """
    method.eval()
    vocabulary = list(dataset.vocabulary)
    options = dict(segment_options or {})
    seen, unseen = zero_shot_split(dataset.name) if zero_shot else (None, None)
    if zero_shot:
        options = calibrated_options(method, options, [vocabulary[i][0] for i in seen])
    matrix = ConfusionMatrix(len(vocabulary), ignore_index=dataset.ignore_index)
    parameter = next(method.parameters())
    count = len(dataset) if num_images is None else min(num_images, len(dataset))
    started = time.perf_counter()
    for index in tqdm(range(count), desc=f"{method.name} on {dataset.name}", disable=not progress):
        item = dataset[index]
        pixels = item["image"][None].to(device=parameter.device, dtype=parameter.dtype)
        logits = predict_logits(
            method, pixels, vocabulary, window=window, options=options,
            output_size=tuple(item["labels"].shape),
        )  # fmt: skip
        matrix.update(logits.argmax(dim=1)[0].cpu().numpy(), item["labels"].numpy())
    scores = matrix.scores(seen=seen, unseen=unseen) if zero_shot else matrix.scores()
    row = {"method": method.name, "set": dataset.info.title, "images": count}
    row |= {key: round(value, 2) for key, value in scores.as_dict().items()}
    return row | {"s/img": round((time.perf_counter() - started) / max(1, count), 3)}


def benchmark_mode(
    method: SegmentationMethod,
    args: argparse.Namespace,
    options: dict[str, Any],
    paper: dict[str, Any],
    window: SlideWindow | None = None,
) -> list[dict]:
    """Run the chosen benchmarks and print this run next to the paper, one column per set."""
    names = list(BENCHMARKS) if args.benchmarks == ["all"] else list(args.benchmarks or [])
    runs = [(name, False) for name in names] + [(name, True) for name in args.zero_shot or []]
    rows, ours, theirs = [], {"": "this run"}, {"": "paper"}
    for name, zero_shot in runs:
        layout = args.zero_shot_layout if zero_shot else "detectron2"
        dataset = SegmentationDataset(name, root=args.datasets_root, layout=layout)
        row = evaluate_benchmark(
            method, dataset, zero_shot=zero_shot, num_images=args.num_images,
            segment_options=options, window=window, progress=True,
        )  # fmt: skip
        inference = describe_inference(method, window)
        rows.append(row | {"trained_head": method.trained_head, "inference": inference})
        title = row["set"]
        if zero_shot:
            expected = paper.get(f"zero-shot:{name}", ("–",) * len(ZERO_SHOT_METRICS))
            for key, value in zip(ZERO_SHOT_METRICS, expected, strict=True):
                ours[f"{title} {key}"], theirs[f"{title} {key}"] = row[key], value
        else:
            ours[title], theirs[title] = row["mIoU"], paper.get(name, "–")
    print(markdown_table(rows))
    print()
    print(markdown_table([ours, theirs]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
