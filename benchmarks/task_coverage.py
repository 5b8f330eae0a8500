"""Coverage and baseline behaviour of the built-in head-attribution task suites.

Loads every ``mechkit/data/tasks/*.jsonl`` (one example a line:
``{"clean", "answer", "corrupted", "corrupted_answer"}``) and, for each bundled model:

- checks the hard constraints with that model's tokenizer (no special tokens): ``answer`` and
  ``corrupted_answer`` are one token each and differ, and ``clean`` and ``corrupted`` have the
  same number of tokens;
- runs the Hugging Face model (float32, CPU, batched, no grad) on the examples that pass and
  reports the clean logit difference ``logit[answer] - logit[corrupted_answer]`` at the last
  position (mean with a bootstrap 95% interval, 1000 resamples, seed 0), the same difference on
  the corrupted prompt (should be negative), and the accuracy (fraction with clean diff > 0).

Gemma's BOS token is prepended when running it (``add_special_tokens=True``); SmolLM2 gets no
special tokens. Lengths are always counted without special tokens.

Usage::

    python benchmarks/task_coverage.py
    python benchmarks/task_coverage.py --model gemma=/path/to/hf_folder --tasks retrieval,inference
    python benchmarks/task_coverage.py --check-only        # constraints only, no forward passes

Exit status is 1 when any example fails a hard constraint (each failure is printed with its
file, line and reason), else 0.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_DIR = os.path.join(ROOT, "mechkit", "data", "tasks")
KEYS = ("clean", "answer", "corrupted", "corrupted_answer")
# name -> (cache folder name, prepend the tokenizer's special tokens when running the model)
MODELS = {"gemma-3-270m": ("gemma-3-270m", True), "smollm2-135m": ("smollm2-135m-instruct", False)}


def models_dir() -> str:
    try:
        from mechkit.models.cache import models_dir as _models_dir

        return str(_models_dir())
    except Exception:  # noqa: BLE001 - fall back to the default cache location
        return os.path.expanduser("~/.cache/mechkit/models")


def load_task(path):
    """Parse one JSONL task file. Returns (examples, format errors); examples keep their line number."""
    examples, errors = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                errors.append(f"line {n}: blank line")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"line {n}: invalid JSON ({e})")
                continue
            if not isinstance(row, dict) or set(row) != set(KEYS) or not all(isinstance(row[k], str) for k in KEYS):
                errors.append(f"line {n}: expected exactly the string fields {KEYS}")
                continue
            if row["answer"] == row["corrupted_answer"]:
                errors.append(f"line {n}: answer and corrupted_answer are the same")
                continue
            if row["clean"] == row["corrupted"]:
                errors.append(f"line {n}: clean and corrupted are the same")
                continue
            if row["clean"] != row["clean"].rstrip() or row["corrupted"] != row["corrupted"].rstrip():
                errors.append(f"line {n}: prompt ends with whitespace")
                continue
            examples.append((n, row))
    seen = {}
    for n, row in examples:
        key = (row["clean"], row["corrupted"])
        if key in seen:
            errors.append(f"line {n}: duplicate of line {seen[key]}")
        seen[key] = n
    return examples, errors


def constraint_errors(tok, row):
    """Reasons (possibly none) why ``row`` fails the hard constraints for ``tok``."""
    def ids(text):
        return tok(text, add_special_tokens=False).input_ids

    why = []
    for k in ("answer", "corrupted_answer"):
        n = len(ids(row[k]))
        if n != 1:
            why.append(f"{k} {row[k]!r} is {n} tokens")
    a, b = len(ids(row["clean"])), len(ids(row["corrupted"]))
    if a != b:
        why.append(f"clean is {a} tokens but corrupted is {b}")
    if not why and ids(row["answer"]) == ids(row["corrupted_answer"]):
        why.append("answer and corrupted_answer are the same token")
    return why


def last_logits(model, tok, prompts, special, batch_size):
    """Logits at each prompt's last token, shape (len(prompts), vocab). Left-pads the batch."""
    import torch

    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i : i + batch_size], add_special_tokens=special, padding=True, return_tensors="pt")
        mask = enc.attention_mask
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            # logits_to_keep=1: project only the last position onto the (large) vocabulary
            logits = model(input_ids=enc.input_ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits
        out.append(logits[:, -1, :].float())
    return torch.cat(out)


def bootstrap_ci(x, n=1000, seed=0):
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n, len(x)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks-dir", default=TASK_DIR)
    ap.add_argument("--tasks", default="", help="comma-separated task names (default: all files)")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER",
                    help="a Hugging Face model folder (repeatable; default: the two bundled models in the cache); "
                    "BOS is prepended when running it if NAME contains 'gemma'")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--check-only", action="store_true", help="check the constraints, run no model")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    if args.model:
        models = {}
        for spec in args.model:
            name, folder = spec.split("=", 1)
            models[name] = (folder, "gemma" in name.lower())
    else:
        models = {name: (os.path.join(models_dir(), sub), special) for name, (sub, special) in MODELS.items()}

    paths = sorted(glob.glob(os.path.join(args.tasks_dir, "*.jsonl")))
    if args.tasks:
        wanted = set(args.tasks.split(","))
        paths = [p for p in paths if os.path.basename(p)[: -len(".jsonl")] in wanted]
    if not paths:
        print(f"no task files in {args.tasks_dir}", file=sys.stderr)
        return 1
    tasks = {}  # name -> (path as shown in messages, examples)
    failures = []
    for p in paths:
        shown = os.path.relpath(p, ROOT) if os.path.abspath(p).startswith(ROOT + os.sep) else p
        examples, errors = load_task(p)
        tasks[os.path.basename(p)[: -len(".jsonl")]] = (shown, examples)
        failures += [f"{shown}: {e}" for e in errors]

    rows = []
    for mname, (folder, special) in models.items():
        tok = AutoTokenizer.from_pretrained(folder)
        model = None
        if not args.check_only:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        for task, (shown, examples) in tasks.items():
            kept = []
            for n, row in examples:
                why = constraint_errors(tok, row)
                if why:
                    failures.append(f"{shown}: line {n}: {mname}: " + "; ".join(why))
                else:
                    kept.append(row)
            if model is None or not kept:
                rows.append([task, mname, len(examples), len(kept), "-", "-", "-"])
                continue
            a = torch.tensor([tok(r["answer"], add_special_tokens=False).input_ids[0] for r in kept])
            b = torch.tensor([tok(r["corrupted_answer"], add_special_tokens=False).input_ids[0] for r in kept])
            idx = torch.arange(len(kept))
            lc = last_logits(model, tok, [r["clean"] for r in kept], special, args.batch_size)
            lk = last_logits(model, tok, [r["corrupted"] for r in kept], special, args.batch_size)
            dc = (lc[idx, a] - lc[idx, b]).numpy()
            dk = (lk[idx, a] - lk[idx, b]).numpy()
            lo, hi = bootstrap_ci(dc)
            rows.append([task, mname, len(examples), len(kept), f"{dc.mean():+.2f} [{lo:+.2f}, {hi:+.2f}]",
                         f"{dk.mean():+.2f}", f"{(dc > 0).mean():.2f}"])
        del model

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import print_table

    print_table(["task", "model", "written", "kept", "clean diff [95% CI]", "corrupted diff", "accuracy"], rows)
    if failures:
        print(f"\n{len(failures)} constraint failure(s):", file=sys.stderr)
        for f in failures:
            print("  " + f, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
