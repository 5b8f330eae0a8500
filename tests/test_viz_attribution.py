"""Attribution figures from synthetic results: the task grid (one shared colour scale, one colour
bar, greyed panels for tasks at chance) and the component share map (missing components drawn
as missing); no text on either overlaps."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import numpy as np
import pytest

from mechkit.data.tasks import TASK_NAMES
from mechkit.results import LabelledArray, Provenance
from mechkit.viz import component_share_figure, save, task_grid_figure
from mechkit.viz.attribution import is_at_chance

COMPONENTS = ["q", "k", "v", "o", "up", "gate", "down"]


def head_result(scale: float, *, significant: bool | None = True, method: str = "patching", magnitude: bool = False,
                shape=(30, 15), seed: int = 0, n: int = 48) -> LabelledArray:
    values = np.random.default_rng(seed).normal(size=shape) * scale
    if magnitude:
        values = np.abs(values)
    ci = [0.4, 1.6] if significant is not False else [-0.3, 0.4]
    baseline = {"metric": "logit_diff", "clean": 1.0 if significant is not False else 0.05, "ci": ci,
                "significant": significant, "n": n}
    return LabelledArray(values, ("layer", "head"), provenance=Provenance(model="smollm2-135m-instruct"),
                         attrs={"method": method, "magnitude": magnitude, "baseline": baseline})


def eight_tasks(**kwargs) -> dict[str, LabelledArray]:
    return {name: head_result(1.0 + i, seed=i, **kwargs) for i, name in enumerate(TASK_NAMES)}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def panels(fig) -> list:
    return [ax for ax in fig.axes if ax.images]


def colour_bars(fig) -> list:
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def overlapping_text(fig) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty tick labels, axis labels and titles whose boxes intersect."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = []
    for ax in fig.axes:
        candidates = [*ax.get_xticklabels(), *ax.get_yticklabels(), ax.title, ax.xaxis.label, ax.yaxis.label]
        for text in candidates:
            if text.get_visible() and text.get_text().strip():
                texts.append((text.get_text(), text.get_window_extent(renderer)))
    clashes = []
    for (a, box_a), (b, box_b) in itertools.combinations(texts, 2):
        if box_a.overlaps(box_b) and box_a.width > 0 and box_b.width > 0:
            clashes.append((a, b))
    return clashes


def test_task_grid_has_one_colour_bar_and_one_shared_symmetric_scale(tmp_path):
    results = eight_tasks()
    fig = task_grid_figure(results)
    axes = panels(fig)
    assert len(axes) == 8 and len(colour_bars(fig)) == 1
    limits = {ax.images[0].get_clim() for ax in axes}
    assert len(limits) == 1  # shared across panels
    (low, high), = limits
    biggest = max(np.abs(r.values).max() for r in results.values())
    assert low == pytest.approx(-high) and high == pytest.approx(biggest)
    assert all(ax.images[0].get_cmap().name == "RdBu_r" for ax in axes)
    assert axes[0].get_title() == "Knowledge Recall (n=48)"
    assert axes[0].get_xlabel() == "Head" and axes[0].get_ylabel() == "Layer"
    assert axes[0].images[0].origin == "lower"  # layer 0 at the bottom
    assert axes[0].images[0].get_array().shape == (30, 15)
    label = colour_bars(fig)[0].get_ylabel()
    assert label.replace("\n", " ") == "Activation patching: effect on logit difference"
    png, svg = save(fig, tmp_path / "grid")
    assert png.stat().st_size > 20_000 and "Knowledge Recall" in svg.read_text()


def test_a_task_at_chance_is_greyed_with_its_interval_and_does_not_set_the_scale():
    results = eight_tasks()
    results["logical_reasoning"] = head_result(100.0, significant=False, seed=9)  # huge, but meaningless
    fig = task_grid_figure(results)
    axes = {ax.get_title().split(" (")[0]: ax for ax in panels(fig)}
    grey, coloured = axes["Logical Reasoning"], axes["Retrieval"]
    assert is_at_chance(results["logical_reasoning"]) and not is_at_chance(results["retrieval"])
    assert grey.images[0].get_cmap().name == "Greys" and grey.images[0].get_alpha() < 0.5
    assert coloured.images[0].get_cmap().name == "RdBu_r" and coloured.images[0].get_alpha() is None
    notes = [t.get_text().replace("\n", " ") for t in grey.texts]
    assert notes == ["at chance: clean logit diff 0.05 [-0.30, 0.40]"]
    assert not coloured.texts
    high = coloured.images[0].get_clim()[1]
    meaningful = max(np.abs(r.values).max() for name, r in results.items() if name != "logical_reasoning")
    assert high == pytest.approx(meaningful) and grey.images[0].get_clim() == coloured.images[0].get_clim()
    assert "at chance" in fig.legends[0].get_texts()[0].get_text()


def test_unpaired_tasks_are_never_greyed():
    result = head_result(1.0, significant=None)
    assert not is_at_chance(result)
    fig = task_grid_figure({"open_answer": result})
    assert panels(fig)[0].images[0].get_cmap().name == "RdBu_r" and not fig.legends


def test_magnitudes_use_a_sequential_scale_from_zero():
    fig = task_grid_figure(eight_tasks(method="atp*", magnitude=True))
    low, high = panels(fig)[0].images[0].get_clim()
    assert low == 0 and high > 0
    assert panels(fig)[0].images[0].get_cmap().name == "viridis"
    assert colour_bars(fig)[0].get_ylabel().replace("\n", " ") == "AtP*: |effect| on logit difference"


def test_a_fixed_vmax_clips_and_marks_the_colour_bar():
    fig = task_grid_figure(eight_tasks(), vmax=2.0)
    assert panels(fig)[0].images[0].get_clim() == (-2.0, 2.0)
    assert colour_bars(fig)[0]._colorbar.extend == "both"  # the clipped ends are drawn as arrows
    assert task_grid_figure(eight_tasks()).axes[-1]._colorbar.extend == "neither"


def test_query_key_value_nodes_are_drawn_one_kind_at_a_time():
    base = head_result(1.0, shape=(6, 4))
    values = np.stack([base.values, 2 * base.values, 3 * base.values], axis=-1)
    nodes = LabelledArray(values, ("layer", "head", "node"), {"node": ["q", "k", "v"]}, provenance=base.provenance,
                          attrs={**base.attrs, "nodes": "qkv"})
    with pytest.raises(ValueError, match="node='q', 'k' or 'v'"):
        task_grid_figure({"retrieval": nodes})
    fig = task_grid_figure({"retrieval": nodes}, node="k")
    np.testing.assert_allclose(panels(fig)[0].images[0].get_array(), 2 * base.values)
    assert "key nodes" in colour_bars(fig)[0].get_ylabel() and "key nodes" in fig.get_suptitle()
    with pytest.raises(ValueError, match="no node axis"):
        task_grid_figure({"retrieval": base}, node="q")


def test_task_grid_refuses_mixed_methods_shapes_and_nothing():
    with pytest.raises(ValueError, match="one method per grid"):
        task_grid_figure({"a": head_result(1.0), "b": head_result(1.0, method="dla")})
    with pytest.raises(ValueError, match="same layer x head shape"):
        task_grid_figure({"a": head_result(1.0), "b": head_result(1.0, shape=(12, 4))})
    with pytest.raises(ValueError, match="at least one"):
        task_grid_figure({})


@pytest.mark.parametrize("n_panels", [1, 3, 8])
def test_task_grid_text_never_overlaps_up_to_30_layers_15_heads_8_panels(n_panels):
    results = dict(list(eight_tasks().items())[:n_panels])
    results["decision_making" if n_panels == 8 else next(iter(results))] = head_result(1.0, significant=False)
    fig = task_grid_figure(results)
    assert overlapping_text(fig) == []


def shares(values: np.ndarray, *, normalised: bool = True, method: str = "grad_x_weight",
           components=COMPONENTS) -> LabelledArray:
    return LabelledArray(values, ("layer", "component"), {"component": components},
                         provenance=Provenance(model="tiny-gpt2"),
                         attrs={"method": method, "normalised": normalised, "task": "retrieval",
                                "baseline": {"metric": "logit_diff"}})


def gpt2_shares(n_layers: int, seed: int = 0) -> np.ndarray:
    values = np.random.default_rng(seed).random((n_layers, len(COMPONENTS)))
    values[:, COMPONENTS.index("gate")] = np.nan  # a GPT-2 MLP has no gate
    return values / np.nansum(values, axis=1, keepdims=True)


def test_component_shares_draw_a_missing_gate_as_missing_not_zero(tmp_path):
    values = gpt2_shares(6)
    fig = component_share_figure(shares(values))
    ax = panels(fig)[0]
    image = ax.images[0].get_array()
    assert image.shape == (7, 6)  # components (rows) x layers (columns)
    assert np.ma.getmaskarray(image)[COMPONENTS.index("gate")].all()
    assert not np.ma.getmaskarray(image)[COMPONENTS.index("up")].any()
    assert ax.patch.get_hatch() == "////"  # what shows through the masked cells
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["not in this architecture"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up",
                                                            "mlp.gate", "mlp.down"]
    assert ax.get_xlabel() == "Layer"
    assert ax.images[0].get_clim() == (0.0, pytest.approx(np.nanmax(values)))
    label = colour_bars(fig)[0].get_ylabel().replace("\n", " ")
    assert label == "Gradient x weight: share of |effect| within the layer"
    annotated = [t.get_text() for t in ax.texts]
    assert len(annotated) == 6 * 6 and "nan" not in annotated  # small grid: every finite cell, no NaN cell
    _, svg = save(fig, tmp_path / "components")
    assert "not in this architecture" in svg.read_text()


def test_component_shares_without_missing_components_have_no_legend():
    values = np.full((4, 7), 1 / 7)
    fig = component_share_figure(shares(values))
    assert not fig.legends and panels(fig)[0].patch.get_hatch() is None


def test_raw_signed_components_are_diverging_with_the_raw_unit():
    values = np.random.default_rng(1).normal(size=(30, 7))
    fig = component_share_figure(shares(values, normalised=False, method="patching"))
    ax = panels(fig)[0]
    low, high = ax.images[0].get_clim()
    assert low == pytest.approx(-high) and high == pytest.approx(np.abs(values).max())
    assert colour_bars(fig)[0].get_ylabel().replace("\n", " ") == "Activation patching: effect on logit difference"
    assert not ax.texts  # 30 layers: no per-cell annotation by default


def test_checkpoint_diff_is_labelled_as_relative_change():
    values = np.random.default_rng(2).random((5, 7)) * 0.1
    fig = component_share_figure(shares(values, normalised=False, method="checkpoint_diff"))
    assert "||W_a - W_b|| / ||W_b||" in colour_bars(fig)[0].get_ylabel()
    assert panels(fig)[0].images[0].get_clim()[0] == 0.0


@pytest.mark.parametrize("n_layers", [2, 12, 18, 30])
def test_component_figure_text_never_overlaps(n_layers):
    fig = component_share_figure(shares(gpt2_shares(n_layers)))
    assert overlapping_text(fig) == []


def test_task_grid_colour_bar_can_be_named_by_the_result():
    import numpy as np

    from mechkit.results import LabelledArray
    from mechkit.viz import task_grid_figure

    panel = LabelledArray(np.random.default_rng(0).random((3, 4)), ("layer", "head"),
                          attrs={"method": "probe", "magnitude": True, "colorbar_label": "share of |grad x activation|"})
    figure = task_grid_figure({"a": panel, "b": panel})
    labels = [ax.get_ylabel() for ax in figure.axes]
    assert "share of |grad x activation|" in labels
