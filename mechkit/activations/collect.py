"""``collect_activations``: named hooks at chosen token positions, batched, bounded, streamed.

Only the requested hooks at the requested positions are kept (never the whole cache),
moved to the CPU batch by batch. The forward pass stops after the deepest requested
layer, so the unembedding (which dominates a 262k-vocabulary forward) is computed only
when ``"logits"`` is among the hooks.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from mechkit.activations.memory import parse_bytes, plan_batch_size
from mechkit.activations.positions import Position, as_position
from mechkit.data.prompts import EncodedPrompt, Prompt, as_prompts, encode
from mechkit.activations.store import ActivationSet, DiskWriter
from mechkit.errors import MechkitError
from mechkit.models.loading import input_device
from mechkit.results import Provenance, data_hash

LOGITS = "logits"
_LAYER = re.compile(r"^blocks\.(\d+)\.")


class _StopForward(Exception):
    """Raised from a hook once every requested activation of a batch is in hand."""


def check_hooks(model, hooks: Sequence[str]) -> list[str]:
    """Validate hook names against the model's hook points; say which exist when one does not."""
    if isinstance(hooks, str):
        hooks = [hooks]
    hooks = list(dict.fromkeys(hooks))
    if not hooks:
        raise MechkitError("no hooks requested: name at least one, e.g. 'blocks.0.hook_resid_post'")
    available = model.hook_dict
    for hook in hooks:
        if hook.endswith(NOT_POSITION_INDEXED):
            raise MechkitError(
                f"{hook} is indexed (batch, head, query, key), not by token position; collect "
                "blocks.L.attn.hook_z or hook_q/hook_k/hook_v instead, or use model.run_with_cache"
            )
        if hook != LOGITS and hook not in available:
            close = difflib.get_close_matches(hook, list(available), n=5, cutoff=0.6)
            layer0 = sorted(h for h in available if h.startswith("blocks.0.") and h.count(".") <= 3)[:12]
            raise MechkitError(
                f"hook {hook!r} does not exist in this model."
                + (f" Close: {close}." if close else "")
                + f" Layer-0 examples: {layer0}; also 'logits'. Full list: model.hook_dict.keys()"
            )
    return hooks


def _stop_layer(model, hooks: list[str]) -> int | None:
    """Deepest block the hooks need, or None when the full forward is needed."""
    layers = []
    for hook in hooks:
        match = _LAYER.match(hook)
        if match:
            layers.append(int(match.group(1)))
        elif hook in ("hook_embed", "hook_pos_embed", "embed.hook_out", "embed.hook_in"):
            layers.append(0)
        else:
            return None
    return max(layers)


def _resolve_positions(encoded: list[EncodedPrompt], positions: list[Position], on_missing: str):
    """Per kept example, the token index of each position (0 where missing under "nan"),
    the missing mask, and the dropped examples."""
    table, kept, dropped, holes = [], [], {}, []
    for i, prompt in enumerate(encoded):
        row = [p.resolve(prompt) for p in positions]
        missing = [p.name for p, r in zip(positions, row) if r is None]
        if missing and (on_missing != "nan" or len(missing) == len(positions)):
            dropped[i] = f"missing position(s) {missing}"
            continue
        kept.append(i)
        holes.append([r is None for r in row])
        table.append([0 if r is None else r for r in row])
    if dropped and on_missing == "raise":
        first = list(dropped.items())[:5]
        raise MechkitError(
            f"{len(dropped)} of {len(encoded)} prompts lack a requested named position, e.g. "
            f"{first}; give their spans, or pass on_missing='drop' to skip them (reported in .dropped)"
        )
    if not kept:
        raise MechkitError(f"every prompt lacks a requested position; reasons: {list(dropped.items())[:5]}")
    return kept, torch.tensor(table, dtype=torch.long), torch.tensor(holes, dtype=torch.bool), dropped


NOT_POSITION_INDEXED = ("hook_pattern", "hook_attn_scores")


def _dry_run_shapes(model, prompt: EncodedPrompt, hooks: list[str], stop_layer: int | None) -> dict[str, tuple[int, ...]]:
    """Trailing shape of each hook's activation (after batch and position), from one short example."""
    tokens = torch.tensor([prompt.ids[:4]])
    where = torch.zeros((1, 1), dtype=torch.long)
    device = input_device(model)  # the embedding's device: layers may sit on others (device_map)
    captured = _run(model, tokens.to(device), torch.ones_like(tokens).to(device), where.to(device), hooks,
                    stop_layer, torch.float32)
    return {h: tuple(captured[h].shape[2:]) for h in hooks}


