"""The demo's example images and vocabulary presets.

Examples are the ToyWorld scenes shipped in ``assets/examples``, two scenes of held-out (unseen)
classes generated from fixed seeds, and matplotlib's Grace Hopper photograph, a real photo that
shows how far the toy models are from the real world.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

import ovseg
from ovseg.backbones import ASSETS_DIR

EXAMPLES_DIR = ASSETS_DIR / "examples"
PRESET_CUSTOM = "(type your own)"
TOYWORLD_SEEN = "ToyWorld seen classes"
TOYWORLD_ALL = "ToyWorld all classes"
# Preset label → bundled vocabulary file (ovseg/data/vocabularies).
BENCHMARK_PRESETS = {
    "COCO-Stuff-171": "coco-stuff-171",
    "ADE-150": "ade-150",
    "ADE-847": "ade-847",
    "Pascal Context-59": "pc-59",
    "VOC-20": "voc-20",
}
UNSEEN_SCENE_SEEDS = (1_001_000_101, 1_001_000_104)  # scenes with many unseen classes
PHOTO_VOCABULARY = "person, necktie, flag, wall, uniform"


def bundled_examples(folder: Path = EXAMPLES_DIR) -> list[list[str]]:
    """[image path, vocabulary] pairs of the shipped ToyWorld scenes (``assets/examples``)."""
    index = folder / "examples.json"
    if not index.is_file():
        return []
    entries = json.loads(index.read_text(encoding="utf-8"))
    return [[str(folder / entry["image"]), entry["vocabulary"]] for entry in entries]


def unseen_scene_examples(folder: Path) -> list[list[str]]:
    """Two ToyWorld scenes made only of classes no head was trained on, written to ``folder``.

    Returns [] when the sprite sheet is missing (the scenes cannot be drawn without it).
    """
    from ovseg.data.toyworld import ToyWorld

    try:
        world = ToyWorld(image_size=256)
    except FileNotFoundError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for seed in UNSEEN_SCENE_SEEDS:
        scene = world.scene(seed, classes=world.unseen_class_ids)
        present = [world.class_names[index] for index in np.unique(scene.labels)]
        path = folder / f"toyworld-unseen-{seed}.png"
        if not path.is_file():
            Image.fromarray(scene.image).save(path)
        examples.append([str(path), ", ".join(present)])
    return examples


def photo_examples() -> list[list[str]]:
    """A real photograph from matplotlib's sample data, when it is installed."""
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return [[str(path), PHOTO_VOCABULARY]] if path.is_file() else []


def all_examples(scratch: Path) -> list[list[str]]:
    """Every example: shipped scenes, generated unseen-class scenes (in ``scratch``), a photo."""
    return bundled_examples() + unseen_scene_examples(scratch) + photo_examples()


def preset_names() -> list[str]:
    """The vocabulary presets offered in the UI, custom text first."""
    available = set(ovseg.list_vocabularies())
    benchmarks = [label for label, name in BENCHMARK_PRESETS.items() if name in available]
    return [PRESET_CUSTOM, TOYWORLD_SEEN, TOYWORLD_ALL, *benchmarks]


def preset_text(preset: str) -> str | None:
    """The vocabulary text of a preset (synonyms joined by ';'), None for custom text."""
    if preset == PRESET_CUSTOM:
        return None
    if preset in (TOYWORLD_SEEN, TOYWORLD_ALL):
        from ovseg.data.toyworld import ToyWorld

        world = ToyWorld(image_size=64)
        ids = world.seen_class_ids if preset == TOYWORLD_SEEN else range(len(world.class_names))
        return ", ".join(world.class_names[index] for index in ids)
    if preset not in BENCHMARK_PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {preset_names()}.")
    vocabulary = ovseg.load_vocabulary(BENCHMARK_PRESETS[preset])
    return ", ".join(";".join(synonyms) for synonyms in vocabulary)


def resolve_vocabulary(text: str, preset: str | None) -> ovseg.Vocabulary:
    """The vocabulary to run: the preset itself while its text is unchanged, else the text.

    A benchmark list can repeat a display name for different senses (ADE-847 has two "screen"
    classes); typed text would merge them, so an unedited preset is taken from its file.

    Raises:
        ovseg.VocabularyError: if the text is empty or too long.
    """
    if preset in BENCHMARK_PRESETS and text.strip() == preset_text(preset):
        return ovseg.load_vocabulary(BENCHMARK_PRESETS[preset])
    return ovseg.parse_vocabulary(text or "")
