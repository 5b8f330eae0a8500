"""Direction files: one residual-stream direction with the model it belongs to, checked on load.

A ``.npz`` holding the direction, the model's name, width and weights hash, and free metadata
(layer, position, how it was chosen). :func:`load_direction` refuses a file from another model
(different width, or a different weights hash when both are known), so that a direction found
on one checkpoint is not silently applied to another.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.directions.interventions import check_direction
from mechkit.errors import MechkitError
from mechkit.models.loading import model_info


def save_direction(path: str | os.PathLike, direction, model, **meta: object) -> Path:
    """Write ``direction`` (normalised) for ``model`` to ``path`` (``.npz``)."""
    unit = check_direction(model, direction)
    info = model_info(model)
    path = Path(path)
    np.savez(path, direction=unit.numpy(), d_model=model.cfg.d_model, model=info.name,
             weights_hash=info.weights_hash(model), meta=json.dumps(meta, default=str))
    return path


def load_direction(path: str | os.PathLike, model=None) -> Float[Tensor, " d_model"]:
    """The unit direction saved at ``path``; with ``model``, check that it belongs to that model."""
    path = Path(path)
    if not path.exists():
        raise MechkitError(f"no direction file at {path}")
    try:
        saved = np.load(path)
        direction, d_model = saved["direction"], int(saved["d_model"])
        source, source_hash = str(saved["model"]), str(saved["weights_hash"])
    except (OSError, KeyError, ValueError) as error:
        raise MechkitError(f"{path} is not a mechkit direction file (save one with save_direction): {error}") from None
    if model is not None:
        if d_model != model.cfg.d_model:
            raise MechkitError(f"{path} holds a direction of width {d_model} from {source}, but this model's residual "
                               f"stream has width {model.cfg.d_model}: it belongs to another model")
        info = model_info(model)
        if source_hash and info.weights_hash(model) != source_hash:
            raise MechkitError(f"{path} was found on {source} (weights hash {source_hash[:12]}), not on {info.name} "
                               f"(weights hash {info.weights_hash(model)[:12]}): find the direction on this model")
    return torch.from_numpy(direction.astype(np.float32))


def direction_meta(path: str | os.PathLike) -> dict:
    """The metadata saved with a direction."""
    return json.loads(str(np.load(Path(path))["meta"]))


__all__ = ["direction_meta", "load_direction", "save_direction"]
