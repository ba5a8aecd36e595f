"""How fast ToyWorld generates scenes on one core, as a markdown table.

Usage::

    python benchmarks/toyworld_speed.py [--scenes 200] [--sizes 128 256 384]

Scenes are generated in this process, one after another, from seeds 0, 1, 2, ...; the first few
are discarded so that loading the sprite sheet is not counted.
"""

from __future__ import annotations

import argparse
import time

from ovseg.data.toyworld import ToyWorld

WARMUP = 5


def scenes_per_second(world: ToyWorld, count: int, *, clutter: bool) -> float:
    for seed in range(WARMUP):
        world.scene(seed, clutter=clutter)
    start = time.perf_counter()
    for seed in range(count):
        world.scene(seed, clutter=clutter)
    return count / (time.perf_counter() - start)


def sprites_per_second(world: ToyWorld, count: int) -> float:
    classes = world.thing_class_ids
    start = time.perf_counter()
    for seed in range(count):
        world.sprite_image(classes[seed % len(classes)], seed)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=200, help="scenes timed per setting")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 384])
    args = parser.parse_args()

    print("| image size | scenes/s | ms/scene | cluttered scenes/s | sprite images/s |")
    print("|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        world = ToyWorld(image_size=size)
        plain = scenes_per_second(world, args.scenes, clutter=False)
        cluttered = scenes_per_second(world, args.scenes, clutter=True)
        sprites = sprites_per_second(world, args.scenes)
        print(
            f"| {size} | {plain:.0f} | {1000 / plain:.1f} | {cluttered:.0f} | {sprites:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
