"""Head classification from the weights alone (MAPS; Elhelo & Geva 2024).

A head's OV circuit maps a source token ``s`` to vocabulary scores
``row(s) = x_s W_V[h] W_O[h] W_U``. A head *implements* a relation when the relation's
target is in the top-k of ``row(source)`` for at least ``threshold`` of its pairs; its
categories are those of the relations it implements.

Choices, and where they depart from the paper:

* ``x_s`` is the embedding row for layer-0 heads and, for later layers, the "effective
  embedding": by default the residual stream after layer 0's MLP without layer 0's
  attention, ``embed(s) + MLP0(norm(embed(s)))`` (the block's post-MLP norm applied where
  the model has one). ``effective_embedding="mlp_out"`` uses the MLP output alone (the
  literal reading of our spec) and ``False`` the raw embedding everywhere. Why the residual:
  on Gemma-3-270M the MLP output alone finds no head at all for any relation (its scaled
  embedding carries the token identity), while the residual finds e.g. a name-copying head
  (15.3, score 0.61); on SmolLM2 the two agree to within 0.03 on every top head.
* No attention-input norm, final norm or biases by default (each is an option).
* Models that normalise each attention output before the residual (Gemma-3) get that
  norm's gain folded into ``W_O`` (``fold_attn_out_norm``; the per-token scale does not
  change ranks). The result's ``notes`` say so.
* Never builds a |V| x |V| matrix: rows go through ``mechkit.kernels.projection_rank``,
  factored through d_head and chunked over the vocabulary.
* k = 1 for copying relations and 10 otherwise (``k=`` overrides); ``scale_k=True`` uses
  MAPS's 3 and 25 scaled from its 128k vocabulary to this model's.
* Control: the same scores with each relation's targets shuffled (seeded) give the rate
  at which heads pass the threshold by chance (``null_scores``, ``false_positive_rate``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import einsum
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from mechkit.data.relations import CATEGORIES, Relation, builtin_relations
from mechkit.errors import MechkitError
from mechkit.heads.weights import WeightSource, as_weights
from mechkit.kernels import projection_rank, projection_topk
from mechkit.results import LabelledArray, Provenance

MIN_PAIRS = 30
MAPS_VOCAB = 128_256
CATEGORY_LABELS = ("unclassified", *CATEGORIES, "2 categories", "3 categories", "4 categories")


@dataclass
class TokenisedRelation:
    """A relation's pairs that are single tokens (with a leading space) for one model."""

    relation: Relation
    sources: Int[Tensor, " pair"]
    targets: Int[Tensor, " pair"]
    n_candidates: int
    words: list[tuple[str, str]]  # the kept (source, target) words, aligned with the ids

    @property
    def n_kept(self) -> int:
        return int(self.sources.numel())


def single_token(tokenizer, word: str) -> int | None:
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def tokenise_relation(model, relation: Relation) -> TokenisedRelation:
    """Keep the pairs whose source and target are single tokens for this model."""
    cache: dict[str, int | None] = {}
    kept: dict[tuple[int, int], tuple[str, str]] = {}
    for source, target in relation.pairs:
        for word in (source, target):
            if word not in cache:
                cache[word] = single_token(model.tokenizer, word)
        if cache[source] is not None and cache[target] is not None:
            kept.setdefault((cache[source], cache[target]), (source, target))  # two spellings, one token pair
    ids = torch.tensor(list(kept), dtype=torch.long).reshape(-1, 2)
    return TokenisedRelation(relation, ids[:, 0], ids[:, 1], len(relation.pairs), list(kept.values()))


