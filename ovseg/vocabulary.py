"""Vocabularies: what the user types, parsed into classes with synonyms.

A vocabulary is an ordered list of classes; each class is one or more synonyms, the first being the
name shown to the user. Text input separates classes with commas or newlines and synonyms with
semicolons (the ODISE convention): ``"car; automobile, grass, sky"`` is three classes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from ovseg.errors import OvsegError

VOCABULARY_DIR = Path(__file__).parent / "data" / "vocabularies"
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


def list_vocabularies() -> list[str]:
    """Names of the bundled benchmark vocabularies (e.g. ``"ade-150"``)."""
    return sorted(path.stem for path in VOCABULARY_DIR.glob("*.json"))


@cache
def load_vocabulary(name: str) -> Vocabulary:
    """Load a bundled benchmark vocabulary by name, in the dataset's training-id order."""
    path = VOCABULARY_DIR / f"{name}.json"
    if not path.is_file():
        raise VocabularyError(
            f"Unknown vocabulary {name!r}; bundled: {', '.join(list_vocabularies())}."
        )
    record = json.loads(path.read_text(encoding="utf-8"))
    # Benchmark lists are kept exactly: their order is the label ids, and a few distinct classes of
    # ADE-847 share a name, so the de-duplication of typed vocabularies must not apply here.
    return Vocabulary(tuple(tuple(synonyms) for synonyms in record["classes"]))


def vocabulary_ignore_index(name: str) -> int:
    """The label value that marks unlabelled pixels in the prepared labels of a benchmark."""
    path = VOCABULARY_DIR / f"{name}.json"
    return int(json.loads(path.read_text(encoding="utf-8"))["ignore_index"])
