"""Head attribution: a planted head is found by every method; AtP is exact where the model is
linear in the patched activation; task files and bad input fail clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechkit.data.tasks import TASK_NAMES, Task, builtin_task, select_tasks, tokenise_task
from mechkit.errors import MechkitError
from mechkit.heads.attribution import METHODS, attribute_heads, task_metric
from mechkit.heads.interventions import zero_heads
from mechkit.heads.patching import metric, metric_positions, run_to_logits, task_batches
from mechkit.models.synthetic import _layer, set_head_ov, tiny_model

WORDS = [f"w{i}" for i in range(60)]
ANSWERS = WORDS[:20]
PLANTED = (0, 2)


def copy_task(n: int = 12) -> Task:
    """"f1 f2 X f3" -> X, corrupted "f1 f2 Y f3" -> Y, with X, Y from the planted head's tokens."""
    fillers = WORDS[30:]
    clean, corrupted, answers, wrong = [], [], [], []
    for i in range(n):
        x, y = ANSWERS[i % 20], ANSWERS[(i + 7) % 20]
        f = fillers[i % 25: i % 25 + 3]
        clean.append(f"{f[0]} {f[1]} {x} {f[2]}")
        corrupted.append(f"{f[0]} {f[1]} {y} {f[2]}")
        answers.append(f" {x}")
        wrong.append(f" {y}")
    return Task("copy", tuple(clean), tuple(answers), tuple(corrupted), tuple(wrong))


@torch.no_grad()
def planted_model(arch: str):
    """Head (0, 2) attends uniformly (zero queries) and copies the 20 answer tokens to the
    logits; every other head's output weights are shrunk, so it alone carries the answer."""
    model = tiny_model(arch, words=WORDS, n_layers=3, n_heads=4, n_kv_heads=4, d_head=24, d_model=96, seed=1)
    cfg = model.cfg
    ids = torch.tensor([model.tokenizer.convert_tokens_to_ids(w) for w in ANSWERS])
    x = model.blocks[0].ln1(model.embed(ids[None]))[0].float()  # what layer 0's heads read
    W_V = torch.zeros(cfg.d_model, cfg.d_head)
    W_V[:, :20] = torch.linalg.pinv(x)
    W_O = torch.zeros(cfg.d_head, cfg.d_model)
    W_O[:20] = 40 * model.W_U.T[ids] / model.W_U.T[ids].norm(dim=-1, keepdim=True)
    set_head_ov(model, *PLANTED, W_V, W_O)
    for layer in range(cfg.n_layers):
        block = _layer(model, layer)
        if hasattr(block, "post_feedforward_layernorm"):  # Gemma rescales MLP outputs to unit RMS x (1 + w)
            block.post_feedforward_layernorm.weight[:] = -0.95
            # and each attention output too, however small its heads' weights; the planted
            # head's layer is amplified instead (the norm would cap its output at unit RMS)
            block.post_attention_layernorm.weight[:] = 20.0 if layer == PLANTED[0] else -0.95
        attn = block.self_attn
        d = cfg.d_head
        for head in range(cfg.n_heads):
            if (layer, head) == PLANTED:
                attn.q_proj.weight[head * d:(head + 1) * d] = 0.0  # uniform attention
            else:
                attn.o_proj.weight[:, head * d:(head + 1) * d] *= 0.05
    return model


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def planted(request):
    return planted_model(request.param)


def test_the_planted_head_carries_the_answer(planted):
    task = copy_task()
    before = task_metric(planted, task)
    assert before["clean"] > 1.0 and before["significant"] and before["corrupted"] < -1.0
    tok = tokenise_task(planted, task)
    with zero_heads(planted, [PLANTED]), torch.no_grad():
        after = np.concatenate([metric(b, run_to_logits(planted, b.clean, metric_positions(b))).numpy()
                                for b in task_batches(tok, 32)])
    assert abs(after.mean()) < 0.2 * before["clean"]  # removing it takes the behaviour away


@pytest.mark.parametrize("method", METHODS)
def test_every_method_ranks_the_planted_head_first(planted, method):
    scores = attribute_heads(planted, copy_task(), method, progress=False)
    assert scores.axes == ("layer", "head") and scores.values.shape == (3, 4)
    flat = np.abs(scores.values) if method in ("atp*",) else scores.values
    assert np.unravel_index(np.argmax(flat), flat.shape) == PLANTED, scores.values
    assert scores.attrs["baseline"]["significant"]


