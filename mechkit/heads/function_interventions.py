"""Causal checks of function heads: remove or amplify them and measure each function's answers.

Per function, on its held-out sub-questions, teacher-forced: **accuracy** (greedy decoding would
produce the gold answer: the argmax at every gold answer token is that token, which is exactly
"the greedy answer starts with the gold answer"; the answer as given, capitalised or in lower case
all count, since a model writes " Yes" where the gold says "yes") and the **gold-answer
log-probability** (summed over those case variants). Under:

* ``base``: the unmodified model;
* ``remove own``: the function's selected heads scaled by 0 (or mean-ablated);
* ``remove random``: as many random heads (not the function's own), ``random_draws`` seeded draws
  (mean; the spread is in ``attrs["random_std"]``);
* ``remove other``: the next function's selected heads (a specificity control);
* ``augment xF``: the function's heads scaled by F.

A function whose base accuracy is at most ``floor`` cannot show harm from removal; it is listed in
``attrs["at_floor"]``. Interventions come from :func:`mechkit.heads.interventions.scale_heads`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mechkit.data.function_chains import FUNCTIONS, SubQuestion
from mechkit.data.tasks import Task, tokenise_task
from mechkit.errors import MechkitError
from mechkit.heads.attribution import mean_head_outputs
from mechkit.heads.function_heads import FunctionHeads
from mechkit.heads.interventions import Head, scale_heads
from mechkit.heads.patching import metric_positions, run_to_logits, task_batches
from mechkit.results import LabelledArray

MEASURES = ("accuracy", "logprob")


def as_task(name: str, subquestions: Sequence[SubQuestion]) -> Task:
    """Sub-questions as an unpaired attribution task (teacher-forced gold answer)."""
    return Task(name, tuple(sq.prompt for sq in subquestions), tuple(sq.target for sq in subquestions))


def answer_variants(sq: SubQuestion) -> list[str]:
    """The gold answer as the model may write it: as given, capitalised, lower case (distinct ones)."""
    answer = sq.answer
    return list(dict.fromkeys(" " + a for a in (answer, answer[:1].upper() + answer[1:], answer.lower())))


@torch.no_grad()
def gold_answer_scores(model, subquestions: Sequence[SubQuestion], *, batch_size: int = 16
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-question: log-probability of the gold answer (summed over its case variants, see
    :func:`answer_variants`) and whether greedy decoding reproduces one of them."""
    if not subquestions:
        raise MechkitError("no sub-questions to score")
    owner = [i for i, sq in enumerate(subquestions) for _ in answer_variants(sq)]
    task = Task("gold", tuple(subquestions[i].prompt for i in owner),
                tuple(v for sq in subquestions for v in answer_variants(sq)))
    tok = tokenise_task(model, task)
    variant_logprob = np.full(len(owner), -np.inf)
    variant_correct = np.zeros(len(owner), dtype=bool)
    for batch in task_batches(tok, batch_size):
        logits = run_to_logits(model, batch.clean, metric_positions(batch)).float()
        targets = batch.clean[:, -batch.answer_length:].to(logits.device)
        where = [tok.kept[i] for i in batch.index]
        variant_logprob[where] = logits.log_softmax(-1).gather(2, targets[..., None])[..., 0].sum(-1).cpu().numpy()
        variant_correct[where] = (logits.argmax(-1) == targets).all(-1).cpu().numpy()
    logprob = np.full(len(subquestions), -np.inf)
    correct = np.zeros(len(subquestions), dtype=bool)
    for v, i in enumerate(owner):
        logprob[i] = np.logaddexp(logprob[i], variant_logprob[v])
        correct[i] |= variant_correct[v]
    return np.where(np.isfinite(logprob), logprob, np.nan), correct


def head_means(model, subquestions: Sequence[SubQuestion], heads: Sequence[Head], *, batch_size: int = 16
               ) -> dict[Head, torch.Tensor]:
    """Each head's output averaged over every token of ``subquestions`` (for mean-ablation)."""
    means = mean_head_outputs(model, tokenise_task(model, as_task("means", subquestions)), batch_size)
    return {(layer, head): means[layer, head] for layer, head in heads}


