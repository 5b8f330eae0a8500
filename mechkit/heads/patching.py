"""The forward passes attribution is built on: batches of a task, its metric, and runs that
stop at the final residual and unembed only the positions the metric reads.

Shared by head attribution (:mod:`mechkit.heads.attribution`) and component attribution
(:mod:`mechkit.components`). The metric of a paired task is the logit difference
``logit[answer] - logit[corrupted answer]`` at the last prompt position; of an unpaired task
the teacher-forced log-probability of the answer tokens.
"""

from __future__ import annotations

import contextlib

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechkit.data.tasks import TokenisedTask
from mechkit.errors import MechkitError


class _Stop(Exception):
    """Raised by the hook on the last block's output: nothing after it is needed."""


@dataclass
class TaskBatch:
    """Examples of one prompt length: clean (and corrupted) tokens and what the metric reads."""

    index: list[int]
    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"] | None
    answer: Int[Tensor, " batch"] | None
    wrong: Int[Tensor, " batch"] | None
    answer_length: int

    def __len__(self) -> int:
        return len(self.index)


def task_batches(tok: TokenisedTask, batch_size: int) -> Iterator[TaskBatch]:
    """Batches of equal-length examples (no padding), ``batch_size`` at most."""
    if batch_size < 1:
        raise MechkitError(f"batch_size must be at least 1, got {batch_size}")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, tokens in enumerate(tok.clean):
        groups.setdefault((len(tokens), tok.answer_lengths[i]), []).append(i)
    for (_, answer_length), members in sorted(groups.items()):
        for start in range(0, len(members), batch_size):
            idx = members[start:start + batch_size]
            yield TaskBatch(
                idx, torch.stack([tok.clean[i] for i in idx]),
                torch.stack([tok.corrupted[i] for i in idx]) if tok.corrupted is not None else None,
                tok.answer_ids[idx] if tok.answer_ids is not None else None,
                tok.corrupted_ids[idx] if tok.corrupted_ids is not None else None, answer_length)


def metric_positions(batch: TaskBatch) -> list[int]:
    """Positions whose logits the metric reads: the last one, or one per answer token."""
    length = batch.clean.shape[1]
    if batch.answer is not None:
        return [length - 1]
    return list(range(length - batch.answer_length - 1, length - 1))


def metric(batch: TaskBatch, logits: Float[Tensor, "batch p vocab"], replicas: int = 1) -> Float[Tensor, " batch"]:
    """Per-example metric from the logits at :func:`metric_positions` (batch may hold
    ``replicas`` copies of the task batch, stacked)."""
    if batch.answer is not None:
        answer, wrong = batch.answer.repeat(replicas), batch.wrong.repeat(replicas)
        last = logits[:, -1].float()
        return last.gather(1, answer[:, None].to(last.device))[:, 0] - last.gather(1, wrong[:, None].to(last.device))[:, 0]
    targets = batch.clean[:, -batch.answer_length:].repeat(replicas, 1).to(logits.device)
    logprobs = logits.float().log_softmax(-1)
    return logprobs.gather(2, targets[..., None])[..., 0].sum(-1)


def final_logits(model, resid: Float[Tensor, "batch p d_model"]) -> Float[Tensor, "batch p vocab"]:
    """Logits of some positions from the last block's output: final norm and unembedding only there."""
    return model.unembed(model.ln_final(resid))


@contextlib.contextmanager
def _skip_blocks_below(model, layer: int) -> Iterator[None]:
    """Blocks below ``layer`` pass their input through untouched while the context is open.

    TransformerLens's ``start_at_layer`` still runs every earlier block (on a placeholder input)
    and discards the result at block ``layer``; skipping them saves that work, which is most of
    exact patching's cost (a forward per head, starting at the head's layer).
    """
    components = [model.blocks[i].original_component for i in range(layer)]
    saved = [c.forward for c in components]

    def passthrough(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    try:
        for component in components:
            component.forward = passthrough
        yield
    finally:
        for component, forward in zip(components, saved):
            component.forward = forward


def run_to_logits(model, inputs: Tensor, positions: Sequence[int], *, start_at_layer: int | None = None,
                  fwd_hooks: Sequence[tuple[str, Callable]] = ()) -> Tensor:
    """Forward ``inputs`` (tokens, or the residual entering ``start_at_layer``) with hooks, stop
    at the last block's output and return the logits at ``positions`` only."""
    captured: dict[str, Tensor] = {}

    def stop(resid: Tensor, hook) -> None:
        captured["resid"] = resid
        raise _Stop

    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    kwargs = {} if start_at_layer is None else {"start_at_layer": start_at_layer}
    skip = _skip_blocks_below(model, start_at_layer) if start_at_layer else contextlib.nullcontext()
    try:
        with skip:
            model.run_with_hooks(inputs, fwd_hooks=[*fwd_hooks, (last, stop)], **kwargs)
    except _Stop:
        pass
    if "resid" not in captured:
        raise MechkitError(f"the forward pass never reached {last}")
    return final_logits(model, captured["resid"][:, list(positions)])


def cache_activations(model, tokens: Tensor, names) -> dict[str, Tensor]:
    """The activations at hooks ``names`` on ``tokens`` (no grad), stopping after the last block."""
    store: dict[str, Tensor] = {}

    def keep(name):
        def hook(x, hook):
            store[name] = x.detach()
        return hook

    with torch.no_grad():
        run_to_logits(model, tokens, [-1], fwd_hooks=[(name, keep(name)) for name in dict.fromkeys(names)])
    return store


def metric_gradients(model, batch: TaskBatch, names: Sequence[str], *,
                     drop_layer: int | None = None, capture: dict | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example clean metric and d(sum of metric)/dx at each hook in ``names``, through zero
    leaves added there (so every path stays in the graph). With ``drop_layer`` no gradient flows
    through that layer's attention and MLP outputs (AtP*'s GradDrop). Raises when the metric is
    constant in all of them. ``capture``, if given, receives each hook's (clean) activation."""
    deltas: dict[str, Tensor] = {}

    def leaf(name):
        def hook(x, hook):
            if capture is not None:
                capture[name] = x.detach()
            deltas[name] = torch.zeros_like(x, requires_grad=True)
            return x + deltas[name]
        return hook

    def cut(x, hook):
        return x.detach()

    hooks = [(name, leaf(name)) for name in names]
    if drop_layer is not None:
        hooks += [(f"blocks.{drop_layer}.hook_attn_out", cut), (f"blocks.{drop_layer}.hook_mlp_out", cut)]
    with torch.enable_grad():
        values = metric(batch, run_to_logits(model, batch.clean, metric_positions(batch), fwd_hooks=hooks))
        if not values.requires_grad:
            raise MechkitError("the metric does not depend on the patched activations (zero gradient everywhere): "
                               "check the task's answers and the model's unembedding")
        found = torch.autograd.grad(values.sum(), [deltas[n] for n in names], allow_unused=True)
    grads = {n: torch.zeros_like(deltas[n]) if g is None else g for n, g in zip(names, found)}
    if drop_layer is None and all(not g.any() for g in grads.values()):
        raise MechkitError("the metric has zero gradient with respect to every patched activation (it is constant "
                           "in them): attribution would be all zeros; check the task's answers and the model")
    return values.detach(), grads


def bootstrap_interval(values: np.ndarray, *, resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (resamples, values.size))].mean(1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


__all__ = [
    "TaskBatch",
    "bootstrap_interval",
    "cache_activations",
    "final_logits",
    "metric",
    "metric_gradients",
    "metric_positions",
    "run_to_logits",
    "task_batches",
]
