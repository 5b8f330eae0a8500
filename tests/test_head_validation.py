"""Interventions, the dynamic check and the ablation check, on tiny planted models."""

import math

import numpy as np
import pytest
import torch

from mechkit.errors import MechkitError
from mechkit.heads import classify_heads
from mechkit.heads.interventions import scale_heads, zero_heads
from mechkit.heads.validation import dynamic_check
from mechkit.models.synthetic import tiny_model

from test_head_classification import WORDS, plant, relation

TOKENS = torch.tensor([[1, 5, 9, 13, 20, 7]])


def test_scale_heads_factor_one_is_exact_and_zero_equals_zeroing_through_hooks(tiny_llama):
    clean = tiny_llama(TOKENS)
    with scale_heads(tiny_llama, {(1, 2): 1.0, (0, 0): 1.0}):
        torch.testing.assert_close(tiny_llama(TOKENS), clean, atol=0, rtol=0)

    def by_hand(z, hook):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    with tiny_llama.hooks(fwd_hooks=[("blocks.1.attn.hook_z", by_hand)]):
        manual = tiny_llama(TOKENS)
    with zero_heads(tiny_llama, [(1, 2)]):
        torch.testing.assert_close(tiny_llama(TOKENS), manual)
    assert not torch.allclose(manual, clean)
    torch.testing.assert_close(tiny_llama(TOKENS), clean)  # hooks removed on exit


def test_scale_heads_at_last_position_only(tiny_llama):
    clean = tiny_llama(TOKENS)
    with zero_heads(tiny_llama, [(0, 1)], positions=[-1]):
        edited = tiny_llama(TOKENS)
    torch.testing.assert_close(edited[:, :-1], clean[:, :-1])
    assert not torch.allclose(edited[:, -1], clean[:, -1])


def test_mean_ablation_replaces_output_with_mean(tiny_llama):
    mean = torch.randn(tiny_llama.cfg.d_head)
    seen = {}

    def spy(z, hook):
        seen["z"] = z[:, :, 3].clone()

    with scale_heads(tiny_llama, {(2, 3): 0.0}, means={(2, 3): mean}):
        with tiny_llama.hooks(fwd_hooks=[("blocks.2.attn.hook_z", spy)]):
            tiny_llama(TOKENS)
    torch.testing.assert_close(seen["z"], mean.expand_as(seen["z"]))


@pytest.mark.parametrize("bad", [{(9, 0): 0.0}, {(0, 9): 0.0}, {(0, 0): -1.0}, {(0, 0): math.inf}, {(0,): 1.0}])
def test_bad_heads_and_factors_are_refused(tiny_llama, bad):
    with pytest.raises(MechkitError):
        with scale_heads(tiny_llama, bad):
            pass


def test_dynamic_check_forced_variant_recovers_a_planted_layer0_head():
    model = tiny_model("llama", words=WORDS, n_layers=2, n_heads=4, n_kv_heads=2, d_head=64, d_model=96, seed=4)
    capital = relation("capital", "knowledge", 0)
    plant(model, 0, 1, [capital])
    result = classify_heads(model, [capital], threshold=0.5, progress=False)
    check = dynamic_check(model, result, [capital], n_pairs=10, progress=False)
    forced = check.forced.sel(relation="capital").values
    assert forced[0, 1] == 1.0  # attention on the source: the value vector maps it to its target
    others = np.delete(forced.ravel(), 1)
    assert others.max() < 0.5
    assert check.pearson["forced"]["all"] > 0.9
    assert check.n_prompts == {"capital": 40}
    with pytest.raises(MechkitError, match="placeholder"):
        dynamic_check(model, result, [capital], templates=("no placeholder",), progress=False)


def test_dynamic_check_spans_the_placeholder_even_when_the_template_repeats_the_word():
    from mechkit.data import Relation

    model = tiny_model("llama", words=WORDS + ["story"], n_layers=1, n_heads=4, n_kv_heads=2, d_head=64, d_model=96,
                       seed=5)
    rel = Relation("r", "knowledge", [("story", "v150")] + [(WORDS[i], WORDS[150 + i]) for i in range(1, 30)])
    result = classify_heads(model, [rel], progress=False)
    seen = []
    import mechkit.heads.validation as validation

    real = validation.collect_activations

    def spy(model, prompts, *args, **kwargs):
        seen.extend(prompts)
        return real(model, prompts, *args, **kwargs)

    validation.collect_activations = spy
    try:
        dynamic_check(model, result, [rel], n_pairs=30, templates=("The story of {} contains",), progress=False)
    finally:
        validation.collect_activations = real
    (prompt,) = [p for p in seen if p.text == "The story of story contains"]
    assert prompt.text[slice(*prompt.spans["source"])] == "story" and prompt.spans["source"][0] == 13
