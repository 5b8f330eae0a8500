"""Edited copies of a loaded model: plain HF weights out of a bridge, a new bridge, the cache.

A TransformerLens 4 bridge wraps the HF modules in place (``model.layers.0._original_component
.self_attn...``), so a weight edit cannot just copy the bridge. :func:`hf_weights` reads the
weights under their plain HF names, :func:`rebuild_hf_model` makes a fresh HF model from them
(optionally with the unembedding untied from the embedding), :func:`boot_edited` boots it with
the source model's tokenizer and BOS policy, and :func:`save_edited` writes any bridge to the
mechkit cache so that ``load_model(name)`` finds it. Used by ``directions/`` (abliteration);
this module knows nothing about what the edit was.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from torch import Tensor

from mechkit.errors import MechkitError
from mechkit.models.cache import atomic_folder, models_dir
from mechkit.models.fingerprint import hash_state_dict
from mechkit.models.loading import ModelInfo, _boot, model_info
from mechkit.models.registry import read_meta, write_meta

WRAPPER = "._original_component"


def hf_weights(model) -> dict[str, Tensor]:
    """The model's parameters under their plain HF names (detached CPU float copies, tied ones once)."""
    hf = model.original_model
    fresh_names = {name for name, _ in _skeleton(hf.config).named_parameters()}
    weights: dict[str, Tensor] = {}
    for name, tensor in hf.state_dict().items():
        plain = name.replace(WRAPPER, "")
        if plain in fresh_names and plain not in weights:
            if tensor.device.type == "meta":
                raise MechkitError(f"{plain} is offloaded (on the meta device): load the model whole to edit it")
            weights[plain] = tensor.detach().to("cpu").clone()
    missing = fresh_names - set(weights) - {"lm_head.weight"}
    if missing:
        raise MechkitError(f"cannot read {len(missing)} weights of this model, e.g. {sorted(missing)[:3]}")
    return weights


def _skeleton(config):
    """An HF model of ``config`` on the meta device (names and shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def rebuild_hf_model(model, weights: dict[str, Tensor], *, untie: bool = False):
    """A fresh HF model with the source's config and ``weights``; ``untie=True`` gives it its own
    unembedding (a copy of the tied embedding), so that editing the embedding leaves it alone."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.original_model.config)
    weights = dict(weights)
    if untie and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
        if getattr(config, "text_config", None) is not None:
            config.text_config.tie_word_embeddings = False
    hf = AutoModelForCausalLM.from_config(config).to(torch.float32)
    if not getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in weights:
        embed = next(name for name in weights if re.search(r"(embed_tokens|wte)\.weight$", name))
        weights["lm_head.weight"] = weights[embed].clone()
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise MechkitError(f"the edited weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf.config.architectures = list(getattr(model.original_model.config, "architectures", None) or [type(hf).__name__])
    return hf.eval()


def _source_tokenizer(model):
    """The tokenizer the model was saved with (the bridge's own always adds BOS)."""
    path = model_info(model).path
    if path and (Path(path) / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    return model.tokenizer


def boot_edited(model, hf_model, *, name: str, source: str):
    """A bridge on ``hf_model`` with ``model``'s tokenizer, BOS policy, chat flag and device."""
    base = model_info(model)
    device = str(next(model.original_model.parameters()).device)
    bridge = _boot(hf_model, _source_tokenizer(model), name, device, torch.float32)
    bridge.mechkit = ModelInfo(name=name, source=source, chat=base.chat, path=None, prepend_bos=base.prepend_bos,
                               _weights_hash=bridge.mechkit_weights_hash)
    return bridge


def cache_folder(name: str) -> Path:
    """The cache folder for a model named ``name`` (characters unsafe in paths replaced)."""
    return models_dir() / re.sub(r"[^A-Za-z0-9._+-]", "-", name)


def save_edited(model, name: str, **meta: object) -> Path:
    """Write ``model`` (any bridge) to the mechkit cache as ``name``: safetensors, tokenizer, metadata.

    Written into a temporary folder and renamed when complete, so an interrupted save leaves
    nothing that looks finished. ``meta`` (JSON-serialisable) is kept in ``mechkit.json``.
    """
    info = model_info(model)
    hf = rebuild_hf_model(model, hf_weights(model))
    folder = cache_folder(name)
    with atomic_folder(folder) as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        _source_tokenizer(model).save_pretrained(tmp)
        write_meta(tmp, {"dtype": "float32", **meta, "name": name, "chat": info.chat,
                         "prepend_bos": info.prepend_bos, "weights_hash": hash_state_dict(hf)})
    return folder


def saved_meta(name: str) -> dict:
    """``mechkit.json`` of a model saved with :func:`save_edited` ({} when there is none)."""
    return read_meta(cache_folder(name))


__all__ = ["boot_edited", "cache_folder", "hf_weights", "rebuild_hf_model", "save_edited", "saved_meta"]
