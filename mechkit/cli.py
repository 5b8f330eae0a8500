"""The ``mechkit`` command line: one subcommand per job, each writing results to disk.

    mechkit models                         list offline models
    mechkit demo [--model NAME]            top next tokens and an activation summary
    mechkit activations --model NAME --prompts FILE --hook H [--hook H2] --position -1 --out DIR
    mechkit classify-heads --model NAME [--model NAME2 ...] --out DIR
    mechkit probe layers --model NAME [--model NAME2 ...] --dataset true_false --out DIR
    mechkit probe positions --model NAME --dataset qa --out DIR
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


BUILTIN_DATASETS = ("true_false", "sentiment", "qa")


def _dataset(name: str, model=None, *, per_type: int | None = None):
    """A built-in probing dataset by name, or a CSV/JSONL file."""
    from mechkit.data import ProbeDataset
    from mechkit.data.probing_sets import sentiment, true_false

    if name == "true_false":
        return true_false()
    if name == "sentiment":
        return sentiment()
    if name == "qa":
        from mechkit.probing.qa import qa_dataset

        if model is None:
            raise MechkitError("the qa dataset is made from one model's own answers: probe one model at a time")
        return qa_dataset(model, per_type=per_type)
    if Path(name).suffix in (".csv", ".tsv", ".jsonl"):
        return ProbeDataset.from_file(name)
    raise MechkitError(f"unknown dataset {name!r}: use one of {BUILTIN_DATASETS} or a .csv/.tsv/.jsonl file")


def _cmd_probe(args: argparse.Namespace) -> int:
    from mechkit.models import load_model
    from mechkit.probing import probe_layers, probe_positions
    from mechkit.viz import layer_probe_figure, position_probe_figure, save

    out = Path(args.out)
    if args.kind == "layers":
        models = [load_model(m) for m in args.model]
        data = _dataset(args.dataset, models[0] if len(models) == 1 else None, per_type=args.per_type)
        result = probe_layers(models, data, args.stream or ["resid_post", "attn_out"], folds=args.folds,
                              balanced=args.balanced, align=args.align, control=args.control)
        figure = layer_probe_figure(result.scores, metric=args.metric or "f1", annotate=args.annotate)
    else:
        if len(args.model) != 1:
            raise MechkitError("probe positions takes one model")
        model = load_model(args.model[0])
        data = _dataset(args.dataset, model, per_type=args.per_type)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mechkit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the models available offline")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_cmd_models)

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
    p.add_argument("--dataset", default="true_false", help=f"one of {BUILTIN_DATASETS} or a .csv/.tsv/.jsonl file")
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
