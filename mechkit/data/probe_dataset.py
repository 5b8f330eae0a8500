"""Labelled probing datasets: prompts, binary labels, groups for leak-free splits, spans.

Users load their own from CSV (columns ``text``, ``label``, optional ``group``) or JSONL
(``{"text", "label", "group"?, "spans"?, "chat"?}``).

Example:
    >>> ds = ProbeDataset("toy", ["It is good.", "It is bad."], [1, 0], groups=["a", "b"])
    >>> len(ds), ds.class_counts()
    (2, {0: 1, 1: 1})
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mechkit.data.prompts import Prompt, as_prompts
from mechkit.errors import MechkitError


@dataclass
class ProbeDataset:
    """``prompts[i]`` has ``labels[i]`` (0 or 1); ``groups[i]`` names what must not straddle a split."""

    name: str
    prompts: list[Prompt]
    labels: np.ndarray
    groups: list[str] | None = None
    attrs: dict = field(default_factory=dict)

    def __init__(self, name: str, prompts: Sequence[str | Prompt], labels: Sequence[int],
                 groups: Sequence[str] | None = None, attrs: dict | None = None) -> None:
        self.name = name
        self.prompts = as_prompts(list(prompts))
        self.labels = np.asarray(labels)
        if self.labels.ndim != 1 or len(self.labels) != len(self.prompts):
            raise MechkitError(f"dataset {name!r}: {len(self.prompts)} prompts but {self.labels.size} labels; "
                               "give exactly one label per prompt")
        if not set(np.unique(self.labels).tolist()) <= {0, 1}:
            raise MechkitError(f"dataset {name!r}: labels must be 0 or 1, got {sorted(set(self.labels.tolist()))[:10]}")
        self.labels = self.labels.astype(np.int64)
        if groups is not None and len(groups) != len(self.prompts):
            raise MechkitError(f"dataset {name!r}: {len(groups)} groups for {len(self.prompts)} prompts")
        self.groups = [str(g) for g in groups] if groups is not None else None
        self.attrs = dict(attrs or {})

    def __len__(self) -> int:
        return len(self.prompts)

    def class_counts(self) -> dict[int, int]:
        return {c: int((self.labels == c).sum()) for c in (0, 1)}

    def subset(self, index: Sequence[int]) -> ProbeDataset:
        """The examples at ``index``; ``attrs`` lists parallel to the prompts are sliced with them."""
        index = list(index)
        attrs = {key: [value[i] for i in index] if isinstance(value, list) and len(value) == len(self) else value
                 for key, value in self.attrs.items()}
        return ProbeDataset(self.name, [self.prompts[i] for i in index], self.labels[index],
                            [self.groups[i] for i in index] if self.groups else None, attrs)

    def fingerprint(self) -> list:
        """What the data hash of a result is taken over."""
        return [[p.text, dict(p.spans), p.chat] for p in self.prompts] + [self.labels.tolist(), self.groups]

    @classmethod
    def from_file(cls, path: str | os.PathLike, name: str | None = None) -> ProbeDataset:
        """Read CSV (``text,label[,group]``) or JSONL (``text, label, group?, spans?, chat?``)."""
        path = Path(path)
        if not path.exists():
            raise MechkitError(f"dataset file {path} does not exist")
        rows = []
        if path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise MechkitError(f"{path}:{number}: not JSON ({error})") from None
        elif path.suffix in (".csv", ".tsv"):
            with open(path, newline="") as handle:
                rows = list(csv.DictReader(handle, delimiter="\t" if path.suffix == ".tsv" else ","))
        else:
            raise MechkitError(f"{path}: use .csv, .tsv or .jsonl")
        labels = []
        for number, row in enumerate(rows, 1):
            if "text" not in row or "label" not in row:
                raise MechkitError(f"{path}: record {number} lacks a 'text' or 'label' field: {row}")
            label = str(row["label"]).strip()
            if label not in ("0", "1"):
                raise MechkitError(f"{path}: record {number}: labels must be 0 or 1, got {row['label']!r}")
            labels.append(int(label))
            if isinstance(row.get("chat"), str):  # CSV cells are text: "false" must not read as true
                chat = row["chat"].strip().lower()
                if chat not in ("", "true", "false", "1", "0"):
                    raise MechkitError(f"{path}: record {number}: chat must be true or false, got {row['chat']!r}")
                row["chat"] = chat in ("true", "1")
        prompts = [Prompt.from_record(r) for r in rows]
        has_group = [r.get("group") not in (None, "") for r in rows]
        if any(has_group) and not all(has_group):
            missing = [i for i, has in enumerate(has_group, 1) if not has][:5]
            raise MechkitError(f"{path}: some records have a 'group' and some do not (e.g. records {missing}); "
                               "give every record a group, or none")
        groups = [r["group"] for r in rows] if rows and all(has_group) else None
        return cls(name or path.stem, prompts, labels, groups)
