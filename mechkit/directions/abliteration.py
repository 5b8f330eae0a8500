"""Abliteration (Arditi et al. 2024): edit the weights so that no write to the residual stream holds a direction.

:func:`orthogonalize` projects the unit direction ``u`` out of every matrix that writes to the
residual stream: the token (and position) embedding, every attention output matrix (all heads'
W_O at once) and every MLP output matrix, with their biases. The unembedding is first untied
from the embedding (both bundled models tie them), so that reading the vocabulary is untouched.

Two kinds of architecture:

* writes added to the stream directly (Llama, SmolLM2, GPT-2): ``W <- (I - u u^T) W``. The edited
  model equals :func:`~mechkit.directions.ablate_direction` (up to float rounding).
* writes normalised first (Gemma-2/3: ``write = g * x / rms(x)`` with gain ``g = 1 + w``): no
  edit of W_O or of the down projection reproduces the hook, which projects after the norm.
  Orthogonalising against ``v = normalise(g * u)`` makes ``x . v = 0``, hence ``write . u = 0``
  exactly: the direction is absent from every write, but the magnitudes differ from the
  hook's, so compare such models by the KL divergence to the hook-ablated model, not by equality.

:func:`make_abliterated` is what ``load_model("<model>+abliterated[:<direction file>]")`` runs the
first time: the direction comes from the file, or is found on the model's own harmful-vs-harmless
set (:func:`~mechkit.directions.selection.refusal_direction`); the edited model is saved in the cache.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from mechkit.directions.files import load_direction, save_direction
from mechkit.directions.interventions import check_direction
from mechkit.errors import MechkitError
from mechkit.models.edited import boot_edited, hf_weights, rebuild_hf_model, save_edited
from mechkit.models.loading import model_info

SUFFIX = "abliterated"
POST_NORM_MODEL_TYPES = ("gemma2", "gemma3", "gemma3_text")
EMBEDDINGS = re.compile(r"(embed_tokens|wte|wpe)\.weight$")
# Linear (out, in): rows live in the residual stream; Conv1D (GPT-2, (in, out)): columns do.
LINEAR_WRITES = re.compile(r"\.(\d+)\.(self_attn\.o_proj|mlp\.down_proj)\.(weight|bias)$")
CONV1D_WRITES = re.compile(r"\.(\d+)\.(attn\.c_proj|mlp\.c_proj)\.(weight|bias)$")
POST_NORM_OF = {"self_attn.o_proj": "post_attention_layernorm", "mlp.down_proj": "post_feedforward_layernorm"}


def _out_of_rows(W: Tensor, v: Tensor) -> Tensor:
    """``(I - v v^T) W`` for W whose rows (first axis) are residual-stream coordinates; also biases."""
    return W - torch.outer(v, v @ W) if W.ndim == 2 else W - (W @ v) * v


def _out_of_columns(W: Tensor, v: Tensor) -> Tensor:
    """``W (I - v v^T)`` for W whose columns (last axis) are residual-stream coordinates; also biases."""
    return W - torch.outer(W @ v, v) if W.ndim == 2 else W - (W @ v) * v


def _layer_prefix(key: str, match: re.Match) -> str:
    return key[:match.start()] + "." + match.group(1)


def orthogonalize(model, direction, *, name: str | None = None):
    """A new model (bridge) whose weights never write ``direction`` to the residual stream.

    Args:
        model: the bridge to edit (left unchanged).
        direction: ``(d_model,)``, any norm (normalised here).
        name: the new model's name (default ``"<model>+abliterated"``).

    Returns:
        A bridge with the embedding untied from the unembedding; save it with
        :func:`mechkit.models.edited.save_edited` or load it by name through ``load_model``.
    """
    u = check_direction(model, direction).double()
    config = model.original_model.config
    weights = hf_weights(model)
    post_norm = any("post_feedforward_layernorm" in key for key in weights)
    if post_norm and getattr(config, "model_type", None) not in POST_NORM_MODEL_TYPES:
        raise MechkitError(f"{config.model_type} normalises each sublayer's output, and mechkit knows the norm's gain "
                           f"only for {POST_NORM_MODEL_TYPES}: use ablate_direction (hooks) for this model")
    edited = dict(weights)  # untouched entries are shared, not copied
    if "lm_head.weight" not in weights:  # tied: the unembedding keeps the unedited embedding
        embed = next(key for key in weights if EMBEDDINGS.search(key) and "wpe" not in key)
        edited["lm_head.weight"] = weights[embed].clone()
    touched = 0
    for key, W in weights.items():
        if EMBEDDINGS.search(key) or CONV1D_WRITES.search(key):
            project, v = _out_of_columns, u
        elif match := LINEAR_WRITES.search(key):
            project, v = _out_of_rows, u
            if post_norm:  # the write is g * x / rms(x): keep x orthogonal to g * u
                gain = 1.0 + weights[f"{_layer_prefix(key, match)}.{POST_NORM_OF[match.group(2)]}.weight"].double()
                v = torch.nn.functional.normalize(gain * u, dim=0)
        else:
            continue
        edited[key] = project(W.double(), v).to(W.dtype)  # float64 only for the matrices edited
        touched += 1
    expected = 1 + 2 * model.cfg.n_layers
    if touched < expected:
        raise MechkitError(f"found only {touched} residual-stream writers in {config.model_type} (expected at least "
                           f"{expected}: the embedding and two per layer); its weight names are not ones mechkit knows")
    base = model_info(model).name
    hf = rebuild_hf_model(model, edited, untie=True)
    return boot_edited(model, hf, name=name or f"{base}+{SUFFIX}", source=SUFFIX)


def make_abliterated(base: str, direction_file: str | None = None, *, progress: bool = True) -> Path:
    """Build ``<base>+abliterated[:<direction_file>]`` once and save it in the cache; returns its folder.

    Without a file the direction is the refusal direction found on the model's own
    harmful-vs-harmless set and chosen by the causal criterion (see
    :func:`~mechkit.directions.selection.refusal_direction`); the choice is kept in the saved
    model's ``mechkit.json``, the direction in ``direction.npz`` and every candidate's scores in
    ``selection.npz`` beside the weights.
    """
    from mechkit.directions.selection import refusal_direction
    from mechkit.models.loading import load_model

    model = load_model(base)
    name = f"{base}+{SUFFIX}" + (f":{direction_file}" if direction_file else "")
    found = None
    if direction_file:
        direction, choice = load_direction(direction_file, model), {"file": str(Path(direction_file).resolve())}
    else:
        found = refusal_direction(model, progress=progress)
        direction, choice = found.direction, found.summary()
    edited = orthogonalize(model, direction, name=name)
    folder = save_edited(edited, name, kind=SUFFIX, base=base, direction=choice,
                         description=f"{base} with its refusal direction orthogonalised out of every residual write")
    save_direction(folder / "direction.npz", direction, model, **choice)
    if found is not None:  # every candidate's bypass / induce / KL / AUC, for the record
        found.scores.save(folder / "selection.npz")
    return folder


__all__ = ["SUFFIX", "make_abliterated", "orthogonalize"]
