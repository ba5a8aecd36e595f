import numpy as np
import pytest

from ovseg.vocabulary import (
    MAX_CLASSES,
    Vocabulary,
    VocabularyError,
    coco_stuff_overlap,
    coco_stuff_seen_names,
    list_vocabularies,
    load_vocabulary,
    normalise_class_name,
    parse_vocabulary,
)


def test_commas_and_newlines_separate_classes_and_semicolons_synonyms():
    vocabulary = parse_vocabulary("cat, car; automobile\nsky\n\n , grass ")
    assert vocabulary.classes == (("cat",), ("car", "automobile"), ("sky",), ("grass",))
    assert vocabulary.names == ("cat", "car", "sky", "grass")


def test_whitespace_inside_names_is_collapsed():
    assert parse_vocabulary("  brick    wall ,\ttraffic  light").names == (
        "brick wall",
        "traffic light",
    )


def test_repeated_names_are_dropped_case_insensitively_and_reported():
    vocabulary = parse_vocabulary("cat, Cat, dog, car; automobile, automobile")
    assert vocabulary.names == ("cat", "dog", "car")
    assert vocabulary.dropped_duplicates == ("Cat", "automobile")


def test_a_synonym_already_used_by_an_earlier_class_is_removed_from_the_later_one():
    vocabulary = parse_vocabulary(["car; automobile", "truck; automobile; lorry"])
    assert vocabulary.classes == (("car", "automobile"), ("truck", "lorry"))


@pytest.mark.parametrize("text", ["", "   ", ",,,", "\n;\n", ";;, ;"])
def test_empty_vocabulary_is_a_clear_error(text):
    with pytest.raises(VocabularyError, match="empty"):
        parse_vocabulary(text)


def test_lists_and_synonym_lists_are_accepted():
    vocabulary = parse_vocabulary([["car", "automobile"], "sky", "grass; lawn"])
    assert vocabulary.classes == (("car", "automobile"), ("sky",), ("grass", "lawn"))


def test_a_vocabulary_passes_through_unchanged():
    vocabulary = Vocabulary((("cat",),))
    assert parse_vocabulary(vocabulary) is vocabulary


def test_a_thousand_names_parse_and_too_many_is_an_error():
    assert len(parse_vocabulary(", ".join(f"class {i}" for i in range(1000)))) == 1000
    with pytest.raises(VocabularyError, match=f"at most {MAX_CLASSES}"):
        parse_vocabulary([f"class {i}" for i in range(MAX_CLASSES + 1)])


def test_an_absurdly_long_name_is_an_error():
    with pytest.raises(VocabularyError, match="characters long"):
        parse_vocabulary("x" * 500)


def test_index_finds_a_class_by_any_synonym():
    vocabulary = parse_vocabulary("cat, car; automobile")
    assert vocabulary.index("Automobile") == 1
    with pytest.raises(KeyError):
        vocabulary.index("dog")


def test_bundled_vocabularies_keep_their_exact_order_and_size():
    sizes = {name: len(load_vocabulary(name)) for name in list_vocabularies()}
    assert sizes == {
        "ade-150": 150,
        "ade-847": 847,
        "coco-stuff-171": 171,
        "pc-459": 459,
        "pc-59": 59,
        "voc-20": 20,
    }
    assert load_vocabulary("coco-stuff-171").names[0] == "person"


def test_unknown_bundled_vocabulary_names_the_known_ones():
    with pytest.raises(VocabularyError, match="ade-150"):
        load_vocabulary("ade-9000")


# --- Benchmark names reach methods in natural language (issue 19, item 12) ---

# Run-together words of the source lists (CAT-Seg's spellings); none may reach a method.
RUN_TOGETHER = {
    "pottedplant", "tvmonitor", "diningtable", "playingfield", "waterdrops", "airconditioner",
    "babycarriage", "baseballbat", "cellphone", "firehydrant", "remotecontrol", "pooltable",
    "swimmingpool", "trashbin", "windowblinds", "wineglass", "lightbulb", "mousepad",
    "washingmachine", "vendingmachine", "casetterecorder", "drawncarriage", "airballoon",
    "horse-drawncarriage", "hot-airballoon", "waterskateboard", "crabstick", "signallight",
}  # fmt: skip

# The only hyphens left: English spellings (ADE-847's WordNet synonyms, PASCAL-Context compounds).
ENGLISH_HYPHENATED = {
    "ash-bin", "check-in desk", "dog-iron", "double-decker", "drop-off", "electric-light bulb",
    "forte-piano", "go-cart", "post-it", "t-shirt", "vent-hole", "horse-drawn carriage",
    "hot-air balloon",
}  # fmt: skip


