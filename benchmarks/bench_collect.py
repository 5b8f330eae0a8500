"""Speed and peak memory of ``collect_activations`` against a plain forward and ``run_with_cache``.

In one process, over the same prompts (~30 tokens each) and batch size, times:

* ``plain forward``: ``model(tokens, attention_mask=mask)`` under ``torch.no_grad()``
  (logits computed, as users do);
* ``run_with_cache (all)``: ``model.run_with_cache(tokens, attention_mask=mask)``, every
  hook cached, the cache deleted after each batch;
* ``collect last layer``: ``collect_activations`` of ``blocks.{n_layers-1}.hook_resid_post``
  at position -1;
* ``collect mid layer``: the same for ``blocks.{n_layers//2-1}.hook_resid_post``.

Each method is warmed up on one batch, then timed ``--repeats`` times (round-robin over the
methods, so that background load hits them alike); the best time counts. Throughput counts
real (non-pad) tokens; the ratios are also given from process CPU time, which other load on
the machine disturbs less than wall time. Peak extra RSS is the highest resident memory above the level right
before a method's run (after ``gc.collect()``), sampled every 5 ms, highest over the repeats.
The baselines batch the prompts in the same order as the collector (longest first), so all
methods see the same padding.

Goals (issue): collection at least the plain-forward rate for the last layer, at least 2x it
for the middle layer, and its peak extra memory within ``--max-memory``. The exit status is
always 0; the verdicts are printed as ``GOAL MET`` / ``GOAL MISSED`` lines.

Usage::

    python benchmarks/bench_collect.py
    python benchmarks/bench_collect.py --n-prompts 32 --batch-size 8 --max-memory 1GB --repeats 3
    python benchmarks/bench_collect.py --threads 1   # steadier when other jobs share the CPUs

With two threads on a machine other jobs also load, a descheduled thread stalls its partner
at every parallel region; timings then swing by 2-3x between repeats (a warning is printed).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _common import MIB, PeakRSS, machine_description, print_table  # noqa: E402

import mechkit  # noqa: E402
from mechkit.activations import Prompt, collect_activations, encode  # noqa: E402
from mechkit.activations.memory import parse_bytes  # noqa: E402

OPENERS = [
    "Last spring,", "On a cold Tuesday morning,", "Years ago,", "During the long school holidays,",
    "According to the local newspaper,", "Late one evening,", "In the middle of the harvest,",
    "For the first time in decades,",
]
SUBJECTS = [
    "The old lighthouse keeper", "A young engineer from the coastal town", "My grandmother",
    "The committee of local farmers", "A curious student of history", "The tired night nurse",
    "Our new neighbour across the street", "The famous violinist", "A small group of hikers",
    "The city council", "The retired schoolteacher", "A quiet boy with a red backpack",
]
VERBS = [
    "carefully explained", "slowly rebuilt", "wrote a long letter about", "argued for hours about",
    "finally discovered", "quietly remembered", "spent the whole summer studying",
    "took several photographs of", "refused to talk about", "made a detailed map of",
]
OBJECTS = [
    "the broken wooden bridge near the river", "the strange noises coming from the attic",
    "the history of the abandoned railway station", "the recipe her family had kept for generations",
    "the first snowfall of the winter", "the price of bread at the morning market",
    "the small garden behind the public library", "the storm that flooded the northern valley",
    "the rules of an ancient board game", "the letters found inside an old piano",
]
CLAUSES = [
    "because nobody else in the village seemed to care.",
    "while the rain kept falling on the tin roof outside.",
    "before the visitors arrived on the evening train.",
    "even though the weather was getting worse every day.",
    "so that the children would understand it one day.",
    "after reading an article in the weekend newspaper.",
    "and everyone listened without saying a single word.",
    "until the sun went down behind the distant hills.",
]


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct English sentences of about 30 tokens, deterministic for a seed."""
    rng = random.Random(seed)
    seen: set[str] = set()
    prompts: list[str] = []
    while len(prompts) < n:
        parts = [rng.choice(OPENERS), rng.choice(SUBJECTS).lower(), rng.choice(VERBS), rng.choice(OBJECTS),
                 rng.choice(CLAUSES)]
        text = " ".join(parts)
        if text not in seen:
            seen.add(text)
            prompts.append(text)
    return prompts


