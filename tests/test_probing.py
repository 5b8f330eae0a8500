"""Probing: the batched trainer equals scikit-learn; planted layers are found; bad input refused."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from mechkit.data import ProbeDataset
from mechkit.data.prompts import Prompt
from mechkit.errors import MechkitError
from mechkit.probing import fit_probes, probe_layers, probe_positions
from mechkit.probing.evaluate import evaluate_cells, group_splits


def planted(n=400, d=32, layers=8, signal_layers=(3, 5), seed=0):
    """Features where the label is linearly encoded only in ``signal_layers``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    X = rng.normal(size=(layers, n, d))
    direction = rng.normal(size=d)
    for layer in (l for l in signal_layers if l < layers):
        X[layer] += np.outer(2 * labels - 1, direction) * 0.8
    return torch.tensor(X, dtype=torch.float32), labels


@pytest.mark.parametrize("balanced", [False, True])
def test_batched_trainer_equals_sklearn(balanced):
    X, labels = planted(n=300, d=24, layers=4)
    labels[:60] = 1  # some imbalance
    probe = fit_probes(X, torch.tensor(labels), C=0.5, balanced=balanced)
    for cell in range(4):
        Z = StandardScaler().fit_transform(X[cell].double().numpy())
        ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000, class_weight="balanced" if balanced else None)
        ref.fit(Z, labels)
        # float32 L-BFGS against scikit-learn's float64 solution, solved tightly
        np.testing.assert_allclose(probe.weight[cell].numpy(), ref.coef_[0], atol=2e-3)
        np.testing.assert_allclose(probe.bias[cell].item(), ref.intercept_[0], atol=2e-3)
        decision = probe.decision(X)[cell].numpy()
        np.testing.assert_allclose(decision, ref.decision_function(Z), atol=1e-2)


def test_planted_layers_are_decodable_exactly_there():
    X, labels = planted()
    splits = group_splits(len(labels), None, labels, folds=None, test_size=0.25, seed=0)
    mean, _ = evaluate_cells(X, labels, splits)
    f1, auc = mean[:, 1], mean[:, 2]
    assert (f1[[3, 5]] > 0.9).all() and (auc[[3, 5]] > 0.95).all()
    others = [0, 1, 2, 4, 6, 7]
    assert (np.abs(auc[others] - 0.5) < 0.12).all()


def test_group_splits_keep_groups_apart_and_folds_cover_everything():
    labels = np.array([0, 1] * 20)
    groups = [f"g{i // 4}" for i in range(40)]
    (train, test), = group_splits(40, groups, labels, folds=None, test_size=0.3, seed=1)
    assert not {groups[i] for i in train} & {groups[i] for i in test}
    folds = group_splits(40, groups, labels, folds=5, test_size=0.3, seed=1)
    assert sorted(np.concatenate([t for _, t in folds]).tolist()) == list(range(40))


def test_bad_input_is_explained():
    X, labels = planted(n=40, layers=2)
    with pytest.raises(MechkitError, match="both classes"):
        fit_probes(X, torch.zeros(40, dtype=torch.long))
    with pytest.raises(MechkitError, match="one per example"):
        fit_probes(X, torch.zeros(39, dtype=torch.long))
    X[1, 3, 2] = float("nan")
    with pytest.raises(MechkitError, match=r"NaN or infinite values \(cells \[1\]\)"):
        fit_probes(X, torch.tensor(labels))
    with pytest.raises(MechkitError, match="5 folds need"):
        group_splits(6, None, np.array([0, 1, 0, 1, 0, 0]), folds=5, test_size=0.2, seed=0)
    with pytest.raises(MechkitError, match="labels must be 0 or 1"):
        ProbeDataset("x", ["a", "b"], [0, 2])
    with pytest.raises(MechkitError, match="2 prompts but 3 labels"):
        ProbeDataset("x", ["a", "b"], [0, 1, 1])


WORDS_TRUE = ["Paris", "Rome"]


def token_dataset(n=60):
    """The label is which word ends the prompt: decodable at every layer of any model."""
    rng = np.random.default_rng(0)
    prompts, labels, groups = [], [], []
    for i in range(n):
        label = i % 2
        filler = " ".join(f"w{int(x)}" for x in rng.integers(1, 30, 3))
        text = f"the capital {filler} is {WORDS_TRUE[label]}"
        prompts.append(Prompt(text, spans={"answer": (len(text) - len(WORDS_TRUE[label]), len(text))}))
        labels.append(label)
        groups.append(filler)
    return ProbeDataset("tokens", prompts, labels, groups)