def _all_names(vocabulary):
    return {synonym for synonyms in vocabulary for synonym in synonyms}


@pytest.mark.parametrize("name", list_vocabularies())
def test_no_bundled_name_given_to_methods_is_run_together_or_machine_hyphenated(name):
    names = _all_names(load_vocabulary(name))
    assert not {n for n in names if "_" in n}
    assert {n for n in names if "-" in n} <= ENGLISH_HYPHENATED
    assert not {n for n in names if n.endswith((" other", " stuff"))}
    assert all(len(set(synonyms)) == len(synonyms) for synonyms in load_vocabulary(name))
    # ADE-847's WordNet synonyms may add a closed spelling ("cellphone") beside a display name.
    display = set(load_vocabulary(name).names)
    words = {word for n in display for word in n.split()}
    assert not (words | display) & RUN_TOGETHER


@pytest.mark.parametrize(
    ("name", "raw", "natural"),
    [
        ("voc-20", "pottedplant", "potted plant"),
        ("voc-20", "tvmonitor", "tv monitor"),
        ("voc-20", "diningtable", "dining table"),
        ("voc-20", "aeroplane", "aeroplane"),
        ("pc-59", "tvmonitor", "tv monitor"),
        ("coco-stuff-171", "wall-concrete", "concrete wall"),
        ("coco-stuff-171", "wall-other", "wall"),
        ("coco-stuff-171", "building-other", "building"),
        ("coco-stuff-171", "desk-stuff", "desk"),
        ("coco-stuff-171", "floor-wood", "wood floor"),
        ("coco-stuff-171", "ceiling-tile", "tile ceiling"),
        ("coco-stuff-171", "window-blind", "window blind"),
        ("coco-stuff-171", "structural-other", "structure"),
        ("coco-stuff-171", "playingfield", "playing field"),
        ("coco-stuff-171", "waterdrops", "water drops"),
        ("coco-stuff-171", "potted plant", "potted plant"),
        ("pc-459", "airconditioner", "air conditioner"),
        ("pc-459", "casetterecorder", "cassette recorder"),
        ("pc-459", "horse-drawncarriage", "horse-drawn carriage"),
        ("pc-459", "fireplace", "fireplace"),
        ("pc-459", "wineglass", "wine glass"),
        ("ade-847", "check-in-desk", "check-in desk"),
        ("ade-150", "chest of drawers", "chest of drawers"),
    ],
)
def test_benchmark_names_map_to_natural_language_at_the_same_label_id(name, raw, natural):
    label_id = load_vocabulary(name, raw=True).names.index(raw)
    assert load_vocabulary(name).names[label_id] == natural


def test_only_the_reviewed_classes_are_respelled():
    changed = {
        name: sum(
            raw != natural
            for raw, natural in zip(
                load_vocabulary(name, raw=True), load_vocabulary(name), strict=True
            )
        )
        for name in list_vocabularies()
    }
    assert changed == {
        "ade-150": 0,
        "ade-847": 2,
        "coco-stuff-171": 31,
        "pc-459": 97,
        "pc-59": 3,
        "voc-20": 3,
    }


def _letters(name):
    return "".join(sorted(name.replace(" ", "").replace("-", "")))


@pytest.mark.parametrize("name", list_vocabularies())
def test_every_natural_name_respells_the_class_of_the_same_label_id(name):
    # Respelling only moves spaces and hyphens (COCO's "wall-concrete" also swaps its words and
    # drops "-other"/"-stuff"), so a class list shifted by one id fails here.
    corrections = {"casetterecorder": "cassette recorder", "structural-other": "structure"}
    raw_names = load_vocabulary(name, raw=True).names
    for raw, natural in zip(raw_names, load_vocabulary(name).names, strict=True):
        if raw in corrections:
            assert natural == corrections[raw]
        else:
            stripped = raw.removesuffix("-other").removesuffix("-stuff")
            assert _letters(natural) == _letters(stripped), (raw, natural)


