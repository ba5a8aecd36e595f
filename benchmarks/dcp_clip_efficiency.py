"""DCP-CLIP's cost against vocabulary size, with and without Dynamic Category Selection.

The analog of the paper's Table VII on our CPUs: inference time and peak memory for vocabularies
of 1, 20, 150 and 847 classes at θ = 0 (every class goes through the head) and θ = 0.5 (the
paper's default), at toy scale (the shipped toy ViT CLIP and head on a ToyWorld scene) and at real
ViT-B/16 scale (random weights, 384 px). Usage::

    python benchmarks/dcp_clip_efficiency.py                      # both scales, the full table
    python benchmarks/dcp_clip_efficiency.py --scales toy --sizes 1 20 --repeats 1

Every setting runs in a fresh subprocess so that its peak resident memory is its own. "C_s" is the
number of classes DCS selected. With random real-scale weights the selection is not meaningful
(a random CLIP votes for arbitrary classes), so the real-scale rows measure the head's cost for the
C_s they report, not DCS's accuracy. The head always runs (a random head where no trained one is
shipped): the training-free path would not measure the decoder.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCALES = {
    # name: (backbone, pretrained, input size, method config)
    "toy": ("toy-vit", None, None, {}),
    "vit-b-16": ("ViT-B-16", None, 384, {}),  # an open_clip name without a tag: random weights
}


def vocabulary_of(size: int) -> list[str]:
    """``size`` distinct class names: ToyWorld's (scene classes first), then ADE-847's."""
    from ovseg.data.toyworld import ToyWorld
    from ovseg.vocabulary import load_vocabulary

    world = ToyWorld(image_size=256)
    scene = world.scene(0)
    present = [world.classes[int(i)].name for i in sorted(set(scene.labels.flat))]
    names = present + [c.name for c in world.classes] + list(load_vocabulary("ade-847").names)
    unique = list(dict.fromkeys(names))
    if size > len(unique):
        raise ValueError(f"Only {len(unique)} distinct names are available; asked for {size}.")
    return unique[:size]


def measure(scale: str, size: int, theta: float, repeats: int, threads: int) -> dict:
    """Run in a subprocess: build, warm up, time ``repeats`` forwards; report seconds and memory."""
    import ovseg
    from ovseg.data.toyworld import ToyWorld

    torch.set_num_threads(threads)
    backbone, pretrained, input_size, extra = SCALES[scale]
    config = dict(extra)
    if pretrained is not None:
        config["pretrained"] = pretrained
    if input_size is not None:
        config["input_size"] = input_size
    method = ovseg.load("dcp-clip", backbone=backbone, **config)
    method.trained_head = True  # measure the head, trained or not
    side = method.config.input_size
    image = ToyWorld(image_size=side).scene(0).image
    images = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    vocabulary = vocabulary_of(size)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, selected = [], 0
    with torch.inference_mode():
        for run in range(repeats + 1):
            started = time.perf_counter()
            output = method(images, vocabulary, theta=theta, return_intermediates=True)
            if run:  # the first run warms caches (text embeddings) and is not timed
                times.append(time.perf_counter() - started)
            selected = int(output.intermediates["num_selected"][0])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times.sort()
    return {
        "scale": scale,
        "K": size,
        "theta": theta,
        "selected": selected,
        "seconds": times[len(times) // 2],
        "peak_mb": peak / 1024,
        "forward_mb": (peak - baseline) / 1024,
    }


def run_isolated(scale: str, size: int, theta: float, repeats: int, threads: int) -> dict:
    command = [
        sys.executable, __file__, "--worker", scale, str(size), str(theta),
        "--repeats", str(repeats), "--threads", str(threads),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    if result.returncode:
        raise RuntimeError(f"{scale} K={size} θ={theta} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", nargs="+", default=list(SCALES), choices=list(SCALES))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 20, 150, 847])
    parser.add_argument("--thetas", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--worker", nargs=3, metavar=("SCALE", "K", "THETA"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        scale, size, theta = args.worker
        print(json.dumps(measure(scale, int(size), float(theta), args.repeats, args.threads)))
        return

    print("| scale | K | θ | C_s | s/image | forward peak MB | process peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for scale in args.scales:
        for size in args.sizes:
            for theta in args.thetas:
                row = run_isolated(scale, size, theta, args.repeats, args.threads)
                rows.append(row)
                print(
                    f"| {scale} | {size} | {theta:g} | {row['selected']} | {row['seconds']:.3f} "
                    f"| {row['forward_mb']:.0f} | {row['peak_mb']:.0f} |",
                    flush=True,
                )
    print()
    print("Growth from the smallest to the largest vocabulary (time ratio; K ratio "
          f"{max(args.sizes) / min(args.sizes):.0f}×):")  # fmt: skip
    for scale in args.scales:
        for theta in args.thetas:
            mine = [r for r in rows if r["scale"] == scale and r["theta"] == theta]
            small = min(mine, key=lambda r: r["K"])
            large = max(mine, key=lambda r: r["K"])
            print(
                f"- {scale}, θ = {theta:g}: {large['seconds'] / small['seconds']:.1f}× time, "
                f"{large['forward_mb'] / max(small['forward_mb'], 1):.1f}× forward memory"
            )


if __name__ == "__main__":
    main()
