"""Head classification from a loaded model vs from the checkpoint read one layer at a time.

Each variant runs in a fresh process and reports two numbers:

* ``weights held``: bytes of weight tensors the analysis keeps (the loaded model's unique
  parameters; the lazy source's peak of ``resident_bytes()`` over every read). This is what a
  GPU would have to hold.
* peak RSS (``ru_maxrss``) of the process. On the CPU it understates the loaded model:
  transformers memory-maps safetensors, and weights that are never touched (every MLP but
  layer 0's) never become resident.

Variants:

* ``imports``: import mechkit and build nothing (the floor every variant pays);
* ``full``: ``load_model(name)`` then ``classify_heads(model)``;
* ``lazy``: ``classify_heads(CheckpointWeights(folder))``: the embedding, unembedding and one
  layer's matrices resident at a time (plus the tokenizer).

Both give the same scores (checked). Usage::

    python benchmarks/bench_lazy_weights.py                                  # SmolLM2, every layer
    python benchmarks/bench_lazy_weights.py --model gemma-3-270m --layers 0,8,17
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def run_variant(variant: str, model: str, layers: list[int] | None) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    import mechkit
    from mechkit.heads.weights import CheckpointWeights
    from mechkit.models.registry import BUNDLED, cached_models

    started = time.perf_counter()
    scores, held = None, 0
    if variant == "full":
        loaded = mechkit.load_model(model)
        held = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in loaded.original_model.parameters()}.values())
        scores = mechkit.classify_heads(loaded, layers=layers, progress=False).scores.values
    elif variant == "lazy":
        folder = BUNDLED[model].cache_path if model in BUNDLED else cached_models().get(model, model)
        weights = CheckpointWeights(folder)
        read = weights.reader.tensor
        peaks = [0]

        def tensor(name):  # after every read from disk, what the source holds (the new tensor not yet stored)
            value = read(name)
            peaks.append(weights.resident_bytes() + value.numel() * value.element_size())
            return value

        weights.reader.tensor = tensor
        scores = mechkit.classify_heads(weights, layers=layers, progress=False).scores.values
        held = max(peaks)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "seconds": seconds, "peak_rss": peak, "held": held,
            "scores": None if scores is None else np.asarray(scores).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--layers", default=None, help="comma-separated layers (default all)")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.model, layers)))
        return
    from _common import machine_description, print_table

    print(machine_description())
    rows, results = [], {}
    for variant in ("imports", "full", "lazy"):
        command = [sys.executable, __file__, "--model", args.model, "--variant", variant]
        if args.layers:
            command += ["--layers", args.layers]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[variant] = json.loads(out)
    floor = results["imports"]["peak_rss"]
    for variant in ("full", "lazy"):
        r = results[variant]
        rows.append([variant, f"{r['seconds']:.1f}", f"{r['held'] / 2**20:.0f}", f"{r['peak_rss'] / 2**20:.0f}",
                     f"{(r['peak_rss'] - floor) / 2**20:.0f}"])
    print(f"model {args.model}, layers {args.layers or 'all'}; import floor {floor / 2**20:.0f} MiB")
    print_table(["variant", "seconds", "weights held MiB", "peak RSS MiB", "above imports MiB"], rows)
    print("same scores:", results["full"]["scores"] == results["lazy"]["scores"])


if __name__ == "__main__":
    main()
