"""Per-method latency and peak memory against vocabulary size and input size, split into stages.

Usage::

    python benchmarks/latency.py                                   # toy scale, the issue's grid
    python benchmarks/latency.py --scales toy --sizes 30 --images 256       # the targets' setting
    python benchmarks/latency.py --scales real --sizes 1 20 150 847 --repeats 1
    python benchmarks/latency.py --side-by-side                    # all five methods in one call
    python benchmarks/latency.py --device cuda                     # on a GPU (default: if present)

Every (scale, method, K, image size) runs in a fresh subprocess, so its peak resident memory is
its own and no cache carries over. Inside it, through :class:`ovseg.Predictor` as a user calls it:

- **backbone**: the CLIP image tower alone on the method's input (``ClipBackbone.encode_image``);
  the floor no head can beat.
- **encode**: the method's ``encode_image`` (resize + backbone + whatever the method adds).
- **text**: encoding a vocabulary no cache holds (text embeddings; DPSeg also draws and encodes
  its visual prompts into a fresh prompt bank): the first call's segment time minus the head's.
  With ``--random-text`` (the default at real scale, where 847 classes × 80 templates take minutes)
  the CLIP text tower is replaced by random unit vectors and this column is empty; ``--text``
  prints the text towers' throughput instead, from which any vocabulary's cost follows.
- **head**: ``segment`` with the vocabulary cached (median of ``--repeats``).
- **post**: label map, scores and areas at the given image's size.
- **first**: wall time of the first predict on a new image with a new vocabulary (for DPSeg this
  includes drawing and encoding the vocabulary's visual prompts into a fresh prompt bank).
- **change**: wall time of a predict on the cached image after one class name was changed (what a
  user does in the demo; the other classes' text embeddings are reused).
- **peak MB**: the process's peak resident memory minus what it held after building the method;
  on a GPU, the peak of memory allocated by torch on the device (and what the forward added).

On a GPU every stage is timed with ``CUDA_LAUNCH_BLOCKING=1``, so each stage's kernels have
finished when its clock stops (a little slower than asynchronous launches, but a true split).

A warm-up predict with a different vocabulary runs first, so one-off costs (kernel selection,
lazy imports, position-embedding interpolation) are not charged to any stage. Real scale uses
open_clip names without a pretrained tag (random weights; the speed of random weights equals that
of trained ones) and a random SAM ViT-B for ESC-Net; heads are measured as if trained. DPSeg's
visual prompts come from ToyWorld's sprite renderer, with Gaussian noise for the names ToyWorld
does not know (Stable Diffusion's own cost is a one-off per class, paid when building the prompt
bank, and not measured here). "cat-seg-style" is the CAT-Seg-like aggregator built from ovseg's
blocks: ESC-Net without its SAM blocks (cost volume → Swin spatial + linear class aggregation ×4
→ upsampling decoder), at the same scale.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from dcp_clip_efficiency import vocabulary_of  # the same vocabularies as DCP-CLIP's benchmark

REPO = Path(__file__).resolve().parents[1]
METHODS = ("dense-clip", "dpseg", "dcp-clip", "esc-net", "ldvc", "cat-seg-style")
# The worker processes read their device from here (set by run_isolated).
DEVICE_VARIABLE = "OVSEG_BENCHMARK_DEVICE"


def device() -> torch.device:
    return torch.device(os.environ.get(DEVICE_VARIABLE, "cpu"))


def resolve_device(name: str) -> str:
    """``auto`` → ``cuda`` when a GPU is present, else ``cpu``; a missing GPU is an error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device on this machine.")
    return name


def peak_memory_mb() -> float:
    """Peak memory so far: torch's device allocations on a GPU, resident memory on the CPU."""
    if device().type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# scale → method → ovseg.load settings
