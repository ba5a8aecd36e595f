"""Checks on the packaged benchmark vocabularies (ovseg/data/vocabularies/*.json).

Plain json + pathlib only, so it runs without torch or any model weights.
The expected entries below were read from cvlab-kaist/CAT-Seg
(datasets/*.json @ dc295eeb751821dfdbe49fc19285d588c8a5b71f); see
ovseg/data/vocabularies/README.md.
"""

import json
from pathlib import Path

import pytest

VOCAB_DIR = Path(__file__).resolve().parents[1] / "ovseg" / "data" / "vocabularies"

# name -> (title, number of classes, ignore index of the prepared label maps)
EXPECTED = {
    "coco-stuff-171": ("COCO-Stuff-171", 171, 255),
    "ade-150": ("ADE20K-150", 150, 255),
    "ade-847": ("ADE20K-847", 847, 65535),  # 16-bit TIFF labels
    "pc-59": ("PASCAL-Context-59", 59, 255),
    "pc-459": ("PASCAL-Context-459", 459, 65535),  # 16-bit TIFF labels
    "voc-20": ("PASCAL-VOC-20", 20, 255),
}

# (file, index, full synonym list) taken from the source lists.
SPOT_CHECKS = [
    ("coco-stuff-171", 0, ["person"]),
    ("coco-stuff-171", 4, ["airplane"]),
    ("coco-stuff-171", 79, ["toothbrush"]),  # last "thing"
    ("coco-stuff-171", 80, ["banner"]),  # first "stuff"
    ("coco-stuff-171", 84, ["building-other"]),
    ("coco-stuff-171", 170, ["wood"]),
    ("ade-150", 0, ["wall"]),
    ("ade-150", 1, ["building"]),
    ("ade-150", 7, ["bed"]),  # "bed " in the source, stripped here
    ("ade-150", 8, ["windowpane"]),
    ("ade-150", 12, ["person"]),
    ("ade-150", 89, ["television receiver"]),
    ("ade-150", 149, ["flag"]),
    ("ade-847", 0, ["wall"]),
    ("ade-847", 1, ["building", "edifice"]),
    ("ade-847", 11, ["person", "individual", "someone", "somebody", "mortal", "soul"]),
    ("ade-847", 300, ["altar", "communion table", "lord's table"]),
    ("ade-847", 846, ["adding machine", "totalizer", "totaliser"]),
    ("pc-59", 0, ["aeroplane"]),
    ("pc-59", 49, ["diningtable"]),
    ("pc-59", 58, ["wood"]),
    ("pc-459", 0, ["accordion"]),
    ("pc-459", 2, ["airconditioner"]),  # the source writes compounds without spaces
    ("pc-459", 396, ["table"]),
    ("pc-459", 458, ["wool"]),
    ("voc-20", 0, ["aeroplane"]),
    ("voc-20", 10, ["diningtable"]),
    ("voc-20", 19, ["tvmonitor"]),
]

# ADE20K-847 keeps distinct WordNet senses that share a head word (e.g. "bag" vs
# "bag, handbag, ..."); these are the only primary names allowed to repeat.
ALLOWED_DUPLICATE_PRIMARIES = {
    "ade-847": {
        "bag",
        "basket",
        "control panel",
        "grill",
        "patio",
        "pier",
        "pipe",
        "pot",
        "screen",
    },
}

# PASCAL-Context-59 label ids in the 459-class id space (1-based), in train-id
# order, as used by CAT-Seg's datasets/prepare_pascal_context_59.py.
PC59_IN_PC459 = [
    2,
    9,
    18,
    19,
    22,
    23,
    25,
    31,
    33,
    34,
    44,
    45,
    46,
    59,
    65,
    68,
    72,
    80,
    85,
    98,
    104,
    105,
    113,
    115,
    144,
    158,
    159,
    162,
    187,
    189,
    207,
    220,
    232,
    258,
    259,
    260,
    284,
    295,
    296,
    308,
    324,
    326,
    347,
    349,
    354,
    355,
    360,
    366,
    368,
    397,
    415,
    416,
    420,
    424,
    427,
    440,
    445,
    454,
    458,
]


def _load(name):
    with open(VOCAB_DIR / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)


def _primaries(name):
    return [entry[0] for entry in _load(name)["classes"]]


