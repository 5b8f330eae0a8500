"""One shared figure style: fonts, sizes, colour maps and the category palette."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # figures are written to files; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# Unclassified grey, the four categories, then "2/3/4 categories" (seed 002's legend).
CATEGORY_COLOURS = ("#d9d9d9", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#17becf")

RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "figure.dpi": 120,
    "savefig.dpi": 160,
    "savefig.bbox": "tight",
    "svg.fonttype": "none",  # keep text as text in SVG (searchable, checkable)
}


def new_figure(n_panels: int, *, panel_size: tuple[float, float] = (3.6, 3.0), max_cols: int = 4,
               sharey: bool = False) -> tuple[Figure, list]:
    """A figure with ``n_panels`` axes in a grid, styled with :data:`RC`."""
    cols = min(n_panels, max_cols)
    rows = -(-n_panels // cols)
    with plt.rc_context(RC):
        fig, axes = plt.subplots(rows, cols, figsize=(panel_size[0] * cols, panel_size[1] * rows),
                                 squeeze=False, sharey=sharey, constrained_layout=True)
    flat = list(axes.ravel())
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return fig, flat[:n_panels]


def tick_step(n: int, max_ticks: int = 10) -> int:
    """A round tick step showing at most ``max_ticks`` labels on an axis of ``n`` cells."""
    for step in (1, 2, 4, 5, 8, 10, 16, 20, 25, 50, 100):
        if n / step <= max_ticks:
            return step
    return max(1, n // max_ticks)


def save(fig: Figure, path_stem, formats=("png", "svg")) -> list:
    """Write ``fig`` as ``path_stem.png`` and ``.svg``; returns the paths."""
    from pathlib import Path

    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    with plt.rc_context(RC):
        for fmt in formats:
            path = stem.with_suffix(f".{fmt}")
            fig.savefig(path)
            paths.append(path)
    return paths
