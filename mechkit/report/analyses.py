"""The analyses a report runs, each as one unit of work per model (or across all models) that
writes its result files and figures into its own folder and says what each figure shows.

Every analysis takes its settings from a plain dict (the report's defaults, overridable with
``--set analysis.name=value``), so that the settings are what the report's cache is keyed by.
The defaults are sized so that the whole report for both bundled models fits a 2-core CPU in
about a quarter of an hour; the analyses' own entry points (``mechkit.probe_layers`` ...)
take the same arguments for full-size runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from mechkit.errors import MechkitError
from mechkit.results import LabelledArray
from mechkit.viz import save
from mechkit.viz.checks import figure_problems, figure_texts


@dataclass
class Unit:
    """Where one unit of an analysis writes, what it is given, and what it has written."""

    folder: Path
    settings: dict
    progress: bool
    device: str | None = None
    figures: list[dict] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)

    def figure(self, fig, stem: str, caption: str) -> None:
        """Save ``fig`` as PNG and SVG, check that it reads (tick labels, colour bar labels), record it."""
        problems, texts = figure_problems(fig), figure_texts(fig)
        paths = save(fig, self.folder / stem)
        plt.close(fig)
        self.figures.append({"png": str(paths[0]), "svg": str(paths[1]), "caption": caption,
                             "problems": problems, "texts": texts})

    def note(self, line: str) -> None:
        self.summary.append(line)


@dataclass(frozen=True)
class Analysis:
    """One analysis of the report: ``run(unit, models)`` with ``models`` a list of (name, loader)."""

    name: str
    title: str
    per_model: bool
    defaults: dict
    run: Callable


def display_name(name: str) -> str:
    """A model's name as figures and captions show it: a local folder or file by its last part."""
    path = Path(name).expanduser()
    return path.name if path.exists() else name


def _range(values) -> str:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return "n/a" if values.size == 0 else f"{values.min():.2f}-{values.max():.2f}"


def _best(scores: LabelledArray) -> str:
    values = np.where(np.isfinite(scores.values), scores.values, -np.inf)
    index = np.unravel_index(np.argmax(values), values.shape)
    where = ", ".join(f"{axis} {scores.labels[axis][i]}" for axis, i in zip(scores.axes, index))
    return f"{float(scores.values[index]):.2f} ({where})"


def _layer_probes(unit: Unit, models) -> None:
    from mechkit.data.probing_sets import true_false
    from mechkit.probing import probe_layers
    from mechkit.viz import layer_probe_figure

    s = unit.settings
    data = true_false(per_relation=s["per_relation"])
    result = probe_layers([load() for _, load in models], data, s["streams"], control=s["control"], progress=unit.progress)
    result.save(unit.folder / "result")
    f1, control = result.scores.sel(metric="f1"), result.control.sel(metric="f1")
    unit.figure(layer_probe_figure(result.scores, metric="f1"), "layer_probes_true_false",
                f"Held-out F1 of a logistic-regression probe trained on each layer's output (one panel per stream) "
                f"to tell true from false factual statements ({len(data)} statements from {s['per_relation']} subjects "
                f"per relation, true and false halves; 25% held out, seeded). Green = decodable, red = chance (0.5); "
                f"grey = the model has no such layer. Control (labels shuffled): F1 {_range(control.values)}.")
    unit.note(f"true/false: best F1 {_best(f1)}; shuffled-label control {_range(control.values)}")


def _jailbreak_probes(unit: Unit, models) -> None:
    from mechkit.data.safety import jailbreak
    from mechkit.models import load_model
    from mechkit.probing import probe_layers
    from mechkit.viz import layer_probe_figure

    s = unit.settings
    data = jailbreak(n=s["n"])
    variants = []
    for name, load in models:
        variants.append(load())
        if s["abliterated"]:
            variants.append(load_model(f"{name}+abliterated", device=unit.device))
    result = probe_layers(variants, data, s["streams"], control=s["control"], progress=unit.progress)
    result.save(unit.folder / "result")
    f1, control = result.scores.sel(metric="f1"), result.control.sel(metric="f1")
    unit.figure(layer_probe_figure(result.scores, metric="f1"), "jailbreak_probes",
                f"Held-out F1 of a probe telling jailbreak prompts from benign ones ({len(data)} prompts; no request on "
                f"both sides of the split) at each layer, for each model"
                + (" and its abliterated variant (refusal direction orthogonalised out of the weights)" if s["abliterated"] else "")
                + f". Control (labels shuffled): F1 {_range(control.values)}.")
    unit.note(f"jailbreak: best F1 {_best(f1)}; shuffled-label control {_range(control.values)}")


