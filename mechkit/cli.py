"""The ``mechkit`` command line: one subcommand per job, each writing results to disk.

    mechkit models                         list offline models
    mechkit demo [--model NAME]            top next tokens and an activation summary
    mechkit activations --model NAME --prompts FILE --hook H [--hook H2] --position -1 --out DIR
    mechkit classify-heads --model NAME [--model NAME2 ...] --out DIR
    mechkit probe layers --model NAME [--model NAME2 ...] --dataset true_false --out DIR
    mechkit probe positions --model NAME --dataset qa --out DIR
    mechkit attribute-heads --model NAME [--model NAME2] --task TASK|all|FILE.jsonl --method atp* --out DIR
    mechkit attribute-components --model NAME --task TASK|all|FILE.jsonl --method grad_x_weight --out DIR
    mechkit attribute-components --model NAME --compare NAME_B --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mechkit.errors import MechkitError

DEMO_PROMPTS = [
    "The capital of France is",
    "The opposite of hot is",
    "One, two, three, four,",
    "The Eiffel Tower is located in the city of",
]


def _cmd_models(args: argparse.Namespace) -> int:
    from mechkit.models import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<28} {'kind':<10} {'installed':<9} {'cached':<7} description")
    for row in rows:
        print(f"{row['name']:<28} {row['kind']:<10} {str(row['installed']):<9} {str(row['cached']):<7} {row['description']}")
    return 0


def read_prompts(path: Path) -> list:
    """Prompts from a text file (one per line) or JSONL (``{"text": ..., "spans": ..., "chat": ...}``)."""
    from mechkit.activations import Prompt

    if not path.exists():
        raise MechkitError(f"prompt file {path} does not exist")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                prompts.append(Prompt.from_record(row))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise MechkitError(f"{path}:{number}: expected a JSON object with a 'text' field ({error})") from None
        return prompts
    return lines


def _cmd_activations(args: argparse.Namespace) -> int:
    from mechkit.activations import collect_activations
    from mechkit.models import load_model

    prompts = read_prompts(Path(args.prompts))
    model = load_model(args.model)
    positions = [int(p) if p.lstrip("-").isdigit() else p for p in args.position]
    result = collect_activations(model, prompts, args.hook, positions, batch_size=args.batch_size,
                                 max_memory=args.max_memory, out=args.out, on_missing=args.on_missing)
    print(result.summary())
    print(f"written to {result.path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from mechkit.activations import Prompt, collect_activations
    from mechkit.models import load_model

    model = load_model(args.model)
    info = model.mechkit
    print(f"loaded {info.name} ({info.source}) in {model.mechkit_load_seconds:.1f} s: "
          f"{model.cfg.n_layers} layers, {model.cfg.n_heads} heads, d_model {model.cfg.d_model}, "
          f"vocab {model.cfg.d_vocab}")
    prompts = [Prompt(p, chat=False) for p in DEMO_PROMPTS]
    acts = collect_activations(model, prompts, ["logits"], [-1], progress=False)
    for prompt, logits in zip(DEMO_PROMPTS, acts["logits"][:, 0]):
        top = torch.topk(logits.softmax(-1), 5)
        shown = ", ".join(f"{model.tokenizer.decode([int(i)])!r} {p:.2f}" for p, i in zip(top.values, top.indices))
        print(f"  {prompt!r:<50} -> {shown}")
    layers = sorted({0, model.cfg.n_layers // 2, model.cfg.n_layers - 1})
    hooks = [f"blocks.{l}.hook_resid_post" for l in layers] + [f"blocks.{layers[1]}.attn.hook_z"]
    acts = collect_activations(model, prompts, hooks, [-2, -1], progress=False)
    print("collected activations (last two tokens of each prompt):")
    print(acts.summary())
    return 0


def _cmd_classify_heads(args: argparse.Namespace) -> int:
    import time

    from mechkit.data.relations import builtin_relations, load_relation_file
    from mechkit.heads import classify_heads
    from mechkit.heads.validation import ablation_check, dynamic_check
    from mechkit.models import load_model
    from mechkit.viz import category_map_figure, relation_scores_figure, save

    out = Path(args.out)
    relations = list(builtin_relations()) + [load_relation_file(p) for p in args.relations or []]
    if args.only:
        unknown = set(args.only) - {r.name for r in relations}
        if unknown:
            raise MechkitError(f"unknown relation(s) {sorted(unknown)}; known: {[r.name for r in relations]}")
        relations = [r for r in relations if r.name in args.only]
    summary, maps = {}, []
    for name in args.model:
        model = load_model(name)
        started = time.perf_counter()
        result = classify_heads(model, relations, k=args.k, threshold=args.threshold, scale_k=args.scale_k,
                                attn_norm=args.attn_norm, final_norm=args.final_norm,
                                effective_embedding={"none": False}.get(args.effective_embedding, args.effective_embedding), null_control=not args.no_null)
        seconds = time.perf_counter() - started
        folder = result.save(out / model.mechkit.name)
        save(relation_scores_figure(result.scores, threshold=result.threshold), folder / "relation_scores")
        maps.append(result.category_map())
        entry = {"seconds": round(seconds, 1), "category_counts": result.category_counts(),
                 "implemented_cells": float((result.scores.values >= result.threshold).mean()),
                 "null_false_positive_rate": result.false_positive_rate(), "relations": result.relations,
                 "notes": result.notes,
                 "top_heads": {r: result.top_heads(r, 3) for r in result.scores.labels["relation"]}}
        if args.dynamic:
            check = dynamic_check(model, result, relations, n_pairs=args.dynamic_pairs)
            entry["dynamic_pearson"] = check.pearson
            check.with_context.save(folder / "dynamic_with_context.npz")
            check.forced.save(folder / "dynamic_forced.npz")
        for relation in args.ablation or []:
            entry.setdefault("ablation", {})[relation] = ablation_check(model, result, relation, relations=relations)
        summary[model.mechkit.name] = entry
        print(f"{model.mechkit.name}: {seconds:.0f} s; {entry['category_counts']}; "
              f"null false-positive rate {entry['null_false_positive_rate']}")
    paths = save(category_map_figure(maps), out / "category_map")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'summary.json'} and {', '.join(str(p) for p in paths)}")
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from mechkit.models import load_model
    from mechkit.probing import probe_layers, probe_positions
    from mechkit.probing.datasets import builtin_dataset
    from mechkit.viz import layer_probe_figure, position_probe_figure, save

    out = Path(args.out)
    if args.kind == "layers":
        models = [load_model(m) for m in args.model]
        data = builtin_dataset(args.dataset, models[0] if len(models) == 1 else None, per_type=args.per_type)
        result = probe_layers(models, data, args.stream or ["resid_post", "attn_out"], folds=args.folds,
                              balanced=args.balanced, align=args.align, control=args.control)
        figure = layer_probe_figure(result.scores, metric=args.metric or "f1", annotate=args.annotate)
    else:
        if len(args.model) != 1:
            raise MechkitError("probe positions takes one model")
        model = load_model(args.model[0])
        data = builtin_dataset(args.dataset, model, per_type=args.per_type)
        positions = [int(p) if p.lstrip("-").isdigit() else p for p in args.position] if args.position else None
        kwargs = {"positions": positions} if positions else {}
        result = probe_positions(model, data, stream=(args.stream or ["resid_post"])[0], folds=args.folds,
                                 balanced=args.balanced, control=args.control, strict=args.strict, **kwargs)
        figure = position_probe_figure(result.scores, metric=args.metric or "auc", annotate=args.annotate)
    result.save(out)
    paths = save(figure, out / f"probe_{args.kind}")
    import numpy as np

    metric = args.metric or ("f1" if args.kind == "layers" else "auc")
    scores, control = result.scores.sel(metric=metric), result.control.sel(metric=metric)
    best = np.unravel_index(np.nanargmax(scores.values), scores.shape)
    summary = {"dataset": data.name, "n_examples": len(data), "class_counts": data.class_counts(),
               "attrs": result.scores.attrs, "metric": metric,
               "best": {"value": float(scores.values[best]),
                        **{axis: scores.labels[axis][i] for axis, i in zip(scores.axes, best)}},
               "control_range": [float(np.nanmin(control.values)), float(np.nanmax(control.values))]}
    print(f"{data.name}: {len(data)} examples, classes {data.class_counts()}; wrote {out} and "
          f"{', '.join(str(p) for p in paths)}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return 0


def _slug(text: str) -> str:
    """A file-name-safe form of a model, task or method name (``atp*`` -> ``atp_star``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text).replace("*", "_star")).strip("_") or "x"


