"""Probing datasets by name: the built-in sets (true/false statements, sentiment, the model's own
QA answers, jailbreak prompts, harmful vs harmless requests) or a user's CSV/TSV/JSONL file."""

from __future__ import annotations

from pathlib import Path

from mechkit.data import ProbeDataset
from mechkit.data.probing_sets import sentiment, true_false
from mechkit.data.safety import harmful_vs_harmless, jailbreak
from mechkit.errors import MechkitError
from mechkit.probing.qa import qa_dataset

BUILTIN_DATASETS = ("true_false", "sentiment", "qa", "jailbreak", "jailbreak_by_template", "harmful_vs_harmless")


def builtin_dataset(name: str, model=None, *, per_type: int | None = None) -> ProbeDataset:
    """A built-in probing dataset by name (:data:`BUILTIN_DATASETS`), or a CSV/TSV/JSONL file.
    ``qa`` is made from ``model``'s own answers (``per_type`` questions of each type)."""
    if name == "true_false":
        return true_false()
    if name == "sentiment":
        return sentiment()
    if name in ("jailbreak", "jailbreak_by_template"):  # plain text, so that base and chat models read the same
        return jailbreak(split_by="template" if name.endswith("by_template") else "request")
    if name == "harmful_vs_harmless":
        return harmful_vs_harmless()
    if name == "qa":
        if model is None:
            raise MechkitError("the qa dataset is made from one model's own answers: probe one model at a time")
        return qa_dataset(model, per_type=per_type)
    if Path(name).suffix in (".csv", ".tsv", ".jsonl"):
        return ProbeDataset.from_file(name)
    raise MechkitError(f"unknown dataset {name!r}: use one of {BUILTIN_DATASETS} or a .csv/.tsv/.jsonl file")


__all__ = ["BUILTIN_DATASETS", "builtin_dataset"]
