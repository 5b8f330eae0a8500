"""Direction interventions as context managers over the bridge's hooks: steering and ablation.

* :func:`steer` adds ``alpha * direction`` to the residual stream entering the chosen layers
  (``blocks.L.hook_resid_pre``), at every position or the chosen ones (activation addition).
* :func:`ablate_direction` projects the direction out of every write to the residual stream:
  the embedding (``hook_embed``, and ``hook_pos_embed`` where the model has one), each layer's
  attention output and each MLP output, at every position. The residual stream then never
  holds the direction (Arditi et al. 2024's directional ablation).

Any analysis run inside the context sees the edited model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from mechkit.errors import MechkitError


def check_direction(model, direction) -> Tensor:
    """A finite, non-zero ``(d_model,)`` direction as a float32 unit vector."""
    direction = torch.as_tensor(direction).detach().float().reshape(-1)
    if direction.numel() != model.cfg.d_model:
        raise MechkitError(f"the direction has {direction.numel()} entries but the model's residual stream has "
                           f"{model.cfg.d_model}: it comes from another model or another hook")
    if not torch.isfinite(direction).all():
        raise MechkitError("the direction has non-finite entries")
    norm = direction.norm()
    if norm == 0:
        raise MechkitError("the direction is zero")
    return direction / norm


def _check_layers(model, layers) -> list[int]:
    n = model.cfg.n_layers
    layer_list = list(range(n)) if layers is None else [int(l) for l in ([layers] if isinstance(layers, int) else layers)]
    bad = [l for l in layer_list if not 0 <= l < n]
    if bad or not layer_list:
        raise MechkitError(f"layers {bad or layer_list} out of range: the model has {n} layers")
    return layer_list


@contextlib.contextmanager
def steer(model, direction, alpha: float, *, layers: int | Sequence[int] | None = None,
          positions: Sequence[int] | None = None) -> Iterator[None]:
    """Add ``alpha * direction`` (unit-normalised) to the residual stream entering ``layers``."""
    unit = check_direction(model, direction)
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
        raise MechkitError(f"alpha must be a finite number, got {alpha!r}")
    layer_list = _check_layers(model, layers)

    def add(resid: Tensor, hook) -> Tensor:
        shift = (alpha * unit).to(resid)
        if positions is None:
            return resid + shift
        resid = resid.clone()
        resid[:, list(positions)] += shift
        return resid

    with model.hooks(fwd_hooks=[(f"blocks.{l}.hook_resid_pre", add) for l in layer_list]):
        yield


def residual_writes(model) -> list[str]:
    """Hooks whose outputs are what is added to the residual stream."""
    names = ["hook_embed"] + (["hook_pos_embed"] if "hook_pos_embed" in model.hook_dict else [])
    for layer in range(model.cfg.n_layers):
        names += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    return names


@contextlib.contextmanager
def ablate_direction(model, direction) -> Iterator[None]:
    """Project ``direction`` out of every write to the residual stream while the context is open."""
    unit = check_direction(model, direction)

    def project_out(x: Tensor, hook) -> Tensor:
        u = unit.to(x)
        return x - (x @ u)[..., None] * u

    with model.hooks(fwd_hooks=[(name, project_out) for name in residual_writes(model)]):
        yield


__all__ = ["ablate_direction", "check_direction", "residual_writes", "steer"]
