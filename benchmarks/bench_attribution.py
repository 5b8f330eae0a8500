"""Faithfulness and speed of head attribution: AtP and AtP* against exact activation patching.

For each bundled model and each built-in task, in one process:

* the task baseline, ``task_metric`` on every example of the task (``--examples N`` caps only the
  attributed examples, N spread evenly over the task file): clean logit difference with its bootstrap 95% interval, whether the
  interval excludes 0, examples kept and dropped;
* ``attribute_heads`` with ``"patching"`` (signed, the ground truth), ``"patching"`` with
  ``magnitude=True`` (mean |effect| per example, what AtP* estimates), ``"atp"``, ``"atp"`` with
  ``magnitude=True`` and ``"atp*"``, each timed by the result's ``attrs["seconds"]`` (this
  includes the ``task_metric`` baseline that ``attribute_heads`` computes for its attrs; the
  "net" speed-ups subtract the baseline's time, measured separately by this script, from each method
  that computes it separately (AtP on a paired task takes it from its own clean and corrupted runs,
  so nothing is subtracted from AtP there); the "CPU"
  speed-ups use this process's CPU time around each call, less sensitive to other load);
* Spearman correlations over all ``layer x head`` scores: AtP vs patching (signed), |AtP| vs
  |patching| (both ``magnitude=True``), AtP* vs |patching|; recall of patching's top-10 heads
  among each method's top 10 (largest signed effect for AtP, largest magnitude for AtP*).

Prints one table per model (rows = tasks, plus a mean row) and the goals of issue 13: AtP at
least 20x faster than exact patching on SmolLM2, AtP* Spearman >= 0.8 against |patching| (on
every task). Patching and AtP each run twice (signed and ``magnitude=True``: the same passes),
so their time is the faster of the two, against other load on the machine.

Cost on a 2-core CPU: exact patching is one forward per head and example from the patched layer
on (mechkit skips the blocks below it, which TransformerLens 4's ``start_at_layer`` would still
run), about 270 forwards an example on SmolLM2 and 72 on Gemma-3, twice; all examples of all
tasks take hours, so use ``--examples``.

With ``--out DIR`` every result is saved with ``LabelledArray.save`` as
``{model}_{task}_{method}.npz``, method one of ``patching``, ``patching_abs``, ``atp``,
``atp_abs``, ``atp_star`` (``atp*``; no ``*`` in file names), plus ``summary.json``.

Usage::

    python benchmarks/bench_attribution.py [--models smollm2-135m-instruct gemma-3-270m]
        [--tasks knowledge_recall ...] [--examples N] [--batch-size 16] [--out DIR] [--threads 2]
    python benchmarks/bench_attribution.py --from-summary DIR/summary.json   # reprint saved tables

Each finished task is appended to ``DIR/rows.jsonl``; ``--resume`` keeps those (same
``--examples``, ``--threads``, ``--batch-size``) and runs only the rest, in a new process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch
from _common import machine_description, print_table
from scipy.stats import spearmanr

import mechkit
from mechkit.data.tasks import TASK_NAMES, Task, as_task
from mechkit.heads.attribution import attribute_heads, task_metric

MODELS = ("smollm2-135m-instruct", "gemma-3-270m")
# (file/key name, attribute_heads method, magnitude)
RUNS = (("patching", "patching", False), ("patching_abs", "patching", True), ("atp", "atp", False),
        ("atp_abs", "atp", True), ("atp_star", "atp*", False))
SPEED_RUNS = RUNS[:1] + RUNS[2:3]  # --speed: signed patching and AtP only, once each (the 20x goal)
TOP = 10


def cap(task: Task, n: int | None) -> Task:
    """``n`` examples spread evenly over the task file (deterministic), or all of them."""
    if n is None or n >= len(task):
        return task
    idx = np.linspace(0, len(task) - 1, n).round().astype(int).tolist()
    pick = lambda items: tuple(items[i] for i in idx) if items else ()
    return Task(task.name, pick(task.clean), pick(task.answers), pick(task.corrupted), pick(task.corrupted_answers))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    rho = spearmanr(a.ravel(), b.ravel()).statistic
    return float(rho)


def recall(reference: np.ndarray, estimate: np.ndarray, k: int = TOP) -> float:
    """Share of the reference's top-k (largest values) among the estimate's top-k."""
    ref = set(np.argsort(-reference.ravel(), kind="stable")[:k].tolist())
    est = set(np.argsort(-estimate.ravel(), kind="stable")[:k].tolist())
    return len(ref & est) / k


def run_task(model, model_name: str, full: Task, examples: int | None, batch_size: int, out: str | None,
             runs=RUNS) -> dict:
    base = task_metric(model, full, batch_size=batch_size)  # the baseline on every example of the task
    base.pop("per_example")
    task = cap(full, examples)
    started = time.perf_counter()  # the baseline attribute_heads computes inside its timing
    attributed = task_metric(model, task, batch_size=batch_size)
    t_base = time.perf_counter() - started
    print(f"  {model_name} {task.name}: clean {base['clean']:.2f} [{base['ci'][0]:.2f}, {base['ci'][1]:.2f}] "
          f"on {base['n']} kept ({len(base['dropped'])} dropped); attributing {attributed['n']} examples", flush=True)
    scores, seconds, cpu = {}, {}, {}
    for key, method, magnitude in runs:
        cpu_started = time.process_time()
        result = attribute_heads(model, task, method, magnitude=magnitude, batch_size=batch_size, progress=False)
        cpu[key] = time.process_time() - cpu_started
        scores[key] = np.asarray(result.values, dtype=np.float64)
        seconds[key] = float(result.attrs["seconds"])
        if out:
            result.save(os.path.join(out, f"{model_name}_{task.name}_{key}.npz"))
        print(f"  {model_name} {task.name} {key}: {seconds[key]:.1f} s wall, {cpu[key]:.1f} s CPU", flush=True)
    row = {
        "task": task.name, "n": base["n"], "dropped": len(base["dropped"]), "clean": base["clean"],
        "ci": base["ci"], "significant": base["significant"], "corrupted": base["corrupted"],
        "attributed_n": attributed["n"], "attributed_clean": attributed["clean"], "attributed_ci": attributed["ci"],
        "baseline_seconds": t_base,
        # AtP with paired corruption takes the baseline from its own clean and corrupted runs (nothing to subtract)
        "atp_own_baseline": base["corrupted"] is not None,
        "rho_atp": spearman(scores["atp"], scores["patching"]),
        "rho_atp_abs": spearman(scores["atp_abs"], scores["patching_abs"]) if "atp_abs" in scores else float("nan"),
        "rho_atp_star": spearman(scores["atp_star"], scores["patching_abs"]) if "atp_star" in scores else float("nan"),
        "recall_atp": recall(scores["patching"], scores["atp"]),
        "recall_atp_star": recall(scores["patching_abs"], scores["atp_star"]) if "atp_star" in scores else float("nan"),
        "seconds": seconds, "cpu_seconds": cpu,
    }
    print(f"  -> rho AtP {row['rho_atp']:.3f}, |AtP| {row['rho_atp_abs']:.3f}, AtP* {row['rho_atp_star']:.3f}; "
          f"recall@10 AtP {row['recall_atp']:.1f}, AtP* {row['recall_atp_star']:.1f}", flush=True)
    return row


def fmt_ratio(num: float, den: float) -> str:
    return f"{num / den:.1f}x" if den > 0 else "-"


def timing(row: dict, key: str, clock: str = "seconds") -> float:
    """Time of one method on one task: patching and AtP ran twice each (signed and magnitude,
    the same forward and backward passes), so take the faster of the two, against other load."""
    times = row[clock]
    if key not in times:  # a --speed run has no AtP*
        return float("nan")
    twin = {"patching": "patching_abs", "atp": "atp_abs"}.get(key)
    return min(times[key], times[twin]) if twin in times else times[key]


def table(model_name: str, rows: list[dict]) -> None:
    headers = ["task", "kept/drop", "clean LD [95% CI]", "excl. 0", "attributed", "rho AtP", "rho |AtP|", "rho AtP*",
               "R@10 AtP", "R@10 AtP*", "t patch s", "t AtP s", "t AtP* s", "AtP x", "AtP* x", "AtP x net",
               "AtP x CPU", "AtP* x CPU"]
    body = []
    for r in rows:
        t = {k: timing(r, k) for k in ("patching", "atp", "atp_star")}
        c = {k: timing(r, k, "cpu_seconds") for k in ("patching", "atp", "atp_star")}
        b = r["baseline_seconds"]
        b_atp = 0.0 if r.get("atp_own_baseline", False) else b
        body.append([r["task"], f"{r['n']}/{r['dropped']}", f"{r['clean']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]",
                     "yes" if r["significant"] else "NO", r["attributed_n"], f"{r['rho_atp']:.3f}",
                     f"{r['rho_atp_abs']:.3f}", f"{r['rho_atp_star']:.3f}", f"{r['recall_atp']:.1f}",
                     f"{r['recall_atp_star']:.1f}", f"{t['patching']:.1f}", f"{t['atp']:.1f}", f"{t['atp_star']:.1f}",
                     fmt_ratio(t["patching"], t["atp"]), fmt_ratio(t["patching"], t["atp_star"]),
                     fmt_ratio(t["patching"] - b, t["atp"] - b_atp),
                     fmt_ratio(c["patching"], c["atp"]), fmt_ratio(c["patching"], c["atp_star"])])
    mean = lambda key: float(np.mean([r[key] for r in rows]))
    total = lambda key, clock="seconds": float(sum(timing(r, key, clock) for r in rows))
    base = float(sum(r["baseline_seconds"] for r in rows))
    base_atp = float(sum(r["baseline_seconds"] for r in rows if not r.get("atp_own_baseline", False)))
    body.append(["mean", f"{sum(r['n'] for r in rows)}/{sum(r['dropped'] for r in rows)}", "-",
                 f"{sum(bool(r['significant']) for r in rows)}/{len(rows)}", sum(r["attributed_n"] for r in rows),
                 f"{mean('rho_atp'):.3f}", f"{mean('rho_atp_abs'):.3f}", f"{mean('rho_atp_star'):.3f}",
                 f"{mean('recall_atp'):.2f}", f"{mean('recall_atp_star'):.2f}", f"{total('patching') / len(rows):.1f}",
                 f"{total('atp') / len(rows):.1f}", f"{total('atp_star') / len(rows):.1f}",
                 fmt_ratio(total("patching"), total("atp")), fmt_ratio(total("patching"), total("atp_star")),
                 fmt_ratio(total("patching") - base, total("atp") - base_atp),
                 fmt_ratio(total("patching", "cpu_seconds"), total("atp", "cpu_seconds")),
                 fmt_ratio(total("patching", "cpu_seconds"), total("atp_star", "cpu_seconds"))])
    print(f"\n{model_name}: kept/drop, clean LD, excl. 0 = the baseline on every example of the task; attributed = "
          f"examples the methods ran on; times are wall seconds from attrs['seconds'] (patching and AtP: the faster of "
          f"their signed and magnitude runs); 'net' subtracts the task_metric baseline that attribute_heads times with "
          f"each method; 'CPU' = ratios of this process's CPU time, less sensitive to other load; mean row: counts "
          f"summed, 'excl. 0' = tasks whose interval excludes 0, times are means, speed-ups are ratios of summed times")
    print_table(headers, body)


def goals(results: dict[str, list[dict]]) -> None:
    print("\nGoals (issue 13):")
    smol = next((m for m in results if "smollm2" in m), None)
    if smol:
        rows = results[smol]
        ratio = sum(timing(r, "patching") for r in rows) / sum(timing(r, "atp") for r in rows)
        cpu_ratio = (sum(timing(r, "patching", "cpu_seconds") for r in rows)
                     / sum(timing(r, "atp", "cpu_seconds") for r in rows))
        per_task = [timing(r, "patching") / timing(r, "atp") for r in rows]
        verdict = "MET" if ratio >= 20 else "MISSED"
        print(f"GOAL {verdict}: AtP >= 20x faster than exact patching on {smol}: {ratio:.1f}x wall "
              f"({cpu_ratio:.1f}x CPU time) over all tasks (per task {min(per_task):.1f}x to {max(per_task):.1f}x wall; "
              f"{sum(p >= 20 for p in per_task)}/{len(rows)} tasks >= 20x)")
    for model_name, rows in results.items():
        rhos = [r["rho_atp_star"] for r in rows if r["rho_atp_star"] == r["rho_atp_star"]]
        if not rhos:
            continue
        verdict = "MET" if min(rhos) >= 0.8 else "MISSED"
        print(f"GOAL {verdict}: AtP* Spearman >= 0.8 vs |patching| on every task of {model_name}: "
              f"mean {np.mean(rhos):.3f}, min {min(rhos):.3f}, {sum(r >= 0.8 for r in rhos)}/{len(rows)} tasks >= 0.8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--tasks", nargs="+", default=list(TASK_NAMES))
    parser.add_argument("--examples", type=int, default=None, help="cap examples per task (default all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=None, help="folder for the LabelledArray .npz files and summary.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speed", action="store_true", help="time signed patching and AtP only, once each")
    parser.add_argument("--resume", action="store_true",
                        help="keep the tasks already finished in --out (rows.jsonl, same settings) and run the rest")
    parser.add_argument("--from-summary", default=None,
                        help="print the tables and goals of a saved summary.json instead of running")
    args = parser.parse_args()
    if args.from_summary:
        with open(args.from_summary, encoding="utf-8") as f:
            saved = json.load(f)
        print(saved["machine"])
        print(f"saved run: {saved['args']}")
        for model_name, rows in saved["results"].items():
            table(model_name, rows)
        goals(saved["results"])
        return
    torch.set_num_threads(args.threads)
    print(machine_description())
    print(f"mechkit from {os.path.dirname(mechkit.__file__)}")
    print(f"models {args.models}; tasks {args.tasks}; examples {args.examples or 'all'}; "
          f"batch size {args.batch_size}; out {args.out}", flush=True)
    started = time.perf_counter()
    results: dict[str, list[dict]] = {}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    rows_file = os.path.join(args.out, "rows.jsonl") if args.out else None
    saved_rows = []
    if args.resume and rows_file and os.path.exists(rows_file):
        with open(rows_file, encoding="utf-8") as f:
            saved_rows = [json.loads(line) for line in f if line.strip()]
        saved_rows = [r for r in saved_rows if r.get("examples") == args.examples and r.get("threads") == args.threads
                      and r.get("batch_size") == args.batch_size and r.get("speed", False) == args.speed]
    elif rows_file and os.path.exists(rows_file):
        os.remove(rows_file)
    for model_name in args.models:
        done = {row["task"]: row for row in saved_rows if row["model"] == model_name}
        todo = [name for name in args.tasks if name not in done]
        if todo:
            t0 = time.perf_counter()
            model = mechkit.load_model(model_name)
            print(f"{model_name}: loaded in {time.perf_counter() - t0:.1f} s "
                  f"({model.cfg.n_layers} layers x {model.cfg.n_heads} heads)", flush=True)
        for name in args.tasks:
            if name in done:
                print(f"  {model_name} {name}: kept from {rows_file} (--resume)", flush=True)
                continue
            row = run_task(model, model_name, as_task(name), args.examples, args.batch_size, args.out,
                           SPEED_RUNS if args.speed else RUNS)
            done[name] = {"model": model_name, "examples": args.examples, "threads": args.threads, "speed": args.speed,
                          "batch_size": args.batch_size, "pid": os.getpid(), **row}
            if rows_file:
                with open(rows_file, "a", encoding="utf-8") as f:
                    f.write(json.dumps(done[name]) + "\n")
        results[model_name] = [done[name] for name in args.tasks]
        if todo:
            del model
        table(model_name, results[model_name])
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    goals(results)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
            json.dump({"machine": machine_description(), "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
