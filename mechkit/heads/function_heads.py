"""Function-specific heads from a multi-class probe over all heads (Ma et al. 2025, "Cognitive Mirrors").

``function_heads(model)``: collect every head's output on the function-labelled sub-questions
(:mod:`mechkit.heads.function_features`), split by chain (a chain's or seed template's questions
never straddle train and test), train one multi-class probe over all heads
(:func:`mechkit.probing.multiclass.fit_head_probe`: ``"logistic"`` or the paper's ``"mlp"``), and
read each head's importance for each function as the mean, over held-out sub-questions of that
function, of gradient x activation of the head's (projected) features for that function's logit,
averaged over the projected width (:func:`~mechkit.probing.multiclass.head_importance`).

Controls: the majority-class accuracy and a probe on the residual stream at the same tokens
(middle and last layer) beside the head probe; a permutation null (the same pipeline on
shuffled labels, ``null_seeds`` seeds) whose largest absolute head importance per function is
the level a head reaches by chance (``null``); heads above it are marked.

Selected heads per function: those before the elbow of the sorted absolute importances (the
point farthest below the chord from the largest to the smallest), or the top ``k``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mechkit.data.function_chains import FUNCTIONS, SubQuestion, function_dataset, load_function_chains
from mechkit.errors import MechkitError
from mechkit.heads.function_features import HeadFeatures, head_features
from mechkit.probing.multiclass import evaluate_multiclass, fit_head_probe, head_importance
from mechkit.results import LabelledArray, Provenance

FAMILIES = ("logistic", "mlp")


@dataclass
class FunctionHeads:
    """``importance`` (function, layer, head), signed; ``absolute`` and ``normalised`` (sums to 1 per
    function); ``null`` (function,) the chance level of |importance|; ``selected`` heads per function;
    ``scores`` the probe's held-out accuracy and macro-F1 with their baselines."""

    importance: LabelledArray
    null: LabelledArray
    selected: dict[str, list[tuple[int, int]]]
    scores: dict
    test_index: np.ndarray
    features: HeadFeatures | None = None

    @property
    def absolute(self) -> LabelledArray:
        return self.importance.with_values(np.abs(self.importance.values), name="|importance|")

    @property
    def normalised(self) -> LabelledArray:
        a = np.abs(self.importance.values)
        return self.importance.with_values(a / a.sum(axis=(1, 2), keepdims=True), name="importance share")

    def above_null(self) -> np.ndarray:
        """(function, layer, head) mask: |importance| above the permutation null's level."""
        return np.abs(self.importance.values) > self.null.values[:, None, None]

    held_out: list[SubQuestion] | None = None

    def test_subquestions(self) -> list[SubQuestion]:
        """The held-out sub-questions the importances were read on (kept when saved)."""
        if self.held_out is not None:
            return list(self.held_out)
        if self.features is None:
            raise MechkitError("this result has neither its held-out sub-questions nor its features")
        return [self.features.subquestions[i] for i in self.test_index]

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.importance.save(folder / "importance.npz")
        self.null.save(folder / "null.npz")
        (folder / "function_heads.json").write_text(json.dumps(
            {"selected": {f: [list(h) for h in heads] for f, heads in self.selected.items()},
             "scores": self.scores, "test_index": self.test_index.tolist(),
             "held_out": [dataclasses.asdict(sq) for sq in self.test_subquestions()]}, indent=2, default=float))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> FunctionHeads:
        folder = Path(folder)
        meta = json.loads((folder / "function_heads.json").read_text())
        return cls(LabelledArray.load(folder / "importance.npz"), LabelledArray.load(folder / "null.npz"),
                   {f: [tuple(h) for h in heads] for f, heads in meta["selected"].items()}, meta["scores"],
                   np.array(meta["test_index"]),
                   held_out=[SubQuestion(**{**sq, "context": tuple(map(tuple, sq["context"]))})
                             for sq in meta.get("held_out", [])] or None)


def elbow(values: np.ndarray) -> int:
    """How many of the descending ``values`` lie before the elbow (at least 1)."""
    v = np.sort(np.asarray(values, dtype=float))[::-1]
    if len(v) < 3 or v[0] == v[-1]:
        return 1
    x = np.linspace(0, 1, len(v))
    y = (v - v[-1]) / (v[0] - v[-1])
    below = (1 - x) - y  # distance below the chord from (0, 1) to (1, 0); its maximum is the knee
    return max(1, int(np.argmax(below)))  # the values before the knee