@torch.no_grad()
def test_atp_equals_patching_where_the_model_is_linear_in_the_head():
    # The last layer's MLP writes nothing and a huge constant residual component fixes the
    # final norm's scale, so the metric is linear (to float precision) in the last layer's heads.
    model = tiny_model("llama", words=WORDS, n_layers=2, n_heads=4, n_kv_heads=4, d_model=64, seed=3)
    _layer(model, 1).mlp.down_proj.weight.zero_()
    _layer(model, 1).self_attn.o_proj.weight *= 50.0  # effects well above float noise
    hf = model.original_model
    hf.model.embed_tokens.weight += 300.0 * torch.nn.functional.normalize(torch.randn(64), dim=0)
    task = copy_task(8)
    exact = attribute_heads(model, task, "patching", progress=False).values[1]
    atp = attribute_heads(model, task, "atp", progress=False).values[1]
    assert np.abs(exact).max() > 1e-3
    np.testing.assert_allclose(atp, exact, rtol=2e-2, atol=2e-3 * np.abs(exact).max())


def test_corruptions_and_unpaired_tasks(planted):
    task = copy_task()
    unpaired = Task("copy-lp", task.clean, task.answers)
    for corruption in ("mean", "zero", "resample"):
        scores = attribute_heads(planted, unpaired, "patching", corruption=corruption, progress=False)
        assert np.isfinite(scores.values).all()
        assert scores.attrs["baseline"]["metric"] == "answer_logprob"
    with pytest.raises(MechkitError, match="no corrupted twins"):
        attribute_heads(planted, unpaired, "atp", corruption="paired")
    with pytest.raises(MechkitError, match="unknown method"):
        attribute_heads(planted, task, "gradient")


def test_task_files_fail_clearly(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"clean": "a b", "answer": " c"}) + "\n" + json.dumps({"clean": "a"}) + "\n")
    with pytest.raises(MechkitError, match=r"t.jsonl:2: missing field\(s\) \['answer'\]"):
        Task.from_file(path)
    path.write_text(json.dumps({"clean": "a", "answer": " b", "corrupted": "c"}) + "\n")
    with pytest.raises(MechkitError, match="both"):
        Task.from_file(path)
    path.write_text("{not json\n")
    with pytest.raises(MechkitError, match="not valid JSON"):
        Task.from_file(path)
    with pytest.raises(MechkitError, match="unknown task"):
        builtin_task("astrology")
    clash = tmp_path / "retrieval.jsonl"  # named like a built-in task: its results would overwrite the built-in's
    clash.write_text(json.dumps({"clean": "a", "answer": " b"}) + "\n")
    with pytest.raises(MechkitError, match="two tasks are both named 'retrieval'"):
        select_tasks(["retrieval", str(clash)])
    path.write_text(json.dumps({"clean": "a", "answer": " b"}) + "\n")
    assert [t.name for t in select_tasks(["retrieval", "retrieval", str(path)], examples=1)] == ["retrieval", "t"]


def test_length_mismatch_and_multi_token_answers_are_dropped_with_reasons():
    model = tiny_model("llama", words=WORDS, n_layers=1, seed=0)
    task = Task("t", ("w1 w2 w3", "w1 w2 w3", "w1 w2", "w1 w2"), (" w4", " w4 w5", " w6", " w6"),
                ("w1 w2 w3 w3", "w1 w2 w9", "w1 w8", "w1 w9"), (" w7", " w7", " w6", " w5"))
    tok = tokenise_task(model, task)
    assert tok.kept == [3]
    assert "corrupted twin is" in tok.dropped[0] and "not one each" in tok.dropped[1]
    assert "same token" in tok.dropped[2]
    with pytest.raises(MechkitError, match="no example is usable"):
        tokenise_task(model, Task("t", task.clean[:3], task.answers[:3], task.corrupted[:3], task.corrupted_answers[:3]))


def test_a_constant_metric_is_refused():
    model = tiny_model("llama", words=WORDS, n_layers=2, seed=0)
    with torch.no_grad():
        model.original_model.lm_head.weight.zero_()  # every logit 0 whatever the heads do
    with pytest.raises(MechkitError, match="zero gradient"):
        attribute_heads(model, copy_task(4), "atp", progress=False)


def test_builtin_tasks_load():
    for name in TASK_NAMES:
        task = builtin_task(name)
        assert len(task) >= 40 and task.paired


@pytest.mark.real
def test_atp_tracks_patching_on_a_real_task(smollm2):
    task = builtin_task("knowledge_recall")
    task = Task(task.name, task.clean[:6], task.answers[:6], task.corrupted[:6], task.corrupted_answers[:6])
    exact = attribute_heads(smollm2, task, "patching", progress=False)
    atp = attribute_heads(smollm2, task, "atp", progress=False)
    from scipy.stats import spearmanr

    assert spearmanr(exact.values.ravel(), atp.values.ravel()).statistic > 0.5
    top_exact = set(np.argsort(-exact.values.ravel())[:10])
    assert len(top_exact & set(np.argsort(-atp.values.ravel())[:10])) >= 4
    assert atp.attrs["seconds"] < exact.attrs["seconds"]


@pytest.mark.parametrize("method", ["patching", "atp", "atp*"])
def test_query_key_value_nodes_find_the_planted_heads_value(planted, method):
    scores = attribute_heads(planted, copy_task(), method, nodes="qkv", progress=False)
    assert scores.axes == ("layer", "head", "node") and scores.labels["node"] == ["q", "k", "v"]
    flat = np.abs(scores.values)
    assert np.unravel_index(np.argmax(flat), flat.shape) == (*PLANTED, 2)  # its value node
    assert flat[(*PLANTED, 0)] < 1e-3 * flat.max()  # its queries are zero in every run