def _position_probes(unit: Unit, models) -> None:
    from mechkit.probing import probe_positions
    from mechkit.probing.datasets import builtin_dataset
    from mechkit.probing.qa import qa_dataset
    from mechkit.viz import position_probe_figure

    s = unit.settings
    (name, load), = models
    name = display_name(name)
    model = load()
    if s["dataset"] == "qa":
        data = qa_dataset(model, per_type=s["per_type"], progress=unit.progress)
        what = (f"whether the model's own greedy answer is correct, at each layer (y) and named token position (x): "
                f"the question's last token, the answer's first tokens, the exact answer's tokens located in the "
                f"generation, and positions from the end ({len(data)} questions, {s['per_type']} per type)")
    else:  # any labelled set: only the positions counted from the end exist
        data = builtin_dataset(s["dataset"], model)
        what = f"the {data.name} label at each layer (y) and token position from the end (x) ({len(data)} examples)"
    result = probe_positions(model, data, control=s["control"], min_examples=s["min_examples"], progress=unit.progress)
    result.save(unit.folder / "result")
    auc, control = result.scores.sel(metric="auc"), result.control.sel(metric="auc")
    no_span = f"{data.attrs.get('no_span_total', 0)} of {data.attrs.get('generated', len(data))}"
    unit.figure(position_probe_figure(result.scores, metric="auc"), "position_probes",
                f"{name}: held-out ROC AUC of a probe predicting {what}. Grey = too few examples at that position. "
                f"Control (labels shuffled): AUC {_range(control.values)}.")
    unit.note(f"{name}: {len(data)} examples, class counts {data.class_counts()}"
              + (f", generations with no exact-answer span: {no_span}" if s["dataset"] == "qa" else "") + "; "
              f"best AUC {_best(auc)}; control {_range(control.values)}")


def _head_classification(unit: Unit, models) -> None:
    from mechkit.heads import classify_heads
    from mechkit.viz import category_map_figure, relation_scores_figure

    s = unit.settings
    (name, load), = models
    name = display_name(name)
    result = classify_heads(load(), k=s["k"], progress=unit.progress)
    result.save(unit.folder / "result")
    unit.figure(category_map_figure([result.category_map()], title=f"Head categories from the weights (MAPS): {name}"),
                "category_map",
                f"{name}: each attention head (y) in each layer (x) coloured by the relation categories it implements, "
                f"read from its OV circuit projected onto the vocabulary (MAPS): a relation counts when its score "
                f"(share of pairs whose target ranks in the top k) reaches {result.threshold}. False-positive rate on "
                f"shuffled (null) relations: {result.false_positive_rate()}.")
    unit.figure(relation_scores_figure(result.scores, threshold=result.threshold), "relation_scores",
                f"{name}: the relation score (share of a relation's pairs whose target ranks in the head's top k) of "
                f"every head for every relation (rows); columns are grouped by layer, one block of heads per layer. "
                f"A head implements a relation at a score of {result.threshold} or more.")
    unit.note(f"{name}: categories {result.category_counts()}; null false-positive rate {result.false_positive_rate()}")


HEAD_METHODS = {
    "atp": "attribution patching (AtP: the gradient of the logit difference between the correct and the "
           "corrupted answer times the change of the head's output from the clean to the corrupted prompt, a "
           "first-order estimate of patching that head)",
    "atp*": "AtP* (AtP with the attention-saturation fix and GradDrop; magnitudes of the patching effect)",
    "patching": "exact activation patching (the change in the logit difference when the head's output is "
                "patched in from the corrupted prompt, one forward per head)",
    "dla": "direct logit attribution (the head's output projected through the final norm onto the correct-minus-"
           "corrupted unembedding direction)",
}