def select_heads(importance: np.ndarray, n_heads: int, select: str | int) -> dict[str, list[tuple[int, int]]]:
    """Heads per function, ranked by |importance|: up to the elbow, or the top ``select``."""
    selected = {}
    for f, name in enumerate(FUNCTIONS):
        flat = np.abs(importance[f]).ravel()
        k = elbow(flat) if select == "elbow" else int(select)
        order = np.argsort(-flat, kind="stable")[:k]
        selected[name] = [(int(i // n_heads), int(i % n_heads)) for i in order]
    return selected


def _subquestions(dataset) -> list[SubQuestion]:
    if dataset is None:
        return function_dataset()
    if isinstance(dataset, (str, os.PathLike)):
        return load_function_chains(dataset)
    return list(dataset)


def _split(feats: HeadFeatures, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices with whole chains (or seed templates) on one side, every function on both.

    Chains are drawn in a seeded order until the test side holds ``test_size`` of the sub-questions;
    a draw that leaves a function without 2 training or 1 test sub-questions is redrawn (50 tries).
    """
    if not 0 < test_size < 1:
        raise MechkitError(f"test_size must lie in (0, 1), got {test_size}")
    groups = np.array([sq.chain_id or f"example{i}" for i, sq in enumerate(feats.subquestions)])
    labels = feats.labels
    unique = np.unique(groups)
    for attempt in range(50):
        order = np.random.default_rng([seed, attempt]).permutation(unique)
        sizes = np.array([(groups == g).sum() for g in order])
        n_groups = int(np.searchsorted(np.cumsum(sizes), test_size * len(labels))) + 1
        test_mask = np.isin(groups, order[:n_groups])
        train, test = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
        counts = [(int((labels[train] == f).sum()), int((labels[test] == f).sum())) for f in range(len(FUNCTIONS))]
        if all(n_train >= 2 and n_test >= 1 for n_train, n_test in counts):
            return train, test
    short = [f"{FUNCTIONS[f]!r} ({n_train} train, {n_test} test)" for f, (n_train, n_test) in enumerate(counts)
             if n_train < 2 or n_test < 1]
    raise MechkitError(f"no split by chain gives every function 2 training and 1 held-out sub-questions: "
                       f"{', '.join(short)}; each function needs at least 2 and 1: give more sub-questions of it")


def function_heads(model, dataset: Sequence[SubQuestion] | str | None = None, *, family: str = "logistic",
                   answer: str = "greedy", layer_mean: bool = True, test_size: float = 0.25, seed: int = 0,
                   null_seeds: int = 3, select: str | int = "elbow", features: HeadFeatures | None = None,
                   epochs: int | None = None, progress: bool = True) -> FunctionHeads:
    """Each head's importance for each cognitive function, read from one probe over all heads.

    Args:
        dataset: sub-questions, a JSONL chain file, or None for the built-in set.
        family: ``"logistic"`` (multinomial logistic regression) or ``"mlp"`` (the paper's probe).
        answer: ``"greedy"``, ``"gold"`` or ``"last_prompt"`` (see :mod:`mechkit.heads.function_features`).
        null_seeds: permutation-null repeats (0: none).
        select: ``"elbow"`` or a number of heads per function.
        features: precomputed :func:`head_features` of this model (skips collection).
    """
    if family not in FAMILIES:
        raise MechkitError(f"family must be one of {FAMILIES}, got {family!r}")
    if not (select == "elbow" or (isinstance(select, int) and select >= 1)):
        raise MechkitError(f"select must be 'elbow' or a positive number of heads, got {select!r}")
    if features is None:
        features = head_features(model, _subquestions(dataset), answer=answer, layer_mean=layer_mean,
                                 progress=progress)
    features.check_model(model)
    train, test = _split(features, test_size, seed)
    X, y = features.features, torch.from_numpy(features.labels)
    fit_kwargs = {"n_classes": len(FUNCTIONS), "seed": seed, **({"epochs": epochs} if epochs else {})}
    probe = fit_head_probe(X[train], y[train], family=family, **fit_kwargs)
    scores = {"head_probe": evaluate_multiclass(probe, X[test], y[test]), "family": family, "answer": features.mode,
              "n_train": int(len(train)), "n_test": int(len(test)), "dropped": len(features.dropped)}
    for name, R in (features.residual or {}).items():
        resid_probe = fit_head_probe(R[train][:, None], y[train], family="logistic", **fit_kwargs)
        scores[f"residual_probe_{name}"] = evaluate_multiclass(resid_probe, R[test][:, None], y[test])
    importance = head_importance(probe, X[test], y[test]).detach().numpy()
    rng = np.random.default_rng(seed)
    null_levels = []
    for s in range(null_seeds):
        shuffled = torch.from_numpy(rng.permutation(features.labels[train]))
        null_probe = fit_head_probe(X[train], shuffled, family=family, **{**fit_kwargs, "seed": seed + 1 + s})
        null_importance = head_importance(null_probe, X[test], torch.from_numpy(rng.permutation(features.labels[test])))
        null_levels.append(np.abs(null_importance.detach().numpy()).max(axis=1))
    null = np.mean(null_levels, axis=0) if null_levels else np.full(len(FUNCTIONS), np.nan)
    L, H = features.n_layers, features.n_heads
    importance = importance.reshape(len(FUNCTIONS), L, H)
    settings = dict(family=family, answer=features.mode, layer_mean=features.layer_mean, test_size=test_size,
                    null_seeds=null_seeds, select=select)
    provenance = Provenance.for_model(model, data=[sq.prompt for sq in features.subquestions], seed=seed, **settings)
    labels = {"function": list(FUNCTIONS), "layer": list(range(L)), "head": list(range(H))}
    result = FunctionHeads(
        LabelledArray(importance.astype(np.float32), ("function", "layer", "head"), labels,
                      name="function importance (grad x activation)", provenance=provenance,
                      attrs={**settings, **scores}),
        LabelledArray(null.astype(np.float32), ("function",), {"function": list(FUNCTIONS)},
                      name="permutation-null level of |importance|", provenance=provenance, attrs=settings),
        select_heads(importance, H, select), scores, test, features)
    return result


__all__ = ["FAMILIES", "FunctionHeads", "elbow", "function_heads", "select_heads"]
