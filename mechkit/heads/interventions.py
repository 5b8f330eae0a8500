"""Head interventions, the one place they live: scale (0 removes, >1 amplifies) or mean-ablate.

They act on ``blocks.{l}.attn.hook_z`` (a head's output before ``W_O``), so every analysis
that runs inside the context sees the edited model.

Example:
    >>> with scale_heads(model, {(3, 1): 0.0}):          # doctest: +SKIP
    ...     logits = model(tokens)                          # head 3.1 removed
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

from torch import Tensor

from mechkit.errors import MechkitError

Head = tuple[int, int]


def check_heads(model, heads) -> list[Head]:
    """Validate (layer, head) pairs against the model's shape."""
    cfg = model.cfg
    checked = []
    for item in heads:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise MechkitError(f"heads are (layer, head) pairs, got {item!r}")
        layer, head = int(item[0]), int(item[1])
        if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
            raise MechkitError(f"head {item} out of range: the model has {cfg.n_layers} layers x {cfg.n_heads} heads")
        checked.append((layer, head))
    return checked


@contextlib.contextmanager
def scale_heads(
    model,
    factors: Mapping,  # {(layer, head): factor}, validated below with clear errors
    *,
    positions: Sequence[int] | None = None,
    means: Mapping[Head, Tensor] | None = None,
) -> Iterator[None]:
    """Multiply each head's output by its factor (0 removes it) while the context is open.

    Args:
        factors: ``{(layer, head): factor}``; factor must be finite and >= 0.
        positions: token positions to edit (negative from the end); default every position.
        means: ``{(layer, head): (d_head,) mean output}``: mean-ablation, i.e. the head's
            output becomes ``mean + factor * (output - mean)`` (factor 0: the mean itself).
    """
    heads = check_heads(model, factors)
    for head, factor in factors.items():
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 0):
            raise MechkitError(f"factor for head {head} must be a finite number >= 0, got {factor!r}")
    by_layer: dict[int, list[tuple[int, float, Tensor | None]]] = {}
    for (layer, head), factor in zip(heads, factors.values()):
        mean = None if means is None else means.get((layer, head))
        if means is not None and mean is None:
            raise MechkitError(f"mean-ablation needs a mean for head {(layer, head)}")
        by_layer.setdefault(layer, []).append((head, float(factor), mean))

    def edit(entries):
        def hook(z: Tensor, hook) -> Tensor:  # z: (batch, pos, head, d_head)
            z = z.clone()
            where = slice(None) if positions is None else list(positions)
            for head, factor, mean in entries:
                part = z[:, where, head]
                if mean is None:
                    z[:, where, head] = part * factor
                else:
                    mean = mean.to(z)
                    z[:, where, head] = mean + factor * (part - mean)
            return z

        return hook

    with model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_z", edit(entries)) for layer, entries in by_layer.items()]):
        yield


def zero_heads(model, heads: Sequence[Head], *, positions: Sequence[int] | None = None):
    """Remove heads (their output set to zero) while the context is open."""
    return scale_heads(model, {h: 0.0 for h in check_heads(model, heads)}, positions=positions)
