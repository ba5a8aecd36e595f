"""Vocabularies: what the user types, parsed into classes with synonyms.

A vocabulary is an ordered list of classes; each class is one or more synonyms, the first being the
name shown to the user. Text input separates classes with commas or newlines and synonyms with
semicolons (the ODISE convention): ``"car; automobile, grass, sky"`` is three classes.

The bundled benchmark vocabularies keep their sources' spellings on disk (``pottedplant``,
``wall-concrete``), but :func:`load_vocabulary` hands every method natural names (``potted plant``,
``concrete wall``) in the same label-id order; :func:`coco_stuff_overlap` says which benchmark
classes COCO-Stuff-171, the training set of the papers, already covers, and
:func:`seen_class_mask` which classes of any vocabulary a trained head has seen.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from ovseg.errors import OvsegError

VOCABULARY_DIR = Path(__file__).parent / "data" / "vocabularies"
# Reviewed tables kept beside the vocabularies (see the README there); not vocabularies themselves.
NATURAL_NAMES_FILE = VOCABULARY_DIR / "natural-names.json"
COCO_STUFF_OVERLAP_FILE = VOCABULARY_DIR / "coco-stuff-overlap.json"
_TABLE_FILES = (NATURAL_NAMES_FILE, COCO_STUFF_OVERLAP_FILE)
MAX_CLASSES = 4096
MAX_NAME_LENGTH = 200


class VocabularyError(OvsegError, ValueError):
    """A vocabulary that cannot be used, with a message meant for the person who typed it."""


@dataclass(frozen=True)
class Vocabulary:
    """An ordered, duplicate-free list of classes.

    Attributes:
        classes: one tuple of synonyms per class; the first synonym is the display name.
        dropped_duplicates: names that were given more than once and dropped (kept for the UI).
    """

    classes: tuple[tuple[str, ...], ...]
    dropped_duplicates: tuple[str, ...] = field(default=(), compare=False)

    @property
    def names(self) -> tuple[str, ...]:
        """The display name of every class, in order."""
        return tuple(synonyms[0] for synonyms in self.classes)

    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self) -> Iterator[tuple[str, ...]]:
        return iter(self.classes)

    def __getitem__(self, index: int) -> tuple[str, ...]:
        return self.classes[index]

    def index(self, name: str) -> int:
        """Index of the class that has ``name`` among its synonyms (case-insensitive)."""
        wanted = name.strip().lower()
        for position, synonyms in enumerate(self.classes):
            if wanted in (synonym.lower() for synonym in synonyms):
                return position
        raise KeyError(f"{name!r} is not in the vocabulary ({', '.join(self.names[:10])}, ...)")


def _split_text(text: str) -> list[list[str]]:
    entries = []
    for line in text.replace("\r", "\n").split("\n"):
        for entry in line.split(","):
            entries.append(entry.split(";"))
    return entries


def parse_vocabulary(
    vocabulary: str | Vocabulary | Iterable[str | Sequence[str]],
) -> Vocabulary:
    """Parse typed text or a list of names into a :class:`Vocabulary`.

    Args:
        vocabulary: text (classes separated by commas or newlines, synonyms by ``;``), a list of
            names (each may itself hold ``;``-separated synonyms), a list of synonym lists, or an
            existing :class:`Vocabulary` (returned unchanged).

    Returns:
        The classes, trimmed, with blank entries removed and repeated names dropped (a name
        counts as repeated when it matches, case-insensitively, any synonym of an earlier class).

    Raises:
        VocabularyError: if nothing is left, a name is too long, or there are more than
            ``MAX_CLASSES`` classes.
    """
    if isinstance(vocabulary, Vocabulary):
        return vocabulary
    if isinstance(vocabulary, str):
        raw_entries = _split_text(vocabulary)
    else:
        raw_entries = []
        for entry in vocabulary:
            if isinstance(entry, str):
                raw_entries.append(entry.split(";"))
            else:
                raw_entries.append([part for synonym in entry for part in str(synonym).split(";")])

    classes: list[tuple[str, ...]] = []
    seen: set[str] = set()
    dropped: list[str] = []
    for raw_synonyms in raw_entries:
        synonyms = []
        for synonym in raw_synonyms:
            synonym = " ".join(synonym.split())
            if not synonym or synonym.lower() in (s.lower() for s in synonyms):
                continue
            if len(synonym) > MAX_NAME_LENGTH:
                raise VocabularyError(
                    f"Class name {synonym[:40]!r}... is {len(synonym)} characters long; "
                    f"names may have at most {MAX_NAME_LENGTH}."
                )
            synonyms.append(synonym)
        if not synonyms:
            continue
        if synonyms[0].lower() in seen:
            dropped.append(synonyms[0])
            continue
        synonyms = [s for s in synonyms if s.lower() not in seen]
        seen.update(s.lower() for s in synonyms)
        classes.append(tuple(synonyms))

    if not classes:
        raise VocabularyError(
            "The vocabulary is empty: type at least one class name, e.g. 'cat, grass, sky'."
        )
    if len(classes) > MAX_CLASSES:
        raise VocabularyError(
            f"The vocabulary has {len(classes)} classes; at most {MAX_CLASSES} are supported."
        )
    return Vocabulary(tuple(classes), tuple(dropped))


def class_synonyms(vocabulary: Iterable[str | Sequence[str]]) -> tuple[tuple[str, ...], ...]:
    """A vocabulary as methods take it (names, or per-class synonym sequences) → one tuple of
    synonyms per class.

    Raises:
        VocabularyError: an empty vocabulary, or a class without a non-empty name.
    """
    classes = []
    for entry in vocabulary:
        synonyms = (entry,) if isinstance(entry, str) else tuple(entry)
        if not synonyms or not all(isinstance(s, str) and s.strip() for s in synonyms):
            raise VocabularyError(f"Each class needs at least one non-empty name; got {entry!r}.")
        classes.append(synonyms)
    if not classes:
        raise VocabularyError("The vocabulary is empty.")
    return tuple(classes)


def list_vocabularies() -> list[str]:
    """Names of the bundled benchmark vocabularies (e.g. ``"ade-150"``)."""
    return sorted(path.stem for path in VOCABULARY_DIR.glob("*.json") if path not in _TABLE_FILES)


def normalise_class_name(name: str) -> str:
    """The form in which class names are compared: lower case, ``-`` and ``_`` as spaces,
    whitespace collapsed (``"Wall-Other"`` → ``"wall other"``)."""
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


@cache
def _raw_classes(name: str) -> tuple[tuple[str, ...], ...]:
    if name not in list_vocabularies():
        raise VocabularyError(
            f"Unknown vocabulary {name!r}; bundled: {', '.join(list_vocabularies())}."
        )
    record = json.loads((VOCABULARY_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return tuple(tuple(synonyms) for synonyms in record["classes"])


@cache
def _natural_name_overrides(name: str) -> dict[str, str]:
    tables = json.loads(NATURAL_NAMES_FILE.read_text(encoding="utf-8"))
    return tables["overrides"].get(name, {})


# COCO-Stuff's stuff classes that name a surface by its material, "wall-brick" → "brick wall".
_SURFACES = ("wall", "floor", "ceiling")


def natural_class_name(vocabulary: str, name: str) -> str:
    """The natural-language spelling of a class name of a bundled benchmark.

    The reviewed override table of ``natural-names.json`` comes first (run-together words such as
    ``pottedplant`` → ``potted plant``, PASCAL-Context's ``airconditioner`` → ``air conditioner``);
    then COCO-Stuff's two hyphen patterns: ``X-other`` and ``X-stuff`` → ``X``
    (``wall-other`` → ``wall``) and a surface with its material, ``wall-concrete`` → ``concrete
    wall``. Every other name is already natural and is returned unchanged (ADE-847's WordNet
    spellings such as ``t-shirt`` keep their hyphen).
    """
    overrides = _natural_name_overrides(vocabulary)
    if name in overrides:
        return overrides[name]
    head, hyphen, tail = name.partition("-")
    if hyphen and tail in ("other", "stuff"):
        return head
    if hyphen and head in _SURFACES and "-" not in tail:
        return f"{tail} {head}"
    return name


@cache
def load_vocabulary(name: str, *, raw: bool = False) -> Vocabulary:
    """Load a bundled benchmark vocabulary by name, in the dataset's training-id order.

    Args:
        name: a bundled vocabulary (see :func:`list_vocabularies`).
        raw: keep the source's spellings (``tvmonitor``, ``wall-concrete``) instead of the natural
            names (``tv monitor``, ``concrete wall``) that methods are given.

    Returns:
        One class per label id; entry ``k`` is the class of label value ``k`` either way.
    """
    # Benchmark lists keep every entry in place: their order is the label ids, and a few distinct
    # classes of ADE-847 share a name, so the de-duplication of typed vocabularies must not apply.
    raw_classes = _raw_classes(name)
    if raw:
        return Vocabulary(raw_classes)
    return Vocabulary(
        tuple(
            tuple(natural_class_name(name, synonym) for synonym in synonyms)
            for synonyms in raw_classes
        )
    )


def vocabulary_ignore_index(name: str) -> int:
    """The label value that marks unlabelled pixels in the prepared labels of a benchmark."""
    path = VOCABULARY_DIR / f"{name}.json"
    return int(json.loads(path.read_text(encoding="utf-8"))["ignore_index"])


@cache
def _coco_stuff_overlap_tables() -> dict[str, dict[str, tuple[str, ...]]]:
    record = json.loads(COCO_STUFF_OVERLAP_FILE.read_text(encoding="utf-8"))
    return {
        name: {key: tuple(coco) for key, coco in table.items()}
        for name, table in record["benchmarks"].items()
    }


def coco_stuff_overlap(name: str) -> dict[str, tuple[str, ...]]:
    """The classes of a bundled benchmark that COCO-Stuff-171 covers: its *seen* classes.

    A class is seen when a COCO-Stuff class denotes the same concept (ADE's ``wall`` is COCO's
    ``wall-other``, ``wall-concrete``, ...; VOC's ``tvmonitor`` is COCO's ``tv``). The table is
    reviewed by hand (``coco-stuff-overlap.json``; the README there gives the conventions).

    Args:
        name: a bundled vocabulary (see :func:`list_vocabularies`).

    Returns:
        Benchmark class → the COCO-Stuff classes it corresponds to, in COCO-Stuff's raw spelling;
        only seen classes are keys. A key is the class's raw synonyms joined by ``", "`` (its
        CAT-Seg string), which is just its name for every benchmark but ADE-847.
    """
    _raw_classes(name)  # an unknown name is a VocabularyError that lists the bundled ones
    return dict(_coco_stuff_overlap_tables()[name])


def _class_spellings() -> list[tuple[bool, frozenset[str]]]:
    """(seen, normalised raw and natural spellings) of every class of every bundled benchmark."""
    classes = []
    for vocabulary in list_vocabularies():
        seen = coco_stuff_overlap(vocabulary)
        raw_classes = load_vocabulary(vocabulary, raw=True)
        for raw, natural in zip(raw_classes, load_vocabulary(vocabulary), strict=True):
            spellings = frozenset(normalise_class_name(name) for name in (*raw, *natural))
            classes.append((", ".join(raw) in seen, spellings))
    return classes


@cache
def coco_stuff_seen_names() -> frozenset[str]:
    """The spellings that mark a class as seen, for methods that know classes only by name.

    Every raw and natural spelling (all synonyms) of every class that :func:`coco_stuff_overlap`
    lists as seen in some bundled benchmark, normalised by :func:`normalise_class_name`, except
    the spellings that also name an unseen class (ADE-847's toilet is also ``pot`` and ``stool``,
    its bicycle ``wheel``). Such a spelling is kept only where a seen class has no other one
    (``counter``, ``paper``, ``dog``, ``cake``, ``stair``, ``track``), so a class counts as seen
    when any of its synonyms is in the set, as DCP-CLIP's Tag Validation matches them, for every
    class of every bundled benchmark but the few ADE-847 classes that the README lists.
    """
    classes = _class_spellings()
    unseen = set().union(*(spellings for seen, spellings in classes if not seen))
    names = set()
    for seen, spellings in classes:
        if seen:
            names.update(spellings - unseen or spellings)
    return frozenset(names)


@cache
def _bundled_by_classes() -> dict[tuple[tuple[str, ...], ...], str]:
    """Every bundled benchmark's class list, raw and natural, → its name."""
    lists = {}
    for name in list_vocabularies():
        for raw in (True, False):
            lists.setdefault(load_vocabulary(name, raw=raw).classes, name)
    return lists


