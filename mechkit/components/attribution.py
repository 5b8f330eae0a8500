"""How each layer's weight matrices share a task's effect: W_Q, W_K, W_V, W_O, MLP up, gate, down.

Three measures, each ``layer x component``:

* ``"grad_x_weight"`` (first-order Taylor): ``|sum(W * d metric / d W)|`` per matrix, the
  gradient taken of the task metric averaged over the examples (``elementwise=True``:
  ``sum(|W * d metric / d W|)``, which does not let a matrix's entries cancel).
* ``"patching"`` (exact): the metric's drop when one matrix's output is replaced by its
  corrupted value, one forward per (layer, component). Which activation stands for which
  matrix: q ``blocks.L.attn.hook_q``, k ``attn.hook_k``, v ``attn.hook_v``, o
  ``blocks.L.hook_attn_out`` (the attention output, W_O's output), gate ``mlp.hook_pre``,
  up ``mlp.hook_pre_linear`` (GPT-2-style MLPs: up is ``mlp.hook_pre``, there is no gate),
  down ``blocks.L.hook_mlp_out``. The activation after the MLP's non-linearity is not a
  component of its own: the down projection after it is linear.
* :func:`checkpoint_diff`: ``||W_a - W_b|| / ||W_b||`` (Frobenius) per matrix between two
  models of the same architecture, e.g. a base and a fine-tuned checkpoint.

By default values are normalised to shares of their absolute values within each layer
(a row sums to 1; signed effects can cancel to a sum near 0); ``normalise=False`` keeps the
raw values (signed for patching). A component a model does not have (the gate of a GPT-2
MLP) is NaN, not 0.

Note on models whose sublayer outputs are normalised before the residual (Gemma 2/3's post-
attention and post-feedforward norms): the layer's output does not change when v, o, up or down
is scaled, so ``W . dM/dW`` of those matrices is zero by Euler's theorem (and v equals o, up
equals down, on any model). There use ``elementwise=True`` or ``"patching"``; a warning says so.
"""

from __future__ import annotations

import re
import time
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from mechkit.data.tasks import Task, as_task, tokenise_task
from mechkit.errors import MechkitError
from mechkit.heads.attribution import task_metric
from mechkit.heads.patching import (
    cache_activations,
    metric,
    metric_positions,
    run_to_logits,
    task_batches,
)
from mechkit.results import LabelledArray, Provenance

COMPONENTS = ("q", "k", "v", "o", "up", "gate", "down")
METHODS = ("grad_x_weight", "patching")
# Parameter names (HF, with the bridge's wrappers removed) of each component, by architecture family.
_WEIGHT_PATTERNS = {
    "q": (r"layers\.{l}\.self_attn\.q_proj\.weight", r"h\.{l}\.attn\.q\.weight"),
    "k": (r"layers\.{l}\.self_attn\.k_proj\.weight", r"h\.{l}\.attn\.k\.weight"),
    "v": (r"layers\.{l}\.self_attn\.v_proj\.weight", r"h\.{l}\.attn\.v\.weight"),
    "o": (r"layers\.{l}\.self_attn\.o_proj\.weight", r"h\.{l}\.attn\.o\.weight"),
    "up": (r"layers\.{l}\.mlp\.up_proj\.weight", r"h\.{l}\.mlp\.c_fc\.weight"),
    "gate": (r"layers\.{l}\.mlp\.gate_proj\.weight",),
    "down": (r"layers\.{l}\.mlp\.down_proj\.weight", r"h\.{l}\.mlp\.c_proj\.weight"),
}


def _gated(model) -> bool:
    return "blocks.0.mlp.hook_pre_linear" in model.hook_dict


def component_hook(model, layer: int, component: str) -> str | None:
    """The hook whose activation is ``component``'s output at ``layer`` (None if the model lacks it)."""
    gated = _gated(model)
    names = {"q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v", "o": "hook_attn_out",
             "gate": "mlp.hook_pre" if gated else None, "up": "mlp.hook_pre_linear" if gated else "mlp.hook_pre",
             "down": "hook_mlp_out"}
    return None if names[component] is None else f"blocks.{layer}.{names[component]}"


def component_weights(model) -> dict[tuple[int, str], torch.nn.Parameter]:
    """``{(layer, component): parameter}`` of the underlying HF model; missing components are absent."""
    params = {re.sub(r"\._original_component", "", name): p for name, p in model.original_model.named_parameters()}
    found = {}
    for layer in range(model.cfg.n_layers):
        for component, patterns in _WEIGHT_PATTERNS.items():
            for pattern in patterns:
                regex = re.compile(r"(^|\.)" + pattern.format(l=layer) + "$")
                hits = [p for name, p in params.items() if regex.search(name)]
                if hits:
                    found[(layer, component)] = hits[0]
                    break
    if not any(c == "q" for _, c in found):
        raise MechkitError(f"no attention weights found in {type(model.original_model).__name__}: component "
                           "attribution knows Llama/Gemma/Qwen-style (q_proj ...) and GPT-2-style (attn.q ...) names")
    return found