def _model_name(model) -> str:
    info = getattr(model, "mechkit", None)
    return getattr(info, "name", None) or "model"


def _baseline_text(baseline: dict) -> str:
    low, high = baseline.get("ci", [float("nan"), float("nan")])
    return f"{baseline.get('clean', float('nan')):+.2f} [{low:+.2f}, {high:+.2f}]"


def _cmd_attribute_heads(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt

    from mechkit.data.tasks import select_tasks
    from mechkit.heads.attribution import attribute_heads, top_heads
    from mechkit.models import load_model
    from mechkit.viz import save, task_grid_figure

    out = Path(args.out)
    tasks = select_tasks(args.task, args.examples)
    method = _slug(args.method) + ("_qkv" if args.nodes == "qkv" else "")
    summary: dict = {"method": args.method, "corruption": args.corruption, "nodes": args.nodes, "models": {}}
    for name in args.model:
        model = load_model(name)
        model_name = _model_name(model)
        folder = out / _slug(model_name)
        results, rows = {}, {}
        for task in tasks:
            result = attribute_heads(model, task, args.method, corruption=args.corruption, batch_size=args.batch_size,
                                     nodes=args.nodes, progress=not args.quiet)
            result.save(folder / f"{_slug(task.name)}_{method}.npz")
            results[task.name] = result
            baseline = result.attrs["baseline"]
            rows[task.name] = {"n": baseline["n"], "metric": baseline["metric"], "clean": baseline["clean"],
                               "ci": baseline["ci"], "significant": baseline["significant"],
                               "dropped": len(baseline.get("dropped", {})), "seconds": round(result.attrs["seconds"], 2),
                               "top_heads": [list(t) for t in top_heads(result)]}
        paths = []
        for node in ("q", "k", "v") if args.nodes == "qkv" else (None,):
            figure = task_grid_figure(results, node=node)
            paths += save(figure, folder / (f"task_grid_{method}" + (f"_{node}" if node else "")))
            plt.close(figure)
        summary["models"][model_name] = rows
        print(f"{model_name}: {args.method} head attribution ({'|effect|' if results[tasks[0].name].attrs.get('magnitude') else 'effect'})")
        print(f"  {'task':<26} {'n':>4}  {'clean metric [95% CI]':<24} {'significant':<11} top-3 heads (by |score|)")
        for task_name, row in rows.items():
            significant = {True: "yes", False: "no (grey)", None: "n/a"}[row["significant"]]
            top = ", ".join(f"{name} {v:+.3g}" for name, v in row["top_heads"])
            print(f"  {task_name:<26} {row['n']:>4}  {_baseline_text(row):<24} {significant:<11} {top}")
        print(f"  wrote {folder} ({', '.join(p.name for p in paths)})")
    (out / f"summary_{method}.json").write_text(json.dumps(summary, indent=2))
    return 0


def _component_line(result) -> str:
    import warnings

    import numpy as np

    values = result.transpose("layer", "component").values.astype(float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per_component = np.nanmean(values, axis=0)
    return "  ".join(f"{c} {'n/a' if not np.isfinite(v) else f'{v:.3g}'}"
                     for c, v in zip(result.labels["component"], per_component))


def _cmd_attribute_components(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt

    import mechkit
    from mechkit.components.attribution import mean_over_tasks
    from mechkit.data.tasks import select_tasks
    from mechkit.models import load_model
    from mechkit.viz import component_share_figure, save

    def save_figure(figure, stem):
        save(figure, stem)
        return figure

    out = Path(args.out)
    model = load_model(args.model)
    model_name = _model_name(model)
    folder = out / _slug(model_name)
    if args.compare:
        other = load_model(args.compare)
        diff = mechkit.checkpoint_diff(model, other)
        path = diff.save(folder / f"checkpoint_diff_{_slug(_model_name(other))}.npz")
        figure = component_share_figure(diff, title=f"Relative weight change: {model_name} vs {_model_name(other)}")
        paths = save(figure, folder / f"checkpoint_diff_{_slug(_model_name(other))}")
        plt.close(figure)
        print(f"{model_name} vs {_model_name(other)}: mean relative change per component (over layers)")
        print(f"  {_component_line(diff)}")
        print(f"  wrote {path} ({', '.join(p.name for p in paths)})")
        return 0
    if not args.task:
        raise MechkitError("give --task (a built-in task, 'all' or a .jsonl file), or --compare MODEL_B for a checkpoint diff")
    tasks = select_tasks(args.task, args.examples)
    method = _slug(args.method)
    kind = "raw" if args.raw else "shares"
    results = []
    summary: dict = {"model": model_name, "method": args.method, "normalised": not args.raw, "tasks": {}}
    print(f"{model_name}: {args.method} component attribution ({'raw values' if args.raw else 'shares within each layer'}; "
          "mean over layers)")
    for task in tasks:
        result = mechkit.attribute_components(model, task, method=args.method, normalise=not args.raw,
                                              elementwise=args.elementwise, corruption=args.corruption,
                                              batch_size=args.batch_size, progress=not args.quiet)
        stem = folder / f"components_{_slug(task.name)}_{method}_{kind}"
        result.save(stem.with_suffix(".npz"))
        plt.close(save_figure(component_share_figure(result), stem))
        results.append(result)
        baseline = result.attrs.get("baseline") or {}
        summary["tasks"][task.name] = {"baseline": {k: baseline.get(k) for k in ("n", "metric", "clean", "ci", "significant")},
                                       "values": result.values.tolist()}
        note = f" clean {_baseline_text(baseline)}" if "clean" in baseline else ""
        print(f"  {task.name:<26}{note}  {_component_line(result)}")
    if len(results) > 1:
        mean = mean_over_tasks(results, f"mean of {len(results)} tasks")
        stem = folder / f"components_mean_{method}_{kind}"
        mean.save(stem.with_suffix(".npz"))
        plt.close(save_figure(component_share_figure(mean, title=f"Component attribution ({args.method}): {model_name}, "
                                                            f"mean of {len(results)} tasks"), stem))
        print(f"  {'mean':<26}  {_component_line(mean)}")
    (folder / f"components_summary_{method}_{kind}.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"  wrote {folder}")
    return 0


def _function_table(table, removed: dict) -> list[str]:
    """The intervention table as text: changes from base, random spread, floor marks."""
    import numpy as np

    lines = [f"  {'function':<24} {'n heads':>7} {'base acc':>8} {'own':>7} {'random (sd)':>13} {'other':>7} "
             + " ".join(f"{c.split()[-1]:>7}" for c in table.labels["condition"][4:]) + "   (accuracy change)"]
    std = np.asarray(table.attrs["random_std"])
    for f, name in enumerate(table.labels["function"]):
        acc = table.values[f, :, 0]
        if np.isnan(acc[0]):
            continue
        delta = acc - acc[0]
        floor = "  at floor" if name in table.attrs["at_floor"] else ""
        lines.append(f"  {name:<24} {removed.get(name, 0):>7} {acc[0]:>8.2f} {delta[1]:>+7.2f} "
                     f"{delta[2]:>+7.2f} ({std[f, 0]:.2f}) {delta[3]:>+7.2f} "
                     + " ".join(f"{d:>+7.2f}" for d in delta[4:]) + floor)
    return lines


def _cmd_function_heads(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt

    from mechkit.data.function_chains import function_dataset, load_function_chains
    from mechkit.heads.function_heads import function_heads
    from mechkit.heads.function_interventions import intervention_table
    from mechkit.heads.function_vs_cause import probe_vs_cause
    from mechkit.models import load_model
    from mechkit.viz import save, task_grid_figure

    out = Path(args.out)
    if args.dataset == "builtin":
        subquestions = function_dataset(per_function=args.per_function, seed=args.seed)
    else:
        subquestions = load_function_chains(args.dataset)
    summary: dict = {"family": args.family, "answer": args.answer, "models": {}}
    for name in args.model:
        model = load_model(name)
        model_name = _model_name(model)
        folder = out / _slug(model_name)
        result = function_heads(model, subquestions, family=args.family, answer=args.answer, seed=args.seed,
                                null_seeds=args.null_seeds, select=args.select if args.select == "elbow" else int(args.select),
                                progress=not args.quiet)
        result.save(folder)
        normalised = result.normalised
        panels = {}
        for function in normalised.labels["function"]:
            panel = normalised.sel(function=function)
            panel.attrs = {"method": f"{args.family} probe importance share", "magnitude": True,
                           "colorbar_label": "share of |grad x activation| per function\n(probe importance, sums to 1)"}
            panels[function] = panel
        figure = task_grid_figure(panels, title=f"{model_name}: function heads ({args.family} probe, grad x activation)")
        paths = save(figure, folder / "function_heads")
        plt.close(figure)
        table = intervention_table(model, result, random_draws=args.random_draws, progress=not args.quiet)
        table.save(folder / "interventions.npz")
        rows = {"scores": result.scores, "selected": {f: [list(h) for h in heads] for f, heads in result.selected.items()},
                "null": dict(zip(result.null.labels["function"], result.null.values.tolist()))}
        print(f"{model_name}: head probe accuracy {result.scores['head_probe']['accuracy']:.3f}, macro-F1 "
              f"{result.scores['head_probe']['macro_f1']:.3f} (majority {result.scores['head_probe']['majority_baseline']:.3f}"
              + "".join(f"; {k.removeprefix('residual_probe_')} residual {v['accuracy']:.3f}"
                        for k, v in result.scores.items() if k.startswith("residual_probe_")) + ")")
        print("\n".join(_function_table(table, {f: len(h) for f, h in result.selected.items()})))
        if not args.no_cause:
            agreement, maps = probe_vs_cause(model, result, patch_top=args.patch_top, patch_random=args.patch_random,
                                             progress=not args.quiet)
            agreement.save(folder / "probe_vs_cause.npz")
            for kind, values in maps.items():
                values.save(folder / f"cause_{kind}.npz")
            rows["probe_vs_cause"] = {f: dict(zip(agreement.labels["measure"], agreement.values[i].tolist()))
                                      for i, f in enumerate(agreement.labels["function"])}
            print(f"  {'function':<24} {'Spearman AtP':>12} {'Spearman patching':>17} {'top-10 overlap':>14}")
            for f, row in rows["probe_vs_cause"].items():
                print(f"  {f:<24} {row['spearman_atp']:>12.2f} {row['spearman_patching']:>17.2f} "
                      f"{row['top10_overlap_atp']:>14.1f}")
        summary["models"][model_name] = rows
        print(f"  wrote {folder} ({', '.join(p.name for p in paths)}, interventions.npz)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary_function_heads.json").write_text(json.dumps(summary, indent=2, default=float))
    return 0


def parse_settings(pairs: list[str] | None) -> dict[str, dict]:
    """``["head-attribution.examples=16", ...]`` -> ``{"head-attribution": {"examples": 16}}``; values are
    read as JSON where they parse (numbers, lists, true/false), else kept as text."""
    settings: dict[str, dict] = {}
    for pair in pairs or []:
        target, equals, value = pair.partition("=")
        analysis, dot, key = target.partition(".")
        if not equals or not dot or not analysis or not key:
            raise MechkitError(f"--set takes ANALYSIS.SETTING=VALUE (e.g. head-attribution.examples=16), got {pair!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        settings.setdefault(analysis, {})[key] = parsed
    return settings


def _cmd_report(args: argparse.Namespace) -> int:
    from mechkit.report import ALL, report

    settings = parse_settings(args.set)
    analyses = args.analysis or list(ALL)  # (report() refuses unknown names before any work)
    if args.method:
        if "head-attribution" not in analyses:
            raise MechkitError("--method chooses the head-attribution method, but this report does not run "
                               "head-attribution (add --analysis head-attribution)")
        settings.setdefault("head-attribution", {})["method"] = args.method
    report(args.model, args.out, analyses=analyses, settings=settings, force=args.force, progress=not args.quiet,
           device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mechkit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the models available offline")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_cmd_models)

    p = sub.add_parser("report", help="every analysis on one or more models: result files, figures and index.html")
    p.add_argument("--model", action="append", required=True, help="model name or path (repeatable)")
    p.add_argument("--out", required=True, help="report folder (re-running the same command reuses what is finished)")
    p.add_argument("--analysis", action="append", help="run only these analyses (repeatable): layer-probes, "
                   "jailbreak-probes, position-probes, head-classification, head-attribution, function-heads, "
                   "component-attribution")
    p.add_argument("--method", choices=["atp", "atp*", "patching", "dla"], help="head attribution method (default atp)")
    p.add_argument("--set", action="append", metavar="ANALYSIS.SETTING=VALUE",
                   help="override one setting, e.g. head-attribution.examples=16 (repeatable)")
    p.add_argument("--force", action="store_true", help="recompute everything; write into a folder holding another run")
    p.add_argument("--device", default=None, help="where to load the models (default: cuda when a GPU is there)")
    p.add_argument("--quiet", action="store_true", help="no per-analysis progress bars")
    p.set_defaults(run=_cmd_report)

    p = sub.add_parser("demo", help="top next tokens and an activation summary on a bundled model")
    p.add_argument("--model", default="gemma-3-270m")
    p.set_defaults(run=_cmd_demo)

    p = sub.add_parser("activations", help="collect hook activations at chosen positions to a folder")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--prompts", required=True, help="text file (one prompt a line) or JSONL with text/spans/chat")
    p.add_argument("--hook", action="append", required=True, help="hook name, e.g. blocks.5.hook_resid_post (repeatable)")
    p.add_argument("--position", action="append", default=None, help="token position: -1, last_q, ... (repeatable; default -1)")
    p.add_argument("--out", required=True, help="output folder (streamed, resumable)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-memory", default=None, help="memory bound, e.g. 2GB")
    p.add_argument("--on-missing", choices=["raise", "drop"], default="raise")
    p.set_defaults(run=_cmd_activations)

    p = sub.add_parser("classify-heads", help="MAPS head classification from the weights, with the category map")
    p.add_argument("--model", action="append", required=True, help="model name or path (repeatable: one panel each)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--relations", action="append", help="extra relation file(s) (.tsv, see docs)")
    p.add_argument("--only", action="append", help="classify only these relations (repeatable)")
    p.add_argument("--k", type=int, default=None, help="top-k for every relation (default 1 copying, 10 other)")
    p.add_argument("--threshold", type=float, default=0.15)
    p.add_argument("--scale-k", action="store_true", help="MAPS's k (3/25 at 128k vocab) scaled to the vocabulary")
    p.add_argument("--attn-norm", action="store_true", help="apply the attention-input norm to the sources")
    p.add_argument("--final-norm", action="store_true", help="fold the final norm's gain into W_U")
    p.add_argument("--effective-embedding", choices=["residual", "mlp_out", "none"], default="residual",
                   help="what later-layer heads read: embedding + MLP0 (default), MLP0 output alone, or the embedding")
    p.add_argument("--no-null", action="store_true", help="skip the shuffled-target control")
    p.add_argument("--dynamic", action="store_true", help="also run the dynamic (template) check")
    p.add_argument("--dynamic-pairs", type=int, default=20, help="pairs per relation in the dynamic check")
    p.add_argument("--ablation", action="append", help="ablation check for this relation (repeatable)")
    p.set_defaults(run=_cmd_classify_heads)

    p = sub.add_parser("probe", help="linear probes by layer (several models) or by layer and position")
    p.add_argument("kind", choices=["layers", "positions"])
    p.add_argument("--model", action="append", required=True, help="model name or path (repeatable for layers)")
    p.add_argument("--dataset", default="true_false", help="one of true_false, sentiment, qa, jailbreak, "
                   "jailbreak_by_template, harmful_vs_harmless, or a .csv/.tsv/.jsonl file")
    p.add_argument("--out", required=True)
    p.add_argument("--stream", action="append", choices=["resid_post", "attn_out", "mlp_out", "resid_pre"])
    p.add_argument("--metric", choices=["accuracy", "f1", "auc"], help="metric drawn (default f1 / auc)")
    p.add_argument("--position", action="append", help="positions for 'positions' (default the named set and -8..-1)")
    p.add_argument("--folds", type=int, default=None, help="k-fold CV by group instead of one seeded split")
    p.add_argument("--control", type=int, default=5, help="label shuffles averaged in the control (0: none)")
    p.add_argument("--balanced", action="store_true", help="weight classes equally")
    p.add_argument("--align", choices=["index", "relative"], default="index", help="layer alignment across models")
    p.add_argument("--strict", action="store_true", help="refuse examples lacking a named position")
    p.add_argument("--per-type", type=int, default=None, help="qa: questions per type")
    p.add_argument("--annotate", action="store_true", help="write each cell's value")
    p.set_defaults(run=_cmd_probe)

    p = sub.add_parser("attribute-heads", help="how much each head matters for each task (layer x head), with the task grid")
    p.add_argument("--model", action="append", required=True, help="model name or path (repeatable: one grid each)")
    p.add_argument("--task", action="append", required=True,
                   help="built-in task name, 'all' (the eight built-in tasks) or a .jsonl task file (repeatable)")
    p.add_argument("--method", default="atp*", choices=["atp*", "atp", "patching", "dla", "mean_ablation", "zero_ablation"])
    p.add_argument("--corruption", choices=["paired", "mean", "zero", "resample"], default=None,
                   help="corrupted value for patching/AtP (default: the task's twin, else mean)")
    p.add_argument("--nodes", choices=["z", "qkv"], default="z",
                   help="score head outputs (z), or query/key/value nodes (qkv: patching, atp, atp*; one grid per node kind)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--examples", type=int, default=None, help="use the first N examples of each task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_cmd_attribute_heads)

    p = sub.add_parser("function-heads",
                       help="heads specific to cognitive functions, from one probe over all heads, with interventions")
    p.add_argument("--model", action="append", required=True, help="model name or path (repeatable)")
    p.add_argument("--dataset", default="builtin", help="'builtin' or a .jsonl chain file")
    p.add_argument("--family", choices=["logistic", "mlp"], default="logistic")
    p.add_argument("--answer", choices=["greedy", "gold", "last_prompt"], default="greedy",
                   help="tokens the head outputs are averaged over")
    p.add_argument("--per-function", type=int, default=None, help="sub-questions per function (default all)")
    p.add_argument("--select", default="elbow", help="'elbow' or a number of heads per function")
    p.add_argument("--null-seeds", type=int, default=3, help="permutation-null repeats")
    p.add_argument("--random-draws", type=int, default=5, help="random head sets per function in the table")
    p.add_argument("--patch-top", type=int, default=30, help="probe vs cause: exact patching of AtP's top N heads")
    p.add_argument("--patch-random", type=int, default=30, help="... plus N random heads")
    p.add_argument("--no-cause", action="store_true", help="skip the probe-versus-cause comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_cmd_function_heads)

    p = sub.add_parser("attribute-components",
                       help="each layer's q/k/v/o/up/gate/down share of a task's effect, or a checkpoint diff")
    p.add_argument("--model", required=True, help="model name or path")
    p.add_argument("--task", action="append", help="built-in task name, 'all' or a .jsonl task file (repeatable)")
    p.add_argument("--method", default="grad_x_weight", choices=["grad_x_weight", "patching"])
    p.add_argument("--compare", metavar="MODEL_B", help="instead: relative weight change ||W_a - W_b|| / ||W_b|| against MODEL_B")
    p.add_argument("--raw", action="store_true", help="raw values instead of shares within each layer")
    p.add_argument("--elementwise", action="store_true", help="grad_x_weight: sum |W * grad| over entries")
    p.add_argument("--corruption", choices=["paired", "mean", "zero"], default=None, help="patching: corrupted value")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--examples", type=int, default=None, help="use the first N examples of each task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_cmd_attribute_components)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "activations" and args.position is None:
        args.position = ["-1"]
    try:
        return args.run(args)
    except MechkitError as error:
        print(f"mechkit: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