def coco_stuff_seen_mask(
    classes: Sequence[Sequence[str]],
) -> tuple[bool, ...] | None:
    """Per class, whether COCO-Stuff covers it, when ``classes`` is a bundled benchmark's list
    (raw or natural spellings, in its order); None for any other vocabulary.

    Exact where matching names cannot be: ADE-847's andiron is also ``dog``, and is unseen.
    """
    key = tuple(tuple(synonyms) for synonyms in classes)
    name = _bundled_by_classes().get(key)
    if name is None:
        return None
    seen = coco_stuff_overlap(name)
    return tuple(", ".join(raw) in seen for raw in load_vocabulary(name, raw=True))


@cache
def _toy_world_seen_names() -> frozenset[str]:
    """Every spelling (name and synonyms) of ToyWorld's seen classes, normalised."""
    from ovseg.data.toyworld import ToyWorld  # torch and PIL: only the toy default needs them

    world = ToyWorld(image_size=32)
    return frozenset(
        normalise_class_name(name)
        for toy_class in world.classes
        if toy_class.seen
        for name in (toy_class.name, *toy_class.synonyms)
    )


def seen_class_mask(
    classes: Sequence[Sequence[str]], *, toy: bool, seen_names: Iterable[str] | None = None
) -> tuple[bool, ...]:
    """Per class, whether a head trained as the papers' heads are has seen it in training.

    Arguments:
        classes: the vocabulary, one tuple of synonyms per class.
        toy: whether the CLIP is a ToyWorld one (trained on ToyWorld's seen classes, not on
            COCO-Stuff-171).
        seen_names: the names of the training classes; a class is seen when any of its
            synonyms is one of them. None: ToyWorld's seen classes for a toy CLIP; for a real
            one, a bundled benchmark's reviewed overlap with COCO-Stuff class by class
            (:func:`coco_stuff_seen_mask`), else :func:`coco_stuff_seen_names`.
    """
    if seen_names is None:
        benchmark = None if toy else coco_stuff_seen_mask(classes)
        if benchmark is not None:
            return benchmark
        seen = _toy_world_seen_names() if toy else coco_stuff_seen_names()
    else:
        seen = {normalise_class_name(name) for name in seen_names}
    return tuple(any(normalise_class_name(s) in seen for s in synonyms) for synonyms in classes)