def test_a_benchmark_dataset_hands_natural_names_in_label_id_order(tmp_path):
    from PIL import Image

    from ovseg.data.datasets import SegmentationDataset

    folder = tmp_path / "VOCdevkit" / "VOC2012"
    (folder / "JPEGImages").mkdir(parents=True)
    (folder / "annotations_detectron2" / "val").mkdir(parents=True)
    Image.new("RGB", (8, 4)).save(folder / "JPEGImages" / "a.jpg")
    labels = np.full((4, 8), 255, dtype=np.uint8)
    labels[:, :4], labels[:, 4:6] = 19, 15
    Image.fromarray(labels).save(folder / "annotations_detectron2" / "val" / "a.png")
    dataset = SegmentationDataset("pascal-voc-20", root=tmp_path, split="val")
    present = sorted({int(v) for v in dataset[0]["labels"].unique()} - {dataset.ignore_index})
    assert [dataset.vocabulary.names[i] for i in present] == ["potted plant", "tv monitor"]
    assert len(dataset.vocabulary) == 20


def test_raw_keeps_the_source_spellings():
    assert load_vocabulary("voc-20", raw=True).names[19] == "tvmonitor"
    assert load_vocabulary("coco-stuff-171", raw=True).names[160] == "wall-concrete"


def test_list_vocabularies_leaves_out_the_reviewed_tables():
    assert "natural-names" not in list_vocabularies()
    assert "coco-stuff-overlap" not in list_vocabularies()
    with pytest.raises(VocabularyError, match="Unknown vocabulary"):
        load_vocabulary("coco-stuff-overlap")


def test_normalise_class_name():
    assert normalise_class_name("  Wall-Other ") == "wall other"
    assert normalise_class_name("tv_monitor\tset") == "tv monitor set"


# --- COCO-Stuff's overlap with each benchmark: DCP-CLIP's seen set (issue 19, item 1) ---

SEEN_COUNTS = {
    "ade-150": 70,
    "ade-847": 124,
    "coco-stuff-171": 171,
    "pc-459": 102,
    "pc-59": 54,
    "voc-20": 20,
}


def test_seen_counts_per_benchmark_are_those_of_the_reviewed_table():
    assert {name: len(coco_stuff_overlap(name)) for name in list_vocabularies()} == SEEN_COUNTS


WALLS = ("wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile")


def test_coco_spellings_of_stuff_and_voc_classes_are_seen():
    ade = coco_stuff_overlap("ade-150")
    assert ade["wall"] == (*WALLS, "wall-wood")
    assert ade["building"] == ("building-other",)
    assert ade["sky"] == ("clouds", "sky-other")
    assert ade["floor"] == (
        "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood"
    )  # fmt: skip
    assert ade["ceiling"] == ("ceiling-other", "ceiling-tile")
    assert ade["sofa"] == ("couch",) and ade["television receiver"] == ("tv",)
    voc = coco_stuff_overlap("voc-20")
    assert {key: voc[key] for key in ("aeroplane", "sofa", "tvmonitor", "motorbike")} == {
        "aeroplane": ("airplane",),
        "sofa": ("couch",),
        "tvmonitor": ("tv",),
        "motorbike": ("motorcycle",),
    }
    assert voc["diningtable"] == ("dining table",) and voc["pottedplant"] == ("potted plant",)
    assert coco_stuff_overlap("coco-stuff-171")["wall-other"] == ("wall-other",)
    ade847 = coco_stuff_overlap("ade-847")
    assert ade847["bag, handbag, pocketbook, purse"] == ("handbag",)
    assert ade847["cellular telephone, cellular phone, cellphone, cell, mobile phone"] == (
        "cell phone",
    )


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("ade-150", "chandelier"),
        ("ade-150", "bulletin board"),  # the DCP-CLIP paper's unseen examples (Fig. 7)
        ("ade-150", "chest of drawers"),
        ("ade-150", "armchair"),  # narrower than COCO's chair, and its own class beside it
        ("ade-150", "bag"),
        ("ade-847", "bag"),
        ("ade-847", "pot, flowerpot"),
        ("pc-59", "bag"),
        ("pc-459", "accordion"),
    ],
)
def test_classes_coco_stuff_does_not_name_are_unseen(name, key):
    assert key in {", ".join(synonyms) for synonyms in load_vocabulary(name, raw=True)}
    assert key not in coco_stuff_overlap(name)


def test_the_overlap_of_an_unknown_benchmark_is_a_clear_error():
    with pytest.raises(VocabularyError, match="ade-150"):
        coco_stuff_overlap("ade-9000")


