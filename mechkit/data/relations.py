"""Relations for head classification: (source, target) word pairs with a category.

A relation file is UTF-8 text: ``# key: value`` header lines (``relation``, ``category``,
``copying``, ``description``), then one ``source<TAB>target`` pair per line, words
without the leading space (it is added when tokenising). Users add their own with
:func:`load_relation_file` or ``Relation(name, category, pairs)``.

Example:
    >>> r = Relation("capital", "knowledge", [("France", "Paris"), ("Italy", "Rome")])
    >>> r.pairs[0]
    ('France', 'Paris')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from mechkit.errors import MechkitError

CATEGORIES = ("algorithmic", "knowledge", "linguistic", "translation")
RELATIONS_DIR = Path(__file__).parent / "relations"


@dataclass(frozen=True)
class Relation:
    """A named relation of one category; ``copying`` relations map words to themselves (k=1)."""

    name: str
    category: str
    pairs: tuple[tuple[str, str], ...]
    copying: bool = False
    description: str = ""

    def __init__(self, name: str, category: str, pairs, copying: bool = False, description: str = "") -> None:
        pairs = tuple((str(s), str(t)) for s, t in pairs)
        if category not in CATEGORIES:
            raise MechkitError(f"relation {name!r}: unknown category {category!r}; use one of {CATEGORIES}")
        if not pairs:
            raise MechkitError(f"relation {name!r} has no pairs")
        seen: set[tuple[str, str]] = set()
        for pair in pairs:
            if not pair[0].strip() or not pair[1].strip():
                raise MechkitError(f"relation {name!r}: empty word in pair {pair}")
            if pair in seen:
                raise MechkitError(f"relation {name!r}: duplicate pair {pair}")
            seen.add(pair)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "category", category)
        object.__setattr__(self, "pairs", pairs)
        object.__setattr__(self, "copying", bool(copying))
        object.__setattr__(self, "description", description)


def load_relation_file(path: str | os.PathLike) -> Relation:
    """Read one relation file; malformed lines are reported with their line numbers."""
    path = Path(path)
    if not path.is_file():
        raise MechkitError(f"relation file {path} does not exist")
    header: dict[str, str] = {}
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            key, sep, value = line[1:].partition(":")
            if not sep:
                raise MechkitError(f"{path}:{number}: header lines look like '# key: value', got {line!r}")
            header[key.strip()] = value.strip()
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not all(f.strip() for f in fields):
            raise MechkitError(f"{path}:{number}: expected 'source<TAB>target', got {line!r}")
        pairs.append((fields[0].strip(), fields[1].strip()))
    for key in ("relation", "category"):
        if key not in header:
            raise MechkitError(f"{path}: missing header line '# {key}: ...'")
    copying = header.get("copying", "false").lower()
    if copying not in ("true", "false"):
        raise MechkitError(f"{path}: 'copying' must be true or false, got {copying!r}")
    try:
        return Relation(header["relation"], header["category"], pairs, copying == "true", header.get("description", ""))
    except MechkitError as error:
        raise MechkitError(f"{path}: {error}") from None


@lru_cache(maxsize=1)
def builtin_relations() -> tuple[Relation, ...]:
    """Every relation shipped in ``mechkit/data/relations``, sorted by category then name."""
    relations = [load_relation_file(p) for p in sorted(RELATIONS_DIR.glob("*.tsv"))]
    return tuple(sorted(relations, key=lambda r: (CATEGORIES.index(r.category), r.name)))