@torch.no_grad()
def test_the_qk_fix_is_exact_where_the_metric_is_linear_in_the_pattern():
    # As in the linear test above: downstream of layer 1's attention pattern the metric is linear,
    # so recomputing the softmax exactly (AtP*'s QK fix) leaves almost no error for its query/key
    # nodes (what remains is the final norm's scale, nearly fixed by a large constant component).
    model = tiny_model("llama", words=WORDS, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, seed=3)
    _layer(model, 1).mlp.down_proj.weight.zero_()
    _layer(model, 1).self_attn.o_proj.weight *= 50.0
    _layer(model, 1).self_attn.q_proj.weight *= 8.0  # sharper attention, larger key effects
    model.original_model.model.embed_tokens.weight += 300.0 * torch.nn.functional.normalize(torch.randn(64), dim=0)
    task = copy_task(8)
    exact = attribute_heads(model, task, "patching", nodes="qkv", magnitude=True, progress=False).values[1, :, :2]
    fixed = attribute_heads(model, task, "atp*", nodes="qkv", progress=False).values[1, :, :2]
    real = exact > 0.05 * exact.max()  # nodes whose effect stands above float noise
    assert exact.max() > 1e-2 and real.sum() >= 2
    np.testing.assert_allclose(fixed[real], exact[real], rtol=0.1)


def test_the_qk_fix_tracks_patching_better_than_plain_atp_on_key_nodes():
    from scipy.stats import spearmanr

    model = tiny_model("llama", n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, seed=4)
    words = model.tokenizer.convert_ids_to_tokens(list(range(4, 30)))
    task = Task("toy", tuple(" ".join(words[i:i + 5]) for i in range(12)), tuple(f" {words[i + 6]}" for i in range(12)),
                tuple(" ".join(words[i + 1:i + 6]) for i in range(12)), tuple(f" {words[i + 8]}" for i in range(12)))
    exact = attribute_heads(model, task, "patching", nodes="qkv", magnitude=True, progress=False).values[..., 1]
    fixed = attribute_heads(model, task, "atp*", nodes="qkv", progress=False).values[..., 1]
    linear = attribute_heads(model, task, "atp", nodes="qkv", magnitude=True, progress=False).values[..., 1]
    rho_fixed = spearmanr(exact.ravel(), fixed.ravel()).statistic
    assert rho_fixed > 0.85 and rho_fixed > spearmanr(exact.ravel(), linear.ravel()).statistic + 0.2


def test_qkv_nodes_refuse_what_they_cannot_do(planted):
    with pytest.raises(MechkitError, match="scored by"):
        attribute_heads(planted, copy_task(), "dla", nodes="qkv")
    with pytest.raises(MechkitError, match="rotary"):
        attribute_heads(planted, copy_task(), "atp", nodes="qkv", corruption="mean", progress=False)
    with pytest.raises(MechkitError, match="nodes must be"):
        attribute_heads(planted, copy_task(), "atp", nodes="heads")


def test_atp_takes_its_baseline_from_its_own_runs_and_equals_the_separate_computation():
    """AtP with paired corruption reuses its clean and corrupted runs for the task baseline: same
    scores and same baseline as caching, differentiating and ``task_metric`` separately."""
    import numpy as np

    import mechkit.heads.attribution as attribution
    from mechkit.data.tasks import Task
    from mechkit.models.synthetic import tiny_model, word_vocabulary

    w = word_vocabulary(60)
    model = tiny_model("llama", n_layers=3, d_model=32, n_heads=4, d_mlp=64, n_kv_heads=2)
    task = Task("t", tuple(f"{w[i]} {w[i + 1]} {w[i + 2]}" for i in range(10)), tuple(" " + w[20 + i] for i in range(10)),
                tuple(f"{w[i + 1]} {w[i]} {w[i + 2]}" for i in range(10)), tuple(" " + w[40 + i] for i in range(10)))
    fast = attribution.attribute_heads(model, task, "atp", batch_size=4, progress=False)
    tok = attribution.tokenise_task(model, task)
    per_example = torch.zeros(3, 4, len(tok.kept))
    for batch in attribution.task_batches(tok, 4):
        per_example[..., batch.index] = attribution._atp(attribution._cache_z(model, batch.clean),
                                                         attribution._cache_z(model, batch.corrupted),
                                                         attribution._gradients(model, batch))
    np.testing.assert_allclose(fast.values, per_example.mean(-1).numpy(), rtol=1e-6, atol=1e-7)
    separate = attribution.task_metric(model, task, batch_size=4)
    for key in ("clean", "ci", "corrupted", "significant", "n"):
        assert fast.attrs["baseline"][key] == pytest.approx(separate[key]), key
