"""Component attribution: grad x weight equals a hand computation on the HF model, patching finds
the planted head's value/output matrices, shares sum to 1, missing components are NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_head_attribution import PLANTED, WORDS, copy_task, planted_model

from mechkit.components import COMPONENTS, attribute_components, checkpoint_diff
from mechkit.data.tasks import tokenise_task
from mechkit.errors import MechkitError
from mechkit.models.synthetic import _layer, tiny_model


def test_grad_x_weight_equals_a_hand_computation_on_the_hf_model():
    model = tiny_model("llama", words=WORDS, n_layers=2, n_heads=4, n_kv_heads=2, d_model=48, seed=5)
    task = copy_task(6)
    result = attribute_components(model, task, "grad_x_weight", normalise=False, progress=False)
    tok = tokenise_task(model, task)
    hf = model.original_model
    params = {c: getattr(_layer(model, 1).self_attn, f"{c}_proj").weight for c in "qkvo"}
    params.update({c: getattr(_layer(model, 1).mlp, f"{c}_proj").weight for c in ("up", "gate", "down")})
    total = 0.0
    for i in range(len(tok.kept)):  # one example at a time, straight through the HF model
        logits = hf(tok.clean[i][None]).logits[0, -1]
        total = total + (logits[tok.answer_ids[i]] - logits[tok.corrupted_ids[i]]) / len(tok.kept)
    grads = torch.autograd.grad(total, list(params.values()))
    for (component, weight), grad in zip(params.items(), grads):
        expected = float((weight * grad).sum().abs())
        got = result.values[1, COMPONENTS.index(component)]
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-6, err_msg=component)
    shares = attribute_components(model, task, "grad_x_weight", progress=False).values
    np.testing.assert_allclose(np.nansum(shares, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_patching_finds_the_planted_heads_value_and_output(arch):
    model = planted_model(arch)
    shares = attribute_components(model, copy_task(), "patching", progress=False)
    row = dict(zip(shares.labels["component"], shares.values[PLANTED[0]]))
    assert row["v"] > 0.4 and row["o"] > 0.4  # the copying head reads through W_V and writes through W_O
    assert row["q"] < 0.02  # its queries are zero in clean and corrupted runs alike
    raw = np.array(shares.attrs["raw"])
    assert raw[PLANTED[0], COMPONENTS.index("o")] == pytest.approx(shares.attrs["baseline"]["clean"]
                                                                   - shares.attrs["baseline"]["corrupted"], rel=0.1)


def test_gpt2_has_no_gate_and_rows_sum_to_one():
    model = tiny_model("gpt2", words=WORDS, n_layers=2, n_heads=4, d_model=32, seed=0)
    for method in ("grad_x_weight", "patching"):
        shares = attribute_components(model, copy_task(4), method, progress=False)
        gate = shares.values[:, COMPONENTS.index("gate")]
        assert np.isnan(gate).all()
        np.testing.assert_allclose(np.nansum(shares.values, axis=1), 1.0, rtol=1e-5)


def test_post_norm_models_warn_about_scale_invariance():
    model = tiny_model("gemma3", words=WORDS, n_layers=1, n_heads=2, n_kv_heads=1, d_model=32, seed=0)
    with pytest.warns(UserWarning, match="scale invariance"):
        attribute_components(model, copy_task(4), "grad_x_weight", progress=False)


@torch.no_grad()
def test_checkpoint_diff():
    a = tiny_model("llama", words=WORDS, n_layers=2, seed=0)
    b = tiny_model("llama", words=WORDS, n_layers=2, seed=0)
    assert np.nanmax(checkpoint_diff(a, b).values) == 0.0
    _layer(b, 1).mlp.down_proj.weight *= 2.0
    diff = checkpoint_diff(b, a)
    assert diff.values[1, COMPONENTS.index("down")] == pytest.approx(1.0)
    assert np.nansum(diff.values) == pytest.approx(1.0)
    with pytest.raises(MechkitError, match="different layers|shapes differ"):
        checkpoint_diff(a, tiny_model("llama", words=WORDS, n_layers=2, d_model=48, seed=0))


def test_bad_input_is_refused():
    model = tiny_model("llama", words=WORDS, n_layers=1, seed=0)
    with pytest.raises(MechkitError, match="unknown method"):
        attribute_components(model, copy_task(4), "saliency")
    with torch.no_grad():
        model.original_model.lm_head.weight.zero_()
    with pytest.raises(MechkitError, match="zero gradient"):
        attribute_components(model, copy_task(4), "grad_x_weight", progress=False)
