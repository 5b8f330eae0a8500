"""load_model(device_map=...): layers placed by accelerate (here: some offloaded to disk) give the plain results."""

import numpy as np
import pytest
import torch

import mechkit
from mechkit.data import Relation
from mechkit.errors import MechkitError
from mechkit.heads import classify_heads
from mechkit.heads.weights import BridgeWeights
from mechkit.models.synthetic import tiny_hf_model

SHAPE = dict(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, vocab_size=120)
RELATIONS = [Relation("next", "linguistic", [(f"w{i}", f"w{i + 1}") for i in range(40)]),
             Relation("jump", "knowledge", [(f"w{i}", f"w{i + 50}") for i in range(40)])]
PROMPTS = ["the capital of France is Paris", "w1 w2 w3 w4 w5", "a w7"]
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out", "blocks.2.hook_resid_post", "logits"]


def layer_map(layer1: str) -> dict[str, str]:
    return {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": layer1, "model.layers.2": "cpu",
            "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf_model, tokenizer, _ = tiny_hf_model(request.param, **SHAPE)
    hf_model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("layer1", ["cpu", "disk"])
def test_placed_layers_give_the_plain_load_results(folder, layer1, tmp_path):
    plain = mechkit.load_model(folder)
    placed = mechkit.load_model(folder, device_map=layer_map(layer1), offload_folder=tmp_path)
    if layer1 == "disk":  # accelerate dispatched it: layer 1's weights live on disk until used
        assert placed.original_model.hf_device_map["model.layers.1"] == "disk"
        assert placed.original_model.model.layers[1].self_attn.v_proj.weight.device.type == "meta"
    assert placed.mechkit.weights_hash(placed) == plain.mechkit.weights_hash(plain)
    for options in ({}, dict(attn_norm=True, final_norm=True)):
        mine = classify_heads(placed, RELATIONS, progress=False, **options)
        theirs = classify_heads(plain, RELATIONS, progress=False, **options)
        assert np.array_equal(mine.scores.values, theirs.scores.values)
        assert np.array_equal(mine.suppression.values, theirs.suppression.values)
    mine = mechkit.collect_activations(placed, PROMPTS, HOOKS, [-1, -2], progress=False)
    theirs = mechkit.collect_activations(plain, PROMPTS, HOOKS, [-1, -2], progress=False)
    for hook in HOOKS:
        assert torch.equal(mine[hook], theirs[hook]), hook
    assert torch.equal(BridgeWeights(placed).W_V(1), BridgeWeights(plain).W_V(1))


def test_placement_errors(folder):
    with pytest.raises(MechkitError, match="device='cpu' cannot be combined with device_map/n_devices"):
        mechkit.load_model(folder, device="cpu", device_map="auto")
    with pytest.raises(MechkitError, match="cannot be combined with device_map/n_devices"):
        mechkit.load_model(folder, device="cpu", n_devices=2)
    with pytest.raises(MechkitError, match="n_devices must be a positive int"):
        mechkit.load_model(folder, n_devices=0)
    with pytest.raises(MechkitError, match="max_memory= and offload_folder= only apply with device_map"):
        mechkit.load_model(folder, max_memory={0: "1GiB"})
    if not torch.cuda.is_available():
        with pytest.raises(MechkitError, match="cannot place the model: n_devices=2 requires CUDA"):
            mechkit.load_model(folder, n_devices=2)
