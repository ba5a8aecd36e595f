"""The real benchmarks in the prepared layouts the anchors use, and a training stream over them.

Six datasets, each with its bundled vocabulary (:mod:`ovseg.vocabulary`, label-id order) and
ignore index, read from ``root`` (default ``$OVSEG_DATASETS``, else ``$DETECTRON2_DATASETS``, else
``./datasets``) in one of two layouts:

``detectron2`` — what CAT-Seg's and SED's ``datasets/prepare_*.py`` scripts write::

    coco-stuff/images/{train2017,val2017}/*.jpg
    coco-stuff/annotations_detectron2/{train2017,val2017}/*.png    171 train ids, 255 ignore
    ADEChallengeData2016/images/validation/*.jpg
    ADEChallengeData2016/annotations_detectron2/validation/*.png  150 train ids, 255 ignore
    ADE20K_2021_17_01/images_detectron2/validation/*.jpg
    ADE20K_2021_17_01/annotations_detectron2/validation/*.tif     847 train ids, uint16, 65535
    VOCdevkit/VOC2010/JPEGImages/*.jpg
    VOCdevkit/VOC2010/annotations_detectron2/pc59_val/*.png       59 train ids, 255 ignore
    VOCdevkit/VOC2010/annotations_detectron2/pc459_val/*.tif      459 train ids, uint16, 65535
    VOCdevkit/VOC2012/JPEGImages/*.jpg
    VOCdevkit/VOC2012/annotations_detectron2/val/*.png            20 train ids, 255 ignore

``mmseg`` — what ZegCLIP (and so LDVC) trains on::

    coco_stuff164k/images/{train2017,val2017}/*.jpg
    coco_stuff164k/annotations/{train2017,val2017}/*_labelTrainIds.png   the same 171 train ids
    VOCdevkit/VOC2012/JPEGImages/*.jpg
    VOCdevkit/VOC2012/SegmentationClassAug/*.png        VOC ids: 0 background, 1..20, 255 border
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,aug,val}.txt         image lists

VOC's raw ids are shifted as mmseg's ``reduce_zero_label`` does (background becomes ignored, 1..20
become 0..19); the ``train_aug`` split is ``train.txt`` + ``aug.txt`` (10,582 images with SBD).

The zero-shot protocol of ZegCLIP and LDVC (:data:`ZERO_SHOT_UNSEEN`) splits VOC-20 into 15 seen
and 5 unseen classes and COCO-Stuff into 156 and 15: training sees only the seen classes (unseen
pixels are ignored, the images are kept); evaluation scores all of them, seen and unseen apart.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from ovseg.data.augment import TrainAugmentation
from ovseg.vocabulary import Vocabulary, load_vocabulary, vocabulary_ignore_index


@dataclass(frozen=True)
class DatasetLayout:
    """Where one layout keeps a dataset's files, relative to the dataset's folder.

    Attributes:
        folder: the dataset's folder under the datasets root.
        images: image folder; ``{split}`` is replaced by the split name.
        labels: label folder, likewise.
        label_suffix: what follows the image stem in a label file name.
        image_suffix: likewise for images.
        split_lists: per split, text files (one image stem a line) that list its images; a split
            without lists takes every label file in ``labels``.
        reduce_zero_label: labels are raw ids with 0 as background: subtract 1 and ignore 0.
    """

    folder: str
    images: str
    labels: str
    label_suffix: str = ".png"
    image_suffix: str = ".jpg"
    split_lists: dict[str, tuple[str, ...]] = field(default_factory=dict)
    reduce_zero_label: bool = False


@dataclass(frozen=True)
class DatasetInfo:
    """A benchmark: its vocabulary, its splits and layouts, and its column name in the papers."""

    vocabulary: str
    splits: tuple[str, ...]
    layouts: dict[str, DatasetLayout]
    title: str

    @property
    def default_split(self) -> str:
        return self.splits[-1]


VOC_LISTS = "ImageSets/Segmentation"

DATASETS: dict[str, DatasetInfo] = {
    "coco-stuff-164k": DatasetInfo(
        vocabulary="coco-stuff-171",
        splits=("train2017", "val2017"),
        title="COCO-Stuff",
        layouts={
            "detectron2": DatasetLayout(
                folder="coco-stuff",
                images="images/{split}",
                labels="annotations_detectron2/{split}",
            ),
            "mmseg": DatasetLayout(
                folder="coco_stuff164k",
                images="images/{split}",
                labels="annotations/{split}",
                label_suffix="_labelTrainIds.png",
            ),
        },
    ),
    "ade20k-150": DatasetInfo(
        vocabulary="ade-150",
        splits=("training", "validation"),
        title="A-150",
        layouts={
            "detectron2": DatasetLayout(
                folder="ADEChallengeData2016",
                images="images/{split}",
                labels="annotations_detectron2/{split}",
            )
        },
    ),
    "ade20k-847": DatasetInfo(
        vocabulary="ade-847",
        splits=("validation",),
        title="A-847",
        layouts={
            "detectron2": DatasetLayout(
                folder="ADE20K_2021_17_01",
                images="images_detectron2/{split}",
                labels="annotations_detectron2/{split}",
                label_suffix=".tif",
            )
        },
    ),
    "pascal-context-59": DatasetInfo(
        vocabulary="pc-59",
        splits=("val",),
        title="PC-59",
        layouts={
            "detectron2": DatasetLayout(
                folder="VOCdevkit/VOC2010",
                images="JPEGImages",
                labels="annotations_detectron2/pc59_{split}",
            )
        },
    ),
    "pascal-context-459": DatasetInfo(
        vocabulary="pc-459",
        splits=("val",),
        title="PC-459",
        layouts={
            "detectron2": DatasetLayout(
                folder="VOCdevkit/VOC2010",
                images="JPEGImages",
                labels="annotations_detectron2/pc459_{split}",
                label_suffix=".tif",
            )
        },
    ),
    "pascal-voc-20": DatasetInfo(
        vocabulary="voc-20",
        splits=("train_aug", "val"),
        title="PAS-20",
        layouts={
            "detectron2": DatasetLayout(
                folder="VOCdevkit/VOC2012",
                images="JPEGImages",
                labels="annotations_detectron2/{split}",
            ),
            "mmseg": DatasetLayout(
                folder="VOCdevkit/VOC2012",
                images="JPEGImages",
                labels="SegmentationClassAug",
                split_lists={
                    "train_aug": (f"{VOC_LISTS}/train.txt", f"{VOC_LISTS}/aug.txt"),
                    "train": (f"{VOC_LISTS}/train.txt",),
                    "val": (f"{VOC_LISTS}/val.txt",),
                },
                reduce_zero_label=True,
            ),
        },
    ),
}

# The five cross-dataset benchmarks of the papers, in their table order.
BENCHMARKS: tuple[str, ...] = (
    "ade20k-847",
    "pascal-context-459",
    "ade20k-150",
    "pascal-context-59",
    "pascal-voc-20",
)

# ZegCLIP's unseen classes (LDVC spec §3.2), by name in the bundled vocabularies.
ZERO_SHOT_UNSEEN: dict[str, tuple[str, ...]] = {
    "pascal-voc-20": ("pottedplant", "sheep", "sofa", "train", "tvmonitor"),
    "coco-stuff-164k": (
        "cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors",
        "cardboard", "clouds", "grass", "playingfield", "river", "road", "tree", "wall-concrete",
    ),
}  # fmt: skip


def datasets_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$OVSEG_DATASETS``, else ``$DETECTRON2_DATASETS``, else ``./datasets``."""
    chosen = root or os.environ.get("OVSEG_DATASETS") or os.environ.get("DETECTRON2_DATASETS")
    return Path(chosen or "datasets")


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; known: {', '.join(DATASETS)}.")
    return DATASETS[name]


