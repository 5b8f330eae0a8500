"""Tiny Llama-, GPT-2- and Gemma-3-shaped models built from a config: no download, seeded.

Tests and demos use them as real TransformerLens bridges, and plant mechanisms in them
by writing chosen weights through :func:`set_head_ov` and friends.

Example:
    >>> from mechkit.models.synthetic import tiny_model
    >>> model = tiny_model("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2)
    >>> model.cfg.n_layers, model.cfg.n_heads
    (2, 4)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens.model_bridge import TransformerBridge

from mechkit.models.loading import ModelInfo, _boot

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def word_vocabulary(n_words: int) -> list[str]:
    """A deterministic word list ``w0 w1 ...`` padded with a few readable words."""
    readable = ["the", "a", "is", "of", "and", "capital", "France", "Paris", "Rome", "Italy", "true", "false"]
    return readable + [f"w{i}" for i in range(max(0, n_words - len(readable)))]


def tiny_tokenizer(words: list[str]):
    """A whitespace word-level fast tokenizer with ``<pad> <bos> <eos> <unk>`` as ids 0-3."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(dict.fromkeys(words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", padding_side="right", add_bos_token=True,
    )
    tokenizer.init_kwargs["name_or_path"] = "mechkit-tiny-words"  # the bridge reads it
    return tokenizer


@dataclass(frozen=True)
class TinyConfig:
    """Shape of a tiny model; ``arch`` is ``llama``, ``gpt2`` or ``gemma3``."""

    arch: str = "llama"
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_head: int | None = None
    d_mlp: int = 128
    vocab_size: int = 64
    n_ctx: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "gpt2", "gemma3"):
            raise ValueError(f"arch must be 'llama', 'gpt2' or 'gemma3', got {self.arch!r}")
        if self.n_heads % (self.n_kv_heads or self.n_heads):
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS)} special tokens")

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    def hf_config(self):
        from transformers import GPT2Config, Gemma3TextConfig, LlamaConfig

        common = dict(vocab_size=self.vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        if self.arch == "gpt2":
            if self.d_head is not None or self.n_kv_heads not in (None, self.n_heads):
                raise ValueError("GPT-2 has d_head = d_model / n_heads and no grouped key/value heads")
            return GPT2Config(
                n_layer=self.n_layers, n_embd=self.d_model, n_head=self.n_heads, n_inner=self.d_mlp,
                n_positions=self.n_ctx, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                architectures=["GPT2LMHeadModel"], **common,
            )
        shared = dict(
            num_hidden_layers=self.n_layers, hidden_size=self.d_model, num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads or self.n_heads, head_dim=self.head_dim,
            intermediate_size=self.d_mlp, max_position_embeddings=self.n_ctx, tie_word_embeddings=True,
            **common,
        )
        if self.arch == "llama":
            return LlamaConfig(architectures=["LlamaForCausalLM"], **shared)
        return Gemma3TextConfig(
            architectures=["Gemma3ForCausalLM"], query_pre_attn_scalar=self.head_dim,
            sliding_window=self.n_ctx, layer_types=["full_attention"] * self.n_layers, **shared,
        )


def tiny_hf_model(arch: str = "llama", *, words: list[str] | None = None, **shape: int):
    """The Hugging Face model, tokenizer and config behind :func:`tiny_model` (not yet bridged)."""
    from transformers import AutoModelForCausalLM

    words = words if words is not None else word_vocabulary(shape.pop("vocab_size", 64) - len(SPECIAL_TOKENS))
    config = TinyConfig(arch=arch, vocab_size=len(SPECIAL_TOKENS) + len(words), **shape)
    torch.manual_seed(config.seed)
    hf_model = AutoModelForCausalLM.from_config(config.hf_config())
    # Random init has tiny weights; scale them so activations and logits are non-trivial.
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if param.ndim == 2:
                param.normal_(0.0, 1.0 / param.shape[-1] ** 0.5 if "embed" not in name and "wte" not in name else 1.0)
    return hf_model, tiny_tokenizer(words), config


def tiny_model(arch: str = "llama", *, words: list[str] | None = None, **shape: int) -> TransformerBridge:
    """Build a seeded random tiny model of ``arch`` with a word-level tokenizer.

    The vocabulary is ``<pad> <bos> <eos> <unk>`` followed by ``words`` (default
    :func:`word_vocabulary`), so ``vocab_size`` is ``4 + len(words)``.
    """
    hf_model, tokenizer, config = tiny_hf_model(arch, words=words, **shape)
    bridge = _boot(hf_model, tokenizer, f"tiny-{arch}", "cpu", torch.float32)
    bridge.mechkit = ModelInfo(name=f"tiny-{arch}-s{config.seed}", source="synthetic",
                               prepend_bos=bridge.mechkit_prepend_bos, _weights_hash=bridge.mechkit_weights_hash)
    bridge.mechkit_config = config
    return bridge


def _layer(model: TransformerBridge, layer: int):
    hf = model.original_model
    base = getattr(hf, "model", None) or getattr(hf, "transformer")
    blocks = getattr(base, "layers", None) or getattr(base, "h")
    return blocks[layer]


@torch.no_grad()
def set_head_ov(model: TransformerBridge, layer: int, head: int, W_V: torch.Tensor, W_O: torch.Tensor) -> None:
    """Write one head's value (d_model x d_head) and output (d_head x d_model) weights.

    For GQA models ``head`` is a query head: its W_O slice is written, and W_V is written
    to the key/value head it reads (``head // (n_heads // n_kv_heads)``), which every
    query head of that group shares.
    """
    cfg = model.cfg
    d_head = cfg.d_head
    model.mechkit._weights_hash = None  # the weights change: provenance must rehash them
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    kv = head // (cfg.n_heads // n_kv)
    block = _layer(model, layer)
    if hasattr(block, "self_attn"):
        attn = block.self_attn
        attn.v_proj.weight[kv * d_head:(kv + 1) * d_head, :] = W_V.T
        attn.o_proj.weight[:, head * d_head:(head + 1) * d_head] = W_O.T
    else:  # GPT-2: Conv1D weights are (in, out); c_attn packs q, k, v.
        d_model = cfg.d_model
        block.attn.c_attn.weight[:, 2 * d_model + head * d_head: 2 * d_model + (head + 1) * d_head] = W_V
        block.attn.c_proj.weight[head * d_head:(head + 1) * d_head, :] = W_O
