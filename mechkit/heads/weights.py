"""The one accessor through which weight-only analyses read a model's matrices.

Head classification reads embeddings, the unembedding, each layer's OV weights and the
few modules it runs (layer 0's MLP and norms, the final norm) only through a
:class:`WeightSource`. Two implementations:

* :class:`BridgeWeights`: a loaded TransformerBridge. Layers may sit on different
  devices (``load_model(..., device_map=...)``) or be offloaded to disk: every matrix is
  read one layer at a time and handed over on ``weights.device`` (the embedding's device),
  and modules are called on their own device with the result moved back.
* :class:`CheckpointWeights`: a checkpoint on disk (safetensors folder or GGUF file),
  read one layer at a time; the model is never built. At most one layer's tensors are
  held at once, besides the embedding, the unembedding and the final norm: enough to
  classify a 70B model's heads on one GPU.

Example:
    >>> weights = CheckpointWeights("~/.cache/mechkit/models/smollm2-135m-instruct")  # doctest: +SKIP
    >>> weights.W_V(3).shape                                   # doctest: +SKIP
    torch.Size([9, 576, 64])
    >>> mechkit.classify_heads(weights)                          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections import Counter

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.errors import MechkitError


def _has_offloaded_params(module: torch.nn.Module) -> bool:
    if getattr(module, "_hf_hook", None) is None:
        return False
    from accelerate.utils import has_offloaded_params

    return has_offloaded_params(module)


@contextlib.contextmanager
def _materialised(module: torch.nn.Module):
    """Load the disk/CPU-offloaded parameters under ``module`` for the duration (accelerate hooks)."""
    offloaded = [m for m in module.modules() if _has_offloaded_params(m)]
    if not offloaded:
        yield
        return
    from accelerate.utils import align_module_device

    with contextlib.ExitStack() as stack:
        for m in offloaded:
            stack.enter_context(align_module_device(m))
        yield


def _execution_device(module: torch.nn.Module, default: torch.device) -> torch.device:
    """Where ``module`` computes: its accelerate hook's device, else its parameters' device."""
    for m in module.modules():
        device = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return default


class _OnDevice:
    """Call ``module`` from ``device``: the input goes to the module's device and dtype, the output comes back."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.module, self.device = module, device

    def __call__(self, x: Tensor) -> Tensor:
        param = next((p for p in self.module.parameters() if p.is_floating_point()), None)
        dtype = param.dtype if param is not None else x.dtype
        return self.module(x.to(_execution_device(self.module, self.device), dtype)).to(self.device)


class _LayerView:
    """One block's modules (``ln1``, ``ln2``, ``mlp``, ``ln1_post``, ...), callable from the compute device."""

    def __init__(self, block: torch.nn.Module, device: torch.device) -> None:
        self._block, self._device = block, device

    def __getattr__(self, name: str) -> _OnDevice:
        module = getattr(self._block, name)  # AttributeError when the block has no such module
        if not isinstance(module, torch.nn.Module):
            raise AttributeError(name)
        return _OnDevice(module, self._device)


