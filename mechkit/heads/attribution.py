"""How much each attention head matters for a task: DLA, activation patching, AtP, AtP*.

Nodes are heads' outputs, ``blocks.{l}.attn.hook_z`` (before ``W_O``). Every method returns
``layer x head`` scores in the task metric's units (logit difference, or log-probability of
the answer) with one sign convention: **positive = the head carries the clean behaviour**,
i.e. the score estimates ``metric(clean) - metric(clean with this head's output replaced by
its corrupted value)``.

* ``"patching"`` (ground truth): that replacement, exactly, one forward per head, heads of a
  layer batched as replicas; each run starts at the head's layer from the clean residual and
  unembeds only the metric's positions.
* ``"atp"`` (attribution patching): ``(z_clean - z_corrupt) . d metric / d z`` for all heads from
  one clean forward+backward and one corrupted forward.
* ``"atp*"``: AtP with GradDrop (Kramar et al. 2024): the backward pass is rerun once per layer
  with the gradient through that layer's attention and MLP outputs dropped, and the estimate is
  ``sum_l |AtP_l| / (L - 1)`` per example, a magnitude (compare it with ``|patching|``). Its other
  fix (recomputing attention softmaxes for query/key nodes) has nothing to fix for ``hook_z``
  nodes; with ``nodes="qkv"`` heads are split into query, key and value nodes and the QK fix
  applies (:mod:`mechkit.heads.qkv_nodes`).
* ``"dla"``: direct logit attribution of the clean run: each head's output through ``W_O`` (and
  Gemma's post-attention norm, with its scale from the clean run), the final norm's scale
  from the clean run, and the unembedding, read along ``W_U[answer] - W_U[corrupted answer]``
  (an unpaired task reads the first answer token's logit).
* ``"mean_ablation"`` / ``"zero_ablation"``: patching with the head's mean output over the task
  (all positions and examples) or zero as the corrupted value.

``corruption`` chooses the corrupted value for patching and AtP: ``"paired"`` (the task's
corrupted twin, default when there is one), ``"mean"``, ``"zero"`` or ``"resample"`` (the same
head's output on another example of the same length).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from einops import einsum
from torch import Tensor
from tqdm.auto import tqdm

from mechkit.data.tasks import Task, as_task, tokenise_task
from mechkit.errors import MechkitError
from mechkit.heads import qkv_nodes
from mechkit.heads.interventions import check_heads
from mechkit.heads.patching import (
    TaskBatch,
    bootstrap_interval,
    cache_activations,
    metric,
    metric_gradients,
    metric_positions,
    run_to_logits,
    task_batches,
)
from mechkit.heads.weights import BridgeWeights
from mechkit.results import LabelledArray, Provenance

METHODS = ("patching", "atp", "atp*", "dla", "mean_ablation", "zero_ablation")
CORRUPTIONS = ("paired", "mean", "zero", "resample")


def _z_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def _cache_z(model, tokens: Tensor) -> list[Tensor]:
    """Every layer's head outputs ``(batch, pos, head, d_head)`` on ``tokens`` (no grad)."""
    store = cache_activations(model, tokens, [_z_name(l) for l in range(model.cfg.n_layers)])
    return [store[_z_name(l)] for l in range(model.cfg.n_layers)]


def mean_head_outputs(model, tok, batch_size: int) -> Tensor:
    """Each head's output ``(layer, head, d_head)`` averaged over every position of every clean example
    of a tokenised task (what mean-ablation puts in its place)."""
    sums, count = None, 0
    for batch in task_batches(tok, batch_size):
        part = torch.stack([z.sum((0, 1)) for z in _cache_z(model, batch.clean)])
        sums = part if sums is None else sums + part
        count += batch.clean.shape[0] * batch.clean.shape[1]
    return sums / count