def make_batches(model, prompts: list[str], batch_size: int):
    """Right-padded (tokens, mask) batches, longest first (the collector's order); real-token count."""
    ids = [list(encode(model, Prompt(p)).ids) for p in prompts]
    order = sorted(range(len(ids)), key=lambda j: -len(ids[j]))
    pad_id = model.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else 0
    batches = []
    for start in range(0, len(order), batch_size):
        rows = [ids[j] for j in order[start:start + batch_size]]
        length = max(len(r) for r in rows)
        tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        batches.append((tokens, mask))
    return batches, sum(len(r) for r in ids), [len(r) for r in ids]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-memory", default="2GB")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default 0: torch's default); 1 is steadier on a loaded machine")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    max_memory = parse_bytes(args.max_memory)

    print(machine_description())
    started = time.perf_counter()
    model = mechkit.load_model(args.model)
    n_layers = model.cfg.n_layers
    last, mid = n_layers - 1, n_layers // 2 - 1
    print(f"model: {args.model} ({n_layers} layers, d_model {model.cfg.d_model}, vocab {model.cfg.d_vocab}), "
          f"loaded in {time.perf_counter() - started:.1f} s")

    prompts = make_prompts(args.n_prompts, args.seed)
    batches, n_tokens, lengths = make_batches(model, prompts, args.batch_size)
    print(f"prompts: {len(prompts)}, tokens {n_tokens} (per prompt {min(lengths)}-{max(lengths)}, "
          f"mean {n_tokens / len(prompts):.1f}, with BOS), batch size {args.batch_size}, "
          f"max_memory {args.max_memory} = {max_memory / MIB:.0f} MiB, repeats {args.repeats} (best counts)")

    def plain(batch_list):
        with torch.no_grad():
            for tokens, mask in batch_list:
                logits = model(tokens, attention_mask=mask)
                del logits

    def with_cache(batch_list):
        with torch.no_grad():
            for tokens, mask in batch_list:
                logits, cache = model.run_with_cache(tokens, attention_mask=mask)
                del logits, cache

    def collector(layer: int):
        hook = f"blocks.{layer}.hook_resid_post"

        def run(prompt_list):
            result = collect_activations(model, prompt_list, [hook], [-1], batch_size=args.batch_size,
                                         max_memory=args.max_memory, progress=False)
            assert tuple(result[hook].shape) == (len(prompt_list), 1, model.cfg.d_model)
            del result

        return run

    # (label, function, its input, warm-up input, is a collect row)
    methods = [
        ("plain forward", plain, batches, batches[:1], False),
        ("run_with_cache (all)", with_cache, batches, batches[:1], False),
        (f"collect last (blocks.{last})", collector(last), prompts, prompts[:args.batch_size], True),
        (f"collect mid (blocks.{mid})", collector(mid), prompts, prompts[:args.batch_size], True),
    ]
    for _, fn, _, warm, _ in methods:
        fn(warm)

    times = {label: [] for label, *_ in methods}
    cpu = {label: [] for label, *_ in methods}
    peak = {label: 0 for label, *_ in methods}
    for repeat in range(args.repeats):
        for label, fn, data, _, _ in methods:
            with PeakRSS() as rss:
                t0, c0 = time.perf_counter(), time.process_time()
                fn(data)
                seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
            times[label].append(seconds)
            cpu[label].append(cpu_seconds)
            peak[label] = max(peak[label], rss.extra)
            print(f"  repeat {repeat + 1}: {label:<26} {seconds:7.2f} s wall, {cpu_seconds:7.2f} s CPU, "
                  f"peak extra RSS {rss.extra_mib:7.1f} MiB", flush=True)
    best = {label: min(t) for label, t in times.items()}

    rate = {label: n_tokens / best[label] for label in best}
    cpu_rate = {label: n_tokens / min(c) for label, c in cpu.items()}
    base, cpu_base = rate["plain forward"], cpu_rate["plain forward"]
    rows = []
    for label, _, _, _, is_collect in methods:
        rows.append([
            label, f"{rate[label]:.1f}", f"{rate[label] / base:.2f}x", f"{best[label]:.2f}",
            f"{cpu_rate[label] / cpu_base:.2f}x", f"{peak[label] / MIB:.1f}",
            ("yes" if peak[label] <= max_memory else "no") if is_collect else "-",
        ])
    print()
    print_table(["method", "tokens/s", "vs plain", "best s", "vs plain (CPU time)", "peak extra RSS MiB",
                 f"within max_memory ({args.max_memory})"], rows)
    print()
    spread = max(max(t) / min(t) for t in times.values())
    if spread > 1.3:
        print(f"WARNING: noisy timings (a method's slowest repeat took {spread:.1f}x its fastest; other load on "
              "the machine?); raise --repeats, or compare the CPU-time ratios, which load shifts less")

    last_label, mid_label = methods[2][0], methods[3][0]
    goals = [
        (f"{last_label} >= 1.0x plain forward", rate[last_label] / base, rate[last_label] >= base),
        (f"{mid_label} >= 2.0x plain forward", rate[mid_label] / base, rate[mid_label] >= 2 * base),
    ]
    for text, ratio, ok in goals:
        print(f"{'GOAL MET' if ok else 'GOAL MISSED'}: {text} (measured {ratio:.2f}x)")
    worst = max(peak[last_label], peak[mid_label])
    print(f"{'GOAL MET' if worst <= max_memory else 'GOAL MISSED'}: collect peak extra RSS within max_memory "
          f"(worst {worst / MIB:.1f} MiB of {max_memory / MIB:.0f} MiB)")
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
