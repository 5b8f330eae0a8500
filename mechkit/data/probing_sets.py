"""Built-in probing datasets made from our own data files.

* :func:`true_false`: true and false factual statements from the relation files ("The capital
  of France is Paris." / "... is Rome."), a false one using another pair's target of the same
  relation; grouped by subject so that no subject is in both train and test.
* :func:`sentiment`: short everyday sentences, positive or negative (not factual).
* The question-answering set with the model's own answers needs a model to generate them:
  see :mod:`mechkit.probing.qa`.
"""

from __future__ import annotations

import csv
import json
import random
from functools import lru_cache
from pathlib import Path

from mechkit.data.probe_dataset import ProbeDataset
from mechkit.data.relations import builtin_relations
from mechkit.errors import MechkitError

PROBING_DIR = Path(__file__).parent / "probing"


@lru_cache(maxsize=1)
def statement_templates() -> dict[str, str]:
    return json.loads((PROBING_DIR / "statement_templates.json").read_text())


# Relations whose swapped-in target makes a reliably false statement (synonyms, compound
# words and pronouns can turn out true when another pair's target is swapped in).
TRUE_FALSE_RELATIONS = (
    "country_to_capital", "country_to_language", "object_to_superclass", "occupation_to_work_location",
    "product_to_company", "antonym", "adjective_to_comparative", "adjective_to_superlative", "verb_to_past_tense",
    "english_to_french", "english_to_spanish", "english_to_german", "english_to_italian",
)


def true_false(relations: list[str] | None = None, *, per_relation: int = 40, seed: int = 0) -> ProbeDataset:
    """True/false statements, ``per_relation`` subjects per relation, each as a true and a false one."""
    templates = statement_templates()
    names = list(relations or TRUE_FALSE_RELATIONS)
    unknown = [n for n in names if n not in templates]
    if unknown:
        raise MechkitError(f"no statement template for {unknown}; templated relations: {sorted(templates)}")
    by_name = {r.name: r for r in builtin_relations()}
    rng = random.Random(seed)
    prompts, labels, groups = [], [], []
    for name in names:
        pairs = list(dict.fromkeys(by_name[name].pairs))
        true_targets: dict[str, set[str]] = {}
        for s, t in pairs:
            true_targets.setdefault(s, set()).add(t)
        sources = list(true_targets)
        rng.shuffle(sources)
        targets = sorted({t for _, t in pairs})
        for source in sources[:per_relation]:
            truth = sorted(true_targets[source])[0]
            wrong = rng.choice([t for t in targets if t not in true_targets[source] and t.lower() != source.lower()])
            for target, label in ((truth, 1), (wrong, 0)):
                prompts.append(templates[name].format(source=source, target=target))
                labels.append(label)
                groups.append(f"{name}:{source}")
    return ProbeDataset("true_false", prompts, labels, groups, {"relations": names, "per_relation": per_relation,
                                                                  "seed": seed})


def sentiment() -> ProbeDataset:
    """Short sentences labelled positive (1) or negative (0); every sentence its own group."""
    with open(PROBING_DIR / "sentiment.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return ProbeDataset("sentiment", [r["text"] for r in rows], [int(r["label"]) for r in rows],
                        [str(i) for i in range(len(rows))])


@lru_cache(maxsize=1)
def qa_questions() -> tuple[dict, ...]:
    lines = (PROBING_DIR / "qa_questions.jsonl").read_text().splitlines()
    return tuple(json.loads(line) for line in lines if line.strip())


@lru_cache(maxsize=1)
def qa_candidates() -> dict[str, list[str]]:
    return json.loads((PROBING_DIR / "qa_candidates.json").read_text())