def collect_activations(
    model,
    prompts: Sequence[str | Prompt],
    hooks: Sequence[str] | str,
    positions: Sequence[int | str | Position] | int | str = (-1,),
    *,
    batch_size: int | None = None,
    max_memory: int | str | None = None,
    padding_side: Literal["right", "left"] = "right",
    out: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    on_missing: Literal["raise", "drop", "nan"] = "raise",
    progress: bool = True,
) -> ActivationSet:
    """Run ``model`` over ``prompts`` and keep ``hooks`` at ``positions`` only.

    Args:
        model: a TransformerBridge (e.g. from :func:`mechkit.load_model`).
        prompts: strings or :class:`~mechkit.data.prompts.Prompt` objects (with
            named spans, or ``chat=True`` for a chat model's template).
        hooks: hook names such as ``"blocks.5.hook_resid_post"``, or ``"logits"``.
        positions: ints (negative counts from each prompt's end) and/or named positions
            (``"last_q"``, ``"exact_answer_first"``, ...; see ``positions.py``).
        batch_size: upper bound on the batch size (default 32, lowered to fit ``max_memory``).
        max_memory: bound on the memory the collection uses on top of the loaded model
            (bytes or ``"2GB"``); estimated from shapes before running.
        padding_side: padding of batched prompts; positions resolve per prompt either way.
        out: stream to this folder instead of keeping results in RAM (memory-mapped on
            return; an interrupted run resumes on the next call with the same arguments).
        dtype: storage dtype of the kept activations.
        on_missing: prompts lacking a named position: ``"raise"`` (default), ``"drop"`` them,
            or ``"nan"``: keep them, with NaN activations and token id -1 at the missing
            positions (prompts lacking every position are still dropped).
        progress: show a progress bar.

    Returns:
        An :class:`~mechkit.activations.store.ActivationSet`; ``result[hook]`` has shape
        ``(example, position, *hook_dims)`` e.g. ``(n, p, d_model)`` or ``(n, p, head, d_head)``.
    """
    prompt_list = as_prompts(prompts)
    hook_list = check_hooks(model, hooks)
    if isinstance(positions, (int, str, Position)):
        positions = [positions]
    position_list = [as_position(p) for p in positions]
    if not position_list:
        raise MechkitError("no positions requested; e.g. positions=[-1] for the last token")
    if padding_side not in ("right", "left"):
        raise MechkitError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if dtype not in (torch.float32, torch.float16, torch.float64, torch.bfloat16):
        raise MechkitError(f"dtype must be a float dtype, got {dtype}")
    if out is not None and dtype == torch.bfloat16:
        raise MechkitError("bfloat16 cannot be stored on disk (numpy has no bfloat16); use float16 or float32")

    encoded = [encode(model, p) for p in prompt_list]
    n_ctx = model.cfg.n_ctx
    for i, e in enumerate(encoded):
        if len(e.ids) > n_ctx:
            raise MechkitError(
                f"prompt {i} has {len(e.ids)} tokens, more than the model's context window of {n_ctx}; "
                "shorten it (mechkit never truncates silently)"
            )
    if on_missing not in ("raise", "drop", "nan"):
        raise MechkitError(f"on_missing must be 'raise', 'drop' or 'nan', got {on_missing!r}")
    kept, index_table, holes, dropped = _resolve_positions(encoded, position_list, on_missing)
    kept_prompts = [encoded[i] for i in kept]
    n, n_pos = len(kept), len(position_list)

    stop_layer = None if LOGITS in hook_list else _stop_layer(model, hook_list)
    # A dry run on one short example gives every hook's shape before the long job starts.
    trailing = _dry_run_shapes(model, kept_prompts[0], hook_list, stop_layer)
    shapes = {h: (n, n_pos, *trailing[h]) for h in hook_list}
    itemsize = torch.empty((), dtype=dtype).element_size()
    kept_per_example = sum(int(np.prod(s[1:])) for s in shapes.values()) * itemsize
    max_tokens = max(len(e.ids) for e in kept_prompts)
    batch = plan_batch_size(
        cfg=model.cfg, max_tokens=max_tokens, kept_bytes_per_example=kept_per_example, n_examples=n,
        logits=LOGITS in hook_list, max_memory=parse_bytes(max_memory), requested=batch_size,
        streaming=out is not None,
    )

    settings = dict(hooks=hook_list, positions=[p.name for p in position_list], padding_side=padding_side,
                    dtype=str(dtype), on_missing=on_missing)
    provenance = Provenance.for_model(model, data=[(p.text, dict(p.spans), p.chat) for p in prompt_list], **settings)
    meta = {"format": "mechkit.ActivationSet/1", "hooks": hook_list, "positions": settings["positions"],
            "examples": kept, "dropped": {str(k): v for k, v in dropped.items()}, "provenance": provenance.to_dict()}

    # Longest first: similar lengths share a batch (less padding) and memory peaks early.
    order = sorted(range(n), key=lambda j: -len(kept_prompts[j].ids))
    batches = [order[s:s + batch] for s in range(0, n, batch)]
    writer = None
    if out is not None:
        fingerprint = f"{provenance.weights_hash}:{provenance.data_hash}:{data_hash(settings)}:{batch}"
        writer = DiskWriter(Path(out), meta, {h: (s, dtype) for h, s in shapes.items()}, n_examples=n,
                            n_positions=n_pos, fingerprint=fingerprint)
        results, token_out = None, None
    else:
        results = {h: torch.empty(s, dtype=dtype) for h, s in shapes.items()}
        token_out = torch.empty((n, n_pos), dtype=torch.long)

    pad_id = model.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else 0
    device = input_device(model)  # the embedding's device: layers may sit on others (device_map)
    bar = tqdm(total=n, desc="collecting activations", unit="prompt", disable=not progress)
    for b, rows in enumerate(batches):
        if writer is not None and b in writer.done:
            bar.update(len(rows))
            continue
        tokens, mask, where = _pad([kept_prompts[j] for j in rows], index_table[rows], pad_id, padding_side)
        captured = _run(model, tokens.to(device), mask.to(device), where.to(device), hook_list, stop_layer, dtype)
        token_ids = tokens.gather(1, where)
        hole = holes[rows]
        if hole.any():
            token_ids[hole] = -1
            for h in hook_list:
                captured[h][hole] = float("nan")
        if writer is not None:
            writer.write(np.asarray(rows), token_ids, captured, batch=b)
        else:
            for h in hook_list:
                results[h][rows] = captured[h]
            token_out[rows] = token_ids
        bar.update(len(rows))
    bar.close()
    if writer is not None:
        return ActivationSet.load(writer.finish())
    return ActivationSet(results, settings["positions"], kept, token_out, dropped, provenance)


