import numpy as np
import pytest

from mechkit.heads.classification import CATEGORY_LABELS
from mechkit.results import LabelledArray, Provenance
from mechkit.viz import category_map_figure, relation_scores_figure, save


def category_map(model, n_layers, n_heads, seed):
    rng = np.random.default_rng(seed)
    return LabelledArray(rng.integers(0, 8, (n_layers, n_heads)), ("layer", "head"),
                         name="category", provenance=Provenance(model=model), attrs={"codes": list(CATEGORY_LABELS)})


def test_category_map_has_one_panel_per_model_and_the_eight_colour_legend(tmp_path):
    fig = category_map_figure([category_map("gemma", 18, 4, 0), category_map("smol", 30, 9, 1)])
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["gemma", "smol"]
    assert axes[0].images[0].get_array().shape == (4, 18)  # head (y) x layer (x)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["Unclassified", "Algorithmic", "Knowledge", "Linguistic", "Translation",
                      "2 categories", "3 categories", "4 categories"]
    png, svg = save(fig, tmp_path / "map")
    assert png.stat().st_size > 10_000
    text = svg.read_text()
    assert "Translation" in text and "Layer" in text and "Head" in text


def test_relation_scores_figure_labels_relations(tmp_path):
    scores = LabelledArray(np.random.default_rng(0).random((3, 4, 2)), ("layer", "head", "relation"),
                           {"relation": ["country_to_capital", "antonym"]}, provenance=Provenance(model="m"))
    fig = relation_scores_figure(scores, threshold=0.15)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["country to capital", "antonym"]
    assert ax.images[0].get_array().shape == (2, 12)


def test_empty_input_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        category_map_figure([])
