"""Question answering with the model's own answers, for position probing (Orgad et al. 2024).

The model answers each question greedily in a fixed few-shot format ("Q: ...\\nA: The answer
is ..."). The exact answer is located inside every generation, right or wrong, by matching
the question type's candidate set (every capital, language, continent, author; years by
pattern), case-insensitively and preferring the longest candidate; it is then labelled
correct when it matches the gold answer or one of its aliases. Generations with no
locatable answer are dropped and counted. **Departures from the paper:** the paper extracts
the exact answer with another language model; offline we use the answer format plus the
candidate sets, so an answer outside the candidate set is not found (counted as no span).
"""

from __future__ import annotations

import re
from collections import Counter

import torch
from tqdm.auto import tqdm

from mechkit.data.probe_dataset import ProbeDataset
from mechkit.data.probing_sets import qa_candidates, qa_questions
from mechkit.data.prompts import Prompt
from mechkit.errors import MechkitError
from mechkit.models.loading import input_device

SHOTS = ("Q: What is the capital of Italy?\nA: The answer is Rome.\n"
         "Q: Who wrote Hamlet?\nA: The answer is William Shakespeare.\n")
MARKER = "\nA: The answer is"
YEAR = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})\b")


def locate_answer(kind: str, text: str) -> tuple[int, int] | None:
    """Character span of the exact answer in ``text``, or None."""
    if kind == "year":
        match = YEAR.search(text)
        return match.span() if match else None
    best = None
    lowered = text.lower()
    for candidate in sorted(qa_candidates().get(kind, []), key=len, reverse=True):
        for match in re.finditer(r"(?<![\w])" + re.escape(candidate.lower()) + r"(?![\w])", lowered):
            if best is None or match.start() < best[0] or (match.start() == best[0] and match.end() > best[1]):
                best = match.span()
            break
    return best


def is_correct(question: dict, answer: str) -> bool:
    accepted = {question["answer"].lower(), *(a.lower() for a in question.get("aliases", []))}
    return answer.lower() in accepted


@torch.no_grad()
def generate(model, prompts: list[str], *, max_new_tokens: int = 8, batch_size: int = 16, progress: bool = True) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches through the HF model the bridge wraps)."""
    tokenizer = model.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = input_device(model)
    outputs = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress):
            batch = prompts[start:start + batch_size]
            encoded = tokenizer(batch, return_tensors="pt", padding=True,
                                add_special_tokens=getattr(model.mechkit, "prepend_bos", True)).to(device)
            # use_cache=False: the KV-cache path through the bridge-wrapped modules degrades after the first token
            out = model.original_model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, use_cache=False,
                                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            outputs += tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


def qa_dataset(model, *, types: list[str] | None = None, per_type: int | None = None, max_new_tokens: int = 8,
               batch_size: int = 16, progress: bool = True) -> ProbeDataset:
    """The model's own answers, labelled correct (1) or not (0), with named spans for probing."""
    questions = list(qa_questions())
    kinds = sorted({q["type"] for q in questions})
    unknown = set(types or []) - set(kinds)
    if unknown:
        raise MechkitError(f"unknown question type(s) {sorted(unknown)}; choose from {kinds}")
    chosen = [q for q in questions if not types or q["type"] in types]
    if per_type is not None:
        seen: Counter = Counter()
        chosen = [q for q in chosen if (seen.update([q["type"]]) or seen[q["type"]] <= per_type)]
    heads = [SHOTS + f"Q: {q['question']}" + MARKER for q in chosen]
    generations = generate(model, heads, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    prompts, labels, groups = [], [], []
    no_span: Counter = Counter()
    for question, head, generated in zip(chosen, heads, generations):
        answer = generated.split("\n")[0].split("Q:")[0].rstrip()
        span = locate_answer(question["type"], answer)
        if not answer.strip() or span is None:
            no_span[question["type"]] += 1
            continue
        text = head + answer
        offset = len(head)
        lead = len(answer) - len(answer.lstrip())
        q_start = head.rindex(question["question"])
        prompts.append(Prompt(text, spans={
            "question": (q_start, q_start + len(question["question"])),
            "answer": (offset + lead, offset + len(answer)),
            "exact_answer": (offset + span[0], offset + span[1]),
        }))
        labels.append(int(is_correct(question, answer[span[0]:span[1]])))
        groups.append(question["question"])
    if not prompts:
        raise MechkitError("no generation contained a locatable answer; try more max_new_tokens")
    attrs = {"generated": len(chosen), "no_span": dict(no_span), "no_span_total": sum(no_span.values()),
             "types": types or kinds, "format": "few-shot 'A: The answer is ...'"}
    return ProbeDataset("qa", prompts, labels, groups, attrs)
