"""Head attribution with each head split into query, key and value nodes, and AtP*'s QK fix.

Nodes: a query head's ``blocks.L.attn.hook_q`` slice, and a key/value head's ``hook_k`` and
``hook_v`` slices (under GQA a key or value node is shared by the query heads of its group; its
score is reported for each of them). Scores follow :mod:`mechkit.heads.attribution`'s sign
convention: ``metric(clean) - metric(node corrupted)``, positive = the node carries the behaviour.

* exact patching: one forward per node (nodes of a layer batched as replicas);
* AtP: ``(x_clean - x_corrupt) . d metric / d x`` at ``hook_q`` / ``hook_k`` / ``hook_v``;
* AtP* (Kramar et al. 2024): for query and key nodes the attention scores are recomputed with
  the corrupted query (or key), ``s' = s + scale * (q' k^T - q k^T)`` from the rotated
  ``hook_rot_q``/``hook_rot_k`` and the clean scores (so masks and windows are kept), the
  softmax is taken exactly, and the change in the pattern is read through the gradient at
  ``hook_pattern`` (the QK fix: softmax saturation is not linearised); value nodes take plain
  AtP. GradDrop then repeats this with each layer's gradient path dropped and combines
  ``sum_l |estimate_l| / (L - 1)`` per example (magnitudes).
"""

from __future__ import annotations

import torch
from einops import einsum
from torch import Tensor

from mechkit.errors import MechkitError
from mechkit.heads.patching import (
    TaskBatch,
    cache_activations,
    metric,
    metric_gradients,
    metric_positions,
    run_to_logits,
)

NODES = ("q", "k", "v")
_CACHED = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
           "attn.hook_attn_scores", "attn.hook_pattern", "hook_resid_pre")


def _name(layer: int, hook: str) -> str:
    return f"blocks.{layer}.{hook}"


def _cache(model, tokens: Tensor) -> dict[str, Tensor]:
    return cache_activations(model, tokens, [_name(l, h) for l in range(model.cfg.n_layers) for h in _CACHED])


def corrupted_cache(clean: dict[str, Tensor], batch: TaskBatch, model, corruption: str) -> dict[str, Tensor]:
    """q/k/v activations of the corrupted run ("paired"), of another example ("resample") or zero."""
    if corruption == "paired":
        return _cache(model, batch.corrupted)
    if corruption == "zero":
        return {name: torch.zeros_like(x) for name, x in clean.items()}
    if corruption == "resample":
        if len(batch) < 2:
            raise MechkitError("corruption='resample' needs at least two examples of each prompt length")
        return {name: x.roll(1, dims=0) for name, x in clean.items()}
    raise MechkitError(f"query/key/value nodes take corruption 'paired', 'resample' or 'zero', not {corruption!r} "
                       "(a mean query is not the query of a mean input after the rotary embedding)")


def _group(model) -> int:
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads
    return model.cfg.n_heads // n_kv


