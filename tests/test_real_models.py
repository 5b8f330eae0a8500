"""The bundled models, loaded once per test run from the mechkit cache."""

import pytest
import torch

from mechkit.activations import Prompt, collect_activations, encode

pytestmark = pytest.mark.real

PROMPTS = ["The capital of France is", "The opposite of hot is", "Water boils at a temperature of"]


def hf_twin(model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model.mechkit.path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", ["gemma", "smollm2"])
def test_bridge_logits_equal_hf_logits(name, request):
    model = request.getfixturevalue(name)
    twin = hf_twin(model)
    for text in PROMPTS:
        ids = torch.tensor([encode(model, Prompt(text)).ids])
        with torch.no_grad():
            torch.testing.assert_close(model(ids), twin(ids).logits, atol=1e-4, rtol=1e-4)
    del twin


def test_gemma_knows_paris(gemma):
    acts = collect_activations(gemma, ["The capital of France is"], ["logits"], [-1], progress=False)
    top5 = torch.topk(acts["logits"][0, 0], 5).indices.tolist()
    assert gemma.tokenizer.encode(" Paris", add_special_tokens=False)[0] in top5


def test_gemma_prepends_bos_once_smollm2_never(gemma, smollm2):
    ids = encode(gemma, Prompt("Hello")).ids
    assert ids[0] == gemma.tokenizer.bos_token_id and ids[1] != gemma.tokenizer.bos_token_id
    assert encode(gemma, Prompt("<bos>Hello")).ids == ids
    assert smollm2.tokenizer.bos_token_id not in encode(smollm2, Prompt("Hello")).ids


def test_smollm2_chat_prompts_use_the_template(smollm2):
    chat = encode(smollm2, Prompt("What is the capital of France?", chat=True, spans={"question": (0, 30)}))
    text = smollm2.tokenizer.decode(list(chat.ids))
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    start, end = chat.spans["question"]
    assert smollm2.tokenizer.decode(list(chat.ids[start:end])).strip() == "What is the capital of France?"


@pytest.mark.parametrize("name", ["gemma", "smollm2"])
def test_hook_names_and_gqa_shapes(name, request):
    model = request.getfixturevalue(name)
    cfg = model.cfg
    acts = collect_activations(model, PROMPTS, [f"blocks.{cfg.n_layers - 1}.attn.hook_z", "blocks.1.hook_attn_out",
                                                "blocks.1.hook_mlp_out", "blocks.2.hook_resid_post"], [-1, -2],
                               progress=False)
    assert acts[f"blocks.{cfg.n_layers - 1}.attn.hook_z"].shape == (3, 2, cfg.n_heads, cfg.d_head)
    assert acts["blocks.2.hook_resid_post"].shape == (3, 2, cfg.d_model)
    assert model.W_O.shape == (cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model)
    assert model.W_V.shape[1] == cfg.n_key_value_heads < cfg.n_heads
    assert torch.isfinite(acts["blocks.1.hook_mlp_out"]).all()


def test_weights_hash_recorded_at_conversion_matches_the_loaded_weights(smollm2):
    from mechkit.models.fingerprint import hash_state_dict

    recorded = smollm2.mechkit.weights_hash(smollm2)  # read from the cache's mechkit.json
    assert recorded == hash_state_dict(hf_twin(smollm2))
