"""Hot loops behind one dispatch function each: vocabulary projections.

``projection_rank`` and ``projection_topk`` pick the path for the inputs: the Triton kernels
(:mod:`mechkit.kernels.triton_projection`) for CUDA tensors, the chunked plain-torch reference
(:mod:`mechkit.kernels.projection`) anywhere else. Callers (head classification) take the
fast path with no change. ``backend="triton"`` forces the kernels (on CPU tensors they run
under ``TRITON_INTERPRET=1``, for tests; otherwise the call falls back to the reference with a
one-line notice); ``backend="reference"`` forces the reference.

Factored projections (``C`` given, ``B = A @ C``): the reference computes ``Y @ (A @ C[:, cols])``
block by block in float32; the Triton path forms each head's ``A @ C`` once, in float32,
rounded to the inputs' dtype (exact for float32 inputs), and runs the kernel on it.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch
from torch import Tensor

from mechkit.errors import MechkitError
from mechkit.kernels.projection import (
    check_projection,
    projection_rank_reference,
    projection_topk_reference,
)

BACKENDS = ("auto", "triton", "reference")
HEAD_GROUP_BYTES = 2 << 30  # the Triton path forms A @ C for this many bytes of heads at a time


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_triton(device: torch.device, backend: str) -> bool:
    if backend not in BACKENDS:
        raise MechkitError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    runnable = triton_available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    if backend == "triton" and not runnable:
        reason = "Triton is not installed" if not triton_available() else f"the inputs are on {device}, not a CUDA GPU"
        warnings.warn(f"mechkit: Triton requested but {reason}; using the torch reference "
                      "(set TRITON_INTERPRET=1 to run the kernels on the CPU)", stacklevel=3)
        return False
    return runnable if backend == "triton" else runnable and device.type == "cuda"


def _check_batched(Y: Tensor, B: Tensor, targets: Tensor | None) -> None:
    if Y.ndim != 3 or B.ndim not in (2, 3) or (B.ndim == 3 and B.shape[0] != Y.shape[0]) or (
            targets is not None and targets.ndim != 2):
        shapes = f"Y {tuple(Y.shape)}, B {tuple(B.shape)}" + (f", targets {tuple(targets.shape)}" if targets is not None else "")
        raise MechkitError("the batched form needs Y (heads, n, r), B (heads, r, V) or a shared (r, V)"
                           + (" and targets (heads, n)" if targets is not None else "") + f"; got {shapes}")


def _head_groups(Y: Tensor, B: Tensor, C: Tensor | None):
    """Yield (head slice, B for those heads) with any factored ``A @ C`` formed per group."""
    heads = Y.shape[0]
    if C is None:
        yield slice(0, heads), B if B.ndim == 3 else B.expand(heads, *B.shape)
        return
    per_head = B.shape[-2] * C.shape[-1] * 4
    step = max(1, HEAD_GROUP_BYTES // per_head)
    for start in range(0, heads, step):
        A = B[start:start + step] if B.ndim == 3 else B[None].expand(min(step, heads - start), *B.shape)
        yield slice(start, start + A.shape[0]), (A.float() @ C.float()).to(Y.dtype)


def projection_rank(Y: Tensor, B: Tensor, targets: Tensor, *, k: int | None = None, C: Tensor | None = None,
                    chunk_size: int = 512, backend: str = "auto") -> Tensor:
    """Rank of each row's target among its ``Y @ B`` (or ``Y @ B @ C``) scores; batched over a leading head axis.

    Args:
        Y: ``(n, r)`` or ``(heads, n, r)`` row vectors.
        B: ``(r, V)``, ``(heads, r, V)`` or (batched, shared by all heads) ``(r, V)``; with ``C``,
            the left factor ``(..., r, m)`` of ``B @ C``.
        targets: ``(n,)`` or ``(heads, n)`` vocabulary indices.
        k: if given, ranks are exact below ``k`` and reported as ``k`` otherwise (much faster).
        C: optional right factor ``(m, V)`` shared by all heads (e.g. ``W_U``).
        backend: ``"auto"`` (Triton on CUDA, else the reference), ``"triton"`` or ``"reference"``.

    Returns:
        int64 ranks, shaped like ``targets``: the number of other entries scoring strictly higher.
    """
    if Y.ndim == 3:
        _check_batched(Y, B, targets)
    check_projection(Y, B, C, targets, k)  # clear errors before any typed kernel sees the inputs
    if _use_triton(Y.device, backend):
        from mechkit.kernels.triton_projection import rank_triton

        Y3, T3 = (Y, targets) if Y.ndim == 3 else (Y[None], targets[None])
        B3 = B if Y.ndim == 3 else B[None]
        ranks = torch.empty(T3.shape, dtype=torch.long, device=Y.device)
        for heads, B_heads in _head_groups(Y3, B3, C):
            ranks[heads] = rank_triton(Y3[heads], B_heads.to(Y.dtype), T3[heads], k=k)
        return ranks if Y.ndim == 3 else ranks[0]
    if Y.ndim == 3:
        return torch.stack([projection_rank_reference(Y[h], B[h] if B.ndim == 3 else B, targets[h], C, k=k,
                                                      chunk_size=chunk_size) for h in range(Y.shape[0])])
    return projection_rank_reference(Y, B, targets, C, k=k, chunk_size=chunk_size)


def projection_topk(Y: Tensor, B: Tensor, k: int, *, C: Tensor | None = None,
                    backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Top-``k`` scores (descending) and indices of each row of ``Y @ B`` (or ``Y @ B @ C``).

    Shapes as in :func:`projection_rank`; returns ``(n, k)`` or ``(heads, n, k)`` scores (float32)
    and int64 indices. Ties go to the lower index.
    """
    if Y.ndim == 3:
        _check_batched(Y, B, None)
    check_projection(Y, B, C, None, k)
    if _use_triton(Y.device, backend):
        from mechkit.kernels.triton_projection import topk_triton

        Y3, B3 = (Y, B) if Y.ndim == 3 else (Y[None], B[None])
        scores = torch.empty(*Y3.shape[:2], k, device=Y.device)
        index = torch.empty(*Y3.shape[:2], k, dtype=torch.long, device=Y.device)
        for heads, B_heads in _head_groups(Y3, B3, C):
            scores[heads], index[heads] = topk_triton(Y3[heads], B_heads.to(Y.dtype), k)
        return (scores, index) if Y.ndim == 3 else (scores[0], index[0])
    if Y.ndim == 3:
        pairs = [projection_topk_reference(Y[h], B[h] if B.ndim == 3 else B, k, C) for h in range(Y.shape[0])]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    return projection_topk_reference(Y, B, k, C)


__all__ = ["BACKENDS", "projection_rank", "projection_topk", "triton_available"]