def test_probe_layers_on_tiny_models_with_padding_and_control(tiny_llama):
    from mechkit.models.synthetic import tiny_model

    deeper = tiny_model("gemma3", n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, seed=3)
    result = probe_layers([tiny_llama, deeper], token_dataset(), ["resid_post", "attn_out"], progress=False)
    scores = result.scores
    assert scores.axes == ("model", "stream", "layer", "metric") and scores.shape == (2, 2, 4, 3)
    resid_auc = scores.sel(stream="resid_post", metric="auc").values
    assert np.isnan(resid_auc[0, 3]) and not np.isnan(resid_auc[1, 3])  # 3-layer model padded
    assert np.nanmin(resid_auc) > 0.95
    control = result.control.sel(stream="resid_post", metric="auc").values
    assert np.nanmax(np.abs(control - 0.5)) < 0.3
    assert scores.attrs["split"] == "by group"
    with pytest.raises(MechkitError, match="unknown stream"):
        probe_layers(tiny_llama, token_dataset(), ["resid"], progress=False)


def test_probe_positions_reports_missing_positions(tiny_llama):
    data = token_dataset()
    data.prompts[0] = Prompt(data.prompts[0].text)  # no answer span
    result = probe_positions(tiny_llama, data, ["first_answer", "second_answer", -1, -2], progress=False)
    counts = result.scores.attrs["examples_per_position"]
    assert counts == {"first_answer": 59, "second_answer": 0, "-1": 60, "-2": 60}
    auc = result.scores.sel(metric="auc").values
    assert np.isnan(auc[:, 1]).all()  # no example has a second answer token
    assert (auc[:, [0, 2]] > 0.95).all()  # the answer token is the last token
    with pytest.raises(MechkitError, match="lack a requested named position"):
        probe_positions(tiny_llama, data, ["first_answer"], strict=True, progress=False)


def test_dataset_files(tmp_path):
    (tmp_path / "d.csv").write_text("text,label,group\nIt is good,1,a\nIt is bad,0,b\n")
    data = ProbeDataset.from_file(tmp_path / "d.csv")
    assert data.labels.tolist() == [1, 0] and data.groups == ["a", "b"]
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(MechkitError, match="lacks a 'text' or 'label'"):
        ProbeDataset.from_file(tmp_path / "d.jsonl")
    (tmp_path / "chat.csv").write_text("text,label,chat\nHi,1,false\nHo,0,true\n")
    assert [p.chat for p in ProbeDataset.from_file(tmp_path / "chat.csv").prompts] == [False, True]
    for body, message in (("text,label\nHi,\n", "labels must be 0 or 1"), ("text,label\nHi,2\n", "labels must be 0 or 1"),
                          ("text,label,group\nHi,1,a\nHo,0,\n", "some records have a 'group'")):
        (tmp_path / "bad.csv").write_text(body)
        with pytest.raises(MechkitError, match=message):
            ProbeDataset.from_file(tmp_path / "bad.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": "x", "label": 1.7}\n')
    with pytest.raises(MechkitError, match="labels must be 0 or 1"):
        ProbeDataset.from_file(tmp_path / "bad.jsonl")


def test_true_false_and_sentiment_builtins_are_balanced_and_grouped():
    from mechkit.data.probing_sets import sentiment, true_false

    data = true_false(per_relation=10)
    assert data.class_counts()[0] == data.class_counts()[1] == len(data) // 2
    assert len(set(data.groups)) == len(data) // 2  # a subject's true and false statement share a group
    assert data.prompts[0].text.endswith(".")
    sent = sentiment()
    assert sent.class_counts() == {0: 110, 1: 110}


def test_qa_answers_are_located_in_generations():
    from mechkit.probing.qa import is_correct, locate_answer

    assert locate_answer("capital", " Paris, the city of light.") == (1, 6)
    assert locate_answer("year", " It ended in 1945.") == (13, 17)
    assert locate_answer("capital", " I do not know.") is None
    text = " Charlotte Brontë wrote it."
    start, end = locate_answer("author", text)
    assert text[start:end] == "Charlotte Brontë"  # the longest candidate wins over "Brontë"
    assert is_correct({"answer": "Kyiv", "aliases": ["Kiev"]}, "kiev")


def test_relative_alignment_and_result_round_trip(tiny_llama, tmp_path):
    from mechkit.models.synthetic import tiny_model
    from mechkit.probing import ProbeResult

    deeper = tiny_model("llama", n_layers=5, d_model=32, n_heads=4, n_kv_heads=2, seed=2)
    result = probe_layers([tiny_llama, deeper], token_dataset(), ["resid_post"], align="relative", control=1,
                          progress=False)
    assert result.scores.labels["layer"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert not np.isnan(result.scores.values).any()  # every model fills every relative-depth bin
    result.save(tmp_path / "probe")
    back = ProbeResult.load(tmp_path / "probe")
    assert back.scores == result.scores and back.control == result.control
