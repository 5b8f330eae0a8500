import time

import pytest
import torch

import mechkit
from mechkit.errors import MechkitError, ModelNotFoundError
from mechkit.models import loading
from mechkit.models.synthetic import TinyConfig, set_head_ov, tiny_hf_model, tiny_model


def test_unknown_name_lists_close_matches_and_offline_models():
    with pytest.raises(ModelNotFoundError, match=r"Did you mean 'gemma-3-270m'.*Offline models: .*smollm2-135m-instruct"):
        mechkit.load_model("gemma-3-207m")


def test_path_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        mechkit.load_model(tmp_path)
    with pytest.raises(ModelNotFoundError, match="is not a model"):
        mechkit.load_model(tmp_path / "notes.txt")


def test_hub_id_without_network_fails_fast(monkeypatch):
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    started = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="cannot be reached"):
        mechkit.load_model("some-org/not-cached-model")
    assert time.perf_counter() - started < 5


def test_hub_reachable_never_hangs(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert loading.hub_reachable() is False


def test_local_folder_round_trip(tmp_path):
    shape = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, seed=5)
    hf_model, tokenizer, _ = tiny_hf_model("llama", **shape)
    hf_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = mechkit.load_model(tmp_path)
    built = tiny_model("llama", **shape)
    tokens = torch.tensor([[1, 4, 9, 7]])
    torch.testing.assert_close(loaded(tokens), built(tokens))
    assert loaded.mechkit.source == "folder"
    assert loaded.mechkit.weights_hash(loaded) == built.mechkit.weights_hash(built)
    other = tiny_model("llama", **{**shape, "seed": 6})
    assert other.mechkit.weights_hash(other) != built.mechkit.weights_hash(built)


def test_a_local_folder_is_a_chat_model_only_when_told_and_its_tokenizer_has_a_template(tmp_path):
    hf_model, tokenizer, _ = tiny_hf_model("llama", n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, seed=5)
    hf_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert mechkit.load_model(tmp_path).mechkit.chat is False  # a folder alone cannot say
    with pytest.raises(MechkitError, match="no chat template"):
        mechkit.load_model(tmp_path, chat=True)
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(tmp_path)
    assert mechkit.load_model(tmp_path).mechkit.chat is False
    assert mechkit.load_model(tmp_path, chat=True).mechkit.chat is True


def test_list_models_names_bundled_models():
    rows = {row["name"]: row for row in mechkit.list_models()}
    assert rows["gemma-3-270m"]["kind"] == "bundled" and not rows["gemma-3-270m"]["chat"]
    assert rows["smollm2-135m-instruct"]["chat"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_synthetic_weights_can_be_planted(arch):
    kv = {} if arch == "gpt2" else {"n_kv_heads": 2}
    model = tiny_model(arch, n_layers=2, d_model=32, n_heads=4, **kv)
    W_V, W_O = torch.randn(32, 8), torch.randn(8, 32)
    set_head_ov(model, 1, 3, W_V, W_O)
    torch.testing.assert_close(model.W_O[1, 3], W_O)
    kv_head = 3 // (4 // (kv.get("n_kv_heads", 4)))
    torch.testing.assert_close(model.W_V[1, kv_head], W_V)
    assert set(model.hook_dict) >= {"blocks.1.attn.hook_z", "blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"}


def test_tiny_config_refuses_impossible_shapes():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        TinyConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="arch must be"):
        TinyConfig(arch="mamba")


def test_registered_cache_models_load_by_name(tmp_path, monkeypatch):
    from mechkit.models import register_cached_model
    from mechkit.models.cache import models_dir

    monkeypatch.setenv("MECHKIT_CACHE", str(tmp_path))
    folder = models_dir() / "tiny-edited"
    hf_model, tokenizer, _ = tiny_hf_model("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2)
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    register_cached_model("tiny+edited", folder, kind="edited", description="a test edit")
    rows = {row["name"]: row for row in mechkit.list_models()}
    assert rows["tiny+edited"]["kind"] == "edited"
    model = mechkit.load_model("tiny+edited")
    assert model.mechkit.name == "tiny+edited" and model.mechkit.source == "edited"
