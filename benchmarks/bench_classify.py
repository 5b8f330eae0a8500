"""MAPS head classification: full time on the bundled models, the share spent in the
vocabulary projection, and the naive way (materialise each relation's full score rows per
head) side by side on the same heads, with peak memory.

In one process, per model:

* ``chunked (mechkit)``: ``classify_heads`` over every head and built-in relation (scores,
  suppression and the shuffled-target null: three projections per head), timed whole; the
  time inside ``kernels.projection_rank`` is measured by wrapping it.
* per head, on ``--sample-heads`` heads spread over the layers, the same relation scores
  (scores only) computed two ways: the chunked ``projection_rank`` with k, and the naive
  materialisation ``Y_rel @ (W_O W_U)`` (every score of every pair's row), ranked by
  comparison. Both give the same scores (checked); time and peak extra RSS per head, and the
  naive total extrapolated to all heads.

Usage::

    python benchmarks/bench_classify.py                      # both bundled models
    python benchmarks/bench_classify.py --model smollm2-135m-instruct --sample-heads 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import PeakRSS, machine_description, print_table  # noqa: E402

import mechkit  # noqa: E402
import mechkit.heads.classification as classification  # noqa: E402
from mechkit.data import builtin_relations  # noqa: E402
from mechkit.heads.weights import BridgeWeights  # noqa: E402


def relation_rows(model, result):
    """Per relation the run classified: source ids, target ids and the k it used (read from the result)."""
    by_name = {r.name: r for r in builtin_relations()}
    rows = []
    for name in result.scores.labels["relation"]:
        tok = classification.tokenise_relation(model, by_name[name])
        rows.append((name, tok.sources, tok.targets, result.relations[name]["k"]))
    return rows


@torch.no_grad()
def head_scores(weights, x, layer, head, rows, naive: bool) -> list[float]:
    W_V, W_U = weights.W_V(layer)[head].float(), weights.W_U().float()
    W_O = weights.W_O_into_residual(layer)[head]  # as classify_heads reads it (Gemma-3: norm gain folded)
    scores = []
    if naive:
        OU = W_O @ W_U  # d_head x V, as a naive implementation would build it per head
    for _, sources, targets, k in rows:
        Y = x[sources] @ W_V
        if naive:
            full = Y @ OU  # n_pairs x V: every score
            own = full[torch.arange(len(Y)), targets]
            ranks = (full > own[:, None]).sum(-1)
            del full
        else:
            ranks = mechkit.kernels.projection_rank(Y, W_O, targets, C=W_U, k=k)
        scores.append(float((ranks < k).float().mean()))
    return scores


def run(name: str, sample_heads: int) -> list[list[object]]:
    model = mechkit.load_model(name)
    weights = BridgeWeights(model)
    spent = {"projection": 0.0}
    real = classification.projection_rank

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent["projection"] += time.perf_counter() - started

    classification.projection_rank = timed
    try:
        with PeakRSS() as peak:
            started = time.perf_counter()
            result = classification.classify_heads(model, progress=False)
            total = time.perf_counter() - started
    finally:
        classification.projection_rank = real
    n_heads = weights.n_layers * weights.n_heads
    table = [[name, "chunked (mechkit), all heads, 3 passes", n_heads, f"{total:.1f}",
              f"{100 * spent['projection'] / total:.0f}%", f"{peak.extra_mib:.0f}", "-"]]
    counts = result.category_counts()
    print(f"{name}: {sum(v for k, v in counts.items() if k != 'unclassified')} of {n_heads} heads classified; "
          f"cells at threshold {float((result.scores.values >= result.threshold).mean()):.4f}, "
          f"shuffled-target null {result.false_positive_rate():.5f}")

    rows = relation_rows(model, result)
    all_sources = torch.cat([s for _, s, _, _ in rows]).unique()
    first, later = classification.source_representations(weights, all_sources)
    index = {int(t): i for i, t in enumerate(all_sources)}
    remapped = [(n, torch.tensor([index[int(s)] for s in src]), tgt, k) for n, src, tgt, k in rows]
    layers = np.linspace(0, weights.n_layers - 1, sample_heads).round().astype(int)
    timings = {True: [], False: []}
    peaks = {True: 0.0, False: 0.0}
    for layer in layers:
        head = int(layer) % weights.n_heads
        x = first if layer == 0 else later
        got = {}
        for naive in (False, True):
            with PeakRSS() as peak:
                started = time.perf_counter()
                got[naive] = head_scores(weights, x, int(layer), head, remapped, naive)
                timings[naive].append(time.perf_counter() - started)
            peaks[naive] = max(peaks[naive], peak.extra_mib)
        assert np.allclose(got[True], got[False]), (layer, head, got)
        assert np.allclose(got[False], result.scores.values[int(layer), head]), "per-head scores differ from the run"
    for naive, label in ((False, "chunked, per head (scores only)"), (True, "naive full rows, per head")):
        per_head = float(np.mean(timings[naive]))
        table.append([name, label, len(layers), f"{per_head:.2f} /head (all: {per_head * n_heads:.0f})",
                      "-", f"{peaks[naive]:.0f}", f"{np.mean(timings[True]) / per_head:.1f}x" if not naive else "1.0x"])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="default: both bundled models")
    parser.add_argument("--sample-heads", type=int, default=4, help="heads timed both ways (spread over layers)")
    args = parser.parse_args()
    print(machine_description())
    rows = []
    for name in args.model or ["smollm2-135m-instruct", "gemma-3-270m"]:
        rows += run(name, args.sample_heads)
    print_table(["model", "method", "heads", "seconds", "in projection", "peak extra RSS MiB", "speed-up vs naive"], rows)


if __name__ == "__main__":
    main()