SCALES: dict[str, dict[str, dict]] = {
    "toy": {
        "dense-clip": {},
        "dpseg": {},
        "dcp-clip": {},
        "esc-net": {},
        "ldvc": {},
        "cat-seg-style": {"use_sam": False},
    },
    "real": {
        "dense-clip": {"backbone": "ViT-B-16", "input_size": 384},
        "dpseg": {"backbone": "convnext_base_w_320", "input_size": 768, "prompts_per_class": 1},
        "dcp-clip": {"backbone": "ViT-B-16", "input_size": 384},
        "esc-net": {
            "backbone": "ViT-B-16", "input_size": 384, "sam": "vit_b", "sam_pretrained": False,
        },
        "ldvc": {"backbone": "ViT-B-16", "input_size": 512},
        "cat-seg-style": {"backbone": "ViT-B-16", "input_size": 384, "use_sam": False},
    },
}  # fmt: skip
TARGETS = """Targets (issue 10; toy models, 256×256 image, K = 30): each method ≤ 300 ms per image;
the side-by-side of all five ≤ 1.5 s; a vocabulary change on a cached image ≤ half the first call;
head overhead over the backbone ≤ 2× at K = 150; DCP-CLIP at K = 847 ≤ 2× its time at K = 20; peak
memory at K = 847 and real ViT-B/16 scale under 8 GB."""


def build(scale: str, method_name: str, prompt_dir: str):
    import ovseg
    from ovseg.prompts.visual import ToyWorldSpriteGenerator

    settings = dict(SCALES[scale][method_name])
    registered = "esc-net" if method_name == "cat-seg-style" else method_name
    if registered == "dpseg":
        resolution = 128 if scale == "toy" else 224
        settings |= {
            "prompt_generator": ToyWorldSpriteGenerator(resolution=resolution, unknown="noise"),
            "prompt_cache_dir": prompt_dir,
        }
        if scale == "real":
            settings["prompt_resolution"] = resolution
    method = ovseg.load(registered, device=device(), **settings).eval()
    method.trained_head = True  # measure the head, trained or not
    return method


def scene_image(size: int) -> np.ndarray:
    from ovseg.data.toyworld import ToyWorld

    return ToyWorld(image_size=size).scene(0).image


def _median(values: list[float]) -> float:
    return statistics.median(values)


def use_random_text(backbone) -> None:
    """Replace a CLIP's text tower by random unit vectors (for timing heads at real scale without
    minutes of text encoding; the head's cost does not depend on the values)."""

    def random_prompts(prompts):
        return F.normalize(torch.randn(len(prompts), backbone.embed_dim, device=device()), dim=-1)

    backbone.encode_prompts = random_prompts


def measure(
    scale: str,
    method_name: str,
    size: int,
    image_size: int,
    repeats: int,
    threads: int,
    random_text: bool = False,
    single: bool = False,
) -> dict:
    """In a subprocess: build one method and time each stage (see the module docstring).

    ``single``: one predict after the warm-up, its own stage timings (head includes the text
    when ``random_text`` is off) and the peak memory; for settings too slow to repeat.
    """
    import ovseg

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as prompt_dir:
        method = build(scale, method_name, prompt_dir)
        if random_text:
            use_random_text(method.backbone)
        if device().type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        baseline = peak_memory_mb()
        predictor = ovseg.Predictor({method_name: method})
        image = scene_image(image_size)
        side = method.config.input_size
        pixels = torch.from_numpy(scene_image(side)).permute(2, 0, 1)[None].float() / 255
        pixels = pixels.to(device())
        with torch.inference_mode():
            predictor.set_image(image)
            predictor.predict(["warm-up thing", "another warm-up thing"])
            backbone = []
            for _ in range(repeats):
                start = time.perf_counter()
                method.backbone.encode_image(method.backbone.normalize(pixels))
                backbone.append(time.perf_counter() - start)

        vocabulary = vocabulary_of(size)
        edited = [*vocabulary[:-1], "a class typed just now"]  # one name changed
        predictor.set_image(image)
        method.clear_caches()
        start = time.perf_counter()
        first = predictor.predict(vocabulary)[method_name]
        first_seconds = time.perf_counter() - start
        row = {
            "scale": scale,
            "method": method_name,
            "K": size,
            "image": image_size,
            "input": side,
            "backbone": _median(backbone),
            "first": first_seconds,
        }

        def memory() -> dict:
            peak = peak_memory_mb()
            return {"peak_mb": peak, "forward_mb": peak - baseline}

        if single:
            timings = first.timings
            return (
                row
                | memory()
                | {
                    "encode": timings["encode_image"],
                    "text": None,
                    "head": timings["segment"],
                    "post": timings["postprocess"],
                    "change": None,
                }
            )
        start = time.perf_counter()
        predictor.predict(edited)
        change_seconds = time.perf_counter() - start
        heads, posts = [], []
        for _ in range(repeats):
            warm = predictor.predict(edited)[method_name]
            heads.append(warm.timings["segment"])
            posts.append(warm.timings["postprocess"])
        encodes = []
        for _ in range(repeats):
            predictor.set_image(image)
            start = time.perf_counter()
            predictor.features(method_name)
            encodes.append(time.perf_counter() - start)
        head = _median(heads)
        return (
            row
            | memory()
            | {
                "encode": _median(encodes),
                "text": None if random_text else max(0.0, first.timings["segment"] - head),
                "head": head,
                "post": _median(posts),
                "change": change_seconds,
            }
        )


