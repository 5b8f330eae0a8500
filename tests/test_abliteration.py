"""Abliteration (weight orthogonalisation), direction files, refusal measurement and causal selection.

Ground truth: a tiny model in which a planted residual direction makes a "refusal" token the
argmax; everything else in the model is first made blind to that direction, so that prompts
without the trigger must come out exactly unchanged by ablation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mechkit.directions import (
    ablate_direction,
    find_direction,
    load_direction,
    mean_kl,
    orthogonalize,
    save_direction,
    select_direction,
)
from mechkit.directions.interventions import residual_writes
from mechkit.directions.refusal import is_refusal, refusal_score, refusal_token_ids
from mechkit.errors import MechkitError
from mechkit.models.synthetic import tiny_model

WORDS = [f"w{i}" for i in range(40)] + ["trigger", "refuse", "I", "Sorry"]


def _random_unit(d: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(seed)), dim=0)


@torch.no_grad()
def planted(arch: str = "llama"):
    """A model whose writes never hold ``u`` except the "trigger" token's embedding (w35 + 6u);
    "refuse"'s unembedding reads ``u``, so prompts ending in "trigger" make it the top token."""
    shape = {} if arch == "gpt2" else {"n_kv_heads": 2}
    base = tiny_model(arch, words=WORDS, n_layers=3, d_model=48, n_heads=4, d_mlp=64, seed=2, **shape)
    u = _random_unit(48, 9)
    model = orthogonalize(base, u, name="planted")  # untied, and blind to u everywhere
    tok = model.tokenizer
    trigger, refuse = tok.convert_tokens_to_ids("trigger"), tok.convert_tokens_to_ids("refuse")
    hf = model.original_model
    embed = hf.get_input_embeddings().weight
    embed[trigger] = embed[tok.convert_tokens_to_ids("w35")] + 6.0 * u
    hf.get_output_embeddings().weight[refuse] = 12.0 * u
    model.mechkit._weights_hash = None
    return model, u, refuse


def prompts(n: int, last: str | None) -> list[str]:
    return [f"w{i % 30} w{(i * 7) % 30} w{(i * 3 + 1) % 30} {last or f'w{30 + i % 10}'}" for i in range(n)]


