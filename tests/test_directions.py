"""Contrast directions, steering and directional ablation on tiny models with a planted direction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechkit.directions import ablate_direction, find_direction, steer
from mechkit.errors import MechkitError
from mechkit.models.synthetic import tiny_model

WORDS = [f"w{i}" for i in range(40)] + ["trigger", "refuse"]


@torch.no_grad()
def planted(arch: str = "llama"):
    """The token "trigger" is "w35" plus a large component along ``u``; "refuse"'s unembedding
    reads it, so prompts ending in "trigger" make "refuse" the top next token."""
    shape = {} if arch == "gpt2" else {"n_kv_heads": 2}
    model = tiny_model(arch, words=WORDS, n_layers=3, d_model=48, n_heads=4, d_mlp=64, seed=2, **shape)
    u = torch.nn.functional.normalize(torch.randn(48, generator=torch.Generator().manual_seed(9)), dim=0)
    tok = model.tokenizer
    trigger, refuse = tok.convert_tokens_to_ids("trigger"), tok.convert_tokens_to_ids("refuse")
    hf = model.original_model
    embed = hf.get_input_embeddings().weight
    embed[trigger] = embed[tok.convert_tokens_to_ids("w35")] + 6.0 * u
    hf.get_output_embeddings().weight[refuse] = 30.0 * u  # (tied: also its embedding, unused in prompts)
    return model, u, refuse


def prompts(n: int, last: str | None) -> list[str]:
    """Three filler words, then ``last`` (default: a varying filler word)."""
    return [f"w{i % 30} w{(i * 7) % 30} w{(i * 3 + 1) % 30} {last or f'w{30 + i % 10}'}" for i in range(n)]


@pytest.mark.parametrize("method", ["mean_diff", "probe"])
def test_find_direction_recovers_the_planted_direction(method):
    model, u, _ = planted()
    found = find_direction(model, prompts(24, "trigger"), prompts(24, "w35"), layers=[0, 1], method=method,
                           progress=False)
    layer, position, direction = found.best()
    assert found.auc.values.max() == 1.0 and abs(found.control_auc.values).max() < 0.95
    cosine = float(direction @ u)
    if method == "mean_diff":
        assert cosine >= 0.99 and layer == 0
    else:  # a probe's normal separates as well but need not point along the mean difference
        assert cosine > 0.3
    assert found.directions.axes == ("layer", "position", "d_model")


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_ablation_keeps_the_direction_out_of_the_residual_stream(arch):
    model, u, refuse = planted(arch)
    tokens = torch.tensor([model.tokenizer.convert_tokens_to_ids(p.split()) for p in prompts(6, "trigger")])
    with torch.no_grad():
        assert (model(tokens)[:, -1].argmax(-1) == refuse).all()
        with ablate_direction(model, u):
            logits, cache = model.run_with_cache(tokens, names_filter=lambda n: "hook_resid" in n)
    for name, resid in cache.items():
        assert (resid @ u).abs().max() < 1e-4 * resid.norm(dim=-1).max(), name
    assert not (logits[:, -1].argmax(-1) == refuse).any()  # the "refusal" is gone


def test_steering():
    model, u, refuse = planted()
    tokens = torch.tensor([model.tokenizer.convert_tokens_to_ids(p.split()) for p in prompts(4, None)])
    with torch.no_grad():
        base = model(tokens)
        with steer(model, u, 0.0, layers=[1]):
            assert torch.equal(model(tokens), base)  # alpha = 0 changes nothing, exactly
        readings = []
        for alpha in (0.0, 2.0, 4.0, 8.0):
            with steer(model, u, alpha, layers=[1]):
                readings.append(float(model(tokens)[:, -1, refuse].mean()))
    assert np.all(np.diff(readings) > 0)  # adding the direction upstream raises what reads it downstream


def test_bad_input_is_refused():
    model, u, _ = planted()
    for bad, match in ((torch.randn(7), "entries"), (torch.zeros(48), "zero"), (torch.full((48,), float("nan")), "non-finite")):
        with pytest.raises(MechkitError, match=match):
            with ablate_direction(model, bad):
                pass
    with pytest.raises(MechkitError, match="finite"):
        with steer(model, u, float("inf")):
            pass
    with pytest.raises(MechkitError, match="out of range"):
        with steer(model, u, 1.0, layers=[5]):
            pass
    with pytest.raises(MechkitError, match="at least 2"):
        find_direction(model, prompts(1, "trigger"), prompts(5, "w1"))
    with pytest.raises(MechkitError, match="unknown method"):
        find_direction(model, prompts(3, "trigger"), prompts(3, "w1"), method="pca")
