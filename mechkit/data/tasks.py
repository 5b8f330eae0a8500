"""Tasks for attribution: clean prompts with an answer, and (usually) a corrupted twin.

A task file is JSONL, one example a line::

    {"clean": "France: Paris. Italy:", "answer": " Rome",
     "corrupted": "France: Paris. Spain:", "corrupted_answer": " Madrid"}

``clean`` and ``answer`` are required. With ``corrupted`` and ``corrupted_answer`` the
metric is the logit difference between the two answers, and the corruption is the twin
(same number of tokens). Without them the metric is the teacher-forced log-probability of
``answer`` (any number of tokens), and attribution corrupts by mean- or zero-ablation or by
resampling another example. Answers carry their leading space when the model should produce
one (" Rome"); the math task's answers are bare digits, since both bundled tokenizers split
" 7" into two tokens.

The eight built-in tasks (:data:`TASK_NAMES`) follow the task families of Ma et al. 2025
("Cognitive Mirrors"); ``benchmarks/task_coverage.py`` validates them on the bundled models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from mechkit.data.jsonl import read_jsonl
from mechkit.data.prompts import Prompt, encode
from mechkit.errors import MechkitError

TASKS_DIR = Path(__file__).parent / "tasks"
TASK_NAMES = ("knowledge_recall", "retrieval", "logical_reasoning", "decision_making", "semantic_understanding",
              "syntactic_understanding", "inference", "math_calculation")
REQUIRED = ("clean", "answer")
PAIRED = ("corrupted", "corrupted_answer")


@dataclass(frozen=True)
class Task:
    """A named list of examples; ``corrupted``/``corrupted_answers`` are empty for an unpaired task."""

    name: str
    clean: tuple[str, ...]
    answers: tuple[str, ...]
    corrupted: tuple[str, ...] = ()
    corrupted_answers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.clean:
            raise MechkitError(f"task {self.name!r} has no examples")
        if len(self.answers) != len(self.clean):
            raise MechkitError(f"task {self.name!r}: {len(self.clean)} prompts but {len(self.answers)} answers")
        if (len(self.corrupted), len(self.corrupted_answers)) not in ((0, 0), (len(self.clean), len(self.clean))):
            raise MechkitError(f"task {self.name!r}: give a corrupted prompt and answer for every example or for none")

    @property
    def paired(self) -> bool:
        return bool(self.corrupted)

    def __len__(self) -> int:
        return len(self.clean)

    @classmethod
    def from_file(cls, path: str | os.PathLike, name: str | None = None) -> Task:
        """Read a JSONL task file (see the module doc); errors name the line and the missing field."""
        path = Path(path)
        rows = []
        for number, row in read_jsonl(path, "task"):
            missing = [key for key in REQUIRED if not isinstance(row.get(key), str) or not row[key]]
            if missing:
                raise MechkitError(f"{path}:{number}: missing field(s) {missing}; every line needs "
                                   f"{list(REQUIRED)} (and optionally {list(PAIRED)})")
            if any(key in row for key in PAIRED) and not all(isinstance(row.get(key), str) for key in PAIRED):
                raise MechkitError(f"{path}:{number}: give both {list(PAIRED)} or neither")
            rows.append(row)
        paired = ["corrupted" in row for row in rows]
        if any(paired) and not all(paired):
            raise MechkitError(f"{path}: some lines have a corrupted twin and some do not; a task is one or the other")
        return cls(name or path.stem, tuple(r["clean"] for r in rows), tuple(r["answer"] for r in rows),
                   tuple(r["corrupted"] for r in rows) if paired[0] else (),
                   tuple(r["corrupted_answer"] for r in rows) if paired[0] else ())


def builtin_task(name: str) -> Task:
    """One of the eight built-in tasks by name."""
    if name not in TASK_NAMES:
        raise MechkitError(f"unknown task {name!r}; built-in tasks are {TASK_NAMES}, or load a file with Task.from_file")
    return Task.from_file(TASKS_DIR / f"{name}.jsonl")


def as_task(task: Task | str | os.PathLike) -> Task:
    """A Task, a built-in task name, or a path to a JSONL task file."""
    if isinstance(task, Task):
        return task
    if isinstance(task, str) and task in TASK_NAMES:
        return builtin_task(task)
    if Path(task).suffix == ".jsonl" or Path(task).exists():
        return Task.from_file(task)
    raise MechkitError(f"unknown task {task!r}; use one of {TASK_NAMES}, a .jsonl file or a mechkit.Task")


@dataclass
class TokenisedTask:
    """A task tokenised for one model, examples grouped by prompt length (no padding needed).

    ``groups`` maps a prompt length to the indices (into the kept examples) of that length.
    For paired tasks ``answer_ids``/``corrupted_ids`` are single tokens; for unpaired tasks the
    answer tokens are appended to the prompt and ``answer_ids`` is ``None``.
    """

    task: Task
    kept: list[int]
    clean: list[Tensor]
    corrupted: list[Tensor] | None
    answer_ids: Int[Tensor, " n"] | None
    corrupted_ids: Int[Tensor, " n"] | None
    answer_lengths: list[int]
    dropped: dict[int, str] = field(default_factory=dict)

    def groups(self) -> dict[int, list[int]]:
        by_length: dict[int, list[int]] = {}
        for i, tokens in enumerate(self.clean):
            by_length.setdefault(len(tokens), []).append(i)
        return by_length


def _answer_tokens(model, answer: str) -> list[int]:
    return list(model.tokenizer(answer, add_special_tokens=False)["input_ids"])


def tokenise_task(model, task: Task) -> TokenisedTask:
    """Tokenise under mechkit's BOS policy; drop (with a reason) examples whose answers are not
    single tokens (paired tasks) or whose clean and corrupted prompts differ in length."""
    kept, clean, corrupted, answers, wrong, lengths = [], [], [], [], [], []
    dropped: dict[int, str] = {}
    for i in range(len(task)):
        ids = list(encode(model, Prompt(task.clean[i])).ids)
        answer = _answer_tokens(model, task.answers[i])
        if task.paired:
            other = _answer_tokens(model, task.corrupted_answers[i])
            twin = list(encode(model, Prompt(task.corrupted[i])).ids)
            if len(answer) != 1 or len(other) != 1:
                dropped[i] = (f"answers {task.answers[i]!r} / {task.corrupted_answers[i]!r} are "
                              f"{len(answer)} / {len(other)} tokens, not one each")
                continue
            if len(twin) != len(ids):
                dropped[i] = f"clean prompt is {len(ids)} tokens but its corrupted twin is {len(twin)}"
                continue
            if answer == other:
                dropped[i] = "clean and corrupted answers are the same token"
                continue
            corrupted.append(torch.tensor(twin))
            answers.append(answer[0])
            wrong.append(other[0])
            clean.append(torch.tensor(ids))
            lengths.append(1)
        else:
            if not answer:
                dropped[i] = "the answer tokenises to nothing"
                continue
            clean.append(torch.tensor(ids + answer))
            lengths.append(len(answer))
        kept.append(i)
    if not kept:
        reasons = sorted(set(dropped.values()))[:3]
        raise MechkitError(f"task {task.name!r}: no example is usable with this tokenizer (e.g. {reasons})")
    return TokenisedTask(task, kept, clean, corrupted if task.paired else None,
                         torch.tensor(answers) if task.paired else None,
                         torch.tensor(wrong) if task.paired else None, lengths, dropped)


def select_tasks(names: list[str], examples: int | None = None) -> list[Task]:
    """Tasks by name (built-in names, ``all`` for every built-in task, JSONL files), each cut
    to its first ``examples`` examples when given. Two tasks of one name (a file named like a
    built-in task, or two files of one stem) are refused: results are labelled by task name."""
    if examples is not None and examples < 1:
        raise MechkitError(f"examples must be at least 1, got {examples}")
    expanded = [t for name in names for t in (TASK_NAMES if name == "all" else [name])]
    tasks = []
    seen: dict[str, str] = {}  # task name -> the name or file it came from
    for name in dict.fromkeys(expanded):
        task = as_task(name)
        if task.name in seen:  # results are labelled (and saved) by task name: one would overwrite the other
            raise MechkitError(f"two tasks are both named {task.name!r} ({seen[task.name]!r} and {name!r}); "
                               "rename the task file")
        seen[task.name] = name
        if examples is not None and examples < len(task):
            task = Task(task.name, task.clean[:examples], task.answers[:examples], task.corrupted[:examples],
                        task.corrupted_answers[:examples])
        tasks.append(task)
    return tasks


__all__ = ["TASK_NAMES", "Task", "TokenisedTask", "as_task", "builtin_task", "select_tasks", "tokenise_task"]