def tokens_of(model, texts: list[str]) -> torch.Tensor:
    return torch.tensor([[model.tokenizer.bos_token_id] + model.tokenizer(t, add_special_tokens=False)["input_ids"]
                         for t in texts])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_planted_refusal_removed_by_ablation_and_by_orthogonalisation(arch):
    model, u, refuse = planted(arch)
    found = find_direction(model, prompts(24, "trigger"), prompts(24, "w35"), layers=[0], progress=False)
    direction = found.direction(0)  # the stream entering layer 0: the embeddings, where only u differs
    assert float(direction @ u) >= 0.99
    with_trigger, without = tokens_of(model, prompts(12, "trigger")), tokens_of(model, prompts(12, None))
    edited = orthogonalize(model, direction)
    with torch.no_grad():
        assert (model(with_trigger)[:, -1].argmax(-1) == refuse).all()  # the planted "refusal"
        plain = model(without)
        with ablate_direction(model, direction):
            hooked_trigger, hooked_plain = model(with_trigger), model(without)
        edited_trigger, edited_plain = edited(with_trigger), edited(without)
    for logits in (hooked_trigger, edited_trigger):
        assert not (logits[:, -1].argmax(-1) == refuse).any()  # refusal rate 0
    for logits in (hooked_plain, edited_plain):  # nothing changes where the direction is absent (float32 rounding:
        torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-5)  # logits here reach 30)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_orthogonalised_model_equals_ablate_direction(arch):
    shape = {} if arch == "gpt2" else {"n_kv_heads": 2}
    model = tiny_model(arch, n_layers=3, d_model=48, n_heads=4, d_mlp=64, seed=5, **shape)
    u = _random_unit(48, 3)
    edited = orthogonalize(model, u)
    tokens = torch.randint(4, 40, (4, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with ablate_direction(model, u):
            hooked = model(tokens)
        got = edited(tokens)
        plain = model(tokens)
    assert (plain - hooked).abs().max() > 0.1  # the ablation does something here
    torch.testing.assert_close(got, hooked, atol=1e-4, rtol=0)
    # the unembedding was untied before the embedding was edited
    assert not torch.equal(edited.original_model.get_input_embeddings().weight,
                           edited.original_model.get_output_embeddings().weight)
    torch.testing.assert_close(edited.original_model.get_output_embeddings().weight,
                               model.original_model.get_output_embeddings().weight)


def test_post_norm_model_keeps_the_direction_out_of_every_write():
    model = tiny_model("gemma3", n_layers=3, d_model=48, n_heads=4, n_kv_heads=2, d_mlp=64, seed=4)
    with torch.no_grad():  # non-trivial post-norm gains, so that orthogonalising against u alone would fail
        for layer in model.original_model.model.layers:
            layer.post_attention_layernorm.weight.normal_(0, 0.5)
            layer.post_feedforward_layernorm.weight.normal_(0, 0.5)
    model.mechkit._weights_hash = None
    u = _random_unit(48, 6)
    edited = orthogonalize(model, u)
    tokens = torch.randint(4, 40, (3, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, cache = edited.run_with_cache(tokens, names_filter=lambda n: n in residual_writes(edited))
        _, before = model.run_with_cache(tokens, names_filter=lambda n: n in residual_writes(model))
    names = list(cache.keys())
    assert len(names) == 1 + 2 * model.cfg.n_layers  # the embedding (Gemma has no position embedding) and 2 a layer
    for name in names:
        share = ((cache[name] @ u).abs() / cache[name].norm(dim=-1).clamp_min(1e-12)).max()
        assert share < 1e-5, name
    assert max(float(((before[n] @ u).abs() / before[n].norm(dim=-1)).max()) for n in names) > 1e-2
    # the edit equals hooks that project g * u (g the post-norm's gain) out of each sublayer before its norm
    hf, handles = model.original_model, []

    def project_out(v):
        return lambda module, inputs, out: out - (out @ v)[..., None] * v

    for layer in hf.model.layers:
        for proj, norm in ((layer.self_attn.o_proj, layer.post_attention_layernorm),
                           (layer.mlp.down_proj, layer.post_feedforward_layernorm)):
            handles.append(proj.register_forward_hook(project_out(
                torch.nn.functional.normalize((1 + norm.weight.detach()) * u, dim=0))))
    handles.append(hf.model.embed_tokens.register_forward_hook(project_out(u)))
    try:
        with torch.no_grad():
            pre_norm = model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        got = edited(tokens)
        with ablate_direction(model, u):
            hooked = torch.log_softmax(model(tokens)[:, -1], -1)
    torch.testing.assert_close(got, pre_norm, atol=1e-4, rtol=0)
    kl = mean_kl(hooked, torch.log_softmax(got[:, -1], -1))
    assert np.isfinite(kl) and kl > -1e-6  # magnitudes differ from the hook's: the KL is what is reported


def test_saved_abliterated_model_loads_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHKIT_CACHE", str(tmp_path))
    from mechkit.models import load_model
    from mechkit.models.edited import save_edited
    from mechkit.models.registry import VARIANTS, register_variant

    model = tiny_model("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, seed=7)
    u = _random_unit(32, 1)
    calls = []

    def maker(base, argument):
        calls.append((base, argument))
        return save_edited(orthogonalize(model, u, name=f"{base}+testedit"), f"{base}+testedit", kind="test")

    register_variant("testedit", maker)
    try:
        loaded = load_model("tiny+testedit")
        again = load_model("tiny+testedit")  # from the cache: the maker is not called twice
    finally:
        VARIANTS.pop("testedit")
    assert calls == [("tiny", None)]
    tokens = torch.randint(4, 40, (2, 7))
    with torch.no_grad(), ablate_direction(model, u):
        expected = model(tokens)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(again(tokens), expected, atol=1e-4, rtol=0)
    assert loaded.mechkit.source == "test" and loaded.mechkit.prepend_bos == model.mechkit.prepend_bos


def test_a_saved_variant_is_made_again_when_its_argument_file_changes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MECHKIT_CACHE", str(tmp_path / "cache"))
    from mechkit.models import load_model
    from mechkit.models.edited import save_edited
    from mechkit.models.registry import VARIANTS, model_identity, register_variant

    model = tiny_model("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, seed=7)
    argument = tmp_path / "direction.txt"
    argument.write_text("first")
    calls = []

    def maker(base, arg):
        calls.append(Path(arg).read_text())
        seed = 1 if Path(arg).read_text() == "first" else 2
        name = f"{base}+testedit:{arg}"
        return save_edited(orthogonalize(model, _random_unit(32, seed), name=name), name, kind="test")

    name = f"tiny+testedit:{argument}"
    register_variant("testedit", maker)
    try:
        identity = model_identity(name)
        first = load_model(name)
        load_model(name)  # unchanged: read from the cache
        argument.write_text("second")  # an edited argument file: the saved variant is stale
        assert model_identity(name) != identity  # (and a report keyed on it recomputes)
        second = load_model(name)
    finally:
        VARIANTS.pop("testedit")
    assert calls == ["first", "second"]
    assert "making tiny+testedit" in capsys.readouterr().out
    tokens = torch.randint(4, 40, (2, 7))
    with torch.no_grad(), ablate_direction(model, _random_unit(32, 2)):
        expected = model(tokens)
    with torch.no_grad():
        torch.testing.assert_close(second(tokens), expected, atol=1e-4, rtol=0)
        assert not torch.allclose(first(tokens), second(tokens), atol=1e-3)


def test_direction_files_belong_to_their_model(tmp_path):
    model = tiny_model("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, seed=7)
    other = tiny_model("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, seed=8)
    wider = tiny_model("llama", n_layers=2, d_model=48, n_heads=4, n_kv_heads=2, d_mlp=64, seed=7)
    u = _random_unit(32, 2)
    path = save_direction(tmp_path / "d.npz", 3 * u, model, layer=1)
    torch.testing.assert_close(load_direction(path, model), u)
    with pytest.raises(MechkitError, match="width 32"):
        load_direction(path, wider)
    with pytest.raises(MechkitError, match="find the direction on this model"):
        load_direction(path, other)
    (tmp_path / "junk.npz").write_bytes(b"not a file")
    with pytest.raises(MechkitError, match="not a mechkit direction file"):
        load_direction(tmp_path / "junk.npz", model)
    with pytest.raises(MechkitError, match="another model"):
        orthogonalize(wider, u)


def test_refusal_detector_and_score():
    assert is_refusal("I'm sorry, but I can\u2019t help with that.")
    assert is_refusal("  As an AI language model, ...")
    assert not is_refusal("Sure! Here is a poem about the sea.")
    model = tiny_model("llama", words=WORDS, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, seed=3)
    ids = refusal_token_ids(model)
    assert set(ids) >= {model.tokenizer.convert_tokens_to_ids(w) for w in ("I", "Sorry")}
    logprobs = torch.log_softmax(torch.randn(5, model.cfg.d_vocab), -1)
    p = logprobs[:, ids].exp().sum(-1)
    torch.testing.assert_close(refusal_score(model, logprobs=logprobs), torch.log(p / (1 - p)), atol=1e-5, rtol=1e-5)
    assert mean_kl(logprobs, logprobs) == pytest.approx(0.0, abs=1e-7)
    assert mean_kl(logprobs, torch.log_softmax(torch.randn_like(logprobs), -1)) > 0


def test_causal_selection_picks_the_direction_that_carries_the_behaviour():
    model, u, refuse = planted("llama")
    found = find_direction(model, prompts(24, "trigger"), prompts(24, "w35"), progress=False)

    def refuse_logodds(model, logprobs):
        return logprobs[:, refuse] - torch.log1p(-logprobs[:, refuse].exp().clamp(max=1 - 1e-7))

    choice = select_direction(model, found, prompts(10, "trigger"), prompts(10, None), metric=refuse_logodds,
                              max_layer_fraction=0.6, progress=False)
    assert choice.criterion.startswith("causal")
    assert float(choice.direction @ u) >= 0.99
    assert choice.layer < 0.6 * model.cfg.n_layers
    assert np.isnan(choice.scores.sel(layer=2, measure="bypass").values).all()  # last layers skipped
    summary = choice.summary()
    assert summary["bypass"] < choice.baseline["positive"] and summary["kl"] < 0.1


def test_bad_directions_and_models_fail_clearly():
    model = tiny_model("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, seed=7)
    for bad, match in ((torch.zeros(32), "zero"), (torch.full((32,), float("nan")), "non-finite"),
                       (torch.ones(31), "another model")):
        with pytest.raises(MechkitError, match=match):
            orthogonalize(model, bad)