def patching(model, batch: TaskBatch, clean: dict, corrupt: dict, clean_metric: Tensor,
             layers: list[int]) -> Tensor:
    """Exact ``metric(clean) - metric(node patched)``: ``(layer, head, node, batch)``."""
    cfg, n = model.cfg, len(batch)
    group = _group(model)
    out = torch.zeros(cfg.n_layers, cfg.n_heads, 3, n)
    positions = metric_positions(batch)
    for layer in layers:
        nodes = [("q", h) for h in range(cfg.n_heads)] + [(kind, g) for kind in "kv" for g in range(cfg.n_heads // group)]

        def patcher(kind):
            name = _name(layer, f"attn.hook_{kind}")

            def hook(x, hook):
                x = x.clone()
                for r, (node_kind, index) in enumerate(nodes):
                    if node_kind == kind:
                        x[r * n:(r + 1) * n, :, index] = corrupt[name][:, :, index]
                return x
            return hook

        inputs = clean[_name(layer, "hook_resid_pre")].repeat(len(nodes), 1, 1)
        with torch.no_grad():
            logits = run_to_logits(model, inputs, positions, start_at_layer=layer,
                                   fwd_hooks=[(_name(layer, f"attn.hook_{k}"), patcher(k)) for k in NODES])
        effect = (clean_metric[None] - metric(batch, logits, replicas=len(nodes)).reshape(len(nodes), n)).cpu()
        for r, (kind, index) in enumerate(nodes):
            heads = [index] if kind == "q" else list(range(index * group, (index + 1) * group))
            out[layer, heads, NODES.index(kind)] = effect[r]
    return out


def _scale(scores: Tensor, q: Tensor, k: Tensor, group: int) -> float:
    """The attention's score scale, fitted on the clean run's unmasked scores (``s = scale * q.k``)."""
    raw = einsum(q, k.repeat_interleave(group, dim=2), "b t h d, b s h d -> b h t s")
    keep = scores > -1e30
    return float((scores[keep] * raw[keep]).sum() / raw[keep].pow(2).sum().clamp_min(1e-30))


def atp(model, clean: dict, corrupt: dict, batch: TaskBatch, *, qk_fix: bool, drop_layer: int | None = None) -> Tensor:
    """AtP estimates for every node, ``(layer, head, node, batch)``, of ``metric(clean) - metric(patched)``;
    with ``qk_fix`` the query/key nodes recompute the softmax exactly (AtP*)."""
    cfg = model.cfg
    group = _group(model)
    hooks = ("attn.hook_pattern", "attn.hook_v") if qk_fix else ("attn.hook_q", "attn.hook_k", "attn.hook_v")
    grads = metric_gradients(model, batch, [_name(l, h) for l in range(cfg.n_layers) for h in hooks],
                             drop_layer=drop_layer)[1]
    out = torch.zeros(cfg.n_layers, cfg.n_heads, 3, len(batch))
    for layer in range(cfg.n_layers):
        def linear(kind):
            name = _name(layer, f"attn.hook_{kind}")
            return einsum(corrupt[name] - clean[name], grads[name], "b t h d, b t h d -> h b")

        v = linear("v").repeat_interleave(group, dim=0)
        if not qk_fix:
            q, k = linear("q"), linear("k").repeat_interleave(group, dim=0)
        else:
            rq, rk = clean[_name(layer, "attn.hook_rot_q")], clean[_name(layer, "attn.hook_rot_k")]
            cq, ck = corrupt[_name(layer, "attn.hook_rot_q")], corrupt[_name(layer, "attn.hook_rot_k")]
            scores, pattern = clean[_name(layer, "attn.hook_attn_scores")], clean[_name(layer, "attn.hook_pattern")]
            g_pattern = grads[_name(layer, "attn.hook_pattern")]
            scale = _scale(scores, rq, rk, group)
            k_rep, ck_rep = rk.repeat_interleave(group, dim=2), ck.repeat_interleave(group, dim=2)
            q_scores = scores + scale * einsum(cq - rq, k_rep, "b t h d, b s h d -> b h t s")
            k_scores = scores + scale * einsum(rq, ck_rep - k_rep, "b t h d, b s h d -> b h t s")
            q = einsum(q_scores.softmax(-1) - pattern, g_pattern, "b h t s, b h t s -> h b")
            per_query = einsum(k_scores.softmax(-1) - pattern, g_pattern, "b h t s, b h t s -> h b")
            k = per_query.reshape(-1, group, len(batch)).sum(1).repeat_interleave(group, dim=0)  # a key node moves its group
        out[layer] = -torch.stack([q, k, v], dim=1).cpu()
    return out


def node_scores(model, batch: TaskBatch, method: str, corruption: str, layers: list[int], bar) -> Tensor:
    """``(layer, head, node, batch)`` scores of one batch under ``method`` (patching, atp, atp*)."""
    cfg = model.cfg
    clean = _cache(model, batch.clean)
    corrupt = corrupted_cache(clean, batch, model, corruption)
    if method == "patching":
        with torch.no_grad():
            clean_metric = metric(batch, run_to_logits(model, batch.clean, metric_positions(batch)))
        scores = patching(model, batch, clean, corrupt, clean_metric, layers)
        bar.update(len(batch) * len(layers))
        return scores
    if method == "atp":
        bar.update(len(batch))
        return atp(model, clean, corrupt, batch, qk_fix=False)
    total = torch.zeros(cfg.n_layers, cfg.n_heads, 3, len(batch))
    for drop in range(cfg.n_layers):
        total += atp(model, clean, corrupt, batch, qk_fix=True, drop_layer=drop).abs()
        bar.update(len(batch))
    return total / max(cfg.n_layers - 1, 1)


__all__ = ["NODES", "node_scores"]
