"""Checks of MAPS's static scores against the running model (the paper's section on validation).

* :func:`dynamic_check`: put each source word into neutral templates, read a head's output
  at the last position through ``W_O`` and ``W_U``, and apply the same top-k test (*with
  context*); and the same with the head's attention forced onto the source token, i.e. its
  output replaced by the source's value vector (*without context*). Pearson correlation
  between static and dynamic scores across heads, for both variants.
* :func:`ablation_check`: zero a relation's top-m heads at the last position and compare
  the relation's few-shot accuracy with zeroing as many random heads (seeded draws).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from mechkit.activations import Prompt, collect_activations
from mechkit.data.relations import Relation, builtin_relations
from mechkit.errors import MechkitError
from mechkit.heads.classification import HeadClassification, tokenise_relation
from mechkit.heads.interventions import zero_heads
from mechkit.heads.weights import BridgeWeights
from mechkit.kernels import projection_rank
from mechkit.results import LabelledArray, Provenance

TEMPLATES = (
    "No {} means no",
    "The story of {} contains",
    "This is a document about {}",
    "When I think about {} I think about",
)


@dataclass
class DynamicCheck:
    """Dynamic scores (layer x head x relation) with context and with attention forced on the source."""

    with_context: LabelledArray
    forced: LabelledArray
    pearson: dict[str, dict[str, float]]  # variant -> {"all": r, relation: r}
    n_prompts: dict[str, int]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _relations_by_name(relations) -> dict[str, Relation]:
    pool = list(builtin_relations()) + list(relations or [])
    return {r.name: r for r in pool}


@torch.no_grad()
def dynamic_check(
    model,
    classification: HeadClassification,
    relations: list[Relation] | None = None,
    *,
    n_pairs: int = 20,
    templates: tuple[str, ...] = TEMPLATES,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = True,
) -> DynamicCheck:
    """Dynamic (inference-time) relation scores for every classified head and relation.

    ``relations`` adds user relations not in the built-in set (matched by name to the
    classification's relations). ``n_pairs`` pairs per relation are drawn (seeded) and put
    into each template.
    """
    for template in templates:
        if template.count("{}") != 1:
            raise MechkitError(f"template {template!r} must contain exactly one '{{}}' placeholder")
    known = _relations_by_name(relations)
    names = classification.scores.labels["relation"]
    missing = [n for n in names if n not in known]
    if missing:
        raise MechkitError(f"relations {missing} are not built in: pass them as relations=[...]")
    layers = [int(l) for l in classification.scores.labels["layer"]]
    weights = BridgeWeights(model)
    rng = random.Random(seed)
    prompts, targets, owners = [], [], []
    for name in names:
        tok = tokenise_relation(model, known[name])
        chosen = rng.sample(range(tok.n_kept), min(n_pairs, tok.n_kept))
        for i in chosen:
            source = tok.words[i][0]
            for template in templates:
                text = template.format(source)
                start = template.index("{}")  # not text.index(source): "The story of story contains"
                prompts.append(Prompt(text, spans={"source": (start, start + len(source))}))
                targets.append(int(tok.targets[i]))
                owners.append(name)
    hooks = [f"blocks.{l}.attn.hook_z" for l in layers] + [f"blocks.{l}.attn.hook_v" for l in layers]
    acts = collect_activations(model, prompts, hooks, [-1, "span:source:last"], batch_size=batch_size,
                               progress=progress)
    target_ids = torch.tensor(targets, device=weights.device)
    owner = np.array(owners)
    k_of = np.array([classification.relations[o]["k"] for o in owners])
    k_max = int(k_of.max())
    W_U = weights.W_U().float()
    fold = classification.scores.provenance.settings.get("fold_attn_out_norm", True)
    shape = (len(layers), weights.n_heads, len(names))
    context, forced = np.zeros(shape), np.zeros(shape)
    bar = tqdm(total=len(layers) * weights.n_heads, desc="dynamic check", unit="head", disable=not progress)
    for li, layer in enumerate(layers):
        z = acts[f"blocks.{layer}.attn.hook_z"][:, 0].float().to(weights.device)  # (prompt, head, d_head) at the last token
        v = acts[f"blocks.{layer}.attn.hook_v"][:, 1].float().to(weights.device)  # (prompt, kv_head, d_head) at the source
        W_O = weights.W_O_into_residual(layer, fold_attn_out_norm=fold)
        for head in range(weights.n_heads):
            for values, Y in ((context, z[:, head]), (forced, v[:, weights.kv_head(head)])):
                hit = (projection_rank(Y, W_O[head], target_ids, C=W_U, k=k_max).cpu().numpy() < k_of)
                values[li, head] = [hit[owner == n].mean() for n in names]
            bar.update()
    bar.close()
    provenance = Provenance.for_model(model, data=[p.text for p in prompts], seed=seed, n_pairs=n_pairs,
                                      templates=list(templates))
    labels = classification.scores.labels
    static = classification.scores.values
    pearson = {}
    for variant, values in (("with_context", context), ("forced", forced)):
        pearson[variant] = {"all": _pearson(static, values)}
        for r, name in enumerate(names):
            pearson[variant][name] = _pearson(static[..., r], values[..., r])

    def labelled(values, name):
        return LabelledArray(values.astype(np.float32), ("layer", "head", "relation"), labels, name=name,
                             provenance=provenance)

    return DynamicCheck(labelled(context, "dynamic_score_with_context"), labelled(forced, "dynamic_score_forced"),
                        pearson, {n: int((owner == n).sum()) for n in names})


@torch.no_grad()
def ablation_check(
    model,
    classification: HeadClassification,
    relation: str,
    *,
    m: int = 5,
    n_random: int = 5,
    n_shots: int = 3,
    n_prompts: int = 50,
    seed: int = 0,
    relations: list[Relation] | None = None,
) -> dict:
    """Few-shot accuracy of ``relation`` when its top-m heads, or m random heads, are zeroed at the last position."""
    known = _relations_by_name(relations)
    if relation not in classification.scores.labels["relation"] or relation not in known:
        raise MechkitError(f"relation {relation!r} was not classified; choose one of {classification.scores.labels['relation']}")
    tok = tokenise_relation(model, known[relation])
    pairs = [(source, target, int(t)) for (source, target), t in zip(tok.words, tok.targets)]
    rng = random.Random(seed)
    prompts, answers = [], []
    for _ in range(n_prompts):
        shots = rng.sample(pairs, n_shots + 1)
        text = "\n".join(f"{s}: {t}" for s, t, _ in shots[:-1]) + f"\n{shots[-1][0]}:"
        prompts.append(text)
        answers.append(shots[-1][2])
    answers_t = torch.tensor(answers)

    def accuracy(heads) -> float:
        with zero_heads(model, heads, positions=[-1]):
            logits = collect_activations(model, prompts, ["logits"], [-1], progress=False)["logits"][:, 0]
        return float((logits.argmax(-1) == answers_t).float().mean())

    top = [(l, h, s) for l, h, s in classification.top_heads(relation, m)]
    layers = classification.scores.labels["layer"]
    top_heads = [(int(layers[l]), h) for l, h, _ in top]
    everything = [(int(l), h) for l in layers for h in range(classification.scores.shape[1])]
    others = [x for x in everything if x not in top_heads]
    random_accuracies = [accuracy(rng.sample(others, m)) for _ in range(n_random)]
    return {
        "relation": relation, "m": m, "n_prompts": n_prompts, "n_shots": n_shots,
        "accuracy": accuracy([]), "accuracy_top_removed": accuracy(top_heads),
        "accuracy_random_removed": random_accuracies,
        "random_mean": float(np.mean(random_accuracies)), "random_std": float(np.std(random_accuracies)),
        "top_heads": [(l, h, round(s, 3)) for (l, h), (_, _, s) in zip(top_heads, top)],
    }
