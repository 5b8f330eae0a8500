"""Attribution figures: the task grid of layer x head heatmaps (seed 003) and the
component x layer share heatmap (seed 004).

Example:
    >>> import numpy as np
    >>> from mechkit.results import LabelledArray
    >>> score = LabelledArray(np.ones((4, 3)), ("layer", "head"), attrs={
    ...     "method": "atp", "magnitude": False,
    ...     "baseline": {"metric": "logit_diff", "clean": 1.2, "ci": [0.8, 1.6], "significant": True, "n": 40}})
    >>> fig = task_grid_figure({"retrieval": score})
    >>> len(fig.axes)  # one panel and one colour bar
    2
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from mechkit.results import LabelledArray
from mechkit.viz.style import new_figure, tick_step

METHOD_NAMES = {"atp*": "AtP*", "atp": "AtP", "patching": "Activation patching", "dla": "DLA",
                "mean_ablation": "Mean ablation", "zero_ablation": "Zero ablation",
                "grad_x_weight": "Gradient x weight", "checkpoint_diff": "Checkpoint diff"}
METRIC_UNITS = {"logit_diff": "logit difference", "answer_logprob": "log-prob of the answer"}
METRIC_SHORT = {"logit_diff": "logit diff", "answer_logprob": "answer log-prob"}
COMPONENT_NAMES = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o",
                   "up": "mlp.up", "gate": "mlp.gate", "down": "mlp.down"}

SIGNED_CMAP = "RdBu_r"      # diverging, centred at 0
MAGNITUDE_CMAP = "viridis"  # sequential from 0 (the seed figure's purple-to-yellow)
GREYED_CMAP = "Greys"       # a task at chance: drawn, but not in colour
MISSING_COLOUR = "#e6e6e6"
MISSING_HATCH = "////"


def _pretty_task(name: str) -> str:
    return " ".join(word[:1].upper() + word[1:] for word in str(name).replace("_", " ").split())


def _method_name(method: str | None) -> str:
    return METHOD_NAMES.get(str(method), str(method or "attribution"))


def is_at_chance(result: LabelledArray) -> bool:
    """True when the task's clean baseline interval includes 0 (``attrs["baseline"]["significant"]``
    is False): the model does not do the task, so its attribution is greyed out.

    An unpaired task (``significant`` is None: the metric is a log-probability, with no chance
    level at 0) is never greyed.
    """
    return (result.attrs.get("baseline") or {}).get("significant") is False


def _chance_note(baseline: Mapping) -> str:
    metric = METRIC_SHORT.get(baseline.get("metric", "logit_diff"), "metric")
    low, high = baseline.get("ci", [float("nan"), float("nan")])
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"no interval (n < 2): clean {metric}\n{baseline.get('clean', float('nan')):.2f}"
    return f"at chance: clean {metric}\n{baseline.get('clean', float('nan')):.2f} [{low:.2f}, {high:.2f}]"


NODE_NAMES = {"q": "query", "k": "key", "v": "value"}


def _select_node(array: LabelledArray, node: str | None) -> LabelledArray:
    if "node" not in array.axes:
        if node is not None:
            raise ValueError(f"node={node!r} was given but the results have no node axis (they score head outputs)")
        return array
    if node is None:
        raise ValueError(f"the results have a node axis {array.labels['node']} (attribute_heads(nodes='qkv')): "
                         "pass node='q', 'k' or 'v' to draw one kind of node")
    return array.sel(node=node)


def task_grid_figure(results: Mapping[str, LabelledArray], *, title: str | None = None, symmetric: bool = True,
                     vmax: float | None = None, node: str | None = None, max_cols: int = 4) -> Figure:
    """One layer (y, layer 0 at the bottom) x head (x) heatmap per task, on one shared colour
    scale with one colour bar.

    ``results`` maps a task name to the ``layer x head`` LabelledArray that
    :func:`mechkit.attribute_heads` returns for it (all for the same model and method). Signed
    scores are drawn on a diverging map centred at 0 (``symmetric=True``); magnitudes
    (``attrs["magnitude"]``, e.g. AtP*) and ``symmetric=False`` on a sequential map from 0.
    The limits come from the panels drawn in colour; ``vmax`` fixes them instead, and values
    beyond it are clipped (the colour bar's end is then drawn as an arrow).

    A panel whose task baseline is at chance (its bootstrap interval includes 0, see
    :func:`is_at_chance`) is drawn in greys, faded, with the clean metric and its interval
    written on it, rather than in colour as if it meant something.

    A result whose ``attrs["colorbar_label"]`` is set (e.g. probe importances, which are not effects
    on a metric) names the colour bar itself.

    Results with query/key/value nodes (``attribute_heads(..., nodes="qkv")``, a third axis
    ``node``) are drawn one kind of node at a time: pass ``node="q"``, ``"k"`` or ``"v"``.
    """
    if not results:
        raise ValueError("give at least one task's attribution result")
    names = list(results)
    arrays = [_select_node(results[name], node).transpose("layer", "head") for name in names]
    shapes = {array.shape for array in arrays}
    if len(shapes) > 1:
        raise ValueError(f"all tasks must have the same layer x head shape (one model per grid), got {sorted(shapes)}")
    methods = {array.attrs.get("method") for array in arrays}
    if len(methods) > 1:
        raise ValueError(f"one method per grid (a shared colour scale compares like with like), got {sorted(map(str, methods))}")
    (method,) = methods
    magnitude = all(bool(array.attrs.get("magnitude")) for array in arrays)
    signed = symmetric and not magnitude
    greyed = [is_at_chance(array) for array in arrays]
    in_colour = [a.values for a, g in zip(arrays, greyed) if not g] or [a.values for a in arrays]
    finite = np.concatenate([v[np.isfinite(v)].ravel() for v in in_colour] + [np.zeros(1)])
    data_max = float(np.abs(finite).max() if signed else finite.max())
    data_min = float(finite.min())
    limit = float(vmax) if vmax is not None else data_max
    limit = limit if limit > 0 else 1.0
    if signed:
        norm: Normalize = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)
        cmap = SIGNED_CMAP
        extend = "both" if vmax is not None and data_max > limit else "neither"
    else:
        low = min(0.0, data_min)
        norm = Normalize(vmin=low, vmax=limit)
        cmap = MAGNITUDE_CMAP
        extend = "max" if vmax is not None and data_max > limit else "neither"

    n_layers, n_heads = arrays[0].shape
    fig, axes = new_figure(len(arrays), panel_size=(max(3.0, 1.0 + 0.13 * n_heads), max(2.6, 0.9 + 0.075 * n_layers)),
                           max_cols=max_cols)
    layer_labels, head_labels = arrays[0].labels["layer"], arrays[0].labels["head"]
    for ax, name, array, grey in zip(axes, names, arrays, greyed):
        baseline = array.attrs.get("baseline") or {}
        values = np.ma.masked_invalid(array.values.astype(float))
        ax.set_facecolor(MISSING_COLOUR)
        ax.imshow(values, cmap=GREYED_CMAP if grey else cmap, norm=norm, aspect="auto", origin="lower",
                  interpolation="nearest", alpha=0.35 if grey else None)
        x_step, y_step = tick_step(n_heads, 8), tick_step(n_layers, 8)
        ax.set_xticks(range(0, n_heads, x_step))
        ax.set_xticklabels([str(head_labels[i]) for i in range(0, n_heads, x_step)])
        ax.set_yticks(range(0, n_layers, y_step))
        ax.set_yticklabels([str(layer_labels[i]) for i in range(0, n_layers, y_step)])
        ax.set_xlabel("Head")
        ax.set_ylabel("Layer")
        n = baseline.get("n")
        label = _pretty_task(name)
        if n is not None:  # long names put the count on a second line, so neighbouring titles never meet
            label += f"\n(n={n})" if len(label) > 18 else f" (n={n})"
        ax.set_title(label, color="#888888" if grey else "black", fontsize=9)
        if grey:
            ax.text(0.5, 0.5, _chance_note(baseline), transform=ax.transAxes, ha="center", va="center", fontsize=7,
                    bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#999999", "alpha": 0.9})
            for spine in ax.spines.values():
                spine.set_edgecolor("#bbbbbb")
    mappable = ScalarMappable(norm=norm, cmap=cmap)
    bar = fig.colorbar(mappable, ax=axes, fraction=0.025 if len(axes) > 1 else 0.05, pad=0.02, extend=extend,
                       shrink=0.9 if len(axes) > 4 else 1.0)
    units = [METRIC_UNITS.get((a.attrs.get("baseline") or {}).get("metric", "logit_diff"), "the metric") for a in arrays]
    unit = " / ".join(dict.fromkeys(units))
    what = f"{NODE_NAMES.get(str(node), node)} nodes' " if node is not None else ""
    label = arrays[0].attrs.get("colorbar_label")  # results that are not effects on a metric name themselves
    bar.set_label(label or f"{_method_name(method)}: {what}{'|effect|' if magnitude else 'effect'}\non {unit}")
    if title is None:
        model = arrays[0].provenance.model
        title = (f"{_method_name(method)} head attribution per task" + (f", {NODE_NAMES.get(str(node), node)} nodes" if node else "")
                 + (f": {model}" if model else ""))
    fig.suptitle(title)
    if any(greyed):
        handle = Patch(facecolor="#cfcfcf", edgecolor="#999999",
                       label="grey: the model is at chance on this task (the clean metric's\n"
                             "95% interval includes 0); its attribution is not interpreted")
        fig.legend(handles=[handle], loc="outside lower center", frameon=False, fontsize=7)
    return fig


def _component_label(component) -> str:
    return COMPONENT_NAMES.get(str(component), str(component))


def _bar_label(shares: LabelledArray, normalised: bool) -> str:
    attrs = shares.attrs
    method = attrs.get("method")
    if method == "checkpoint_diff":
        quantity = "relative change\n||W_a - W_b|| / ||W_b||"
        return f"share of the {quantity} within the layer" if normalised else quantity
    if normalised:
        return f"{_method_name(method)}:\nshare of |effect| within the layer" if method else "share of |effect| within the layer"
    metric = attrs.get("metric") or (attrs.get("baseline") or {}).get("metric", "")
    unit = attrs.get("unit") or METRIC_UNITS.get(metric)
    if method == "grad_x_weight":
        return "Gradient x weight:\n|W . d metric / dW|" + (f" ({unit})" if unit else "")
    return f"{_method_name(method)}:\neffect" + (f" on {unit}" if unit else "") if method else (unit or "effect")


def component_share_figure(shares: LabelledArray, *, title: str | None = None, annotate: bool | None = None,
                           cmap: str | None = None) -> Figure:
    """Component (rows) x layer (columns) heatmap of :func:`mechkit.attribute_components` results.

    Values are shares of |effect| that sum to 1 within each layer (drawn on a sequential map
    from 0), or raw values when ``attrs["normalised"]`` is False (a diverging map centred at 0
    if any is negative). A component the architecture does not have (NaN, e.g. the gate of a
    GPT-2 MLP) is drawn hatched and named in a legend, never as 0. ``annotate`` writes each
    cell's value; by default only when the grid is small (at most 12 layers).
    """
    array = shares.transpose("component", "layer")
    values = array.values.astype(float)
    n_components, n_layers = values.shape
    normalised = bool(shares.attrs.get("normalised", True))
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        finite = np.zeros(1)
    signed = not normalised and bool((finite < 0).any())
    if signed:
        limit = float(np.abs(finite).max()) or 1.0
        norm: Normalize = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)
        cmap = cmap or SIGNED_CMAP
    else:
        norm = Normalize(vmin=0.0, vmax=float(finite.max()) or 1.0)
        cmap = cmap or ("Oranges" if normalised else MAGNITUDE_CMAP)
    width = max(4.0, 2.2 + 0.28 * n_layers)
    fig, (ax,) = new_figure(1, panel_size=(width, max(2.6, 1.4 + 0.3 * n_components)))
    ax.set_facecolor(MISSING_COLOUR)
    missing = ~np.isfinite(values)
    if missing.any():
        ax.patch.set_hatch(MISSING_HATCH)
        ax.patch.set_edgecolor("#9a9a9a")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    layers = array.labels["layer"]
    step = tick_step(n_layers, 16)
    ax.set_xticks(range(0, n_layers, step))
    ax.set_xticklabels([str(layers[i]) for i in range(0, n_layers, step)])
    ax.set_yticks(range(n_components))
    ax.set_yticklabels([_component_label(c) for c in array.labels["component"]])
    ax.set_xlabel("Layer")
    if annotate is None:
        annotate = n_layers <= 12
    if annotate:
        colormap = image.get_cmap()
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                r, g, b, _ = colormap(norm(v))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(j, i, f"{v:.2f}" if normalised else f"{v:.2g}", ha="center", va="center", fontsize=6,
                        color="white" if dark else "black")
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label(_bar_label(shares, normalised))
    if missing.any():
        handle = Patch(facecolor=MISSING_COLOUR, edgecolor="#9a9a9a", hatch=MISSING_HATCH, label="not in this architecture")
        fig.legend(handles=[handle], loc="outside lower center", frameon=False)
    if title is None:
        method = shares.attrs.get("method")
        model = shares.provenance.model
        what = "Checkpoint diff" if method == "checkpoint_diff" else f"Component attribution ({_method_name(method)})" \
            if method else "Component attribution"
        task = shares.attrs.get("task")
        title = what + (f": {model}" if model else "") + (f", {_pretty_task(task)}" if isinstance(task, str) else "")
    fig.suptitle(title)  # above the colour bar too: a long title never meets its tick labels
    return fig


__all__ = ["component_share_figure", "is_at_chance", "task_grid_figure"]