def _as_shares(raw: np.ndarray, normalise: bool) -> np.ndarray:
    if not normalise:
        return raw
    magnitude = np.abs(raw)
    total = np.nansum(magnitude, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, magnitude / total, np.nan)


def _grad_x_weight(model, tok, batch_size: int, elementwise: bool, bar) -> np.ndarray:
    weights = component_weights(model)
    saved = {key: p.requires_grad for key, p in weights.items()}
    grads = {key: torch.zeros_like(p, dtype=torch.float32) for key, p in weights.items()}
    n = len(tok.kept)
    try:
        for p in weights.values():
            p.requires_grad_(True)
        for batch in task_batches(tok, batch_size):
            with torch.enable_grad():
                values = metric(batch, run_to_logits(model, batch.clean, metric_positions(batch)))
                found = torch.autograd.grad(values.sum() / n, list(weights.values()), allow_unused=True)
            for key, g in zip(weights, found):
                if g is not None:
                    grads[key] += g.float()
            bar.update(len(batch))
    finally:
        for key, p in weights.items():
            p.requires_grad_(saved[key])
    if all(not g.any() for g in grads.values()):
        raise MechkitError("the metric has zero gradient with respect to every weight matrix (it is constant): "
                           "check the task's answers and the model")
    raw = np.full((model.cfg.n_layers, len(COMPONENTS)), np.nan)
    for (layer, component), p in weights.items():
        product = p.detach().float() * grads[(layer, component)]
        raw[layer, COMPONENTS.index(component)] = float(product.abs().sum() if elementwise else product.sum().abs())
    return raw


def _patching(model, tok, corruption: str, batch_size: int, bar) -> np.ndarray:
    cfg = model.cfg
    hooks = {(l, c): component_hook(model, l, c) for l in range(cfg.n_layers) for c in COMPONENTS}
    hooks = {key: name for key, name in hooks.items() if name is not None}
    totals = np.zeros((cfg.n_layers, len(COMPONENTS)))
    means: dict[str, torch.Tensor] = {}
    if corruption == "mean":  # each activation's mean over the task's examples and positions
        count = 0
        for batch in task_batches(tok, batch_size):
            cache = cache_activations(model, batch.clean, hooks.values())
            for name, x in cache.items():
                means[name] = means.get(name, 0) + x.sum((0, 1))
            count += batch.clean.shape[0] * batch.clean.shape[1]
        means = {name: s / count for name, s in means.items()}
    for batch in task_batches(tok, batch_size):
        positions = metric_positions(batch)
        with torch.no_grad():
            clean = metric(batch, run_to_logits(model, batch.clean, positions))
        source = cache_activations(model, batch.corrupted, hooks.values()) if corruption == "paired" else None
        resid = cache_activations(model, batch.clean, [f"blocks.{l}.hook_resid_pre" for l in range(cfg.n_layers)])
        for (layer, component), name in hooks.items():
            def patch(x, hook, name=name, source=source):
                if corruption == "paired":
                    return source[name]
                return torch.zeros_like(x) if corruption == "zero" else means[name].expand_as(x)

            with torch.no_grad():
                logits = run_to_logits(model, resid[f"blocks.{layer}.hook_resid_pre"], positions, start_at_layer=layer,
                                       fwd_hooks=[(name, patch)])
            totals[layer, COMPONENTS.index(component)] += float((clean - metric(batch, logits)).sum())
            bar.update(len(batch))
    raw = totals / len(tok.kept)
    for layer in range(cfg.n_layers):
        for component in COMPONENTS:
            if (layer, component) not in hooks:
                raw[layer, COMPONENTS.index(component)] = np.nan
    return raw


