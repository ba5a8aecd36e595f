"""ToyWorld: determinism, label/instance consistency, the seen/unseen split, captions, eval sets."""

import itertools
import re

import numpy as np
import pytest
import torch

from ovseg.data.toyworld import (
    EVAL_SETS,
    TRAIN_SEED_LIMIT,
    ToyWorld,
    ToyWorldDataset,
    eval_set,
    eval_vocabulary,
)

SIZE = 96  # small images keep the suite fast; the generator is resolution independent


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return ToyWorld(image_size=SIZE)


def mentions(caption: str, words: list[str]) -> bool:
    """Whether any of ``words`` (optionally pluralised) appears as whole words in ``caption``."""
    return any(re.search(rf"\b{re.escape(w)}(s|es)?\b", caption) for w in words)


def test_same_seed_gives_identical_scene(world):
    first, again, other = world.scene(3), world.scene(3), world.scene(4)
    for field in ("image", "labels", "instance_masks", "instance_classes"):
        np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
    assert first.caption == again.caption
    assert not np.array_equal(first.image, other.image)


def test_determinism_does_not_depend_on_call_order():
    fresh = ToyWorld(image_size=SIZE)
    expected = fresh.scene(11).image
    fresh.scene(12)
    fresh.sprite_image(20, 0)
    np.testing.assert_array_equal(ToyWorld(image_size=SIZE).scene(11).image, expected)


def test_scene_shapes_and_dtypes(world):
    scene = world.scene(0)
    n = len(scene.instance_classes)
    assert scene.image.shape == (SIZE, SIZE, 3) and scene.image.dtype == np.uint8
    assert scene.labels.shape == (SIZE, SIZE) and scene.labels.dtype == np.int64
    assert scene.instance_masks.shape == (n, SIZE, SIZE) and scene.instance_masks.dtype == bool
    assert scene.instance_classes.dtype == np.int64
    assert scene.labels.min() >= 0 and scene.labels.max() < len(world.classes)


@pytest.mark.parametrize("clutter", [False, True])
def test_instances_match_labels_and_never_overlap(world, clutter):
    for seed in range(15):
        scene = world.scene(seed, clutter=clutter)
        masks, classes = scene.instance_masks, scene.instance_classes
        assert masks.sum(axis=0).max(initial=0) <= 1, "instances overlap"
        assert masks.any(axis=(1, 2)).all(), "a fully hidden instance was kept"
        for mask, class_id in zip(masks, classes, strict=True):
            assert world.classes[class_id].kind == "thing"
            assert (scene.labels[mask] == class_id).all()
        # Every pixel outside the instances is stuff.
        outside = scene.labels[~masks.any(axis=0)]
        assert (outside < len(world.stuff_class_ids)).all()


def test_things_are_pasted_with_requested_counts(world):
    assert len(world.scene(5, num_things=(0, 0)).instance_classes) == 0
    counts = [len(world.scene(s, num_things=(6, 6)).instance_classes) for s in range(5)]
    assert all(1 <= c <= 6 for c in counts) and max(counts) >= 4  # occlusion may hide a few


def test_seen_scenes_contain_only_seen_classes(world):
    seen = set(world.seen_class_ids)
    for seed in range(25):
        scene = world.scene(seed, classes=world.seen_class_ids)
        assert set(np.unique(scene.labels).tolist()) <= seen


def test_classes_restrict_what_appears(world):
    allowed = [world.class_names.index("grass"), world.class_names.index("cat")]
    for seed in range(5):
        present = set(np.unique(world.scene(seed, classes=allowed).labels).tolist())
        assert present <= set(allowed)


def test_scene_rejects_class_lists_without_stuff(world):
    with pytest.raises(ValueError, match="stuff"):
        world.scene(0, classes=[world.class_names.index("cat")])
    with pytest.raises(ValueError, match="class ids"):
        world.scene(0, classes=[len(world.classes)])


def test_split_sizes(world):
    stuff = [c for c in world.classes if c.kind == "stuff"]
    things = [c for c in world.classes if c.kind == "thing"]
    assert len(stuff) >= 12 and len(things) >= 250
    assert sum(not c.seen for c in stuff) == 2
    assert 0.2 <= sum(not c.seen for c in things) / len(things) <= 0.3
    assert sorted(world.seen_class_ids + world.unseen_class_ids) == list(range(len(world.classes)))
    # Stuff first, then things.
    assert world.stuff_class_ids == list(range(len(stuff)))


def test_split_is_fixed():
    names = ToyWorld(image_size=SIZE).class_names
    unseen = {names[i] for i in ToyWorld(image_size=SIZE).unseen_class_ids}
    assert {"water", "gravel"} <= unseen


def test_class_names_unique_and_never_another_class_synonym(world):
    names = world.class_names
    assert len(set(names)) == len(names)
    assert all(n == n.lower() and n.strip() == n for n in names)
    owner = {n: i for i, n in enumerate(names)}
    for i, toy_class in enumerate(world.classes):
        for synonym in toy_class.synonyms:
            assert owner.get(synonym, i) == i, f"{synonym!r} is also a class name"


