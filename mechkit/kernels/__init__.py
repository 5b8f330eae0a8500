"""Hot loops behind one dispatch function each: vocabulary projections.

``projection_rank`` and ``projection_topk`` pick the fastest correct path for the inputs' device. Today that is
the chunked plain-torch reference everywhere; GPU kernels plug in here, so callers (head
classification) take them with no change.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mechkit.errors import MechkitError

from mechkit.kernels.projection import check_projection, projection_rank_reference, projection_topk_reference


def projection_rank(Y: Tensor, B: Tensor, targets: Tensor, *, k: int | None = None, C: Tensor | None = None,
                    chunk_size: int = 512) -> Tensor:
    """Rank of each row's target among its ``Y @ B`` (or ``Y @ B @ C``) scores; batched over a leading head axis.

    Args:
        Y: ``(n, r)`` or ``(heads, n, r)`` row vectors.
        B: ``(r, V)`` or ``(heads, r, V)``; with ``C``, the left factor ``(r, m)`` of ``B @ C``.
        targets: ``(n,)`` or ``(heads, n)`` vocabulary indices.
        k: if given, ranks are exact below ``k`` and reported as ``k`` otherwise (much faster).
        C: optional right factor ``(m, V)`` shared by all heads (e.g. ``W_U``).

    Returns:
        int64 ranks, shaped like ``targets``: the number of other entries scoring strictly higher.
    """
    if Y.ndim == 3:
        if B.ndim != 3 or B.shape[0] != Y.shape[0] or targets.ndim != 2:
            raise MechkitError(f"batched form needs Y (heads, n, r), B (heads, r, V) and targets (heads, n); "
                               f"got {tuple(Y.shape)}, {tuple(B.shape)}, {tuple(targets.shape)}")
        return torch.stack([projection_rank(Y[h], B[h], targets[h], k=k, C=C, chunk_size=chunk_size)
                            for h in range(Y.shape[0])])
    check_projection(Y, B, C, targets, k)  # clear errors before any typed kernel sees the inputs
    return projection_rank_reference(Y, B, targets, C, k=k, chunk_size=chunk_size)


def projection_topk(Y: Tensor, B: Tensor, k: int, *, C: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-``k`` scores and indices of each row of ``Y @ B`` (or ``Y @ B @ C``), ``(n, k)`` each."""
    check_projection(Y, B, C, None, k)
    return projection_topk_reference(Y, B, k, C)


__all__ = ["projection_rank", "projection_topk"]