def attribute_components(
    model,
    task: Task | str,
    method: str = "grad_x_weight",
    *,
    normalise: bool = True,
    elementwise: bool = False,
    corruption: str | None = None,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> LabelledArray:
    """Each layer's q/k/v/o/up/gate/down share of a task's effect (see the module doc).

    Args:
        task: a :class:`~mechkit.data.tasks.Task`, built-in task name or JSONL path.
        method: ``"grad_x_weight"`` or ``"patching"``.
        normalise: shares of absolute values within each layer (default), else raw values.
        elementwise: for ``grad_x_weight``, sum ``|W * grad|`` over entries instead of ``|sum(W * grad)|``.
        corruption: for ``patching``: ``"paired"`` (default for paired tasks), ``"mean"`` or ``"zero"``.

    Returns:
        ``layer x component`` values (NaN for a component the model lacks); ``attrs`` hold the
        method, whether normalised, the raw values and the task's baseline metric.
    """
    if method not in METHODS:
        raise MechkitError(f"unknown method {method!r}; use one of {METHODS}")
    task = as_task(task)
    corruption = corruption or ("paired" if task.paired else "mean")
    if method == "patching" and corruption not in ("paired", "mean", "zero"):
        raise MechkitError(f"unknown corruption {corruption!r}; use 'paired', 'mean' or 'zero'")
    if method == "patching" and corruption == "paired" and not task.paired:
        raise MechkitError(f"task {task.name!r} has no corrupted twins; use corruption='mean' or 'zero'")
    tok = tokenise_task(model, task)
    if method == "grad_x_weight" and not elementwise and hasattr(model.blocks[0], "ln1_post"):
        warnings.warn("this model normalises each sublayer's output (post-norms), so W . dM/dW of v, o, up and down "
                      "is zero by scale invariance; use elementwise=True or method='patching'", stacklevel=2)
    started = time.perf_counter()
    steps = len(tok.kept) * (1 if method == "grad_x_weight" else model.cfg.n_layers * len(COMPONENTS))
    with tqdm(total=steps, desc=f"{method} components on {task.name}", disable=not progress) as bar:
        raw = (_grad_x_weight(model, tok, batch_size, elementwise, bar) if method == "grad_x_weight"
               else _patching(model, tok, corruption, batch_size, bar))
    baseline = task_metric(model, task, batch_size=batch_size, seed=seed)
    baseline.pop("per_example")
    settings = dict(method=method, normalised=normalise, elementwise=elementwise,
                    corruption=corruption if method == "patching" else None)
    provenance = Provenance.for_model(model, data={"task": task.name, "clean": list(task.clean)}, seed=seed, **settings)
    return LabelledArray(
        _as_shares(raw, normalise).astype(np.float32), ("layer", "component"),
        {"layer": list(range(model.cfg.n_layers)), "component": list(COMPONENTS)},
        name=f"{method} component attribution: {task.name}", provenance=provenance,
        attrs={**settings, "task": task.name, "raw": raw.tolist(), "baseline": baseline,
               "seconds": time.perf_counter() - started},
    )


@torch.no_grad()
def checkpoint_diff(model_a, model_b, *, normalise: bool = False) -> LabelledArray:
    """``||W_a - W_b|| / ||W_b||`` per layer and component between two models of one architecture
    (``normalise=True``: shares within each layer instead)."""
    a, b = component_weights(model_a), component_weights(model_b)
    if set(a) != set(b) or model_a.cfg.n_layers != model_b.cfg.n_layers:
        raise MechkitError("the two models have different layers or components: a checkpoint diff needs one "
                           "architecture (e.g. a base and a fine-tuned checkpoint of the same model)")
    raw = np.full((model_a.cfg.n_layers, len(COMPONENTS)), np.nan)
    for key, wa in a.items():
        wb = b[key]
        if wa.shape != wb.shape:
            raise MechkitError(f"layer {key[0]} {key[1]}: shapes differ ({tuple(wa.shape)} vs {tuple(wb.shape)}); "
                               "the checkpoints are not of the same architecture")
        reference = wb.float().norm()
        raw[key[0], COMPONENTS.index(key[1])] = float((wa.float() - wb.float().to(wa.device)).norm() / reference) \
            if reference > 0 else float("nan")
    provenance = Provenance.for_model(model_a, data={"compared_with": getattr(getattr(model_b, "mechkit", None), "name", None)})
    return LabelledArray(
        _as_shares(raw, normalise).astype(np.float32), ("layer", "component"),
        {"layer": list(range(model_a.cfg.n_layers)), "component": list(COMPONENTS)},
        name="relative weight change", provenance=provenance,
        attrs={"method": "checkpoint_diff", "normalised": normalise, "raw": raw.tolist()},
    )


def mean_over_tasks(arrays: list[LabelledArray], name: str) -> LabelledArray:
    """The mean of several tasks' ``layer x component`` results (a component missing everywhere stays NaN)."""
    stack = np.stack([a.transpose("layer", "component").values.astype(float) for a in arrays])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (a missing component) stay NaN
        mean = np.nanmean(stack, axis=0)
    first = arrays[0].transpose("layer", "component")
    attrs = {key: first.attrs[key] for key in ("method", "normalised", "elementwise", "corruption") if key in first.attrs}
    attrs.update(task=name, tasks=[a.attrs.get("task") for a in arrays],
                 baseline={"metric": (first.attrs.get("baseline") or {}).get("metric")})
    return LabelledArray(mean.astype(np.float32), first.axes, first.labels, name=f"{first.attrs.get('method')} component "
                         f"attribution: mean of {len(arrays)} tasks", provenance=first.provenance, attrs=attrs)


__all__ = ["COMPONENTS", "METHODS", "attribute_components", "checkpoint_diff", "component_hook", "component_weights",
           "mean_over_tasks"]