def _head_attribution(unit: Unit, models) -> None:
    from mechkit.data.tasks import select_tasks
    from mechkit.heads.attribution import attribute_heads, top_heads
    from mechkit.viz import task_grid_figure

    s = unit.settings
    (name, load), = models
    name = display_name(name)
    model = load()
    results = {}
    for task in select_tasks(s["tasks"], s["examples"]):
        result = attribute_heads(model, task, s["method"], progress=unit.progress)
        result.save(unit.folder / f"{task.name}.npz")
        results[task.name] = result
        base = result.attrs["baseline"]
        low, high = base["ci"]
        unit.note(f"{name} {task.name}: clean {base['metric']} {base['clean']:+.2f} [{low:+.2f}, {high:+.2f}]"
                  + {True: "", False: " (interval includes 0: greyed)", None: " (no corrupted twin: not tested)"}[
                      base["significant"]]
                  + "; top heads " + ", ".join(f"{h} {v:+.3g}" for h, v in top_heads(result)))
    unit.figure(task_grid_figure(results, title=f"{name}: head attribution per task ({s['method']})"), "task_grid",
                f"{name}: how much each head (x) in each layer (y) matters for each task: {HEAD_METHODS[s['method']]} "
                f"({s['examples']} examples a task). A task whose clean logit difference has a bootstrap interval "
                f"including 0 is greyed: the model is at chance on it.")


def _function_heads(unit: Unit, models) -> None:
    from mechkit.data.function_chains import function_dataset
    from mechkit.heads.function_heads import function_heads
    from mechkit.heads.function_interventions import intervention_table
    from mechkit.viz import task_grid_figure

    s = unit.settings
    (name, load), = models
    name = display_name(name)
    model = load()
    subquestions = function_dataset(per_function=s["per_function"], seed=0)
    result = function_heads(model, subquestions, answer=s["answer"], null_seeds=s["null_seeds"], progress=unit.progress)
    result.save(unit.folder / "result")
    panels = {}
    for function in result.normalised.labels["function"]:
        panel = result.normalised.sel(function=function)
        panel.attrs = {"method": "logistic probe importance share", "magnitude": True,
                       "colorbar_label": "share of |grad x activation| per function\n(probe importance, sums to 1)"}
        panels[function] = panel
    unit.figure(task_grid_figure(panels, title=f"{name}: function heads (logistic probe over all heads)"), "function_heads",
                f"{name}: for each cognitive function, the share of a multi-class probe's reliance (|gradient x "
                f"activation|) on each head's output, the probe telling functions apart from all heads at once "
                f"({len(subquestions)} sub-questions, {s['per_function']} per function, split by chain). Held-out "
                f"accuracy {result.scores['head_probe']['accuracy']:.2f} against a majority baseline of "
                f"{result.scores['head_probe']['majority_baseline']:.2f}.")
    table = intervention_table(model, result, factors=tuple(s["factors"]), random_draws=s["random_draws"],
                               progress=unit.progress)
    table.save(unit.folder / "interventions.npz")
    unit.note(f"{name}: head probe accuracy {result.scores['head_probe']['accuracy']:.3f} "
              f"(majority {result.scores['head_probe']['majority_baseline']:.3f}); selected heads per function "
              + ", ".join(f"{f} {len(h)}" for f, h in result.selected.items()))
    acc = table.values[..., 0]
    for f, function in enumerate(table.labels["function"]):
        if np.isfinite(acc[f, 0]):
            unit.note(f"  {function}: accuracy {acc[f, 0]:.2f}; removing its heads {acc[f, 1] - acc[f, 0]:+.2f}, "
                      f"random heads {acc[f, 2] - acc[f, 0]:+.2f}")


def _component_method(s: dict) -> str:
    if s["method"] == "grad_x_weight":
        return ("gradient x weight, " + ("sum(|W * dM/dW|) per matrix (entries cannot cancel; also right for "
                                         "post-norm models such as Gemma 3)" if s["elementwise"] else "|sum(W * dM/dW)|"))
    return "activation patching of each matrix's output (exact)"


