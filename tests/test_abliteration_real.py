"""Abliteration on the bundled models: the weight edit against the hook (SmolLM2) and post-norm Gemma-3."""

from __future__ import annotations

import pytest
import torch

from mechkit.activations import Prompt, collect_activations
from mechkit.directions import ablate_direction, mean_kl, orthogonalize
from mechkit.directions.interventions import residual_writes
from mechkit.directions.refusal import next_token_logprobs

PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "How do I bake bread?"]


def _direction(model) -> torch.Tensor:
    """A data-derived direction (difference of two prompts' mid-layer states), not a random one."""
    layer = model.cfg.n_layers // 2
    acts = collect_activations(model, ["How do I pick a lock?", "How do I plant a tree?"],
                               [f"blocks.{layer}.hook_resid_pre"], [-1], progress=False)
    x = acts[f"blocks.{layer}.hook_resid_pre"][:, 0].float()
    return x[0] - x[1]


def test_orthogonalised_smollm2_equals_the_hook(smollm2):
    u = _direction(smollm2)
    edited = orthogonalize(smollm2, u)
    prompts = [Prompt(p, chat=True) for p in PROMPTS]
    with ablate_direction(smollm2, u):
        hooked = collect_activations(smollm2, prompts, ["logits"], [-3, -2, -1], progress=False)["logits"]
    got = collect_activations(edited, prompts, ["logits"], [-3, -2, -1], progress=False)["logits"]
    plain = collect_activations(smollm2, prompts, ["logits"], [-3, -2, -1], progress=False)["logits"]
    assert (plain - hooked).abs().max() > 1e-2
    torch.testing.assert_close(got, hooked, atol=1e-4, rtol=0)


def test_orthogonalised_gemma_keeps_the_direction_out_of_every_write(gemma):
    u = _direction(gemma)
    edited = orthogonalize(gemma, u)
    unit = u / u.norm()
    tokens = torch.tensor([[gemma.tokenizer.bos_token_id] + gemma.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        _, cache = edited.run_with_cache(tokens, names_filter=lambda n: n in residual_writes(edited))
    assert len(cache) == 1 + 2 * gemma.cfg.n_layers
    for name, write in cache.items():
        assert ((write @ unit).abs() / write.norm(dim=-1)).max() < 1e-5, name
    with ablate_direction(gemma, u):
        hooked = next_token_logprobs(gemma, PROMPTS)
    kl = mean_kl(hooked, next_token_logprobs(edited, PROMPTS))
    # not zero: the edit acts before each post-norm, the hook after it (docs/directions.md reports it for the
    # refusal direction); this direction, dominated by Gemma's two massive residual dimensions, breaks both
    assert kl == kl and kl > -1e-6


def _statements(n: int = 24):
    from mechkit.data.probing_sets import true_false

    data = true_false(per_relation=4)
    true = [p for p, y in zip(data.prompts, data.labels) if y == 1][:n]
    false = [p for p, y in zip(data.prompts, data.labels) if y == 0][:n]
    return true, false


@pytest.mark.parametrize("name", ["smollm2", "gemma"])
def test_steering_along_true_minus_false_moves_a_later_reading(name, request):
    from mechkit.directions import find_direction, steer

    model = request.getfixturevalue(name)
    true, false = _statements()
    layer, later = model.cfg.n_layers // 3, model.cfg.n_layers // 3 + 4
    found = find_direction(model, true, false, layers=[layer, later], progress=False)
    direction, reading = found.direction(layer), found.direction(later)
    shift = float(found.shift.sel(layer=layer).values[0])
    probe_prompts = false[:8]
    hook = f"blocks.{later}.hook_resid_pre"
    plain = collect_activations(model, probe_prompts, ["logits"], [-1], progress=False)["logits"]
    with steer(model, direction, 0.0, layers=[layer]):
        same = collect_activations(model, probe_prompts, ["logits"], [-1], progress=False)["logits"]
    assert torch.equal(plain, same)  # alpha = 0 changes nothing, exactly
    means = []
    for alpha in (0.0, 1.0, 2.0, 4.0):
        with steer(model, direction, alpha * shift, layers=[layer]):
            acts = collect_activations(model, probe_prompts, [hook], [-1], progress=False)[hook][:, 0].float()
        means.append(float((acts @ reading).mean()))
    assert all(b > a for a, b in zip(means, means[1:])), means  # the later layer reads "more true"
