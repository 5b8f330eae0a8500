"""The one accessor through which weight-only analyses read a model's matrices.

Head classification reads embeddings, the unembedding and each layer's OV weights only
through :class:`BridgeWeights`, so that a layer-by-layer streaming source (for models
that do not fit in memory) can replace it without touching the analysis.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.errors import MechkitError


class BridgeWeights:
    """Weights of a loaded TransformerBridge, per layer, with GQA expanded per query head."""

    def __init__(self, model) -> None:
        for name, param in model.named_parameters():
            if param.device.type == "meta":
                raise MechkitError(
                    f"weight {name} is on the meta device (not loaded, or offloaded by a device map); "
                    "head classification reads weights directly: load the model with "
                    "mechkit.load_model(name) without offloading"
                )
        self.model = model
        cfg = model.cfg
        self.n_layers, self.n_heads, self.d_head = cfg.n_layers, cfg.n_heads, cfg.d_head
        self.d_model, self.d_vocab = cfg.d_model, cfg.d_vocab
        self.n_kv_heads = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        self.device = next(model.parameters()).device
        self._W_V = model.W_V
        self._W_O = model.W_O

    def kv_head(self, head: int) -> int:
        """The key/value head a query head reads (GQA): ``h // (n_heads / n_kv_heads)``."""
        return head // (self.n_heads // self.n_kv_heads)

    def W_V(self, layer: int) -> Float[Tensor, "head d_model d_head"]:
        """Value weights per *query* head (shared within a GQA group)."""
        W = self._W_V[layer]
        return W.repeat_interleave(self.n_heads // W.shape[0], dim=0) if W.shape[0] != self.n_heads else W

    def W_O(self, layer: int) -> Float[Tensor, "head d_head d_model"]:
        return self._W_O[layer]

    @property
    def has_attn_out_norm(self) -> bool:
        """Whether each attention output is normalised before the residual (Gemma-3's post-attention norm)."""
        return hasattr(self.block(0), "ln1_post")

    def W_O_into_residual(self, layer: int, *, fold_attn_out_norm: bool = True) -> Float[Tensor, "head d_head d_model"]:
        """``W_O`` in float32, times the post-attention norm's gain where the model has one
        (its per-token scale does not change ranks, so this is what reaches the residual up to scale)."""
        W_O = self.W_O(layer).float()
        if fold_attn_out_norm and self.has_attn_out_norm:
            W_O = W_O * self.norm_gain(self.block(layer).ln1_post, self.d_model, self.device)
        return W_O

    def b_V(self, layer: int) -> Float[Tensor, "head d_head"] | None:
        try:
            b = self.model.b_V[layer]
        except (AttributeError, RuntimeError):
            return None
        b = b.reshape(-1, self.d_head)
        return b.repeat_interleave(self.n_heads // b.shape[0], dim=0) if b.shape[0] != self.n_heads else b

    def b_O(self, layer: int) -> Float[Tensor, " d_model"] | None:
        try:
            return self.model.b_O[layer]
        except (AttributeError, RuntimeError):
            return None

    def W_E(self) -> Float[Tensor, "vocab d_model"]:
        return self.model.W_E

    def W_U(self) -> Float[Tensor, "d_model vocab"]:
        return self.model.W_U

    def embed(self, tokens: Tensor) -> Float[Tensor, "n d_model"]:
        """Token embeddings as the model's embedding layer produces them (Gemma scales by sqrt(d_model))."""
        return self.model.embed(tokens[None])[0]

    def block(self, layer: int):
        return self.model.blocks[layer]

    @staticmethod
    def norm_gain(norm, d_model: int, device) -> Float[Tensor, " d_model"]:
        """Elementwise gain of an RMS/LayerNorm module (its output on a unit-RMS input of ones)."""
        with torch.no_grad():
            return norm(torch.ones(1, 1, d_model, device=device))[0, 0]