def test_all_files_present():
    assert set(EXPECTED) <= {p.stem for p in VOCAB_DIR.glob("*.json")}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_header(name):
    data = _load(name)
    title, count, ignore_index = EXPECTED[name]
    assert data["name"] == name
    assert data["title"] == title
    assert data["ignore_index"] == ignore_index
    assert isinstance(data["source"], str) and data["source"].strip()
    assert len(data["classes"]) == count
    # an ignore index must never collide with a real train id
    assert not 0 <= data["ignore_index"] < count


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_entries_well_formed(name):
    for i, entry in enumerate(_load(name)["classes"]):
        assert isinstance(entry, list) and entry, (name, i, entry)
        for synonym in entry:
            assert isinstance(synonym, str), (name, i, entry)
            assert synonym and synonym == synonym.strip(), (name, i, entry)
            assert synonym == synonym.lower(), (name, i, entry)
            assert synonym.isascii(), (name, i, entry)
            assert "," not in synonym and "  " not in synonym, (name, i, entry)
        assert len(set(entry)) == len(entry), (name, i, entry)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_no_duplicate_primary_names(name):
    primaries = _primaries(name)
    seen, duplicates = set(), set()
    for p in primaries:
        (duplicates if p in seen else seen).add(p)
    assert duplicates == ALLOWED_DUPLICATE_PRIMARIES.get(name, set())
    # whole entries are always unique
    entries = [tuple(e) for e in _load(name)["classes"]]
    assert len(set(entries)) == len(entries)


@pytest.mark.parametrize("name,index,expected", SPOT_CHECKS)
def test_spot_checks(name, index, expected):
    assert _load(name)["classes"][index] == expected


def test_coco_stuff_things_then_stuff():
    primaries = _primaries("coco-stuff-171")
    assert primaries[:10] == [
        "person",
        "bicycle",
        "car",
        "motorcycle",
        "airplane",
        "bus",
        "train",
        "truck",
        "boat",
        "traffic light",
    ]
    assert primaries[80:85] == ["banner", "blanket", "branch", "bridge", "building-other"]


def test_voc_order():
    assert _primaries("voc-20") == [
        "aeroplane",
        "bicycle",
        "bird",
        "boat",
        "bottle",
        "bus",
        "car",
        "cat",
        "chair",
        "cow",
        "diningtable",
        "dog",
        "horse",
        "motorbike",
        "person",
        "pottedplant",
        "sheep",
        "sofa",
        "train",
        "tvmonitor",
    ]


def test_voc_classes_are_pascal_context_classes():
    assert set(_primaries("voc-20")) <= set(_primaries("pc-59"))


def test_pc59_is_pc459_subset_in_label_order():
    pc59 = _primaries("pc-59")
    pc459 = _primaries("pc-459")
    assert len(PC59_IN_PC459) == 59 and sorted(PC59_IN_PC459) == PC59_IN_PC459
    mapped = [pc459[i - 1] for i in PC59_IN_PC459]
    # PASCAL-Context-459 calls it "table"; the 59-class list calls it "diningtable"
    mismatches = [(a, b) for a, b in zip(mapped, pc59, strict=True) if a != b]
    assert mismatches == [("table", "diningtable")]


def test_ade150_names_appear_in_ade847():
    # Cross-check of the two ADE lists: every ADE-150 name is a synonym in ADE-847.
    ade847_names = {s for entry in _load("ade-847")["classes"] for s in entry}
    missing = [p for p in _primaries("ade-150") if p not in ade847_names]
    assert missing == []


# The reviewed tables beside the vocabularies (see README.md there).


def _table(name):
    with open(VOCAB_DIR / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)


def test_every_overlap_key_is_a_class_and_every_value_a_coco_stuff_class():
    coco = _primaries("coco-stuff-171")
    tables = _table("coco-stuff-overlap")["benchmarks"]
    assert set(tables) == set(EXPECTED)
    for name, table in tables.items():
        classes = {", ".join(entry) for entry in _load(name)["classes"]}
        assert set(table) <= classes, (name, set(table) - classes)
        for key, mapped in table.items():
            assert mapped and len(set(mapped)) == len(mapped), (name, key)
            assert set(mapped) <= set(coco), (name, key, mapped)
            assert mapped == sorted(mapped, key=coco.index), (name, key)
    assert tables["coco-stuff-171"] == {name: [name] for name in coco}


def test_every_natural_name_override_respells_a_class_of_its_benchmark():
    overrides = _table("natural-names")["overrides"]
    assert set(overrides) <= set(EXPECTED)
    for name, table in overrides.items():
        names = {synonym for entry in _load(name)["classes"] for synonym in entry}
        assert set(table) <= names, (name, set(table) - names)
        for raw, natural in table.items():
            assert natural != raw and natural == " ".join(natural.split()), (name, raw)
            assert natural.isascii() and natural == natural.lower() and "_" not in natural
