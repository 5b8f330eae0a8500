"""Held-out evaluation of batched probes: seeded group-aware splits, k-fold CV, metrics.

Splits keep every group (e.g. a subject: a country, a word) on one side, so a probe cannot
score by recognising a subject it saw in training. Metrics come from scikit-learn.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from mechkit.errors import MechkitError
from mechkit.probing.trainer import fit_probes

METRICS = ("accuracy", "f1", "auc")


def group_splits(n: int, groups: list[str] | None, labels: np.ndarray, *, folds: int | None,
                 test_size: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs: one seeded split, or ``folds`` folds; whole groups per side."""
    group_ids = np.asarray(groups) if groups is not None else np.arange(n).astype(str)
    unique = np.unique(group_ids)
    rng = np.random.default_rng(seed)
    order = rng.permutation(unique)
    if folds is not None:
        if folds < 2:
            raise MechkitError(f"folds must be at least 2, got {folds}")
        if folds > len(unique) or folds > min(np.bincount(labels, minlength=2)):
            raise MechkitError(f"{folds} folds need at least {folds} groups and {folds} examples of each class; "
                               f"have {len(unique)} groups and class counts {np.bincount(labels, minlength=2).tolist()}")
        parts = np.array_split(order, folds)
        splits = [(np.flatnonzero(~np.isin(group_ids, p)), np.flatnonzero(np.isin(group_ids, p))) for p in parts]
    else:
        if not 0 < test_size < 1:
            raise MechkitError(f"test_size must lie in (0, 1), got {test_size}")
        n_test = max(1, int(round(len(unique) * test_size)))
        test = np.isin(group_ids, order[:n_test])
        splits = [(np.flatnonzero(~test), np.flatnonzero(test))]
    for train, test in splits:
        for side, idx in (("training", train), ("test", test)):
            if len(np.unique(labels[idx])) < 2:
                raise MechkitError(f"a {side} split holds one class only ({len(idx)} examples); use more data, "
                                   "fewer folds or another seed")
    return splits


def evaluate_cells(features: torch.Tensor, labels: np.ndarray, splits, *, C: float = 1.0,
                   balanced: bool = False, **fit: object) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over splits of held-out (accuracy, F1, AUC) for every cell: (cell, metric) each.
    ``fit`` goes to :func:`~mechkit.probing.trainer.fit_probes` (``solver``, ``group_size``, ...)."""
    per_split = []
    y = torch.as_tensor(labels)
    for train, test in splits:
        probe = fit_probes(features[:, train], y[train], C=C, balanced=balanced, **fit)
        decision = probe.decision(features[:, test]).numpy()
        truth = labels[test]
        per_split.append([[accuracy_score(truth, d > 0), f1_score(truth, d > 0, zero_division=0.0),
                           roc_auc_score(truth, d)] for d in decision])
    scores = np.asarray(per_split)  # split x cell x metric
    return scores.mean(0), scores.std(0)