def intervention_table(model, result: FunctionHeads, subquestions: Sequence[SubQuestion] | None = None, *,
                       factors: Sequence[float] = (1.5, 2.0, 4.0), random_draws: int = 5, mean_ablate: bool = False,
                       floor: float = 0.05, seed: int = 0, batch_size: int = 16, progress: bool = True
                       ) -> LabelledArray:
    """``(function, condition, measure)``: accuracy and mean gold log-prob under each intervention."""
    if random_draws < 1:
        raise MechkitError(f"random_draws must be at least 1, got {random_draws}")
    subquestions = list(subquestions) if subquestions is not None else result.test_subquestions()
    cfg = model.cfg
    every_head = [(layer, head) for layer in range(cfg.n_layers) for head in range(cfg.n_heads)]
    means = head_means(model, subquestions, every_head, batch_size=batch_size) if mean_ablate else None
    conditions = ["base", "remove own", "remove random", "remove other"] + [f"augment x{f:g}" for f in factors]
    values = np.full((len(FUNCTIONS), len(conditions), len(MEASURES)), np.nan)
    random_std = np.full((len(FUNCTIONS), len(MEASURES)), np.nan)
    rng = np.random.default_rng(seed)
    at_floor, others = [], {}
    bar = tqdm(total=len(FUNCTIONS) * (len(conditions) + random_draws - 1), desc="function interventions",
               disable=not progress)

    def measure(items, factors_by_head=None, ablate_means=False):
        if not factors_by_head:
            scores = gold_answer_scores(model, items, batch_size=batch_size)
        else:
            kwargs = {"means": {h: means[h] for h in factors_by_head}} if ablate_means else {}
            with scale_heads(model, factors_by_head, **kwargs):
                scores = gold_answer_scores(model, items, batch_size=batch_size)
        bar.update(1)
        logprob, correct = scores
        return float(np.mean(correct)), float(np.nanmean(logprob))

    for f, name in enumerate(FUNCTIONS):
        items = [sq for sq in subquestions if sq.function == name]
        if not items:
            bar.update(len(conditions) + random_draws - 1)
            continue
        own = result.selected[name]
        other_name = FUNCTIONS[(f + 1) % len(FUNCTIONS)]
        others[name] = other_name
        values[f, 0] = measure(items)
        values[f, 1] = measure(items, {h: 0.0 for h in own}, mean_ablate)
        pool = [h for h in every_head if h not in own]
        draws = [measure(items, {pool[i]: 0.0 for i in rng.choice(len(pool), size=min(len(own), len(pool)),
                                                                    replace=False)}, mean_ablate)
                 for _ in range(random_draws)]
        values[f, 2], random_std[f] = np.mean(draws, axis=0), np.std(draws, axis=0)
        values[f, 3] = measure(items, {h: 0.0 for h in result.selected[other_name]}, mean_ablate)
        for c, factor in enumerate(factors):
            values[f, 4 + c] = measure(items, {h: float(factor) for h in own})
        if values[f, 0, 0] <= floor:
            at_floor.append(name)
    bar.close()
    return LabelledArray(values, ("function", "condition", "measure"),
                         {"function": list(FUNCTIONS), "condition": conditions, "measure": list(MEASURES)},
                         name="function accuracy and gold log-prob under head interventions",
                         provenance=result.importance.provenance,
                         attrs={"random_std": random_std.tolist(), "random_draws": random_draws, "at_floor": at_floor,
                                "other_function": others, "mean_ablate": mean_ablate, "floor": floor,
                                "n_heads_removed": {n: len(h) for n, h in result.selected.items()},
                                "n_items": {n: sum(sq.function == n for sq in subquestions) for n in FUNCTIONS}})


__all__ = ["MEASURES", "answer_variants", "as_task", "gold_answer_scores", "head_means", "intervention_table"]
