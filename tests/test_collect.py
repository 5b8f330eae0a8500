import numpy as np
import pytest
import torch

from mechkit.activations import Prompt, collect_activations, encode
from mechkit.activations.memory import forward_bytes_per_example, parse_bytes
from mechkit.activations.store import ActivationSet
from mechkit.errors import MechkitError, MemoryBudgetError

PROMPTS = [
    "the capital of France is Paris",
    "the capital of Italy is",
    "a w1 w2 w3 w4 w5 w6 w7 w8",
    "Rome",
    "true or false w9 w10",
]
HOOKS = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z", "blocks.2.hook_attn_out", "blocks.1.hook_mlp_out"]


def reference(model, prompts, hooks, positions):
    """One unpadded run_with_cache per prompt: the ground truth."""
    out = {h: [] for h in hooks}
    for text in prompts:
        ids = torch.tensor([encode(model, Prompt(text)).ids])
        logits, cache = model.run_with_cache(ids)
        for h in hooks:
            acts = logits if h == "logits" else cache[h]
            out[h].append(acts[0, positions])
    return {h: torch.stack(v) for h, v in out.items()}


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_matches_unbatched_run_with_cache(tiny, padding_side, batch_size):
    positions = [-1, 0, 1]
    got = collect_activations(tiny, PROMPTS, HOOKS + ["logits"], positions, batch_size=batch_size,
                              padding_side=padding_side, progress=False)
    want = reference(tiny, PROMPTS, HOOKS + ["logits"], positions)
    for h in HOOKS + ["logits"]:
        torch.testing.assert_close(got[h], want[h], atol=2e-5, rtol=1e-4)
    assert got.examples == list(range(len(PROMPTS)))
    ids = [encode(tiny, Prompt(p)).ids for p in PROMPTS]
    assert got.token_ids[:, 0].tolist() == [i[-1] for i in ids]


def test_stops_after_deepest_layer_and_skips_unembedding(tiny_llama):
    fired = []
    tiny_llama.hook_dict["blocks.2.hook_resid_pre"].add_hook(lambda act, hook: fired.append(hook.name))
    try:
        collect_activations(tiny_llama, PROMPTS, ["blocks.1.hook_resid_post"], [-1], progress=False)
        assert fired == []  # layer 2 never ran
        collect_activations(tiny_llama, PROMPTS[:1], ["blocks.2.hook_resid_post"], [-1], progress=False)
        assert fired  # layer 2 ran (in the dry run and the batch)
    finally:
        tiny_llama.reset_hooks()
    calls = []
    handle = tiny_llama.unembed.register_forward_hook(lambda *a: calls.append(1))
    try:
        collect_activations(tiny_llama, PROMPTS, ["blocks.2.hook_resid_post"], [-1], progress=False)
        assert calls == []
        collect_activations(tiny_llama, PROMPTS[:2], ["logits"], [-1], progress=False)
        assert calls
    finally:
        handle.remove()


def test_named_positions_drop_or_raise(tiny_llama):
    prompts = [Prompt("the capital of France is Paris", spans={"exact_answer": (25, 30)}), Prompt("the capital is")]
    with pytest.raises(MechkitError, match="1 of 2 prompts lack a requested named position"):
        collect_activations(tiny_llama, prompts, ["blocks.0.hook_resid_post"], ["exact_answer_first"], progress=False)
    got = collect_activations(tiny_llama, prompts, ["blocks.0.hook_resid_post"], ["exact_answer_first", -1],
                              on_missing="drop", progress=False)
    assert got.examples == [0] and list(got.dropped) == [1]
    assert got.token_ids.tolist() == [[tiny_llama.tokenizer.convert_tokens_to_ids("Paris")] * 2]


def test_bad_input_is_explained(tiny_llama):
    with pytest.raises(MechkitError, match="hook 'blocks.0.hook_resid_postt' does not exist.*Close"):
        collect_activations(tiny_llama, PROMPTS, ["blocks.0.hook_resid_postt"], progress=False)
    with pytest.raises(MechkitError, match="empty"):
        collect_activations(tiny_llama, [], ["blocks.0.hook_resid_post"], progress=False)
    with pytest.raises(MechkitError, match="outside a prompt of 2 tokens"):
        collect_activations(tiny_llama, ["Rome"], ["blocks.0.hook_resid_post"], [-3], progress=False)
    long = " ".join(["w1"] * 200)
    with pytest.raises(MechkitError, match="prompt 1 has 201 tokens, more than the model's context window of 128"):
        collect_activations(tiny_llama, ["Rome", long], ["blocks.0.hook_resid_post"], progress=False)