def measure_side_by_side(size: int, image_size: int, repeats: int, threads: int) -> dict:
    """In a subprocess: the demo's side-by-side, every toy method in one Predictor."""
    import ovseg

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as prompt_dir:
        methods = {name: build("toy", name, prompt_dir) for name in METHODS[:5]}
        predictor = ovseg.Predictor(methods)
        image = scene_image(image_size)
        with torch.inference_mode():
            predictor.set_image(scene_image(image_size + 32))
            predictor.predict(["warm-up thing", "another warm-up thing"])
        firsts, changes, warms = [], [], []
        vocabulary = vocabulary_of(size)
        for run in range(repeats):
            edited = [*vocabulary[:-1], f"a class typed just now {run}"]
            predictor.set_image(image)
            for method in methods.values():
                method.clear_caches()
            start = time.perf_counter()
            predictor.predict(vocabulary)
            firsts.append(time.perf_counter() - start)
            start = time.perf_counter()
            predictor.predict(edited)
            changes.append(time.perf_counter() - start)
            start = time.perf_counter()
            predictor.predict(edited)
            warms.append(time.perf_counter() - start)
    return {
        "K": size,
        "image": image_size,
        "first": _median(firsts),
        "change": _median(changes),
        "warm": _median(warms),
    }


TEXT_TOWERS = {
    "toy-vit": "toy-vit",
    "toy-convnext": "toy-convnext",
    "ViT-B-16": "ViT-B-16",
    "convnext_base_w_320": "convnext_base_w_320",
}