@pytest.mark.parametrize("clutter", [False, True])
def test_captions_mention_every_class_present(world, clutter):
    for seed in range(20):
        scene = world.scene(seed, clutter=clutter)
        for class_id in np.unique(scene.labels):
            toy_class = world.classes[class_id]
            assert mentions(scene.caption, [toy_class.name, *toy_class.synonyms]), (
                f"{toy_class.name!r} missing from {scene.caption!r}"
            )


def test_captions_vary_and_sometimes_use_synonyms(world):
    captions = [world.scene(seed).caption for seed in range(60)]
    phrasings = ["in front of", "in the background", " on ", "seen against", "the background is"]
    assert sum(any(p in c for c in captions) for p in phrasings) >= 4
    synonyms_used = 0
    for seed in range(60):
        scene = world.scene(seed)
        for class_id in scene.instance_classes:
            toy_class = world.classes[class_id]
            if not mentions(scene.caption, [toy_class.name]):
                synonyms_used += 1
    assert synonyms_used > 0


@pytest.mark.parametrize("background", ["random", "plain", "white"])
def test_sprite_image_shapes_and_determinism(world, background):
    for class_id in (
        0,
        world.stuff_class_ids[-1],
        world.thing_class_ids[0],
        len(world.classes) - 1,
    ):
        image = world.sprite_image(class_id, 7, background=background)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, world.sprite_image(class_id, 7, background=background))
    assert world.sprite_image(world.thing_class_ids[3], 1, size=40).shape == (40, 40, 3)
    white = world.sprite_image(world.thing_class_ids[3], 1, background="white")
    assert (white[0, 0] > 200).all(), "the corner of a white-background sprite is white"


def test_sprite_image_varies_with_seed(world):
    cat = world.class_names.index("cat")
    assert not np.array_equal(world.sprite_image(cat, 0), world.sprite_image(cat, 1))


def test_eval_sets_are_fixed_and_disjoint_from_training_seeds():
    ranges = []
    for spec in EVAL_SETS.values():
        assert spec.first_seed >= TRAIN_SEED_LIMIT
        ranges.append(range(spec.first_seed, spec.first_seed + spec.max_images))
    for a, b in itertools.pairwise(ranges):
        assert a.stop <= b.start
    with pytest.raises(ValueError, match="seeds"):
        ToyWorldDataset(base_seed=TRAIN_SEED_LIMIT - 5, num_scenes=10)

    world = ToyWorld(image_size=64)
    scenes = eval_set("toy-seen", image_size=64, num_images=4)
    np.testing.assert_array_equal(
        scenes[2].labels, eval_set("toy-seen", image_size=64, num_images=3)[2].labels
    )
    first = EVAL_SETS["toy-seen"].first_seed
    np.testing.assert_array_equal(
        scenes[0].image, world.scene(first, classes=world.seen_class_ids).image
    )
    for scene in scenes:
        assert set(np.unique(scene.labels).tolist()) <= set(world.seen_class_ids)


def test_eval_vocabularies(world):
    assert eval_vocabulary("toy-seen") == world.seen_class_ids
    assert eval_vocabulary("toy-open") == list(range(len(world.classes)))
    assert eval_vocabulary("toy-full") == list(range(len(world.classes)))
    with pytest.raises(ValueError, match="unknown ToyWorld eval set"):
        eval_set("toy-nope")


def test_cluttered_eval_scenes_are_busier():
    plain = eval_set("toy-open", image_size=64, num_images=6)
    full = eval_set("toy-full", image_size=64, num_images=6)
    assert sum(len(s.instance_classes) for s in full) > sum(len(s.instance_classes) for s in plain)
    assert np.mean([len(np.unique(s.labels)) for s in full]) > np.mean(
        [len(np.unique(s.labels)) for s in plain]
    )


def test_dataset_yields_tensors_from_seen_classes(world):
    dataset = ToyWorldDataset(split="seen", image_size=SIZE, base_seed=100, num_scenes=3)
    items = list(dataset)
    assert len(items) == len(dataset) == 3
    item = items[0]
    assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
    assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0
    assert item["labels"].shape == (SIZE, SIZE) and item["labels"].dtype == torch.int64
    assert isinstance(item["caption"], str)
    expected = world.scene(100, classes=world.seen_class_ids)
    np.testing.assert_array_equal(item["labels"].numpy(), expected.labels)
    assert set(torch.cat([i["labels"].unique() for i in items]).tolist()) <= set(
        world.seen_class_ids
    )


def test_dataloader_workers_get_disjoint_seeds():
    dataset = ToyWorldDataset(split="all", image_size=32, base_seed=40, num_scenes=6)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    got = sorted(item["caption"] + str(item["labels"].sum().item()) for item in loader)
    world = ToyWorld(image_size=32)
    expected = sorted(
        world.scene(s).caption + str(int(world.scene(s).labels.sum())) for s in range(40, 46)
    )
    assert got == expected