class _Corruption:
    """The corrupted head outputs of a batch, per layer, under one corruption scheme."""

    def __init__(self, model, tok, corruption: str, batch_size: int) -> None:
        self.model, self.kind = model, corruption
        if corruption == "mean":
            self.mean = mean_head_outputs(model, tok, batch_size)

    def __call__(self, batch: TaskBatch, clean_z: list[Tensor]) -> list[Tensor]:
        if self.kind == "paired":
            return _cache_z(self.model, batch.corrupted)
        if self.kind == "zero":
            return [torch.zeros_like(z) for z in clean_z]
        if self.kind == "mean":
            return [self.mean[l].expand_as(z) for l, z in enumerate(clean_z)]
        if len(batch) < 2:  # resample: another example of the same length; a lone example has none
            raise MechkitError("corruption='resample' needs at least two examples of each prompt length; "
                               "use a larger batch_size, or corruption='mean'")
        return [z.roll(1, dims=0) for z in clean_z]


def _patching(model, batch: TaskBatch, clean_z, corrupt_z, clean_metric, heads_per_run: int, bar,
              head_lists: dict[int, list[int]]) -> Tensor:
    """Per-example ``metric(clean) - metric(head patched)`` for the heads in ``head_lists`` ({layer: heads}):
    ``(layer, head, batch)`` (other entries stay zero)."""
    cfg = model.cfg
    positions = metric_positions(batch)
    resid = cache_activations(model, batch.clean, [f"blocks.{l}.hook_resid_pre" for l in head_lists])
    out = torch.zeros(cfg.n_layers, cfg.n_heads, len(batch))
    n = len(batch)
    for layer, layer_heads in head_lists.items():
        for start in range(0, len(layer_heads), heads_per_run):
            heads = layer_heads[start:start + heads_per_run]
            source = corrupt_z[layer]

            def patch(z: Tensor, hook, heads=heads, source=source) -> Tensor:
                z = z.clone()
                for g, head in enumerate(heads):
                    z[g * n:(g + 1) * n, :, head] = source[:, :, head]
                return z

            inputs = resid[f"blocks.{layer}.hook_resid_pre"].repeat(len(heads), 1, 1)
            with torch.no_grad():
                logits = run_to_logits(model, inputs, positions, start_at_layer=layer,
                                       fwd_hooks=[(_z_name(layer), patch)])
            patched = metric(batch, logits, replicas=len(heads)).reshape(len(heads), n)
            out[layer, heads] = (clean_metric[None] - patched).cpu()
            bar.update(len(heads) * n)
    return out


def _gradients(model, batch: TaskBatch, drop_layer: int | None = None) -> list[Tensor]:
    """d(sum of metric)/dz for every layer's head outputs (GradDrop with ``drop_layer``)."""
    names = [_z_name(l) for l in range(model.cfg.n_layers)]
    grads = metric_gradients(model, batch, names, drop_layer=drop_layer)[1]
    return [grads[n] for n in names]


def _atp_paired(model, batch: TaskBatch) -> tuple[Tensor, Tensor, Tensor]:
    """AtP with paired corruption from one clean forward and backward and one corrupted forward,
    which also give the batch's clean and corrupted metric (the task baseline), so that nothing
    runs twice: ``(scores (layer, head, batch), clean metric, corrupted metric)``."""
    names = [_z_name(l) for l in range(model.cfg.n_layers)]
    clean: dict[str, Tensor] = {}
    clean_metric, grads = metric_gradients(model, batch, names, capture=clean)
    corrupted: dict[str, Tensor] = {}

    def grab(name):
        def hook(x, hook):
            corrupted[name] = x.detach()
            return x
        return hook

    with torch.no_grad():
        corrupted_metric = metric(batch, run_to_logits(model, batch.corrupted, metric_positions(batch),
                                                       fwd_hooks=[(n, grab(n)) for n in names]))
    scores = _atp([clean[n] for n in names], [corrupted[n] for n in names], [grads[n] for n in names])
    return scores, clean_metric, corrupted_metric


def _atp(clean_z, corrupt_z, grads) -> Tensor:
    """``(z_clean - z_corrupt) . grad`` summed over positions and d_head: ``(layer, head, batch)``."""
    return torch.stack([einsum(c - x, g, "b p h d, b p h d -> h b") for c, x, g in zip(clean_z, corrupt_z, grads)]).cpu()