def measure_text(tower: str, prompts: int, threads: int) -> dict:
    """In a subprocess: prompts per second through one CLIP text tower (80-template prompts)."""
    from ovseg.backbones import load_backbone
    from ovseg.prompts.templates import resolve_templates

    torch.set_num_threads(threads)
    backbone = load_backbone(tower, "random" if tower.startswith("toy") else None, device=device())
    templates = resolve_templates("imagenet")
    names = vocabulary_of(max(1, prompts // len(templates) + 1))
    texts = [t.format(n) for n in names for t in templates][:prompts]
    with torch.inference_mode():
        backbone.encode_prompts(texts[:64])
        start = time.perf_counter()
        backbone.encode_prompts(texts)
        seconds = time.perf_counter() - start
    return {"tower": tower, "prompts": len(texts), "per_second": len(texts) / seconds}


def run_isolated(arguments: list[str], on: str = "cpu") -> dict:
    command = [sys.executable, __file__, *arguments]
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    environment[DEVICE_VARIABLE] = on
    if on == "cuda":
        environment["CUDA_LAUNCH_BLOCKING"] = "1"
    result = subprocess.run(
        command, capture_output=True, text=True, check=False, cwd=REPO, env=environment
    )
    if result.returncode:
        raise RuntimeError(f"{' '.join(arguments)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", nargs="+", default=["toy"], choices=list(SCALES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 20, 30, 150, 847])
    parser.add_argument("--images", type=int, nargs="+", default=[256], help="image sides")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per stage (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where the models run (auto: a GPU when torch sees one)",
    )
    parser.add_argument(
        "--side-by-side", action="store_true", help="time all five toy methods in one predict"
    )
    parser.add_argument(
        "--random-text",
        choices=["auto", "yes", "no"],
        default="auto",
        help="random text embeddings (auto: at real scale only)",
    )
    parser.add_argument(
        "--text", action="store_true", help="print the CLIP text towers' prompts per second"
    )
    parser.add_argument("--prompts", type=int, default=2000, help="prompts timed by --text")
    parser.add_argument("--towers", nargs="+", default=list(TEXT_TOWERS), choices=TEXT_TOWERS)
    parser.add_argument(
        "--single",
        action="store_true",
        help="one call per setting (no vocabulary change or repeats): for slow real-scale rows",
    )
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--text-worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--side-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        scale, name, size, image, random_text, single = args.worker
        row = measure(
            scale,
            name,
            int(size),
            int(image),
            args.repeats,
            args.threads,
            random_text == "yes",
            single == "yes",
        )
        print(json.dumps(row))
        return
    if args.text_worker:
        tower, prompts = args.text_worker
        print(json.dumps(measure_text(tower, int(prompts), args.threads)))
        return
    if args.side_worker:
        size, image = args.side_worker
        print(json.dumps(measure_side_by_side(int(size), int(image), args.repeats, args.threads)))
        return

    common = ["--repeats", str(args.repeats), "--threads", str(args.threads)]
    on = resolve_device(args.device)
    where = f"GPU {torch.cuda.get_device_name()}" if on == "cuda" else "CPU"
    print(
        f"Device: {where}; {torch.get_num_threads()} CPU threads available, using "
        f"{args.threads}. Times in ms.\n"
    )
    if args.text:
        print("| text tower | prompts | prompts/s | 30 classes × 80 templates | 847 × 80 |")
        print("|---|---:|---:|---:|---:|")
        for tower in args.towers:
            row = run_isolated(["--text-worker", tower, str(args.prompts), *common], on)
            rate = row["per_second"]
            print(
                f"| {tower} | {row['prompts']} | {rate:.0f} | {2400 / rate:.1f} s "
                f"| {847 * 80 / rate:.0f} s |",
                flush=True,
            )
        return
    if args.side_by_side:
        print("| K | image | first call | vocabulary change | same vocabulary again |")
        print("|---:|---:|---:|---:|---:|")
        for size in args.sizes:
            for image in args.images:
                row = run_isolated(["--side-worker", str(size), str(image), *common], on)
                print(
                    f"| {size} | {image} | {milliseconds(row['first'])} "
                    f"| {milliseconds(row['change'])} | {milliseconds(row['warm'])} |",
                    flush=True,
                )
        return

    print(
        "| scale | method | K | image | input | backbone | encode | text | head | post "
        "| first call | vocab change | head / backbone | peak MB (forward) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for scale in args.scales:
        for name in args.methods:
            for size in args.sizes:
                for image in args.images:
                    random_text = args.random_text == "yes" or (
                        args.random_text == "auto" and scale == "real"
                    )
                    row = run_isolated(
                        [
                            "--worker", scale, name, str(size), str(image),
                            "yes" if random_text else "no", "yes" if args.single else "no",
                            *common,
                        ],
                        on,
                    )  # fmt: skip
                    text = "–" if row["text"] is None else milliseconds(row["text"])
                    print(
                        f"| {scale} | {name} | {size} | {image} | {row['input']} "
                        f"| {milliseconds(row['backbone'])} | {milliseconds(row['encode'])} "
                        f"| {text} | {milliseconds(row['head'])} "
                        f"| {milliseconds(row['post'])} | {milliseconds(row['first'])} "
                        f"| {'–' if row['change'] is None else milliseconds(row['change'])} "
                        f"| {row['head'] / row['backbone']:.1f} "
                        f"| {row['peak_mb']:.0f} ({row['forward_mb']:.0f}) |",
                        flush=True,
                    )
    print()
    print(TARGETS)


if __name__ == "__main__":
    main()