def zero_shot_split(name: str) -> tuple[list[int], list[int]]:
    """(seen, unseen) label ids of a dataset's zero-shot split, each in increasing order."""
    if name not in ZERO_SHOT_UNSEEN:
        raise ValueError(
            f"{name!r} has no zero-shot split; datasets with one: {', '.join(ZERO_SHOT_UNSEEN)}."
        )
    # ZegCLIP's unseen lists use the benchmarks' own spellings ("pottedplant").
    vocabulary = load_vocabulary(dataset_info(name).vocabulary, raw=True)
    unseen = sorted(vocabulary.names.index(class_name) for class_name in ZERO_SHOT_UNSEEN[name])
    seen = [i for i in range(len(vocabulary)) if i not in set(unseen)]
    return seen, unseen


@dataclass(frozen=True)
class Sample:
    """One image and its label map on disk."""

    name: str
    image: Path
    labels: Path


class SegmentationDataset(torch.utils.data.Dataset):
    """A benchmark split on disk: items are dicts with ``"image"`` (``3×H×W`` float in [0, 1]),
    ``"labels"`` (``H×W`` int64 label ids, :attr:`ignore_index` where unlabelled) and ``"name"``.

    Arguments:
        name: a key of :data:`DATASETS` (``"coco-stuff-164k"``, ``"ade20k-847"``, ...).
        root: the datasets root (see :func:`datasets_root`).
        split: a split of the dataset (default: its evaluation split).
        layout: ``"detectron2"`` or ``"mmseg"`` (where the dataset has it).

    Raises:
        FileNotFoundError: the label folder or a listed image is missing, or the split is empty;
            the message names the path and the preparation step.
    """

    def __init__(
        self,
        name: str,
        *,
        root: str | os.PathLike | None = None,
        split: str | None = None,
        layout: str = "detectron2",
    ) -> None:
        info = dataset_info(name)
        split = split or info.default_split
        if split not in info.splits:
            raise ValueError(f"{name} has the splits {list(info.splits)}; got {split!r}.")
        if layout not in info.layouts:
            raise ValueError(f"{name} comes in the layouts {list(info.layouts)}; got {layout!r}.")
        self.name, self.split, self.info = name, split, info
        self.layout = info.layouts[layout]
        self.folder = datasets_root(root) / self.layout.folder
        self.vocabulary: Vocabulary = load_vocabulary(info.vocabulary)
        self.ignore_index = vocabulary_ignore_index(info.vocabulary)
        self.samples = self._find_samples()

    def _find_samples(self) -> list[Sample]:
        layout, folder = self.layout, self.folder
        image_dir = folder / layout.images.format(split=self.split)
        label_dir = folder / layout.labels.format(split=self.split)
        if not label_dir.is_dir():
            raise FileNotFoundError(
                f"No label folder {label_dir} for {self.name} ({self.split}); prepare the dataset "
                "as docs/training-real-data.md describes, or set OVSEG_DATASETS to its root."
            )
        lists = layout.split_lists.get(self.split)
        if lists:
            stems = [line.strip() for path in lists for line in _read_lines(folder / path)]
            stems = [stem for stem in stems if stem]
        else:
            suffix = layout.label_suffix
            stems = sorted(p.name[: -len(suffix)] for p in label_dir.glob(f"*{suffix}"))
        samples = [
            Sample(
                stem,
                image_dir / f"{stem}{layout.image_suffix}",
                label_dir / f"{stem}{layout.label_suffix}",
            )
            for stem in stems
        ]
        if not samples:
            raise FileNotFoundError(f"{label_dir} holds no *{layout.label_suffix} label files.")
        missing = [s.image for s in samples if not s.image.is_file()]
        missing += [s.labels for s in samples if lists and not s.labels.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} file(s) of {self.name} ({self.split}) are missing, "
                f"e.g. {missing[0]}."
            )
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``index`` as an ``H×W×3`` uint8 image and ``H×W`` int64 label ids."""
        sample = self.samples[index]
        with Image.open(sample.image) as image:
            pixels = np.asarray(image.convert("RGB"))
        with Image.open(sample.labels) as label_image:
            raw = np.asarray(label_image).astype(np.int64)
        if raw.ndim != 2 or raw.shape != pixels.shape[:2]:
            raise ValueError(
                f"{sample.labels} is {raw.shape}, not a single-channel map of the image's size "
                f"{pixels.shape[:2]}."
            )
        if self.layout.reduce_zero_label:
            raw = np.where((raw == 0) | (raw == 255), self.ignore_index, raw - 1)
        return pixels, raw

    def __getitem__(self, index: int) -> dict[str, object]:
        pixels, labels = self.read(index)
        return {
            "image": torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0,
            "labels": torch.from_numpy(labels),
            "name": self.samples[index].name,
        }


class TrainingStream(torch.utils.data.IterableDataset):
    """An endless, shuffled, augmented stream of a :class:`SegmentationDataset`.

    Each epoch is a fresh permutation seeded by ``(seed, epoch)``; distributed ranks and
    DataLoader workers take disjoint shares of it. Items are ``{"image": 3×S×S float in [0, 1],
    "labels": S×S int64 label ids}`` with S the augmentation's crop size; padded pixels carry the
    dataset's ignore index.
    """

    def __init__(
        self, dataset: SegmentationDataset, augmentation: TrainAugmentation, *, seed: int
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.augmentation = augmentation
        self.seed = seed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        shard, shards = rank * workers + worker_id, world_size * workers
        rng = np.random.default_rng([self.seed, shard])
        epoch = 0
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
            for index in order[shard::shards]:
                pixels, labels = self.dataset.read(int(index))
                pixels, labels = self.augmentation(pixels, labels, rng)
                yield {
                    "image": torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0,
                    "labels": torch.from_numpy(labels.astype(np.int64)),
                }
            epoch += 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"No image list {path}.")
    return path.read_text().splitlines()


def label_to_vocabulary(
    num_labels: int, ignore_index: int, class_ids: Sequence[int], target_ignore: int
) -> np.ndarray:
    """A lookup table from label ids (and ``ignore_index``) to positions in ``class_ids``.

    Labels outside ``class_ids`` (unseen classes, ignored pixels) map to ``target_ignore``.
    """
    table = np.full(max(num_labels, ignore_index + 1), target_ignore, dtype=np.int64)
    table[list(class_ids)] = np.arange(len(class_ids))
    return table


def build_training_data(
    spec: dict[str, object], seed: int, *, ignore_index: int
) -> tuple[TrainingStream, list[tuple[str, ...]], np.ndarray]:
    """The training stream, vocabulary and label map a dataset spec of a training config names.

    ``spec`` keys: ``name`` (a :data:`DATASETS` key), ``root``, ``split`` (default: the first,
    the training split), ``layout``, ``zero_shot`` (True: seen classes only), and the
    :class:`TrainAugmentation` fields ``crop_size`` (required), ``short_side``, ``max_size``,
    ``scale_range``, ``flip``, ``color_jitter``, ``cat_max_ratio``.

    Returns:
        the stream; the training vocabulary (synonym tuples); and the table from the dataset's
        label ids to vocabulary positions, ``ignore_index`` for unseen and unlabelled pixels.
    """
    options = dict(spec)
    name = str(options.pop("name"))
    info = dataset_info(name)
    dataset = SegmentationDataset(
        name,
        root=options.pop("root", None),
        split=options.pop("split", info.splits[0]),
        layout=str(options.pop("layout", "detectron2")),
    )
    class_ids = list(range(len(dataset.vocabulary)))
    if options.pop("zero_shot", False):
        class_ids, _ = zero_shot_split(name)
    if len(class_ids) > ignore_index:
        raise ValueError(
            f"{name} has {len(class_ids)} training classes; the trainer's ignore index "
            f"{ignore_index} limits training to {ignore_index}."
        )
    if "crop_size" not in options:
        raise ValueError(f"The dataset spec of {name} needs a crop_size for training.")
    if "scale_range" in options:
        options["scale_range"] = tuple(options["scale_range"])
    try:
        augmentation = TrainAugmentation(**options, ignore_index=dataset.ignore_index)
    except TypeError as error:
        raise ValueError(f"Unknown option in the dataset spec of {name}: {error}.") from error
    vocabulary = [dataset.vocabulary[i] for i in class_ids]
    table = label_to_vocabulary(
        len(dataset.vocabulary), dataset.ignore_index, class_ids, ignore_index
    )
    return TrainingStream(dataset, augmentation, seed=seed), vocabulary, table
