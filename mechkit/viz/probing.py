"""Probing figures: models x layers per stream (seed 000) and layer x position (seed 001)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from mechkit.results import LabelledArray
from mechkit.viz.style import new_figure, tick_step

STREAM_TITLES = {"resid_post": "Layer output", "attn_out": "MHA output", "mlp_out": "MLP output",
                 "resid_pre": "Layer input"}


def _masked(values: np.ndarray) -> np.ma.MaskedArray:
    return np.ma.masked_invalid(values)


def _metric_label(metric: str) -> str:
    return metric if metric == "accuracy" else metric.upper()


def _finish_heatmap(fig: Figure, ax, image, values: np.ndarray, bar_label: str, annotate: bool) -> None:
    """Optional cell annotations and a labelled colour bar, the same on every probing heatmap."""
    if annotate:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label(bar_label)


def layer_probe_figure(scores: LabelledArray, *, metric: str = "f1", vmin: float = 0.5, vmax: float = 1.0,
                       annotate: bool = False) -> Figure:
    """One panel per stream: model (y) x layer (x) heatmap of a probe metric, red (0.5) to green (1).

    ``scores`` is ``model x stream x layer x metric`` as :func:`mechkit.probe_layers` returns;
    layers a model does not have are drawn blank (grey).
    """
    data = scores.sel(metric=metric).transpose("stream", "model", "layer")
    streams, models, layers = data.labels["stream"], data.labels["model"], data.labels["layer"]
    fig, axes = new_figure(len(streams), panel_size=(max(3.5, 0.5 + 0.28 * len(layers)), 1.5 + 0.45 * len(models)), max_cols=2,
                           sharey=True)
    for ax, stream in zip(axes, streams):
        values = data.sel(stream=stream).values
        ax.set_facecolor("#f0f0f0")
        image = ax.imshow(_masked(values), cmap="RdYlGn", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(0, len(layers), tick_step(len(layers), 16)))
        ax.set_xticklabels([str(layers[i]) for i in range(0, len(layers), tick_step(len(layers), 16))])
        ax.set_yticks(range(len(models)))
        ax.set_yticklabels(models)
        ax.set_xlabel("Layer" if scores.attrs.get("align", "index") == "index" else "Relative depth")
        ax.set_title(f"{STREAM_TITLES.get(stream, stream)} {_metric_label(metric)}")
        _finish_heatmap(fig, ax, image, values, f"held-out {metric}", annotate)
    fig.suptitle(f"Linear probe {_metric_label(metric)} by layer ({scores.attrs.get('dataset', '')})")
    return fig


def position_probe_figure(scores: LabelledArray, *, metric: str = "auc", vmin: float = 0.5, vmax: float = 1.0,
                          annotate: bool = False) -> Figure:
    """Layer (y) x position (x) heatmap of a probe metric for one model, blues from 0.5 to 1.

    Positions with too few examples are drawn blank (grey); their counts are in
    ``scores.attrs["examples_per_position"]``.
    """
    data = scores.sel(metric=metric).transpose("layer", "position")
    layers, positions = data.labels["layer"], data.labels["position"]
    label_height = 0.065 * max(len(str(p)) for p in positions)  # upright tick labels below the panel
    fig, (ax,) = new_figure(1, panel_size=(1.5 + 0.45 * len(positions), 1.2 + 0.16 * len(layers) + label_height))
    ax.set_facecolor("#f0f0f0")
    image = ax.imshow(_masked(data.values), cmap="Blues", vmin=vmin, vmax=vmax, aspect="auto", origin="lower",
                      interpolation="nearest")
    ax.set_xticks(range(len(positions)))
    ax.set_xticklabels([str(p) for p in positions], rotation=90)  # upright boxes: long names never overlap
    ax.set_yticks(range(0, len(layers), tick_step(len(layers), 16)))
    ax.set_xlabel("Token")
    ax.set_ylabel("Layer")
    _finish_heatmap(fig, ax, image, data.values, f"held-out {_metric_label(metric)}", annotate)
    ax.set_title(f"Probe {_metric_label(metric)} by layer and token: {scores.provenance.model or ''}")
    return fig