def test_seen_names_hold_raw_natural_and_coco_spellings_and_no_unseen_one():
    seen = coco_stuff_seen_names()
    expected = {
        "wall", "wall other", "wall concrete", "concrete wall", "tvmonitor", "tv monitor", "tv",
        "pottedplant", "potted plant", "aeroplane", "airplane", "motorbike", "sofa", "couch",
        "playingfield", "playing field", "building", "sky", "floor", "ceiling",
    }  # fmt: skip
    assert expected <= seen
    assert not {"chandelier", "bulletin board", "armchair", "bag", "pot", "screen"} & seen
    assert all(name == normalise_class_name(name) for name in seen)


# ADE-847 classes that share their only unambiguous spelling with a seen class elsewhere (buffet
# is also "counter", andiron also "dog"): name matching cannot tell them apart.
NAME_MATCHING_EXCEPTIONS = {
    "buffet, counter, sideboard",
    "step, stair",
    "track",
    "newspaper, paper",
    "patty, cake",
    "andiron, firedog, dog, dog-iron",
}


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("name", list_vocabularies())
def test_matching_any_synonym_against_the_seen_names_finds_each_benchmarks_seen_set(name, raw):
    # DCP-CLIP's Tag Validation knows classes only by name: a class is seen when any synonym,
    # normalised, is a seen name. That must reproduce the reviewed table, raw or natural.
    seen_names = coco_stuff_seen_names()
    table = coco_stuff_overlap(name)
    wrong = {
        ", ".join(raw_synonyms)
        for raw_synonyms, synonyms in zip(
            load_vocabulary(name, raw=True), load_vocabulary(name, raw=raw), strict=True
        )
        if any(normalise_class_name(s) in seen_names for s in synonyms)
        != (", ".join(raw_synonyms) in table)
    }
    assert wrong == (NAME_MATCHING_EXCEPTIONS if name == "ade-847" else set())


def test_a_bundled_benchmarks_seen_mask_is_its_reviewed_table_class_by_class():
    from ovseg.vocabulary import coco_stuff_seen_mask

    for name, seen_count in (("ade-150", 70), ("ade-847", 124), ("voc-20", 20), ("pc-459", 102)):
        for raw in (True, False):
            mask = coco_stuff_seen_mask(load_vocabulary(name, raw=raw).classes)
            assert mask is not None and sum(mask) == seen_count, (name, raw)
    ade847 = load_vocabulary("ade-847")
    mask = coco_stuff_seen_mask(ade847.classes)
    andiron = next(i for i, synonyms in enumerate(ade847) if "andiron" in synonyms)
    assert "dog" in ade847[andiron] and not mask[andiron]  # a name match would call it seen
    assert mask[ade847.index("dog")]
    assert coco_stuff_seen_mask(load_vocabulary("ade-150").classes[:-1]) is None
    assert coco_stuff_seen_mask([("cat",), ("dog",)]) is None


def test_a_real_clips_seen_classes_are_a_benchmarks_table_or_every_seen_spelling():
    from ovseg.vocabulary import seen_class_mask

    for name in ("ade-150", "ade-847", "voc-20"):
        seen = seen_class_mask(load_vocabulary(name).classes, toy=False)
        assert sum(seen) == len(coco_stuff_overlap(name)), name
    ade150 = load_vocabulary("ade-150")
    seen = seen_class_mask(ade150.classes, toy=False)
    for stuff in ("wall", "building", "sky", "floor", "ceiling"):
        assert seen[ade150.index(stuff)], stuff
    assert not seen[ade150.index("chandelier")]
    assert all(seen_class_mask(load_vocabulary("voc-20").classes, toy=False))  # aeroplane, sofa
    # Another vocabulary is matched by name against every seen spelling of every benchmark.
    flags = seen_class_mask((("aeroplane",), ("chandelier",), ("wall",)), toy=False)
    assert flags == (True, False, True)


def test_a_toy_clips_seen_classes_are_toyworlds_and_given_names_match_any_synonym():
    from ovseg.data.toyworld import ToyWorld
    from ovseg.vocabulary import seen_class_mask

    world = ToyWorld(image_size=32)
    classes = [(c.name, *c.synonyms) for c in world.classes]
    assert seen_class_mask(classes, toy=True) == tuple(c.seen for c in world.classes)
    assert not all(c.seen for c in world.classes) and any(c.seen for c in world.classes)
    assert seen_class_mask(load_vocabulary("voc-20").classes, toy=True) != (True,) * 20
    flags = seen_class_mask(
        (("car", "Auto-Mobile"), ("sky",)), toy=True, seen_names=["auto_mobile"]
    )
    assert flags == (True, False)