def _dla(model, batch: TaskBatch, clean_z: list[Tensor]) -> Tensor:
    """Direct logit attribution of each head on the clean run: ``(layer, head, batch)``."""
    weights = BridgeWeights(model)
    cfg = model.cfg
    last = batch.clean.shape[1] - 1 if batch.answer is not None else batch.clean.shape[1] - batch.answer_length - 1
    final_name = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        final = cache_activations(model, batch.clean, [final_name])[final_name][:, last].float()  # (batch, d_model)
        layer_norm = getattr(cfg, "normalization_type", "RMS") in ("LN", "LNPre")
        centred = final - final.mean(-1, keepdim=True) if layer_norm else final
        scale = (centred.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt()  # the final norm's scale, clean run
        W_U = weights.W_U().float()
        answer = batch.answer if batch.answer is not None else batch.clean[:, -batch.answer_length]
        direction = W_U[:, answer].T  # (batch, d_model)
        if batch.wrong is not None:
            direction = direction - W_U[:, batch.wrong].T
        direction = direction * weights.norm_gain(model.ln_final, cfg.d_model, final.device)
        out = torch.zeros(cfg.n_layers, cfg.n_heads, len(batch))
        for layer in range(cfg.n_layers):
            z = clean_z[layer][:, last].float()  # (batch, head, d_head)
            per_head = einsum(z, weights.W_O(layer).float(), "b h e, h e d -> b h d")
            if weights.has_attn_out_norm:  # Gemma: the attention output is RMS-normalised before the residual
                norm = weights.block(layer).ln1_post
                total = per_head.sum(1)
                rms = (total.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt()
                per_head = per_head / rms[:, None] * weights.norm_gain(norm, cfg.d_model, final.device)
            if layer_norm:
                per_head = per_head - per_head.mean(-1, keepdim=True)
            out[layer] = einsum(per_head / scale[:, None], direction, "b h d, b d -> h b").cpu()
    return out


def task_metric(model, task: Task | str, *, batch_size: int = 32, seed: int = 0) -> dict:
    """The task's clean (and corrupted) metric per example, its mean with a bootstrap 95%
    interval, and whether the interval excludes 0 (the model does the task at all)."""
    task = as_task(task)
    tok = tokenise_task(model, task)
    clean = np.zeros(len(tok.kept))
    corrupted = np.zeros(len(tok.kept)) if tok.corrupted is not None else None
    with torch.no_grad():
        for batch in task_batches(tok, batch_size):
            clean[batch.index] = metric(batch, run_to_logits(model, batch.clean, metric_positions(batch))).cpu().numpy()
            if corrupted is not None:
                corrupted[batch.index] = metric(batch, run_to_logits(model, batch.corrupted, metric_positions(batch))).cpu().numpy()
    return _summarise_metric(task, tok, clean, corrupted, seed)


def _summarise_metric(task: Task, tok, clean: np.ndarray, corrupted: np.ndarray | None, seed: int) -> dict:
    """:func:`task_metric`'s dict from the per-example clean (and corrupted) metric."""
    low, high = bootstrap_interval(clean, seed=seed)
    return {"task": task.name, "metric": "logit_diff" if task.paired else "answer_logprob",
            "n": len(tok.kept), "dropped": {str(i): why for i, why in tok.dropped.items()},
            "clean": float(clean.mean()), "ci": [low, high],
            "corrupted": None if corrupted is None else float(corrupted.mean()),
            "significant": bool(task.paired and (low > 0 or high < 0)) if task.paired else None,
            "per_example": clean.tolist()}


def attribute_heads(
    model,
    task: Task | str,
    method: str = "atp*",
    *,
    corruption: str | None = None,
    magnitude: bool = False,
    batch_size: int = 16,
    heads_per_run: int | None = None,
    layers: list[int] | None = None,
    heads: Sequence[tuple[int, int]] | None = None,
    nodes: str = "z",
    seed: int = 0,
    progress: bool = True,
) -> LabelledArray:
    """Score every head of ``model`` for ``task`` (see the module doc for methods and signs).

    Args:
        task: a :class:`~mechkit.data.tasks.Task`, a built-in task name or a JSONL path.
        method: ``"patching"``, ``"atp"``, ``"atp*"``, ``"dla"``, ``"mean_ablation"`` or ``"zero_ablation"``.
        corruption: ``"paired"`` (default for paired tasks), ``"mean"`` (default otherwise),
            ``"zero"`` or ``"resample"``.
        magnitude: average per-example absolute values (what AtP* estimates; always on for it).
        batch_size: examples per forward pass.
        heads_per_run: heads patched per forward in exact patching (replicas of the batch);
            default all heads of a layer.
        layers: score only these layers (default all); exact patching then runs only there (how
            :func:`~mechkit.heads.distributed.attribute_heads_distributed` shards it).
        heads: exact patching / ablation of only these ``(layer, head)`` pairs; the others are NaN
            (e.g. the top heads of a cheaper method, where patching every head would take hours).
        nodes: ``"z"`` (each head's output, default) or ``"qkv"``: each head split into query,
            key and value nodes (:mod:`mechkit.heads.qkv_nodes`; methods patching, atp, atp*, where
            AtP* adds the QK fix), returned with a third axis ``node``.

    Returns:
        ``layer x head`` scores; ``attrs`` hold the method, corruption, the task's clean metric
        with its bootstrap interval and whether it excludes 0 (``significant``), what was
        dropped, and the time taken.
    """
    if method not in METHODS:
        raise MechkitError(f"unknown method {method!r}; use one of {METHODS}")
    task = as_task(task)
    if method in ("mean_ablation", "zero_ablation"):
        corruption = method.split("_")[0]
    corruption = corruption or ("paired" if task.paired else "mean")
    if corruption not in CORRUPTIONS:
        raise MechkitError(f"unknown corruption {corruption!r}; use one of {CORRUPTIONS}")
    if corruption == "paired" and not task.paired:
        raise MechkitError(f"task {task.name!r} has no corrupted twins; use corruption='mean', 'zero' or 'resample'")
    if nodes not in ("z", "qkv"):
        raise MechkitError(f"nodes must be 'z' (head outputs) or 'qkv' (query/key/value nodes), got {nodes!r}")
    if nodes == "qkv" and method not in ("patching", "atp", "atp*"):
        raise MechkitError(f"query/key/value nodes are scored by 'patching', 'atp' or 'atp*', not {method!r}")
    cfg = model.cfg
    layer_list = list(range(cfg.n_layers)) if layers is None else [int(l) for l in layers]
    bad = [l for l in layer_list if not 0 <= l < cfg.n_layers]
    if bad or not layer_list:
        raise MechkitError(f"layers {bad or layer_list} out of range: the model has {cfg.n_layers} layers")
    if heads is not None:
        if method not in ("patching", "mean_ablation", "zero_ablation") or nodes != "z":
            raise MechkitError(f"heads= selects heads for exact patching or ablation, not for {method!r}")
        heads = check_heads(model, heads)
        outside = [h for h in heads if h[0] not in layer_list]
        if outside:
            raise MechkitError(f"heads {outside[:5]} lie outside layers={layer_list}")
    head_lists = {layer: sorted(h for l, h in heads if l == layer) if heads is not None else list(range(cfg.n_heads))
                  for layer in layer_list}
    head_lists = {layer: chosen for layer, chosen in head_lists.items() if chosen}
    tok = tokenise_task(model, task)
    heads_per_run = heads_per_run or cfg.n_heads
    started = time.perf_counter()
    corrupt = _Corruption(model, tok, corruption, batch_size) if method != "dla" and nodes == "z" else None
    per_example = torch.zeros(cfg.n_layers, cfg.n_heads, *((3,) if nodes == "qkv" else ()), len(tok.kept))
    work = len(tok.kept) * (sum(map(len, head_lists.values())) if method in ("patching", "mean_ablation", "zero_ablation")
                            else cfg.n_layers if method == "atp*" else 1)
    bar = tqdm(total=work, desc=f"{method} on {task.name}", unit="run", disable=not progress)
    # AtP with paired corruption runs the clean and corrupted prompts anyway: the baseline comes from those runs.
    reuse = method == "atp" and nodes == "z" and corruption == "paired"
    clean_values, corrupted_values = np.zeros(len(tok.kept)), np.zeros(len(tok.kept))
    for batch in task_batches(tok, batch_size):
        if reuse:
            scores, clean_metric, corrupted_metric = _atp_paired(model, batch)
            per_example[..., batch.index] = scores
            clean_values[batch.index] = clean_metric.cpu().numpy()
            corrupted_values[batch.index] = corrupted_metric.cpu().numpy()
            bar.update(len(batch))
            continue
        if nodes == "qkv":
            per_example[..., batch.index] = qkv_nodes.node_scores(model, batch, method, corruption, layer_list, bar)
            continue
        clean_z = _cache_z(model, batch.clean)
        if method == "dla":
            scores = _dla(model, batch, clean_z)
            bar.update(len(batch))
        elif method in ("patching", "mean_ablation", "zero_ablation"):
            with torch.no_grad():
                clean_metric = metric(batch, run_to_logits(model, batch.clean, metric_positions(batch)))
            scores = _patching(model, batch, clean_z, corrupt(batch, clean_z), clean_metric, heads_per_run, bar,
                               head_lists)
        else:
            corrupt_z = corrupt(batch, clean_z)
            if method == "atp":
                scores = _atp(clean_z, corrupt_z, _gradients(model, batch))
                bar.update(len(batch))
            else:  # atp*: GradDrop, one backward per dropped layer
                scores = torch.zeros(cfg.n_layers, cfg.n_heads, len(batch))
                for drop in range(cfg.n_layers):
                    scores += _atp(clean_z, corrupt_z, _gradients(model, batch, drop_layer=drop)).abs()
                    bar.update(len(batch))
                scores /= max(cfg.n_layers - 1, 1)
        per_example[..., batch.index] = scores
    bar.close()
    per_example = per_example[layer_list]
    values = per_example.abs().mean(-1) if (magnitude or method == "atp*") else per_example.mean(-1)
    if heads is not None:
        chosen = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.bool)
        for layer, head in heads:
            chosen[layer, head] = True
        values = torch.where(chosen[layer_list], values, torch.full_like(values, float("nan")))
    if reuse:
        baseline = _summarise_metric(task, tok, clean_values, corrupted_values, seed)
    else:
        baseline = task_metric(model, task, batch_size=batch_size, seed=seed)
    baseline.pop("per_example")
    settings = dict(method=method, corruption=None if method == "dla" else corruption,
                    magnitude=bool(magnitude or method == "atp*"), layers=layer_list, nodes=nodes,
                    **({"heads": [list(h) for h in heads]} if heads is not None else {}))
    provenance = Provenance.for_model(model, data={"task": task.name, "clean": list(task.clean)}, seed=seed, **settings)
    return LabelledArray(
        values.numpy().astype(np.float32), ("layer", "head") + (("node",) if nodes == "qkv" else ()),
        {"layer": layer_list, "head": list(range(cfg.n_heads)), **({"node": list(qkv_nodes.NODES)} if nodes == "qkv" else {})},
        name=f"{method} head attribution: {task.name}", provenance=provenance,
        attrs={**settings, "task": task.name, "baseline": baseline, "seconds": time.perf_counter() - started},
    )


def top_heads(scores: LabelledArray, n: int = 3) -> list[tuple[str, float]]:
    """The ``n`` heads (or query/key/value nodes) with the largest |score|: ``("L3.H2", score)``."""
    axes = ("layer", "head") + (("node",) if "node" in scores.axes else ())
    values = np.nan_to_num(scores.transpose(*axes).values.astype(float), nan=0.0)
    order = np.argsort(-np.abs(values), axis=None, kind="stable")[:n]
    top = []
    for index in zip(*np.unravel_index(order, values.shape)):
        name = f"L{scores.labels['layer'][index[0]]}.H{scores.labels['head'][index[1]]}"
        if len(index) == 3:
            name += f".{scores.labels['node'][index[2]]}"
        top.append((name, float(values[index])))
    return top


__all__ = ["CORRUPTIONS", "METHODS", "attribute_heads", "mean_head_outputs", "task_metric", "top_heads"]
