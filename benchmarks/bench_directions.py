"""Directions and abliteration on the bundled models: time, refusal, and what abliteration costs.

For each bundled model, in one process:

* time to find the harmful-vs-harmless direction at every layer (difference of means at the last
  token) and to choose one by the causal criterion (``select_direction``), and time to
  orthogonalise the weights;
* refusal: the phrase detector on greedy completions of held-out harmful and harmless requests
  (in the chat template for chat models), and the refusal log-odds at the first generated token,
  for the model and its abliterated copy;
* cost: mean KL divergence of next-token distributions on held-out harmless requests between
  the model and its abliterated copy, and (the "control" row) between the model and a copy
  orthogonalised against a random direction; on post-norm models (Gemma-3) also the KL between
  the weight edit and the hook (``ablate_direction``), which differ there by construction;
* the change in the true/false probe (best held-out F1 and AUC over layers of ``resid_post``).

Prints one table per measure. Usage::

    python benchmarks/bench_directions.py [--models gemma-3-270m smollm2-135m-instruct] [--threads 2]
        [--n-eval 24] [--tokens 24]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch
from _common import machine_description, print_table

import mechkit
from mechkit.data.probing_sets import true_false
from mechkit.data.prompts import Prompt
from mechkit.data.safety import harmful_vs_harmless
from mechkit.directions import ablate_direction, find_direction, orthogonalize, select_direction
from mechkit.directions.refusal import mean_kl, next_token_logprobs, refusal_rate, refusal_score

MODELS = ("gemma-3-270m", "smollm2-135m-instruct")


def split_requests(model, n_eval: int, seed: int = 0):
    """Harmful and harmless prompts: all but ``n_eval`` of each to find, ``n_eval`` held out."""
    import random

    data = harmful_vs_harmless(seed=seed, chat=model.mechkit.chat)
    harmful = [p for p, y in zip(data.prompts, data.labels) if y == 1]
    harmless = [p for p, y in zip(data.prompts, data.labels) if y == 0]
    rng = random.Random(f"bench:{seed}")
    rng.shuffle(harmful)
    rng.shuffle(harmless)
    return harmful[n_eval:], harmless[n_eval:], harmful[:n_eval], harmless[:n_eval]


def probe_best(model) -> tuple[float, float]:
    result = mechkit.probe_layers(model, true_false(), ["resid_post"], control=0, progress=False)
    f1, auc = result.scores.sel(metric="f1").values, result.scores.sel(metric="auc").values
    return float(np.nanmax(f1)), float(np.nanmax(auc))


def run(name: str, n_eval: int, tokens: int) -> dict:
    row: dict = {"model": name}
    model = mechkit.load_model(name)
    fit_harmful, fit_harmless, harmful, harmless = split_requests(model, n_eval)
    t0 = time.perf_counter()
    found = find_direction(model, fit_harmful, fit_harmless, progress=False)
    row["find_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    choice = select_direction(model, found, harmful, harmless, progress=False)
    row["select_s"] = time.perf_counter() - t0
    row.update(layer=choice.layer, criterion=choice.criterion.split(":")[0], auc=float(np.nanmax(found.auc.values)),
               chosen_auc=choice.summary()["auc"])
    t0 = time.perf_counter()
    edited = orthogonalize(model, choice.direction)
    row["orthogonalize_s"] = time.perf_counter() - t0
    random_dir = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    control = orthogonalize(model, random_dir)
    base_harmless = next_token_logprobs(model, harmless)
    row["kl"] = mean_kl(base_harmless, next_token_logprobs(edited, harmless))
    row["kl_random"] = mean_kl(base_harmless, next_token_logprobs(control, harmless))
    del control
    if any("post_feedforward_layernorm" in n for n, _ in model.original_model.named_parameters()):
        with ablate_direction(model, choice.direction):
            hooked = next_token_logprobs(model, harmless)
        row["kl_edit_vs_hook"] = mean_kl(hooked, next_token_logprobs(edited, harmless))
    for label, which in (("base", model), ("abl", edited)):
        rate_harmful, _ = refusal_rate(which, harmful, max_new_tokens=tokens, progress=False)
        rate_harmless, _ = refusal_rate(which, harmless, max_new_tokens=tokens, progress=False)
        row[f"refuse_harmful_{label}"], row[f"refuse_harmless_{label}"] = rate_harmful, rate_harmless
        row[f"score_harmful_{label}"] = float(refusal_score(which, harmful).mean())
        row[f"tf_f1_{label}"], row[f"tf_auc_{label}"] = probe_best(which)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-eval", type=int, default=24, help="held-out requests per class")
    parser.add_argument("--tokens", type=int, default=24, help="tokens generated for the phrase detector")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_description())
    rows = [run(name, args.n_eval, args.tokens) for name in args.models]
    print_table(["model", "find all layers (s)", "select (s)", "orthogonalise (s)", "layer", "criterion",
                 "best AUC", "chosen AUC"],
                [[r["model"], f"{r['find_s']:.1f}", f"{r['select_s']:.1f}", f"{r['orthogonalize_s']:.1f}", r["layer"],
                  r["criterion"], f"{r['auc']:.3f}", f"{r['chosen_auc']:.3f}"] for r in rows])
    print_table(["model", "refusal harmful (base -> abl.)", "refusal harmless (base -> abl.)",
                 "refusal log-odds harmful (base -> abl.)"],
                [[r["model"], f"{r['refuse_harmful_base']:.2f} -> {r['refuse_harmful_abl']:.2f}",
                  f"{r['refuse_harmless_base']:.2f} -> {r['refuse_harmless_abl']:.2f}",
                  f"{r['score_harmful_base']:.2f} -> {r['score_harmful_abl']:.2f}"] for r in rows])
    print_table(["model", "KL harmless (abliterated)", "KL (random direction)", "KL edit vs hook",
                 "true/false F1 (base -> abl.)", "true/false AUC (base -> abl.)"],
                [[r["model"], f"{r['kl']:.4f}", f"{r['kl_random']:.4f}",
                  f"{r['kl_edit_vs_hook']:.4f}" if "kl_edit_vs_hook" in r else "n/a (equal by construction)",
                  f"{r['tf_f1_base']:.3f} -> {r['tf_f1_abl']:.3f}", f"{r['tf_auc_base']:.3f} -> {r['tf_auc_abl']:.3f}"]
                 for r in rows])


if __name__ == "__main__":
    main()