@dataclass
class HeadClassification:
    """Scores and categories of every head; save/load as a folder of LabelledArrays."""

    scores: LabelledArray          # layer x head x relation: fraction of pairs in the top-k
    suppression: LabelledArray     # the same on the negated rows
    null_scores: LabelledArray | None  # scores with shuffled targets (the chance control)
    threshold: float
    relations: dict[str, dict[str, Any]] = field(default_factory=dict)  # category, k, pairs kept, skipped
    notes: list[str] = field(default_factory=list)

    @property
    def categories(self) -> LabelledArray:
        """layer x head x category: whether the head implements a relation of that category."""
        implemented = self.scores.values >= self.threshold
        cats = [self.relations[r]["category"] for r in self.scores.labels["relation"]]
        values = np.stack([implemented[..., [c == cat for c in cats]].any(-1) for cat in CATEGORIES], -1)
        return LabelledArray(values, ("layer", "head", "category"),
                             {**{a: self.scores.labels[a] for a in ("layer", "head")}, "category": list(CATEGORIES)},
                             name="implements", provenance=self.scores.provenance)

    def category_map(self) -> LabelledArray:
        """layer x head codes into ``CATEGORY_LABELS``: 0 none, 1-4 one category, 5-7 several."""
        cats = self.categories.values
        count = cats.sum(-1)
        codes = np.where(count == 1, cats.argmax(-1) + 1, np.where(count > 1, count + 3, 0))
        return LabelledArray(codes.astype(np.int64), ("layer", "head"),
                             {a: self.scores.labels[a] for a in ("layer", "head")}, name="category",
                             provenance=self.scores.provenance, attrs={"codes": list(CATEGORY_LABELS)})

    def category_counts(self) -> dict[str, int]:
        codes = self.category_map().values
        return {label: int((codes == i).sum()) for i, label in enumerate(CATEGORY_LABELS)}

    def false_positive_rate(self) -> float | None:
        """Fraction of (head, relation) cells at or above the threshold when targets are shuffled."""
        return None if self.null_scores is None else float((self.null_scores.values >= self.threshold).mean())

    def top_heads(self, relation: str, n: int = 5) -> list[tuple[int, int, float]]:
        scores = self.scores.sel(relation=relation).values
        flat = np.argsort(-scores, axis=None)[:n]
        return [(int(l), int(h), float(scores[l, h])) for l, h in zip(*np.unravel_index(flat, scores.shape))]

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        scores = LabelledArray(self.scores.values, self.scores.axes, self.scores.labels, name=self.scores.name,
                               provenance=self.scores.provenance,
                               attrs={**self.scores.attrs, "threshold": self.threshold, "relations": self.relations,
                                      "notes": self.notes})
        scores.save(folder / "scores.npz")  # the classification's own fields travel in the scores' attrs
        self.suppression.save(folder / "suppression.npz")
        if self.null_scores is not None:
            self.null_scores.save(folder / "null_scores.npz")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> HeadClassification:
        folder = Path(folder)
        scores = LabelledArray.load(folder / "scores.npz")
        threshold, relations, notes = (scores.attrs.pop(key) for key in ("threshold", "relations", "notes"))
        null = folder / "null_scores.npz"
        return cls(scores, LabelledArray.load(folder / "suppression.npz"),
                   LabelledArray.load(null) if null.exists() else None, threshold, relations, notes)


def _as_relations(relations) -> list[Relation]:
    if relations is None:
        return list(builtin_relations())
    if isinstance(relations, Relation):
        relations = [relations]
    result = list(relations)
    if not result or not all(isinstance(r, Relation) for r in result):
        raise MechkitError("relations must be a non-empty list of mechkit.Relation (or None for the built-in set)")
    names = [r.name for r in result]
    if len(set(names)) != len(names):
        raise MechkitError(f"relation names must be distinct, got {names}")
    return result


def _default_k(relation: Relation, vocab: int, scale_k: bool) -> int:
    if scale_k:
        return max(1, round((3 if relation.copying else 25) * vocab / MAPS_VOCAB))
    return 1 if relation.copying else 10


EFFECTIVE_EMBEDDINGS = (True, "residual", "mlp_out", False)


@torch.no_grad()
def source_representations(weights: WeightSource, tokens: Tensor, *,
                           effective_embedding: bool | str = True) -> tuple[Tensor, Tensor]:
    """``x_s`` for layer-0 heads (embedding rows) and for later heads (see the module doc)."""
    if effective_embedding not in EFFECTIVE_EMBEDDINGS:
        raise MechkitError(f"effective_embedding must be one of {EFFECTIVE_EMBEDDINGS}, got {effective_embedding!r}")
    first = weights.W_E()[tokens].float()
    if effective_embedding is False:
        return first, first
    block = weights.block(0)
    x = weights.embed(tokens).float()[None]
    out = block.mlp(block.ln2(x))
    if hasattr(block, "ln2_post"):
        out = block.ln2_post(out)
    if effective_embedding == "mlp_out":
        return first, out[0].float()
    return first, (x + out)[0].float()


