"""Function-labelled question chains: the data for function-specific heads (Ma et al. 2025).

"Cognitive Mirrors" looks for attention heads that serve one cognitive function. Its data are
CogQA-style chains: a question broken into short sub-questions, each labelled with the one
function it needs (:data:`FUNCTIONS`, the names of :data:`mechkit.data.tasks.TASK_NAMES`) and a
short gold answer. A later step is shown the earlier steps with their *gold* answers, as a chain
of thought would see them, so that activations can be read at every step of a chain.

The files live in ``mechkit/data/functions/``:

* ``chains.jsonl``: one chain a line, 1 to :data:`MAX_STEPS` steps (the built-in chains have 2-4)::

    {"id": "c001", "steps": [
      {"question": "What is the capital of France?", "answer": "Paris", "function": "knowledge_recall"},
      {"question": "How many letters are in the word Paris?", "answer": "5", "function": "math_calculation"}]}

  Chain ids are unique; questions and answers are non-empty single lines. Users load their own
  chains in this format with :func:`load_function_chains`.
* ``seeds.jsonl``: one seed a line, ``{"function", "question", "answer" or "op", "fill" or "rows"?}``.
  ``question`` and ``answer`` may hold ``{slot}`` placeholders, filled from every row of a fill
  list: a named list in ``fills.json`` (``"fill": "countries"``) or rows written in the seed
  (``"rows": [{"country": "France", "capital": "Paris"}, ...]``). A seed thus gives one single-step
  sub-question (empty context) per row, in row order. Arithmetic seeds give ``"op"`` (a key of
  :data:`OPS`) instead of ``"answer"``: the answer is computed in Python from the row's slots by
  that named operation; no text is ever evaluated.
* ``fills.json``: ``{"name": [{"slot": value, ...}, ...], ...}``, values strings or integers.

Substitution is plain text replacement of ``{name}`` (a word); every placeholder must be filled.

Example:
    >>> q = SubQuestion("How many letters are in the word Paris?", "5", "math_calculation",
    ...                 (("What is the capital of France?", "Paris"),), "c001", 1)
    >>> print(q.prompt)
    Q: What is the capital of France?
    A: Paris
    Q: How many letters are in the word Paris?
    A:
    >>> q.target
    ' 5'
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from mechkit.data.jsonl import read_jsonl
from mechkit.data.tasks import TASK_NAMES
from mechkit.errors import MechkitError

FUNCTIONS = TASK_NAMES
FUNCTIONS_DIR = Path(__file__).parent / "functions"
MAX_STEPS = 4
CHAIN_FIELDS = ("id", "steps")
STEP_FIELDS = ("question", "answer", "function")
_SLOT = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class SubQuestion:
    """One sub-question with its function label and gold answer.

    ``context`` holds the earlier steps of its chain as (question, gold answer) pairs, in order;
    ``step`` is its index in the chain (0 for a first step or a seed). ``chain_id`` names the chain,
    or the seed (``"seed012"``: line 12 of the seed file) that a single step was expanded from, so
    that splits can keep a chain or a template on one side.
    """

    question: str
    answer: str
    function: str
    context: tuple[tuple[str, str], ...] = ()
    chain_id: str = ""
    step: int = 0

    def __post_init__(self) -> None:
        context = tuple(tuple(pair) for pair in self.context)
        object.__setattr__(self, "context", context)
        if self.function not in FUNCTIONS:
            raise MechkitError(f"unknown function {self.function!r}; use one of {FUNCTIONS}")
        if any(len(pair) != 2 for pair in context):
            raise MechkitError(f"sub-question {self.question!r}: context holds (question, answer) pairs, got {context}")
        texts = [("question", self.question), ("answer", self.answer)]
        texts += [(f"context step {i + 1} {kind}", text)
                  for i, pair in enumerate(context) for kind, text in zip(("question", "answer"), pair)]
        for name, text in texts:
            problem = _text_problem(text)
            if problem:
                raise MechkitError(f"sub-question {self.question!r}: {name} {problem}")
        if self.step < 0:
            raise MechkitError(f"sub-question {self.question!r}: step must be >= 0, got {self.step}")

    @property
    def prompt(self) -> str:
        """The text shown to the model: earlier steps as ``Q: ...\\nA: ...`` lines, then ``Q: question\\nA:``."""
        return "".join(f"Q: {q}\nA: {a}\n" for q, a in self.context) + f"Q: {self.question}\nA:"

    @property
    def target(self) -> str:
        """The gold answer as the model should continue the prompt: with its leading space."""
        return " " + self.answer


def _text_problem(text) -> str | None:
    """Why ``text`` cannot be a question or answer, or None."""
    if not isinstance(text, str):
        return f"must be text, got {type(text).__name__}"
    if not text.strip():
        return "is empty"
    if "\n" in text or "\r" in text:
        return f"spans several lines ({text!r}); the prompt format needs one line"
    return None


def _exact_divide(a: int, b: int) -> int:
    if b == 0 or a % b:
        raise MechkitError(f"{a} / {b} is not a whole number; pick operands that divide exactly")
    return a // b


# name -> (the slots it reads, the operation); results must be whole numbers >= 0.
OPS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "add": (("a", "b"), lambda a, b: a + b),
    "subtract": (("a", "b"), lambda a, b: a - b),
    "multiply": (("a", "b"), lambda a, b: a * b),
    "divide": (("a", "b"), _exact_divide),
    "double": (("a",), lambda a: 2 * a),
    "half": (("a",), lambda a: _exact_divide(a, 2)),
    "successor": (("a",), lambda a: a + 1),
    "predecessor": (("a",), lambda a: a - 1),
    "letters": (("word",), len),
}


def _check_function(where: str, function) -> None:
    if function not in FUNCTIONS:
        raise MechkitError(f"{where}: unknown function {function!r}; use one of {list(FUNCTIONS)}")


def _read_chains(path: Path) -> list[SubQuestion]:
    """The steps of every chain in ``path`` as sub-questions, chain by chain."""
    subquestions = []
    seen: dict[str, int] = {}
    for number, row in read_jsonl(path, "chain"):
        where = f"{path}:{number}"
        missing = [key for key in CHAIN_FIELDS if key not in row]
        if missing:
            raise MechkitError(f"{where}: missing field(s) {missing}; every line is "
                               '{"id": ..., "steps": [{"question", "answer", "function"}, ...]}')
        chain_id, steps = row["id"], row["steps"]
        if not isinstance(chain_id, str) or not chain_id.strip():
            raise MechkitError(f"{where}: the chain id must be non-empty text, got {chain_id!r}")
        if chain_id in seen:
            raise MechkitError(f"{where}: chain id {chain_id!r} repeats line {seen[chain_id]}; ids are unique")
        seen[chain_id] = number
        if not isinstance(steps, list) or not steps:
            raise MechkitError(f"{where}: chain {chain_id!r} has no steps; give a list of 1 to {MAX_STEPS}")
        if len(steps) > MAX_STEPS:
            raise MechkitError(f"{where}: chain {chain_id!r} has {len(steps)} steps, more than MAX_STEPS="
                               f"{MAX_STEPS}; split it into shorter chains")
        context: list[tuple[str, str]] = []
        for index, step in enumerate(steps):
            at = f"{where}: step {index + 1} of chain {chain_id!r}"
            if not isinstance(step, dict):
                raise MechkitError(f"{at} is not a JSON object: {step!r}")
            missing = [key for key in STEP_FIELDS if key not in step]
            if missing:
                raise MechkitError(f"{at}: missing field(s) {missing}; every step needs {list(STEP_FIELDS)}")
            _check_function(at, step["function"])
            for key in ("question", "answer"):
                problem = _text_problem(step[key])
                if problem:
                    raise MechkitError(f"{at}: {key} {problem}")
            question, answer = step["question"].strip(), step["answer"].strip()
            subquestions.append(SubQuestion(question, answer, step["function"], tuple(context), chain_id, index))
            context.append((question, answer))
    return subquestions


def _fill(text: str, row: dict, where: str) -> str:
    def slot(match: re.Match) -> str:
        if match.group(1) not in row:
            raise MechkitError(f"{where}: slot {{{match.group(1)}}} has no value in row {row}")
        return str(row[match.group(1)])
    return _SLOT.sub(slot, text)


def _compute(op: str, row: dict, where: str) -> str:
    slots, operation = OPS[op]
    args = []
    for name in slots:
        value = row.get(name)
        wanted = str if op == "letters" else int
        if type(value) is not wanted:
            raise MechkitError(f"{where}: op {op!r} needs slot {name!r} to be {wanted.__name__}, got {value!r} "
                               f"in row {row}")
        args.append(value)
    try:
        result = operation(*args)
    except MechkitError as error:
        raise MechkitError(f"{where}: {error}") from None
    if result < 0:
        raise MechkitError(f"{where}: op {op!r} on row {row} gives {result}; answers are whole numbers >= 0")
    return str(result)


def _read_fills(path: Path) -> dict[str, list[dict]]:
    if not path.exists():
        raise MechkitError(f"fill file {path} does not exist")
    try:
        fills = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise MechkitError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(fills, dict):
        raise MechkitError(f"{path}: expected an object of named lists, got {type(fills).__name__}")
    return fills


def _rows(seed: dict, fills: dict[str, list[dict]], where: str) -> list[dict]:
    """The rows a seed is expanded over ([{}] for a seed without slots)."""
    if "fill" in seed and "rows" in seed:
        raise MechkitError(f"{where}: give 'fill' (a list in the fill file) or 'rows', not both")
    if "fill" in seed:
        if seed["fill"] not in fills:
            raise MechkitError(f"{where}: unknown fill list {seed['fill']!r}; the fill file has {sorted(fills)}")
        rows = fills[seed["fill"]]
    else:
        rows = seed.get("rows", [{}])
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise MechkitError(f"{where}: the fill rows must be a non-empty list of objects, got {rows!r}")
    return rows


def _expand(seed: dict, fills: dict[str, list[dict]], where: str, chain_id: str) -> list[SubQuestion]:
    """The single-step sub-questions of one seed line, one per row."""
    missing = [key for key in ("function", "question") if key not in seed]
    if "answer" not in seed and "op" not in seed:
        missing.append("answer (or op)")
    if missing:
        raise MechkitError(f"{where}: missing field(s) {missing}; a seed is "
                           '{"function", "question", "answer" or "op", "fill" or "rows"?}')
    if "answer" in seed and "op" in seed:
        raise MechkitError(f"{where}: give 'answer' or 'op' (a computed answer), not both")
    _check_function(where, seed["function"])
    if "op" in seed and seed["op"] not in OPS:
        raise MechkitError(f"{where}: unknown op {seed['op']!r}; use one of {sorted(OPS)}")
    for key in ("question", "answer"):
        problem = _text_problem(seed[key]) if key in seed else None
        if problem:
            raise MechkitError(f"{where}: {key} {problem}")
    out = []
    for index, row in enumerate(_rows(seed, fills, where)):
        question = _fill(seed["question"], row, where).strip()
        answer = _compute(seed["op"], row, where) if "op" in seed else _fill(seed["answer"], row, where).strip()
        for key, text in (("question", question), ("answer", answer)):
            problem = _text_problem(text)
            if problem:
                raise MechkitError(f"{where}: row {index + 1}: the {key} {problem}")
        out.append(SubQuestion(question, answer, seed["function"], (), chain_id, 0))
    return out


def load_seeds(path: str | os.PathLike | None = None,
               fills: str | os.PathLike | None = None) -> list[tuple[int, list[SubQuestion]]]:
    """The seeds of a seed file (default: the built-in one) with their expansions.

    Returns (line number, sub-questions) for every seed, in file order; every sub-question is a
    single step with empty context and ``chain_id`` ``"seed<line>"``. ``fills`` is the fill file
    (default: ``fills.json`` beside the seed file, when there is one). A question that repeats an
    earlier one of the same function is an error naming both lines.
    """
    path = Path(path) if path is not None else FUNCTIONS_DIR / "seeds.jsonl"
    fills_path = Path(fills) if fills is not None else path.parent / "fills.json"
    fill_lists = _read_fills(fills_path) if fills is not None or fills_path.exists() else {}
    seen: dict[tuple[str, str], int] = {}
    seeds = []
    for number, seed in read_jsonl(path, "seed"):
        where = f"{path}:{number}"
        expanded = _expand(seed, fill_lists, where, f"seed{number:03d}")
        for q in expanded:
            key = (q.function, " ".join(q.question.lower().split()))
            if key in seen:
                raise MechkitError(f"{where}: question {q.question!r} ({q.function}) repeats line {seen[key]}; "
                                   "keep every question once")
            seen[key] = number
        seeds.append((number, expanded))
    return seeds


@lru_cache(maxsize=1)
def _builtin() -> tuple[SubQuestion, ...]:
    chains = _read_chains(FUNCTIONS_DIR / "chains.jsonl")
    return tuple(chains + [q for _, expanded in load_seeds() for q in expanded])


def load_function_chains(path: str | os.PathLike | None = None) -> list[SubQuestion]:
    """The sub-questions of a chain file (see the module doc), chain by chain and step by step.

    Without ``path``: the built-in set, chains then expanded seeds (as :func:`function_dataset`).
    Malformed lines raise :class:`~mechkit.errors.MechkitError` naming the file and line.
    """
    if path is None:
        return list(_builtin())
    return _read_chains(Path(path))


def function_dataset(per_function: int | None = None, seed: int = 0) -> list[SubQuestion]:
    """The built-in sub-questions: all of them in file order, or ``per_function`` of each function.

    With ``per_function`` the result is balanced (for probes that compare functions): that many
    sub-questions of every function, drawn with ``seed``, grouped by function in :data:`FUNCTIONS`
    order and in file order within a function.
    """
    subquestions = list(_builtin())
    if per_function is None:
        return subquestions
    have = counts(subquestions)
    if per_function < 1 or per_function > min(have.values()):
        raise MechkitError(f"per_function={per_function}, but the built-in set holds {have}; "
                           f"use 1 <= per_function <= {min(have.values())}")
    rng = random.Random(f"functions:{seed}")
    out = []
    for function in FUNCTIONS:
        pool = [i for i, q in enumerate(subquestions) if q.function == function]
        out.extend(subquestions[i] for i in sorted(rng.sample(pool, per_function)))
    return out


def counts(subquestions: Iterable[SubQuestion]) -> dict[str, int]:
    """How many sub-questions of each function, in :data:`FUNCTIONS` order (zeros included)."""
    tally = dict.fromkeys(FUNCTIONS, 0)
    for q in subquestions:
        tally[q.function] += 1
    return tally


__all__ = ["FUNCTIONS", "MAX_STEPS", "OPS", "SubQuestion", "counts", "function_dataset", "load_function_chains",
           "load_seeds"]
