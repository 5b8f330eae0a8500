"""Function heads: planted per-head features are found, features come from hook_z, interventions bite."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechkit.data.function_chains import FUNCTIONS, SubQuestion, function_dataset
from mechkit.errors import MechkitError
from mechkit.heads.function_features import HeadFeatures, head_features, is_content
from mechkit.heads.function_heads import FunctionHeads, elbow, function_heads
from mechkit.heads.function_interventions import gold_answer_scores, intervention_table
from mechkit.models.loading import model_info
from mechkit.models.synthetic import tiny_model

N_LAYERS, N_HEADS, D_HEAD = 3, 4, 8


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=N_LAYERS, d_model=32, n_heads=N_HEADS, n_kv_heads=2, d_mlp=64, seed=3)


def planted_features(model, per_function: int = 40, seed: int = 0):
    """Head features where function f is carried only by head ``carriers[f]`` (one head each, 8 of the
    12), every other head noise; sub-questions are the built-in ones (for chain ids and labels)."""
    rng = np.random.default_rng(seed)
    subquestions = function_dataset(per_function=per_function, seed=seed)
    labels = np.array([FUNCTIONS.index(sq.function) for sq in subquestions])
    X = rng.normal(size=(len(labels), N_LAYERS * N_HEADS, D_HEAD))
    carriers = rng.permutation(N_LAYERS * N_HEADS)[:len(FUNCTIONS)]
    for f, head in enumerate(carriers):
        direction = rng.normal(size=D_HEAD)
        X[labels == f, head] += 3.0 * direction / np.linalg.norm(direction)
    info = model_info(model)
    features = HeadFeatures(torch.tensor(X, dtype=torch.float32), labels, subquestions,
                            [sq.answer for sq in subquestions], N_LAYERS, N_HEADS, "gold", False, info.name,
                            info.weights_hash(model))
    return features, {name: (int(carriers[f] // N_HEADS), int(carriers[f] % N_HEADS)) for f, name in enumerate(FUNCTIONS)}


@pytest.mark.parametrize("family, epochs", [("logistic", None), ("mlp", 40)])
def test_planted_function_heads_are_selected(model, family, epochs):
    features, carriers = planted_features(model)
    result = function_heads(model, features=features, family=family, select=1, null_seeds=2, epochs=epochs,
                            progress=False)
    assert result.importance.axes == ("function", "layer", "head")
    assert result.importance.values.shape == (len(FUNCTIONS), N_LAYERS, N_HEADS)
    for name, head in carriers.items():
        assert result.selected[name] == [head], (name, result.selected[name], head)  # precision and recall 1
        assert result.above_null()[FUNCTIONS.index(name), head[0], head[1]]
    assert result.scores["head_probe"]["accuracy"] > 0.5 > result.scores["head_probe"]["majority_baseline"]
    np.testing.assert_allclose(result.normalised.values.sum(axis=(1, 2)), 1.0, rtol=1e-5)


def test_shuffled_labels_find_nothing_above_the_null(model):
    features, _ = planted_features(model)
    features.features = torch.randn_like(features.features)  # no head carries anything
    result = function_heads(model, features=features, select="elbow", null_seeds=3, progress=False)
    assert result.above_null().mean() < 0.1
    assert result.scores["head_probe"]["accuracy"] < 0.35


def test_elbow():
    assert elbow(np.array([10.0, 9.5, 1.0, 0.9, 0.8, 0.7])) == 2
    assert elbow(np.array([5.0, 0.1, 0.1, 0.1])) == 1
    assert elbow(np.ones(5)) == 1


def test_head_features_read_hook_z_over_the_answer(model):
    subquestions = function_dataset(per_function=2, seed=1)
    gold = head_features(model, subquestions, answer="gold", layer_mean=True, progress=False)
    assert gold.features.shape == (len(subquestions), N_LAYERS * N_HEADS, 2 * model.cfg.d_head)
    # the appended half is the layer's mean head output
    per_layer = gold.features.reshape(len(subquestions), N_LAYERS, N_HEADS, -1)
    d = model.cfg.d_head
    torch.testing.assert_close(per_layer[..., d:], per_layer[..., :d].mean(2, keepdim=True).expand(-1, -1, N_HEADS, -1))
    last = head_features(model, subquestions, answer="last_prompt", layer_mean=False, progress=False)
    # by hand: hook_z at the last prompt token of the first sub-question
    ids = torch.tensor([[model.tokenizer.bos_token_id]
                        + model.tokenizer(subquestions[0].prompt, add_special_tokens=False)["input_ids"]])
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_z"))
    expected = torch.cat([cache[f"blocks.{l}.attn.hook_z"][0, -1] for l in range(N_LAYERS)])
    torch.testing.assert_close(last.features[0], expected, atol=1e-5, rtol=1e-5)
    assert set(gold.residual) == {"middle (layer 1)", "last (layer 2)"}


def test_content_filter():
    assert is_content(" Paris") and is_content("42") and not is_content(" the") and not is_content(".")


def test_features_from_another_model_are_refused(model):
    features, _ = planted_features(model, per_function=6)
    other = tiny_model("llama", n_layers=N_LAYERS, d_model=32, n_heads=N_HEADS, n_kv_heads=2, d_mlp=64, seed=4)
    with pytest.raises(MechkitError, match="collect them on this model"):
        function_heads(other, features=features, progress=False)


def test_bad_input_fails_clearly(model):
    features, _ = planted_features(model, per_function=6)
    with pytest.raises(MechkitError, match="family"):
        function_heads(model, features=features, family="forest", progress=False)
    with pytest.raises(MechkitError, match="select"):
        function_heads(model, features=features, select=0, progress=False)
    few = [sq for sq in function_dataset(per_function=6) if sq.function != "inference"] + \
        [SubQuestion("Is it hot?", "yes", "inference", chain_id="only")]
    info = model_info(model)
    labels = np.array([FUNCTIONS.index(sq.function) for sq in few])
    thin = HeadFeatures(torch.randn(len(few), N_LAYERS * N_HEADS, D_HEAD), labels, few, [sq.answer for sq in few],
                        N_LAYERS, N_HEADS, "gold", False, info.name, info.weights_hash(model))
    with pytest.raises(MechkitError, match="needs at least 2 and 1"):
        function_heads(model, features=thin, progress=False)
    with pytest.raises(MechkitError, match="answer must be"):
        head_features(model, few[:2], answer="sampled")


# -- interventions on a model where one head alone carries the answer ----------------------------
class BareSubQuestion(SubQuestion):
    """The question alone as the prompt (the tiny word-level tokenizer knows no "Q:" / "A:")."""

    @property
    def prompt(self) -> str:
        return self.question


def _copy_items(n: int = 12) -> list[SubQuestion]:
    from test_head_attribution import ANSWERS, WORDS

    fillers = WORDS[30:]
    return [BareSubQuestion(f"{fillers[i % 25]} {fillers[i % 25 + 1]} {ANSWERS[i % 20]} {fillers[i % 25 + 2]}",
                        ANSWERS[i % 20], "retrieval", chain_id=f"c{i}") for i in range(n)]


def test_removing_the_planted_head_takes_the_function_away():
    from test_head_attribution import PLANTED, planted_model

    planted = planted_model("llama")
    items = _copy_items()
    logprob, correct = gold_answer_scores(planted, items)
    assert np.isfinite(logprob).all()
    selected = {name: [PLANTED] if name == "retrieval" else [(2, 0)] for name in FUNCTIONS}
    from mechkit.results import LabelledArray

    dummy = LabelledArray(np.zeros((8, 3, 4)), ("function", "layer", "head"))
    result = FunctionHeads(dummy, LabelledArray(np.zeros(8), ("function",)), selected, {}, np.arange(len(items)))
    table = intervention_table(planted, result, items, random_draws=5, progress=False)
    retrieval = table.sel(function="retrieval")
    accuracy = dict(zip(retrieval.labels["condition"], retrieval.sel(measure="accuracy").values))
    logprob = dict(zip(retrieval.labels["condition"], retrieval.sel(measure="logprob").values))
    assert accuracy["base"] == pytest.approx(correct.mean())
    assert logprob["remove own"] < logprob["base"] - 1.0  # removing its head takes the answer away ...
    assert logprob["remove random"] > logprob["base"] - 0.5  # ... removing one random head does not
    assert logprob["augment x1.5"] > logprob["base"] and accuracy["augment x4"] >= 0.9 > accuracy["remove own"]
    assert np.isnan(table.sel(function="inference").values).all()  # no items of that function here


def test_probe_vs_cause_agrees_where_the_probe_is_the_cause():
    from test_head_attribution import PLANTED, planted_model

    from mechkit.heads.attribution import attribute_heads
    from mechkit.heads.function_interventions import as_task
    from mechkit.heads.function_vs_cause import probe_vs_cause
    from mechkit.results import LabelledArray

    planted = planted_model("llama")
    items = _copy_items()
    atp = attribute_heads(planted, as_task("retrieval", items), "atp", corruption="mean", progress=False).values
    importance = np.zeros((8, 3, 4))
    importance[FUNCTIONS.index("retrieval")] = np.abs(atp)  # a "probe" that reads exactly the causal map
    result = FunctionHeads(LabelledArray(importance, ("function", "layer", "head")),
                           LabelledArray(np.zeros(8), ("function",)), {}, {}, np.arange(len(items)))
    table, maps = probe_vs_cause(planted, result, items, patch_top=2, patch_random=2, progress=False)
    row = dict(zip(table.labels["measure"], table.sel(function="retrieval").values))
    assert row["spearman_atp"] == pytest.approx(1.0) and row["top10_overlap_atp"] == 1.0
    assert row["n_patched"] == 4 and np.isfinite(row["spearman_patching"])
    patched = maps["patching"].sel(function="retrieval").values
    assert np.isfinite(patched).sum() == 4  # only the chosen heads are patched
    assert np.unravel_index(np.nanargmax(np.abs(patched)), patched.shape) == PLANTED
    assert np.isnan(table.sel(function="inference", measure="spearman_atp").values)  # no items


def test_answer_variants_count_case():
    from mechkit.heads.function_interventions import answer_variants

    assert answer_variants(SubQuestion("Is ice cold?", "yes", "inference")) == [" yes", " Yes"]
    assert answer_variants(SubQuestion("Capital of France?", "Paris", "knowledge_recall")) == [" Paris", " paris"]
    assert answer_variants(SubQuestion("2 plus 3?", "5", "math_calculation")) == [" 5"]


def test_saved_result_keeps_its_held_out_subquestions(model, tmp_path):
    features, _ = planted_features(model, per_function=12)
    result = function_heads(model, features=features, select=2, null_seeds=1, progress=False)
    loaded = FunctionHeads.load(result.save(tmp_path / "fh"))
    assert loaded.test_subquestions() == result.test_subquestions()
    assert loaded.selected == result.selected and loaded.importance == result.importance


def test_head_means_average_every_token(model):
    from mechkit.data.tasks import tokenise_task
    from mechkit.heads.function_interventions import as_task, head_means

    items = function_dataset(per_function=1)[:4]
    means = head_means(model, items, [(0, 1), (2, 3)])
    tok = tokenise_task(model, as_task("means", items))
    zs = {layer: [] for layer in (0, 2)}
    for ids in tok.clean:
        _, cache = model.run_with_cache(ids[None], names_filter=lambda n: n.endswith("hook_z"))
        for layer in zs:
            zs[layer].append(cache[f"blocks.{layer}.attn.hook_z"][0])
    torch.testing.assert_close(means[(0, 1)], torch.cat(zs[0])[:, 1].mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(means[(2, 3)], torch.cat(zs[2])[:, 3].mean(0), atol=1e-5, rtol=1e-5)
