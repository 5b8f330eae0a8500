"""Head figures: the category map (head x layer per model) and per-relation scores."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from mechkit.results import LabelledArray
from mechkit.viz.style import CATEGORY_COLOURS, new_figure, tick_step


def category_map_figure(maps: Sequence[LabelledArray], *, title: str = "Head categories from the weights (MAPS)") -> Figure:
    """One panel per model: head (y) x layer (x) coloured by category, with the 8-colour legend.

    Each map is a ``layer x head`` LabelledArray of codes into ``attrs["codes"]``, as
    :meth:`mechkit.heads.HeadClassification.category_map` returns (its provenance names the model).
    """
    if not maps:
        raise ValueError("give at least one category map")
    codes = maps[0].attrs["codes"]
    cmap = ListedColormap(CATEGORY_COLOURS[: len(codes)])
    norm = BoundaryNorm(np.arange(len(codes) + 1) - 0.5, cmap.N)
    fig, axes = new_figure(len(maps), panel_size=(4.2, 3.2))
    for ax, cmap_array in zip(axes, maps):
        arr = cmap_array.transpose("head", "layer")
        ax.imshow(arr.values, cmap=cmap, norm=norm, aspect="auto", origin="lower", interpolation="nearest")
        n_heads, n_layers = arr.shape
        ax.set_xticks(range(0, n_layers, tick_step(n_layers)))
        ax.set_yticks(range(0, n_heads, tick_step(n_heads, 8)))
        ax.set_xlabel("Layer")
        ax.set_ylabel("Head")
        ax.set_title(cmap_array.provenance.model or "model")
    handles = [Patch(facecolor=CATEGORY_COLOURS[i], edgecolor="#777777", label=label.capitalize() if i < 5 else label)
               for i, label in enumerate(codes)]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), frameon=False)
    fig.suptitle(title)
    return fig


def relation_scores_figure(scores: LabelledArray, *, threshold: float | None = None) -> Figure:
    """Relation (y) x head (x, grouped by layer) heatmap of MAPS relation scores in [0, 1]."""
    values = scores.transpose("relation", "layer", "head").values
    n_rel, n_layers, n_heads = values.shape
    flat = values.reshape(n_rel, n_layers * n_heads)
    fig, (ax,) = new_figure(1, panel_size=(min(14, 2.5 + 0.06 * flat.shape[1]), 1.2 + 0.22 * n_rel))
    image = ax.imshow(flat, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    step = tick_step(n_layers, 18)
    ax.set_xticks([l * n_heads + (n_heads - 1) / 2 for l in range(0, n_layers, step)])
    ax.set_xticklabels([str(scores.labels["layer"][l]) for l in range(0, n_layers, step)])
    for l in range(1, n_layers):
        ax.axvline(l * n_heads - 0.5, color="white", lw=0.3)
    ax.set_yticks(range(n_rel))
    ax.set_yticklabels([str(r).replace("_", " ") for r in scores.labels["relation"]])
    ax.set_xlabel(f"Layer (each block: its {n_heads} heads)")
    bar = fig.colorbar(image, ax=ax, fraction=0.03)
    bar.set_label("relation score (fraction of pairs in top-k)")
    if threshold is not None:
        bar.ax.axhline(threshold, color="red", lw=1)
    ax.set_title(f"MAPS relation scores: {scores.provenance.model or ''}")
    return fig