def _component_attribution(unit: Unit, models) -> None:
    import mechkit
    from mechkit.components.attribution import mean_over_tasks
    from mechkit.data.tasks import select_tasks
    from mechkit.viz import component_share_figure

    s = unit.settings
    (name, load), = models
    name = display_name(name)
    model = load()
    results = []
    for task in select_tasks(s["tasks"], s["examples"]):
        result = mechkit.attribute_components(model, task, method=s["method"], elementwise=s["elementwise"],
                                              progress=unit.progress)
        result.save(unit.folder / f"{task.name}.npz")
        results.append(result)
    mean = mean_over_tasks(results, f"mean of {len(results)} tasks") if len(results) > 1 else results[0]
    mean.save(unit.folder / "mean.npz")
    unit.figure(component_share_figure(mean, title=f"{name}: component attribution ({s['method']}), "
                                                  f"mean of {len(results)} tasks"), "component_shares",
                f"{name}: in each layer (x), the share of the effect carried by each component (rows: attention q, k, "
                f"v, o; MLP up, down, gate), by {_component_method(s)} on the task suite ({s['examples']} examples a "
                f"task, averaged over {len(results)} tasks); each column sums to 1. A component the architecture lacks "
                f"is hatched.")
    per_component = np.nanmean(mean.transpose("layer", "component").values.astype(float), axis=0)
    unit.note(f"{name}: mean share " + ", ".join(f"{c} {v:.2f}" for c, v in zip(mean.labels["component"], per_component)))


ANALYSES: dict[str, Analysis] = {a.name: a for a in [
    Analysis("layer-probes", "Layer probing: true/false statements", False,
             {"per_relation": 10, "streams": ["resid_post", "attn_out"], "control": 2}, _layer_probes),
    Analysis("jailbreak-probes", "Layer probing: jailbreak prompts, with abliterated variants", False,
             {"n": 48, "streams": ["resid_post", "attn_out"], "control": 2, "abliterated": True}, _jailbreak_probes),
    Analysis("position-probes", "Position probing by layer and token", True,
             {"dataset": "qa", "per_type": 24, "control": 2, "min_examples": 20}, _position_probes),
    Analysis("head-classification", "Head classification from the weights (MAPS)", True,
             {"k": None}, _head_classification),
    Analysis("head-attribution", "Head attribution per task", True,
             {"method": "atp", "examples": 8, "tasks": ["all"]}, _head_attribution),
    Analysis("function-heads", "Function-specific heads", True,
             {"per_function": 20, "answer": "gold", "null_seeds": 1, "random_draws": 1, "factors": [2.0]}, _function_heads),
    Analysis("component-attribution", "Component attribution per layer", True,
             {"method": "grad_x_weight", "elementwise": True, "examples": 8, "tasks": ["all"]}, _component_attribution),
]}


def resolve_settings(analyses: list[str], overrides: dict[str, dict] | None = None) -> dict[str, dict]:
    """Each chosen analysis's settings: its defaults updated with ``overrides[analysis]``.
    Unknown analyses or setting names are refused (a typo must not silently run the defaults), and
    so are task lists that would not load."""
    unknown = [a for a in analyses if a not in ANALYSES]
    if unknown:
        raise MechkitError(f"unknown analysis {unknown}; choose from {list(ANALYSES)}")
    settings = {}
    for name in analyses:
        extra = dict((overrides or {}).get(name, {}))
        bad = sorted(set(extra) - set(ANALYSES[name].defaults))
        if bad:
            raise MechkitError(f"{name} has no setting {bad}; its settings are {sorted(ANALYSES[name].defaults)}")
        for key, value in extra.items():
            default = ANALYSES[name].defaults[key]
            expected = (int, float) if isinstance(default, float) else type(default)
            if default is not None and (not isinstance(value, expected) or isinstance(value, bool) != isinstance(default, bool)):
                raise MechkitError(f"{name}.{key} takes a {type(default).__name__} like {json.dumps(default)}, "
                                   f"got {json.dumps(value)}")
        settings[name] = {**ANALYSES[name].defaults, **extra}
        if name == "head-attribution" and settings[name]["method"] not in HEAD_METHODS:
            raise MechkitError(f"head-attribution.method must be one of {list(HEAD_METHODS)}, got "
                               f"{settings[name]['method']!r}")
        if "tasks" in settings[name]:  # unknown tasks, broken files, two tasks of one name: refused now
            from mechkit.data.tasks import select_tasks

            select_tasks(settings[name]["tasks"])
    for name in overrides or {}:
        if name not in ANALYSES:
            raise MechkitError(f"settings given for unknown analysis {name!r}; choose from {list(ANALYSES)}")
        if name not in analyses:
            raise MechkitError(f"settings given for {name!r}, which this report does not run")
    json.dumps(settings)  # settings must be plain JSON: they key the cache
    return settings


__all__ = ["ANALYSES", "Analysis", "Unit", "resolve_settings"]
