import numpy as np

from mechkit.results import LabelledArray, Provenance
from mechkit.viz import layer_probe_figure, position_probe_figure, save


def test_layer_probe_figure_one_panel_per_stream_with_blank_padding(tmp_path):
    values = np.random.default_rng(0).uniform(0.5, 1, (2, 2, 30, 3))
    values[0, :, 18:] = np.nan  # an 18-layer model beside a 30-layer one
    scores = LabelledArray(values, ("model", "stream", "layer", "metric"),
                           {"model": ["gemma-3-270m", "smollm2"], "stream": ["resid_post", "attn_out"],
                            "metric": ["accuracy", "f1", "auc"]}, attrs={"dataset": "true_false"})
    fig = layer_probe_figure(scores, metric="f1")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["Layer output F1", "MHA output F1"]
    assert np.ma.is_masked(panels[0].images[0].get_array()[0, 20])
    assert [t.get_text() for t in panels[0].get_yticklabels()] == ["gemma-3-270m", "smollm2"]
    _, svg = save(fig, tmp_path / "layers")
    assert "held-out f1" in svg.read_text()


def test_position_probe_figure_labels_positions(tmp_path):
    positions = ["last_q", "exact_answer_first", "-2", "-1"]
    scores = LabelledArray(np.random.default_rng(1).uniform(0.5, 1, (18, 4, 3)), ("layer", "position", "metric"),
                           {"position": positions, "metric": ["accuracy", "f1", "auc"]}, provenance=Provenance(model="m"))
    fig = position_probe_figure(scores)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == positions
    assert ax.get_xlabel() == "Token" and ax.get_ylabel() == "Layer"
    png, _ = save(fig, tmp_path / "positions")
    assert png.stat().st_size > 5_000
