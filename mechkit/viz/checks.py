"""Readability checks on a finished figure: tick labels that overlap, colour bars without a
label, and the texts (titles, axis labels, legend entries) a reader must find in it.

The report runs these on every figure it writes and records the answers, so a test (or a
reader) can tell that a figure is legible without looking at it.
"""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.transforms import Bbox


def _tick_boxes(labels, renderer) -> list[tuple[str, Bbox]]:
    return [(label.get_text(), label.get_window_extent(renderer)) for label in labels
            if label.get_visible() and label.get_text().strip()]


def _overlaps(boxes: list[tuple[str, Bbox]], along: int) -> list[tuple[str, str]]:
    """Pairs of neighbouring labels whose boxes intersect (sorted along x (0) or y (1))."""
    boxes = sorted(boxes, key=lambda tb: tb[1].get_points()[0][along])
    clash = []
    for (text_a, a), (text_b, b) in zip(boxes, boxes[1:]):
        if a.overlaps(b) and a.width > 0 and b.width > 0:
            # Touching edges do not count: require the overlap to be wider than half a pixel.
            inter = Bbox.intersection(a, b)
            if inter is not None and inter.width > 0.5 and inter.height > 0.5:
                clash.append((text_a, text_b))
    return clash


def figure_problems(fig: Figure) -> list[str]:
    """What makes ``fig`` hard to read: overlapping tick labels on an axis, a colour bar with
    no label. An empty list means none was found."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    problems = []
    for index, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        name = ax.get_title() or ax.get_ylabel() or f"axes {index}"
        for axis, labels, along in (("x", ax.get_xticklabels(), 0), ("y", ax.get_yticklabels(), 1)):
            for a, b in _overlaps(_tick_boxes(labels, renderer), along):
                problems.append(f"{name}: {axis} tick labels {a!r} and {b!r} overlap")
        if getattr(ax, "_colorbar", None) is not None and not (ax.get_ylabel().strip() or ax.get_xlabel().strip()):
            problems.append(f"{name}: colour bar without a label")
    return problems


def figure_texts(fig: Figure) -> list[str]:
    """The texts a reader needs: the figure title, each visible axes' title and axis labels,
    colour-bar labels and legend entries (as the SVG, written with text kept as text, holds them)."""
    texts = []
    if fig._suptitle is not None and fig._suptitle.get_text().strip():
        texts.append(fig._suptitle.get_text())
    legends = list(fig.legends)
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        texts += [t for t in (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) if t.strip()]
        if ax.get_legend() is not None:
            legends.append(ax.get_legend())
    for legend in legends:
        texts += [t.get_text() for t in legend.get_texts() if t.get_text().strip()]
    return list(dict.fromkeys(texts))


__all__ = ["figure_problems", "figure_texts"]
