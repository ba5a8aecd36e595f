"""Write the demo's example images: ToyWorld scenes from the held-out evaluation seeds.

    python training/make_examples.py --out assets/examples

Each example gets a PNG and an entry in ``examples.json`` with a vocabulary naming what is in it
plus a few distractors, so a visitor can click it and press Segment.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ovseg.data.toyworld import EVAL_SETS, ToyWorld

EXAMPLE_SEEDS = (3, 11, 24, 42)
DISTRACTORS = 3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("assets/examples"))
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args()
    world = ToyWorld(image_size=args.image_size)
    first_seed = EVAL_SETS["toy-open"].first_seed
    rng = np.random.default_rng(0)
    args.out.mkdir(parents=True, exist_ok=True)
    examples = []
    for index, offset in enumerate(EXAMPLE_SEEDS):
        scene = world.scene(first_seed + offset)
        present = [int(c) for c in np.unique(scene.labels)]
        others = [c for c in range(len(world.classes)) if c not in present]
        chosen = present + [int(c) for c in rng.choice(others, DISTRACTORS, replace=False)]
        names = [world.classes[c].name for c in chosen]
        path = args.out / f"toyworld-{index + 1}.png"
        Image.fromarray(scene.image).save(path, optimize=True)
        examples.append({
            "image": path.name,
            "vocabulary": ", ".join(names),
            "present": [world.classes[c].name for c in present],
            "unseen_present": [world.classes[c].name for c in present if not world.classes[c].seen],
            "caption": scene.caption,
            "seed": first_seed + offset,
        })  # fmt: skip
    (args.out / "examples.json").write_text(json.dumps(examples, indent=2) + "\n")


if __name__ == "__main__":
    main()
