"""The real-dataset loaders on tiny fake copies of their prepared layouts, and the augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg.data.augment import TrainAugmentation, photometric_distortion
from ovseg.data.datasets import (
    DATASETS,
    SegmentationDataset,
    build_training_data,
    zero_shot_split,
)
from ovseg.methods.base import IGNORE_INDEX
from ovseg.vocabulary import load_vocabulary, vocabulary_ignore_index

SIZE = (24, 32)  # H, W of the fake images


def fake_labels(num_classes: int, ignore_index: int, seed: int) -> np.ndarray:
    """Four horizontal bands of label ids (the highest id of the vocabulary among them) and an
    ignored corner."""
    rng = np.random.default_rng(seed)
    ids = [num_classes - 1, *rng.integers(0, num_classes, 3).tolist()]
    labels = np.repeat(np.array(ids), SIZE[0] // 4)[:, None].repeat(SIZE[1], axis=1)
    labels[:3, :3] = ignore_index
    return labels.astype(np.int64)


def write_fake_dataset(
    root: Path, name: str, *, layout: str = "detectron2", split: str | None = None, count: int = 2
) -> list[np.ndarray]:
    """Write ``count`` random images and label maps of ``name`` in ``layout`` under ``root``, in
    the on-disk encoding of that layout; return the label ids the loader should give back."""
    info = DATASETS[name]
    split = split or info.default_split
    files = info.layouts[layout]
    folder = root / files.folder
    vocabulary = load_vocabulary(info.vocabulary)
    ignore = 65535 if files.label_suffix == ".tif" else 255
    image_dir = folder / files.images.format(split=split)
    label_dir = folder / files.labels.format(split=split)
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    expected, stems = [], []
    for index in range(count):
        stem = f"{split}_{index:06d}"
        labels = fake_labels(len(vocabulary), ignore, seed=index)
        pixels = np.random.default_rng(index).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(image_dir / f"{stem}{files.image_suffix}")
        stored = labels
        if files.reduce_zero_label:  # VOC's raw ids: background 0, classes 1..20, border 255
            stored = np.where(labels == ignore, 0, labels + 1)
            stored[0, -1] = 255
            labels = labels.copy()
            labels[0, -1] = ignore
        dtype = np.uint16 if files.label_suffix == ".tif" else np.uint8
        Image.fromarray(stored.astype(dtype)).save(label_dir / f"{stem}{files.label_suffix}")
        expected.append(labels)
        stems.append(stem)
    for list_file in files.split_lists.get(split, ()):
        (folder / list_file).parent.mkdir(parents=True, exist_ok=True)
        (folder / list_file).write_text("".join(f"{stem}\n" for stem in stems))
        stems = []  # a second list (aug.txt) names no further images here
    return expected


LAYOUTS = [
    (name, layout, split)
    for name, info in DATASETS.items()
    for layout, files in info.layouts.items()
    for split in (info.splits if files.split_lists else (info.default_split,))
    if not files.split_lists or split in files.split_lists
]


@pytest.mark.parametrize(("name", "layout", "split"), LAYOUTS)
def test_each_loader_reads_its_prepared_layout_with_the_right_label_ids(
    tmp_path, name, layout, split
):
    expected = write_fake_dataset(tmp_path, name, layout=layout, split=split)
    dataset = SegmentationDataset(name, root=tmp_path, split=split, layout=layout)
    vocabulary = load_vocabulary(DATASETS[name].vocabulary)
    assert len(dataset) == 2 and len(dataset.vocabulary) == len(vocabulary)
    item = dataset[1]
    assert item["image"].shape == (3, *SIZE) and item["image"].dtype == torch.float32
    assert float(item["image"].min()) >= 0.0 and float(item["image"].max()) <= 1.0
    assert item["labels"].dtype == torch.int64
    np.testing.assert_array_equal(item["labels"].numpy(), expected[1])
    # The highest class id survives the file format (847 and 459 need 16-bit TIFF).
    assert int(item["labels"][5, 5]) == len(vocabulary) - 1
    assert int(item["labels"][0, 0]) == dataset.ignore_index


def test_the_ignore_index_is_65535_exactly_where_255_is_a_class():
    ignore = {name: vocabulary_ignore_index(DATASETS[name].vocabulary) for name in DATASETS}
    assert ignore == {
        "coco-stuff-164k": 255,
        "ade20k-150": 255,
        "ade20k-847": 65535,
        "pascal-context-59": 255,
        "pascal-context-459": 65535,
        "pascal-voc-20": 255,
    }


def test_voc_raw_ids_are_shifted_and_background_and_border_ignored(tmp_path):
    folder = tmp_path / "VOCdevkit" / "VOC2012"
    (folder / "JPEGImages").mkdir(parents=True)
    (folder / "SegmentationClassAug").mkdir()
    (folder / "ImageSets" / "Segmentation").mkdir(parents=True)
    raw = np.array([[0, 1, 15], [20, 255, 16]], dtype=np.uint8)
    for stem in ("a", "b"):
        Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(folder / "JPEGImages" / f"{stem}.jpg")
        Image.fromarray(raw).save(folder / "SegmentationClassAug" / f"{stem}.png")
    (folder / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    (folder / "ImageSets" / "Segmentation" / "aug.txt").write_text("b\n")
    dataset = SegmentationDataset("pascal-voc-20", root=tmp_path, split="train_aug", layout="mmseg")
    assert [s.name for s in dataset.samples] == ["a", "b"]  # train.txt + aug.txt
    np.testing.assert_array_equal(dataset.read(0)[1], [[255, 0, 14], [19, 255, 15]])


def test_the_root_comes_from_the_environment_and_a_missing_dataset_says_where(
    tmp_path, monkeypatch
):
    write_fake_dataset(tmp_path / "env", "ade20k-150")
    monkeypatch.delenv("OVSEG_DATASETS", raising=False)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "env"))
    assert len(SegmentationDataset("ade20k-150")) == 2
    monkeypatch.setenv("OVSEG_DATASETS", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="annotations_detectron2/validation"):
        SegmentationDataset("ade20k-150")
    with pytest.raises(ValueError, match="splits"):
        SegmentationDataset("ade20k-847", split="training")
    with pytest.raises(ValueError, match="Unknown dataset"):
        SegmentationDataset("cityscapes")


def test_a_missing_image_is_named(tmp_path):
    write_fake_dataset(tmp_path, "pascal-context-59")
    next((tmp_path / "VOCdevkit" / "VOC2010" / "JPEGImages").glob("*.jpg")).unlink()
    with pytest.raises(FileNotFoundError, match=r"missing, e\.g\. .*JPEGImages"):
        SegmentationDataset("pascal-context-59", root=tmp_path)


def test_zegclip_zero_shot_splits():
    seen, unseen = zero_shot_split("coco-stuff-164k")
    assert unseen == [19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160]
    assert len(seen) == 156 and not set(seen) & set(unseen)
    seen, unseen = zero_shot_split("pascal-voc-20")
    assert (seen, unseen) == (list(range(15)), list(range(15, 20)))
    with pytest.raises(ValueError, match="no zero-shot split"):
        zero_shot_split("ade20k-150")


def test_zero_shot_training_sees_seen_classes_only_and_ignores_unseen_pixels(tmp_path):
    write_fake_dataset(tmp_path, "pascal-voc-20", layout="mmseg", split="train_aug", count=3)
    spec = {
        "name": "pascal-voc-20",
        "root": str(tmp_path),
        "layout": "mmseg",
        "zero_shot": True,
        "crop_size": 16,
        "scale_range": [0.5, 2.0],
        "cat_max_ratio": 0.75,
    }
    stream, vocabulary, table = build_training_data(spec, seed=0, ignore_index=IGNORE_INDEX)
    assert [names[0] for names in vocabulary][-1] == "person" and len(vocabulary) == 15
    assert table[14] == 14 and table[15] == IGNORE_INDEX and table[255] == IGNORE_INDEX
    items = [item for item, _ in zip(stream, range(7), strict=False)]
    assert all(item["image"].shape == (3, 16, 16) for item in items)
    assert all(item["labels"].shape == (16, 16) for item in items)
    labels = torch.stack([item["labels"] for item in items])
    mapped = torch.from_numpy(table)[labels]
    assert set(mapped.unique().tolist()) <= {*range(15), IGNORE_INDEX}
    again = [item for item, _ in zip(stream, range(7), strict=False)]
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(items, again, strict=True))


def test_a_training_spec_needs_a_crop_size_and_known_options(tmp_path):
    write_fake_dataset(tmp_path, "coco-stuff-164k", split="train2017")
    spec = {"name": "coco-stuff-164k", "root": str(tmp_path)}
    with pytest.raises(ValueError, match="crop_size"):
        build_training_data(spec, 0, ignore_index=IGNORE_INDEX)
    with pytest.raises(ValueError, match="Unknown option"):
        build_training_data({**spec, "crop_size": 8, "colour": 1}, 0, ignore_index=IGNORE_INDEX)
    _, vocabulary, table = build_training_data({**spec, "crop_size": 8}, 0, ignore_index=255)
    assert len(vocabulary) == 171 and table[170] == 170 and table[255] == 255


def banded(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An image whose red channel is 40 × its label (labels 0-3 in vertical bands)."""
    labels = (np.arange(width)[None, :] * 4 // width).repeat(height, axis=0).astype(np.int64)
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = labels * 40
    return image, labels


def test_augmentation_scales_crops_flips_and_pads_image_and_labels_together():
    image, labels = banded(40, 80)
    augment = TrainAugmentation(crop_size=32, scale_range=(0.5, 2.0), color_jitter=False)
    rng = np.random.default_rng(0)
    flipped = 0
    for _ in range(20):
        out_image, out_labels = augment(image, labels, rng)
        assert out_image.shape == (32, 32, 3) and out_labels.shape == (32, 32)
        valid = out_labels != 255
        assert set(np.unique(out_labels[valid])) <= {0, 1, 2, 3}  # nearest: no new labels
        agree = np.abs(out_image[..., 0][valid].astype(int) - out_labels[valid] * 40) <= 20
        assert agree.mean() > 0.9
        assert (out_image[~valid] == 0).all()  # padding is black where labels are ignored
        columns = out_labels[0][out_labels[0] != 255]
        flipped += bool(len(np.unique(columns)) > 1 and columns[0] > columns[-1])
    assert 0 < flipped < 20


def test_rescale_sets_the_short_side_and_caps_the_long_side():
    image, labels = banded(100, 200)
    augment = TrainAugmentation(crop_size=64, short_side=50, max_size=80, color_jitter=False)
    resized, resized_labels = augment.rescale(image, labels, np.random.default_rng(0))
    assert resized_labels.shape == (40, 80) and resized.shape == (40, 80, 3)  # long side capped
    augment = TrainAugmentation(crop_size=64, short_side=50, color_jitter=False)
    assert augment.rescale(image, labels, np.random.default_rng(0))[1].shape == (50, 100)


def test_cat_max_ratio_prefers_crops_with_several_classes():
    labels = np.zeros((64, 64), np.int64)
    labels[:, 56:] = 1
    image = np.zeros((64, 64, 3), np.uint8)
    rng = np.random.default_rng(0)
    strict = TrainAugmentation(
        crop_size=16, short_side=64, cat_max_ratio=0.75, flip=False, color_jitter=False
    )
    loose = TrainAugmentation(crop_size=16, short_side=64, flip=False, color_jitter=False)
    mixed_strict = sum(len(np.unique(strict(image, labels, rng)[1])) > 1 for _ in range(40))
    mixed_loose = sum(len(np.unique(loose(image, labels, rng)[1])) > 1 for _ in range(40))
    assert mixed_strict > mixed_loose


def test_photometric_distortion_changes_colours_but_not_the_shape():
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    outputs = [photometric_distortion(image, np.random.default_rng(seed)) for seed in range(6)]
    assert all(out.shape == image.shape and out.dtype == np.uint8 for out in outputs)
    assert any(not np.array_equal(out, image) for out in outputs)
