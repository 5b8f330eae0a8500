"""Function heads on the bundled models: time of each stage, and the probes' held-out scores.

For each model, in one process: collect per-head features of the built-in sub-questions
(``--per-function`` of each function, ``--answer`` tokens), then for each probe family fit the probe
over all heads, read the importances, and run the permutation null; print the time of each stage
with the held-out accuracy and macro-F1 beside the majority baseline and the residual-stream probes.

Usage::

    python benchmarks/bench_function_heads.py [--models smollm2-135m-instruct gemma-3-270m]
        [--per-function 60] [--answer greedy] [--null-seeds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from _common import machine_description, print_table

import mechkit
from mechkit.data.function_chains import function_dataset
from mechkit.heads.function_features import head_features
from mechkit.heads.function_heads import function_heads

MODELS = ("smollm2-135m-instruct", "gemma-3-270m")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--per-function", type=int, default=60)
    parser.add_argument("--answer", default="greedy", choices=["greedy", "gold", "last_prompt"])
    parser.add_argument("--null-seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_description())
    print(f"{args.per_function} sub-questions per function, answer tokens: {args.answer}, null seeds {args.null_seeds}")
    rows = []
    for name in args.models:
        model = mechkit.load_model(name)
        t0 = time.perf_counter()
        features = head_features(model, function_dataset(per_function=args.per_function), answer=args.answer,
                                 progress=False)
        collect = time.perf_counter() - t0
        for family in ("logistic", "mlp"):
            t0 = time.perf_counter()
            probe_only = function_heads(model, features=features, family=family, null_seeds=0, progress=False)
            fit = time.perf_counter() - t0
            t0 = time.perf_counter()
            function_heads(model, features=features, family=family, null_seeds=args.null_seeds, progress=False)
            with_null = time.perf_counter() - t0
            s = probe_only.scores
            residual = ", ".join(f"{k.removeprefix('residual_probe_')} {v['accuracy']:.2f}"
                                 for k, v in s.items() if k.startswith("residual_probe_"))
            rows.append([name, family, features.features.shape[1], features.features.shape[2], len(features.labels),
                         len(features.dropped), f"{collect:.0f}", f"{fit:.1f}", f"{with_null:.1f}",
                         f"{s['head_probe']['accuracy']:.3f}", f"{s['head_probe']['macro_f1']:.3f}",
                         f"{s['head_probe']['majority_baseline']:.3f}", residual])
    print_table(["model", "probe", "heads", "features/head", "sub-questions", "dropped", "collect s",
                 "probe + importance s", "with null s", "accuracy", "macro-F1", "majority", "residual probe accuracy"],
                rows)


if __name__ == "__main__":
    main()