def _pad(prompts: list[EncodedPrompt], index: Int[Tensor, "batch position"], pad_id: int, side: str):
    """Padded token ids, attention mask, and positions shifted by each row's left padding."""
    length = max(len(p.ids) for p in prompts)
    tokens = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    where = index.clone()
    for r, p in enumerate(prompts):
        start = length - len(p.ids) if side == "left" else 0
        tokens[r, start:start + len(p.ids)] = torch.tensor(p.ids)
        mask[r, start:start + len(p.ids)] = 1
        where[r] += start
    return tokens, mask, where


@torch.no_grad()
def _run(model, tokens, mask, where, hooks: list[str], stop_layer: int | None, dtype) -> dict[str, Tensor]:
    captured: dict[str, Tensor] = {}
    rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None]

    def keeper(name: str):
        # Hook names may be aliases (hook_resid_post is blocks.L.hook_out): key by the request.
        def keep(activation: Tensor, hook) -> None:
            on = activation.device  # this layer's device under a device_map
            captured[name] = activation[rows.to(on), where.to(on)].to("cpu", dtype)

        return keep

    def stop(activation: Tensor, hook) -> None:
        raise _StopForward

    fwd_hooks = [(h, keeper(h)) for h in hooks if h != LOGITS]
    if stop_layer is not None:
        fwd_hooks.append((f"blocks.{stop_layer}.hook_resid_post", stop))
    with model.hooks(fwd_hooks=fwd_hooks):
        try:
            logits = model(tokens, attention_mask=mask, return_type="logits")
        except _StopForward:
            logits = None
    if LOGITS in hooks:
        captured[LOGITS] = logits[rows.to(logits.device), where.to(logits.device)].to("cpu", dtype)
    return captured