def test_memory_bound_is_planned_before_running(tiny_llama):
    per_example = forward_bytes_per_example(tiny_llama.cfg, 11, logits=False)
    with pytest.raises(MemoryBudgetError, match="too small for even one example"):
        collect_activations(tiny_llama, PROMPTS, ["blocks.0.hook_resid_post"], max_memory=per_example // 2,
                            progress=False)
    with pytest.raises(MemoryBudgetError, match="stream them to disk with out=PATH"):
        collect_activations(tiny_llama, PROMPTS * 50, ["blocks.0.hook_resid_post"], max_memory=20_000,
                            progress=False)
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("1 MiB") == 2**20
    with pytest.raises(MemoryBudgetError, match="cannot read memory size"):
        parse_bytes("lots")


def test_streaming_to_disk_equals_memory_and_resumes(tiny_llama, tmp_path, monkeypatch):
    in_memory = collect_activations(tiny_llama, PROMPTS, HOOKS, [-1, 0], batch_size=2, progress=False)
    out = tmp_path / "acts"

    import mechkit.activations.collect as collect

    real_run, calls = collect._run, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # call 1 is the shape dry run, call 2 the first batch
            raise KeyboardInterrupt  # interrupted mid-run
        return real_run(*args, **kwargs)

    monkeypatch.setattr(collect, "_run", flaky)
    with pytest.raises(KeyboardInterrupt):
        collect_activations(tiny_llama, PROMPTS, HOOKS, [-1, 0], batch_size=2, out=out, progress=False)
    assert not out.exists() and (tmp_path / "acts.partial").exists()
    with pytest.raises(FileNotFoundError, match="unfinished run"):
        ActivationSet.load(out)
    monkeypatch.setattr(collect, "_run", real_run)
    resumed_calls = []
    monkeypatch.setattr(collect, "_run", lambda *a, **k: resumed_calls.append(1) or real_run(*a, **k))
    streamed = collect_activations(tiny_llama, PROMPTS, HOOKS, [-1, 0], batch_size=2, out=out, progress=False)
    assert len(resumed_calls) == 3  # the dry run, then 2 of 3 batches: the first was already on disk
    assert out.exists() and not (tmp_path / "acts.partial").exists()
    for h in HOOKS:
        np.testing.assert_array_equal(streamed[h].numpy(), in_memory[h].numpy())
    reloaded = ActivationSet.load(out)
    assert reloaded.examples == in_memory.examples and reloaded.positions == ["-1", "0"]
    assert reloaded.provenance.data_hash == in_memory.provenance.data_hash


def test_provenance_identifies_model_and_data(tiny_llama):
    a = collect_activations(tiny_llama, PROMPTS, ["blocks.0.hook_resid_post"], progress=False)
    b = collect_activations(tiny_llama, PROMPTS[:2], ["blocks.0.hook_resid_post"], progress=False)
    assert a.provenance.model == "tiny-llama-s0" and len(a.provenance.weights_hash) == 16
    assert a.provenance.weights_hash == b.provenance.weights_hash
    assert a.provenance.data_hash != b.provenance.data_hash


def test_missing_positions_as_nan(tiny_llama):
    prompts = [Prompt("the capital of France is Paris", spans={"answer": (25, 30)}), Prompt("the capital is")]
    got = collect_activations(tiny_llama, prompts, ["blocks.0.hook_resid_post"], ["first_answer", -1],
                              on_missing="nan", progress=False)
    acts = got["blocks.0.hook_resid_post"]
    assert got.examples == [0, 1] and not got.dropped
    assert torch.isnan(acts[1, 0]).all() and torch.isfinite(acts[1, 1]).all() and torch.isfinite(acts[0]).all()
    assert got.token_ids[1, 0] == -1


def test_attention_patterns_are_refused_with_a_pointer(tiny_llama):
    with pytest.raises(MechkitError, match="not by token position"):
        collect_activations(tiny_llama, PROMPTS, ["blocks.0.attn.hook_pattern"], progress=False)


def test_shapes_come_from_a_dry_run(tiny_llama):
    hooks = ["blocks.1.attn.hook_k", "blocks.1.mlp.hook_post", "blocks.0.attn.hook_q"]
    got = collect_activations(tiny_llama, PROMPTS, hooks, [-1], progress=False)
    cfg = tiny_llama.cfg
    assert got["blocks.1.attn.hook_k"].shape == (5, 1, cfg.n_key_value_heads, cfg.d_head)
    assert got["blocks.1.mlp.hook_post"].shape == (5, 1, cfg.d_mlp)
    assert got["blocks.0.attn.hook_q"].shape == (5, 1, cfg.n_heads, cfg.d_head)


def test_activation_set_save_load_round_trip(tiny_llama, tmp_path):
    acts = collect_activations(tiny_llama, PROMPTS, HOOKS, [-1, 0], progress=False)
    back = ActivationSet.load(acts.save(tmp_path / "saved"), mmap=False)
    for h in HOOKS:
        assert torch.equal(back[h], acts[h])
    assert back.positions == acts.positions and back.examples == acts.examples
    assert torch.equal(back.token_ids, acts.token_ids) and back.provenance == acts.provenance
