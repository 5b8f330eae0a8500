"""Probe importance against causal importance, per function, on the same sub-questions.

For each function, its held-out sub-questions become an unpaired attribution task (the
teacher-forced log-probability of the gold answer, heads corrupted by mean-ablation, since
sub-questions have no corrupted twin) and :func:`mechkit.attribute_heads` scores every head with
AtP; exact patching scores AtP's top ``patch_top`` heads plus ``patch_random`` random others
(patching every head on long chain contexts would take hours on a CPU). Reported per function:

* Spearman correlation of |probe importance| with |AtP| over all heads, and with |patching| over
  the patched heads;
* the overlap of the probe's and AtP's top-10 heads (a fraction of 10).

A probe reads where a function is *decodable*; patching measures where it is *used*. Low
agreement is a finding, not a bug: the docs discuss where the two disagree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import spearmanr

from mechkit.data.function_chains import FUNCTIONS, SubQuestion
from mechkit.heads.attribution import attribute_heads
from mechkit.heads.function_heads import FunctionHeads
from mechkit.heads.function_interventions import as_task
from mechkit.results import LabelledArray

MEASURES = ("spearman_atp", "spearman_patching", "top10_overlap_atp", "n_items", "n_patched")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3 or np.ptp(a[keep]) == 0 or np.ptp(b[keep]) == 0:
        return float("nan")
    return float(spearmanr(a[keep], b[keep]).statistic)


def probe_vs_cause(model, result: FunctionHeads, subquestions: Sequence[SubQuestion] | None = None, *,
                   patch_top: int = 30, patch_random: int = 30, batch_size: int = 8, seed: int = 0,
                   progress: bool = True) -> tuple[LabelledArray, dict[str, LabelledArray]]:
    """``(function, measure)`` agreement table, and the causal maps: ``{"atp": ..., "patching": ...}``,
    each ``(function, layer, head)`` (patching NaN where not patched)."""
    subquestions = list(subquestions) if subquestions is not None else result.test_subquestions()
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    table = np.full((len(FUNCTIONS), len(MEASURES)), np.nan)
    atp_maps = np.full((len(FUNCTIONS), cfg.n_layers, cfg.n_heads), np.nan)
    patch_maps = np.full_like(atp_maps, np.nan)
    for f, name in enumerate(FUNCTIONS):
        items = [sq for sq in subquestions if sq.function == name]
        table[f, MEASURES.index("n_items")] = len(items)
        if len(items) < 2:
            continue
        task = as_task(name, items)
        atp = attribute_heads(model, task, "atp", corruption="mean", batch_size=batch_size, progress=progress).values
        atp_maps[f] = atp
        probe = np.abs(result.importance.values[f])
        order = np.argsort(-np.abs(atp).ravel(), kind="stable")
        top = order[:patch_top]
        rest = order[patch_top:]
        extra = rng.choice(rest, size=min(patch_random, len(rest)), replace=False) if len(rest) else rest
        chosen = [(int(i // cfg.n_heads), int(i % cfg.n_heads)) for i in np.concatenate([top, extra])]
        if chosen:
            patched = attribute_heads(model, task, "patching", corruption="mean", heads=chosen, batch_size=batch_size,
                                      progress=progress).values
            patch_maps[f] = patched
            table[f, MEASURES.index("spearman_patching")] = _spearman(probe.ravel(), np.abs(patched).ravel())
        table[f, MEASURES.index("n_patched")] = len(chosen)
        table[f, MEASURES.index("spearman_atp")] = _spearman(probe.ravel(), np.abs(atp).ravel())
        top_probe = set(np.argsort(-probe.ravel(), kind="stable")[:10].tolist())
        table[f, MEASURES.index("top10_overlap_atp")] = len(top_probe & set(order[:10].tolist())) / 10
    labels = {"function": list(FUNCTIONS), "layer": list(range(cfg.n_layers)), "head": list(range(cfg.n_heads))}
    provenance = result.importance.provenance
    maps = {kind: LabelledArray(values.astype(np.float32), ("function", "layer", "head"), labels,
                                name=f"{kind} (mean-ablation, gold log-prob)", provenance=provenance,
                                attrs={"patch_top": patch_top, "patch_random": patch_random})
            for kind, values in (("atp", atp_maps), ("patching", patch_maps))}
    return LabelledArray(table, ("function", "measure"), {"function": list(FUNCTIONS), "measure": list(MEASURES)},
                         name="probe importance vs causal importance", provenance=provenance,
                         attrs={"patch_top": patch_top, "patch_random": patch_random, "seed": seed}), maps


__all__ = ["MEASURES", "probe_vs_cause"]
