import pytest

from ovseg.vocabulary import (
    MAX_CLASSES,
    Vocabulary,
    VocabularyError,
    list_vocabularies,
    load_vocabulary,
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
