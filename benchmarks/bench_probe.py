"""The batched probe trainer against a loop of scikit-learn ``LogisticRegression`` fits.

On activations of a bundled model (default gemma-3-270m; the built-in true/false set,
every layer of ``resid_post`` and ``attn_out`` at the last token), in one process, over the
same cells and the same seeded split by subject:

* ``batched (mechkit)``: ``mechkit.probing.evaluate.evaluate_cells`` (the default: every cell's
  L-BFGS stepping together, each leaving the batch when it converges) plus held-out metrics;
* ``torch.optim.LBFGS, one cell per solve``: the previous CPU default, for comparison;
* ``scikit-learn loop``: per cell ``StandardScaler`` + ``LogisticRegression(C=1)`` (lbfgs,
  max_iter 1000) and the same metrics.

Prints time, the ratio, and the largest difference in held-out F1 and AUC across cells.

Usage::

    python benchmarks/bench_probe.py [--model smollm2-135m-instruct] [--per-relation 40]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import machine_description, print_table  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import f1_score, roc_auc_score  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

import mechkit  # noqa: E402
from mechkit.activations import collect_activations  # noqa: E402
from mechkit.data.probing_sets import true_false  # noqa: E402
from mechkit.probing.evaluate import evaluate_cells, group_splits  # noqa: E402


def sklearn_loop(features: torch.Tensor, labels: np.ndarray, train, test) -> np.ndarray:
    out = []
    for cell in features.numpy():
        scaler = StandardScaler().fit(cell[train])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(C=1.0, max_iter=1000).fit(scaler.transform(cell[train]), labels[train])
        decision = model.decision_function(scaler.transform(cell[test]))
        out.append([f1_score(labels[test], decision > 0), roc_auc_score(labels[test], decision)])
    return np.asarray(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--per-relation", type=int, default=40)
    args = parser.parse_args()
    print(machine_description())
    model = mechkit.load_model(args.model)
    data = true_false(per_relation=args.per_relation)
    hooks = [f"blocks.{l}.{h}" for h in ("hook_resid_post", "hook_attn_out") for l in range(model.cfg.n_layers)]
    acts = collect_activations(model, data.prompts, hooks, [-1], progress=False)
    features = torch.stack([acts[h][:, 0] for h in hooks])
    labels = data.labels
    ((train, test),) = group_splits(len(labels), data.groups, labels, folds=None, test_size=0.25, seed=0)
    print(f"{args.model}: {features.shape[0]} cells, {len(train)} train / {len(test)} test examples, "
          f"{features.shape[2]} features")
    started = time.perf_counter()
    batched, _ = evaluate_cells(features, labels, [(train, test)])
    t_batched = time.perf_counter() - started
    started = time.perf_counter()
    per_cell, _ = evaluate_cells(features, labels, [(train, test)], solver="torch", group_size=1)
    t_per_cell = time.perf_counter() - started
    started = time.perf_counter()
    reference = sklearn_loop(features, labels, train, test)
    t_sklearn = time.perf_counter() - started
    f1_diff = np.abs(batched[:, 1] - reference[:, 0]).max()
    auc_diff = np.abs(batched[:, 2] - reference[:, 1]).max()
    print_table(["method", "cells", "seconds", "speed-up", "max |F1 diff|", "max |AUC diff|"], [
        ["scikit-learn loop", features.shape[0], f"{t_sklearn:.2f}", "1.0x", "-", "-"],
        ["batched (mechkit default)", features.shape[0], f"{t_batched:.2f}", f"{t_sklearn / t_batched:.1f}x",
         f"{f1_diff:.4f}", f"{auc_diff:.4f}"],
        ["torch.optim.LBFGS, one cell per solve", features.shape[0], f"{t_per_cell:.2f}",
         f"{t_sklearn / t_per_cell:.1f}x", f"{np.abs(per_cell[:, 1] - reference[:, 0]).max():.4f}",
         f"{np.abs(per_cell[:, 2] - reference[:, 1]).max():.4f}"],
    ])
    print(f"best held-out AUC {batched[:, 2].max():.3f} (cell {int(batched[:, 2].argmax())})")
    verdict = "MET" if t_sklearn / t_batched >= 20 and max(f1_diff, auc_diff) <= 0.01 else "MISSED"
    print(f"GOAL {verdict}: >= 20x faster with held-out metrics within 0.01")


if __name__ == "__main__":
    main()