class WeightSource:
    """The interface of weight-only analyses: sizes, ``device``, per-layer matrices, a few modules.

    Subclasses provide ``W_V``, ``W_O``, ``b_V``, ``b_O``, ``W_E``, ``W_U``, ``embed``,
    ``block`` (an object whose ``ln1``/``ln2``/``mlp`` and, where the model has them,
    ``ln1_post``/``ln2_post`` are callables), ``final_norm_gain`` and ``has_attn_out_norm``.
    Every tensor returned is on ``device``.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_vocab: int
    device: torch.device

    def kv_head(self, head: int) -> int:
        """The key/value head a query head reads (GQA): ``h // (n_heads / n_kv_heads)``."""
        return head // (self.n_heads // self.n_kv_heads)

    def _per_query_head(self, W: Tensor) -> Tensor:
        return W.repeat_interleave(self.n_heads // W.shape[0], dim=0) if W.shape[0] != self.n_heads else W

    def W_O_into_residual(self, layer: int, *, fold_attn_out_norm: bool = True) -> Float[Tensor, "head d_head d_model"]:
        """``W_O`` in float32, times the post-attention norm's gain where the model has one
        (its per-token scale does not change ranks, so this is what reaches the residual up to scale)."""
        W_O = self.W_O(layer).float()
        if fold_attn_out_norm and self.has_attn_out_norm:
            W_O = W_O * self.norm_gain(self.block(layer).ln1_post, self.d_model, self.device).float()
        return W_O

    @staticmethod
    def norm_gain(norm, d_model: int, device) -> Float[Tensor, " d_model"]:
        """Elementwise gain of an RMS/LayerNorm module, read off its outputs on an alternating
        +-1 vector and its negation (zero mean and unit RMS, so neither kind rescales it, and
        the difference cancels a LayerNorm's bias; ones would centre to zero under LayerNorm)."""
        signs = torch.ones(d_model, device=device)
        signs[1::2] = -1.0
        if d_model % 2:  # odd width: the mean is not zero; fall back to ones (RMS norms only)
            signs = torch.ones(d_model, device=device)
        with torch.no_grad():
            up, down = norm(signs[None, None]), norm(-signs[None, None])
        return ((up - down) / (2 * signs))[0, 0]

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise MechkitError(f"layer {layer} out of range: the model has {self.n_layers} layers (0-{self.n_layers - 1})")


def as_weights(model) -> WeightSource:
    """``model`` itself when it is already a :class:`WeightSource`, else :class:`BridgeWeights` of it."""
    return model if isinstance(model, WeightSource) else BridgeWeights(model)


class BridgeWeights(WeightSource):
    """Weights of a loaded TransformerBridge, per layer, with GQA expanded per query head."""

    def __init__(self, model) -> None:
        hf = getattr(model, "original_model", model)
        for module_name, module in hf.named_modules():
            if _has_offloaded_params(module):
                continue  # accelerate loads these on demand (device_map with "disk"/"cpu" offload)
            for name, param in module.named_parameters(recurse=False):
                if param.device.type == "meta":
                    raise MechkitError(
                        f"weight {module_name}.{name} is on the meta device and nothing can load it (not "
                        "loaded, or offloaded without accelerate's hooks); head classification reads weights "
                        "directly: load the model with mechkit.load_model(name) (a device_map with 'disk' "
                        "entries is fine), or read them from disk with mechkit.CheckpointWeights(path)"
                    )
        self.model = model
        cfg = model.cfg
        self.n_layers, self.n_heads, self.d_head = cfg.n_layers, cfg.n_heads, cfg.d_head
        self.d_model, self.d_vocab = cfg.d_model, cfg.d_vocab
        self.n_kv_heads = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        device = getattr(cfg, "device", None)  # the embedding's device under a device map
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.tokenizer = getattr(model, "tokenizer", None)

    def _read(self, component: torch.nn.Module, attr: str, *, copy: bool = False) -> Tensor | None:
        """``component.attr`` on ``self.device``; offloaded weights are loaded for the read and copied out.

        Per-layer matrices are copies (cheap), so editing them never edits the model; the
        embedding and unembedding are views where they already sit on ``self.device``.
        """
        offloaded = any(_has_offloaded_params(m) for m in component.modules())
        with _materialised(component):
            value = getattr(component, attr)
            return None if value is None else value.detach().to(self.device, copy=copy or offloaded)

    def W_V(self, layer: int) -> Float[Tensor, "head d_model d_head"]:
        """Value weights per *query* head (shared within a GQA group)."""
        self._check_layer(layer)
        return self._per_query_head(self._read(self.model.blocks[layer].attn, "W_V", copy=True))

    def W_O(self, layer: int) -> Float[Tensor, "head d_head d_model"]:
        self._check_layer(layer)
        return self._read(self.model.blocks[layer].attn, "W_O", copy=True)

    @property
    def has_attn_out_norm(self) -> bool:
        """Whether each attention output is normalised before the residual (Gemma-3's post-attention norm)."""
        return hasattr(self.model.blocks[0], "ln1_post")

    def b_V(self, layer: int) -> Float[Tensor, "head d_head"] | None:
        try:
            b = self._read(self.model.blocks[layer].attn, "b_V")
        except (AttributeError, RuntimeError):
            return None
        return None if b is None else self._per_query_head(b.reshape(-1, self.d_head))

    def b_O(self, layer: int) -> Float[Tensor, " d_model"] | None:
        try:
            return self._read(self.model.blocks[layer].attn, "b_O")
        except (AttributeError, RuntimeError):
            return None

    def W_E(self) -> Float[Tensor, "vocab d_model"]:
        return self._read(self.model.embed, "W_E")

    def W_U(self) -> Float[Tensor, "d_model vocab"]:
        return self._read(self.model.unembed, "W_U")

    def embed(self, tokens: Tensor) -> Float[Tensor, "n d_model"]:
        """Token embeddings as the model's embedding layer produces them (Gemma scales by sqrt(d_model))."""
        device = _execution_device(self.model.embed, self.device)
        return self.model.embed(tokens[None].to(device))[0].to(self.device)

    def block(self, layer: int) -> _LayerView:
        self._check_layer(layer)
        return _LayerView(self.model.blocks[layer], self.device)

    def final_norm_gain(self) -> Float[Tensor, " d_model"]:
        return self.norm_gain(_OnDevice(self.model.ln_final, self.device), self.d_model, self.device)


class _CheckpointLayer:
    """The modules of one layer of a :class:`CheckpointWeights`, built from disk when first used."""

    def __init__(self, weights: CheckpointWeights, layer: int) -> None:
        self._weights, self._layer = weights, layer

    def __getattr__(self, name: str) -> _OnDevice:
        child = self._weights._children.get(name)
        if child is None:
            raise AttributeError(name)
        return _OnDevice(self._weights._layer_module(self._layer, child), self._weights.device)


class CheckpointWeights(WeightSource):
    """The :class:`BridgeWeights` interface read from a checkpoint on disk, one layer at a time.

    Args:
        path: a Hugging Face folder of safetensors files (one file or shards with
            ``model.safetensors.index.json``) or a ``.gguf`` file, of a Llama- or
            Gemma-3-style model (``model.embed_tokens``, ``model.layers.N.self_attn.{v,o}_proj``,
            ``model.layers.N.mlp``, norms; ``lm_head`` or tied embeddings).
        device: where the matrices go and the arithmetic runs (default CPU).
        dtype: floating dtype of every tensor read (default float32, as ``load_model``).
        tokenizer: the tokenizer (default: loaded from the folder or the GGUF file).

    ``classify_heads(weights)`` then works as on a loaded model. At most one layer's
    tensors are resident (``resident()`` lists them; ``layer_loads`` counts reads per layer),
    besides the embedding, unembedding and final norm. ``mechkit.json``'s hash is used
    where the folder has one; otherwise provenance hashes the checkpoint by streaming it.
    """

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, tokenizer=None) -> None:
        from mechkit.models.checkpoint import CheckpointReader
        from mechkit.models.loading import ModelInfo, tokenizer_prepends_bos

        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise MechkitError(f"dtype must be a floating torch dtype such as torch.float32, got {dtype!r}")
        self.reader = CheckpointReader(path)
        config = self.reader.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        meta = self.reader.meta_model
        state = meta.state_dict(keep_vars=True)
        embed = [n for n in state if n.endswith("embed_tokens.weight")]
        base = embed[0][: -len(".embed_tokens.weight")] if embed else None
        layer0 = meta.get_submodule(f"{base}.layers.0") if base is not None else None
        attn = getattr(layer0, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("v_proj", "o_proj")) or not hasattr(layer0, "mlp"):
            raise MechkitError(
                f"CheckpointWeights reads Llama- and Gemma-3-style checkpoints (model.embed_tokens, "
                f"model.layers.N.self_attn.v_proj/o_proj, model.layers.N.mlp); {self.reader.path} is a "
                f"{getattr(config, 'model_type', '?')!r} model without them: load it with mechkit.load_model instead"
            )
        self._base = base
        if hasattr(layer0, "pre_feedforward_layernorm"):  # Gemma-2/3: a norm before and after each sublayer
            self._children = {"ln1": "input_layernorm", "ln1_post": "post_attention_layernorm",
                              "ln2": "pre_feedforward_layernorm", "ln2_post": "post_feedforward_layernorm", "mlp": "mlp"}
        else:
            self._children = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm", "mlp": "mlp"}
        self._lm_head = next((n for n in state if n.endswith("lm_head.weight")), None)
        self.n_layers = text.num_hidden_layers
        self.n_heads = text.num_attention_heads
        self.d_model = text.hidden_size
        self.d_head = getattr(text, "head_dim", None) or self.d_model // self.n_heads
        self.n_kv_heads = getattr(text, "num_key_value_heads", None) or self.n_heads
        self.d_vocab = text.vocab_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.tokenizer = tokenizer if tokenizer is not None else self.reader.tokenizer()
        name = self.reader.path.stem if self.reader.kind == "gguf" else self.reader.path.name
        self.mechkit = ModelInfo(name=name, source="checkpoint", path=str(self.reader.path),
                                 prepend_bos=tokenizer_prepends_bos(self.tokenizer))
        self._layer: int | None = None
        self._layer_cache: dict[str, object] = {}
        self._global: dict[str, object] = {}
        self.layer_loads: Counter[int] = Counter()

    def __repr__(self) -> str:
        return (f"CheckpointWeights({str(self.reader.path)!r}, layers={self.n_layers}, heads={self.n_heads}, "
                f"device={self.device})")

    # -- reading ----------------------------------------------------------------------
    def _tensor(self, name: str) -> Tensor:
        tensor = self.reader.tensor(name)
        return tensor.to(self.device, self.dtype if tensor.is_floating_point() else tensor.dtype)

    def _cache_for(self, layer: int) -> dict[str, object]:
        self._check_layer(layer)
        if layer != self._layer:
            self._layer_cache = {}  # drop the previous layer before reading the next
            self._layer = layer
            self.layer_loads[layer] += 1
        return self._layer_cache

    def _layer_tensor(self, layer: int, name: str) -> Tensor:
        cache = self._cache_for(layer)
        if name not in cache:
            cache[name] = self._tensor(f"{self._base}.layers.{layer}.{name}")
        return cache[name]

    def _filled(self, path: str, tensor_of) -> torch.nn.Module:
        """A copy of the meta module at ``path`` holding real tensors (so the architecture's own code runs)."""
        meta = self.reader.meta_model.get_submodule(path)
        module = copy.deepcopy(meta)
        state = {n: (tensor_of(n) if t.device.type == "meta" else t) for n, t in meta.state_dict(keep_vars=True).items()}
        module.load_state_dict(state, assign=True)
        return module.to(self.device).eval().requires_grad_(False)

    def _layer_module(self, layer: int, child: str) -> torch.nn.Module:
        cache = self._cache_for(layer)
        key = f"module:{child}"
        if key not in cache:
            cache[key] = self._filled(f"{self._base}.layers.{layer}.{child}",
                                      lambda n: self._layer_tensor(layer, f"{child}.{n}"))
        return cache[key]

    def _global_tensor(self, name: str) -> Tensor:
        if name not in self._global:
            self._global[name] = self._tensor(name)
        return self._global[name]

    def resident(self) -> list[str]:
        """Names of the tensors held right now (one layer's, plus embedding, unembedding, final norm)."""
        layer = [f"{self._base}.layers.{self._layer}.{n}" for n in self._layer_cache if not n.startswith("module:")]
        return sorted(layer + [n for n in self._global if not n.startswith("module:")])

    def resident_bytes(self) -> int:
        """Bytes of the tensors held right now (see :meth:`resident`)."""
        tensors = [t for t in (*self._layer_cache.values(), *self._global.values()) if isinstance(t, Tensor)]
        return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values())

    # -- the WeightSource interface ------------------------------------------------------
    def W_V(self, layer: int) -> Float[Tensor, "head d_model d_head"]:
        """Value weights per *query* head (shared within a GQA group)."""
        W = self._layer_tensor(layer, "self_attn.v_proj.weight")  # (kv * d_head, d_model)
        return self._per_query_head(W.reshape(self.n_kv_heads, self.d_head, self.d_model).transpose(1, 2))

    def W_O(self, layer: int) -> Float[Tensor, "head d_head d_model"]:
        W = self._layer_tensor(layer, "self_attn.o_proj.weight")  # (d_model, head * d_head)
        return W.T.reshape(self.n_heads, self.d_head, self.d_model)

    @property
    def has_attn_out_norm(self) -> bool:
        return "ln1_post" in self._children

    def b_V(self, layer: int) -> Float[Tensor, "head d_head"] | None:
        name = f"{self._base}.layers.{layer}.self_attn.v_proj.bias"
        if name not in self.reader:
            return None
        return self._per_query_head(self._layer_tensor(layer, "self_attn.v_proj.bias").reshape(-1, self.d_head))

    def b_O(self, layer: int) -> Float[Tensor, " d_model"] | None:
        name = f"{self._base}.layers.{layer}.self_attn.o_proj.bias"
        return self._layer_tensor(layer, "self_attn.o_proj.bias") if name in self.reader else None

    def W_E(self) -> Float[Tensor, "vocab d_model"]:
        return self._global_tensor(f"{self._base}.embed_tokens.weight")

    def W_U(self) -> Float[Tensor, "d_model vocab"]:
        if self._lm_head is not None and self._lm_head in self.reader:
            return self._global_tensor(self._lm_head).T
        config = self.reader.config
        tied = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                       "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))
        if not tied:
            raise MechkitError(f"{self.reader.path} has no lm_head.weight and its config does not tie the "
                               "embeddings: the checkpoint is incomplete")
        return self.W_E().T

    def embed(self, tokens: Tensor) -> Float[Tensor, "n d_model"]:
        """Token embeddings as the model's embedding layer produces them (Gemma scales by sqrt(d_model))."""
        key = "module:embed_tokens"
        if key not in self._global:
            self._global[key] = self._filled(f"{self._base}.embed_tokens", lambda n: self.W_E())
        return self._global[key](tokens.to(self.device))

    def block(self, layer: int) -> _CheckpointLayer:
        self._check_layer(layer)
        return _CheckpointLayer(self, layer)

    def final_norm_gain(self) -> Float[Tensor, " d_model"]:
        key = "module:norm"
        if key not in self._global:
            self._global[key] = self._filled(f"{self._base}.norm",
                                             lambda n: self._global_tensor(f"{self._base}.norm.{n}"))
        return self.norm_gain(_OnDevice(self._global[key], self.device), self.d_model, self.device)

    def hash_weights(self) -> str:
        """The weights hash for provenance: mechkit.json's where it matches, else a streamed hash."""
        from mechkit.models.registry import read_meta

        if self.reader.kind == "safetensors" and self.dtype == torch.float32:
            known = read_meta(self.reader.path).get("weights_hash")
            if known:
                return known
        return self.reader.weights_hash(self.dtype)