@torch.no_grad()
def classify_heads(
    model,
    relations: list[Relation] | Relation | None = None,
    *,
    k: int | None = None,
    threshold: float = 0.15,
    effective_embedding: bool | str = True,
    attn_norm: bool = False,
    final_norm: bool = False,
    biases: bool = False,
    fold_attn_out_norm: bool = True,
    scale_k: bool = False,
    min_pairs: int = MIN_PAIRS,
    null_control: bool = True,
    seed: int = 0,
    layers: list[int] | None = None,
    chunk_size: int = 512,
    progress: bool = True,
) -> HeadClassification:
    """Classify every attention head by the relations its OV circuit implements (MAPS).

    Args:
        model: a TransformerBridge, or a weight source such as
            :class:`~mechkit.heads.weights.CheckpointWeights` (a checkpoint read one layer at a time).
        relations: ``None`` for the built-in relations, or a list of :class:`~mechkit.data.Relation`.
        k: top-k for every relation (default 1 for copying, 10 otherwise; see ``scale_k``).
        threshold: a head implements a relation when its score is at least this (default
            0.15, the value MAPS's released code uses for its top-k test).
        effective_embedding: ``True``/``"residual"`` (default), ``"mlp_out"`` or ``False``; see the module doc.
        attn_norm, final_norm, biases, fold_attn_out_norm: see the module doc.
        scale_k: use MAPS's k (3 copying / 25 other at 128k vocabulary) scaled to this vocabulary.
        min_pairs: skip a relation with fewer single-token pairs than this (reported).
        null_control: also score shuffled targets (the chance baseline).
        layers: restrict to these layers (default all).

    Returns:
        A :class:`HeadClassification` with ``layer x head x relation`` scores and suppression scores.
    """
    if not 0.0 <= threshold <= 1.0:
        raise MechkitError(f"threshold must lie in [0, 1], got {threshold}")
    weights = as_weights(model)
    if k is not None and not 1 <= k <= weights.d_vocab:
        raise MechkitError(f"k={k} must be between 1 and the vocabulary size {weights.d_vocab}")
    layer_list = list(range(weights.n_layers)) if layers is None else list(layers)
    bad = [l for l in layer_list if not 0 <= l < weights.n_layers]
    if bad:
        raise MechkitError(f"layers {bad} out of range: the model has {weights.n_layers}")

    info: dict[str, dict[str, Any]] = {}
    usable: list[TokenisedRelation] = []
    for relation in _as_relations(relations):
        tok = tokenise_relation(model, relation)
        entry = {"category": relation.category, "pairs": tok.n_candidates, "kept": tok.n_kept,
                 "k": k or _default_k(relation, weights.d_vocab, scale_k), "skipped": None}
        if tok.n_kept < min_pairs:
            entry["skipped"] = (f"only {tok.n_kept} of {tok.n_candidates} pairs are single tokens for this "
                                f"tokenizer (need {min_pairs})")
        else:
            usable.append(tok)
        info[relation.name] = entry
    if not usable:
        raise MechkitError(f"no relation has {min_pairs} single-token pairs for this model: {info}")

    notes = []
    device = weights.device
    sources = torch.cat([t.sources for t in usable]).to(device)
    targets = torch.cat([t.targets for t in usable]).to(device)
    generator = torch.Generator().manual_seed(seed)
    null_targets = torch.cat([t.targets[torch.randperm(t.n_kept, generator=generator)] for t in usable]).to(device)
    row_k = torch.cat([torch.full((t.n_kept,), info[t.relation.name]["k"]) for t in usable]).to(device)
    k_max = int(row_k.max())
    bounds = np.cumsum([0] + [t.n_kept for t in usable])

    x_first, x_later = source_representations(weights, sources, effective_embedding=effective_embedding)
    W_U = weights.W_U().float()
    if final_norm:
        W_U = weights.final_norm_gain().float()[:, None] * W_U
        notes.append("final norm gain folded into W_U")
    if weights.has_attn_out_norm and fold_attn_out_norm:
        notes.append("the post-attention RMSNorm gain is folded into W_O (its per-token scale does not change ranks)")
    if effective_embedding == "mlp_out":
        notes.append("later-layer heads read layer 0's MLP output on the normalised embedding")
    elif effective_embedding:
        notes.append("later-layer heads read the effective embedding: embedding + layer 0's MLP on it")

    names = [t.relation.name for t in usable]
    shape = (len(layer_list), weights.n_heads, len(usable))
    scores, suppression, null = np.zeros(shape), np.zeros(shape), np.zeros(shape) if null_control else None
    bar = tqdm(total=len(layer_list) * weights.n_heads, desc="classifying heads", unit="head", disable=not progress)
    for li, layer in enumerate(layer_list):
        x = x_first if layer == 0 else x_later
        block = weights.block(layer)
        if attn_norm:
            x = block.ln1(x[None])[0].float()
        W_V = weights.W_V(layer)
        # On a GPU the kernels run in the model's own precision (fp32 accumulation); on the CPU in float32.
        compute_dtype = W_V.dtype if device.type == "cuda" else torch.float32
        W_O = weights.W_O_into_residual(layer, fold_attn_out_norm=fold_attn_out_norm)
        b_V, b_O = (weights.b_V(layer), weights.b_O(layer)) if biases else (None, None)
        Y = einsum(x, W_V.float(), "n d_model, head d_model d_head -> head n d_head")
        A = W_O
        if b_V is not None:
            Y = Y + b_V.float()[:, None, :]
        if b_O is not None:  # a constant row offset: append it as one more factor row
            Y = torch.cat([Y, torch.ones_like(Y[..., :1])], -1)
            A = torch.cat([A, b_O.float().expand(A.shape[0], 1, -1)], 1)
        Y, A = Y.to(compute_dtype), A.to(compute_dtype)
        for values, rows, sign in ((scores, targets, 1), (suppression, targets, -1), (null, null_targets, 1)):
            if values is None:
                continue
            # all heads of the layer in one call: one kernel launch on a GPU
            ranks = projection_rank(sign * Y, A, rows.expand(weights.n_heads, -1), C=W_U, k=k_max,
                                    chunk_size=chunk_size)
            hit = (ranks < row_k).float().cpu().numpy()
            values[li] = [[hit[h, a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])] for h in range(len(hit))]
        bar.update(weights.n_heads)
    bar.close()

    settings = dict(k=k, threshold=threshold, effective_embedding=effective_embedding, attn_norm=attn_norm,
                    final_norm=final_norm, biases=biases, fold_attn_out_norm=fold_attn_out_norm, scale_k=scale_k,
                    min_pairs=min_pairs, layers=layer_list)
    provenance = Provenance.for_model(model, data={r: [(int(s), int(t)) for s, t in zip(u.sources, u.targets)]
                                                   for r, u in zip(names, usable)}, seed=seed, **settings)
    labels = {"layer": layer_list, "head": list(range(weights.n_heads)), "relation": names}

    def labelled(values, name):
        return LabelledArray(values.astype(np.float32), ("layer", "head", "relation"), labels, name=name,
                             provenance=provenance)

    return HeadClassification(labelled(scores, "relation_score"), labelled(suppression, "suppression_score"),
                              labelled(null, "null_score") if null is not None else None, threshold, info, notes)


@torch.no_grad()
def head_top_mappings(model, layer: int, head: int, words: list[str], *, k: int = 5,
                      effective_embedding: bool | str = True) -> dict[str, list[str]]:
    """What a head's OV circuit maps each (single-token) word to: its top-k tokens.

    The view a researcher looks at first for a strong head, e.g. ``{" France": [" Paris", ...]}``.
    """
    weights = as_weights(model)
    ids = [single_token(model.tokenizer, w) for w in words]
    if any(i is None for i in ids):
        raise MechkitError(f"not single tokens (with a leading space): {[w for w, i in zip(words, ids) if i is None]}")
    first, later = source_representations(weights, torch.tensor(ids), effective_embedding=effective_embedding)
    x = first if layer == 0 else later
    W_O = weights.W_O_into_residual(layer)[head]
    _, top = projection_topk(x @ weights.W_V(layer)[head].float(), W_O, k, C=weights.W_U().float())
    return {w: [model.tokenizer.decode([int(t)]) for t in row] for w, row in zip(words, top)}
