"""Abliteration on the bundled models: the weight edit against the hook (SmolLM2) and post-norm Gemma-3."""

from __future__ import annotations

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
