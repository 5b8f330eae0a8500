"""Projection-rank: where a target ranks in a row of vocabulary scores, never storing the row.

Rows are ``Y @ B`` with ``Y`` (n, r) and ``B`` (r, V), or ``Y @ (A @ C)`` for a factored
``B = A @ C`` (e.g. a head's ``W_O`` and the shared ``W_U``), computed in vocabulary
chunks. **Ties:** the rank of a target is the number of *other* vocabulary entries whose
score is strictly larger than the target's (so rank 0 is the top; equal scores do not
push a target down). With ``k`` given, only "is the rank below k" matters: rows drop out
as soon as k larger scores are seen and their rank is reported as ``k`` (exact below k).
Columns are visited in strided chunks (chunk c holds columns c, c + m, c + 2m, ...
for m chunks), so each chunk samples the whole vocabulary (frequent and rare tokens alike)
and most rows drop out in the first chunk. Accumulation is in float32 whatever the input dtype.

This is the plain-torch reference that runs anywhere; :func:`mechkit.kernels.projection_rank`
dispatches to it (and to GPU kernels where they exist).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechkit.errors import MechkitError


def check_projection(Y: Tensor, A: Tensor, C: Tensor | None, targets: Tensor | None, k: int | None) -> int:
    """Validate shapes, dtypes, targets and k; return the vocabulary size."""
    for name, t in (("Y", Y), ("B" if C is None else "A", A)) + ((("C", C),) if C is not None else ()):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise MechkitError(f"{name} has unsupported dtype {t.dtype}; use float32, float16 or bfloat16")
        if t.device.type == "meta":
            raise MechkitError(f"{name} is on the meta device (weights not loaded); load the model with its weights")
    if Y.shape[-1] != A.shape[-2]:
        raise MechkitError(f"inner dimensions differ: Y is {tuple(Y.shape)} but B/A is {tuple(A.shape)} (need Y[..., r] and B[r, V])")
    if C is not None and A.shape[-1] != C.shape[0]:
        raise MechkitError(f"inner dimensions differ: A is {tuple(A.shape)} but C is {tuple(C.shape)}")
    vocab = (C if C is not None else A).shape[-1]
    if targets is not None:
        if targets.shape != Y.shape[:-1]:
            raise MechkitError(f"targets have shape {tuple(targets.shape)}; expected one per row: {tuple(Y.shape[:-1])}")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
            raise MechkitError(f"targets must lie in [0, {vocab}); got values in [{int(targets.min())}, {int(targets.max())}]")
    if k is not None and not 1 <= k <= vocab:
        raise MechkitError(f"k={k} must be between 1 and the vocabulary size {vocab}")
    return vocab


@torch.no_grad()
def projection_rank_reference(
    Y: Float[Tensor, "n r"],
    A: Float[Tensor, "r m"],
    targets: Int[Tensor, " n"],
    C: Float[Tensor, "m V"] | None = None,
    *,
    k: int | None = None,
    chunk_size: int = 512,
) -> Int[Tensor, " n"]:
    """Rank of ``targets[i]`` in row ``i`` of ``Y @ A`` (or ``Y @ A @ C``); see the module doc."""
    vocab = check_projection(Y, A, C, targets, k)
    device = Y.device
    Y = Y.float()
    A = A.float()
    C = C.float() if C is not None else None
    if C is not None:  # the target's score through the thin factors: (Y A) . C[:, t]
        target_score = ((Y @ A) * C[:, targets].T).sum(-1)
    else:
        target_score = (Y * A[:, targets].T).sum(-1)
    counts = torch.zeros(Y.shape[0], dtype=torch.long, device=device)
    active = torch.arange(Y.shape[0], device=device)
    n_chunks = -(-vocab // chunk_size)
    for chunk in range(n_chunks):
        if active.numel() == 0:
            break
        columns = torch.arange(chunk, vocab, n_chunks, device=device)
        block = (A @ C[:, chunk::n_chunks]) if C is not None else A[:, chunk::n_chunks]
        scores = Y[active] @ block
        own = columns[None, :] == targets[active][:, None]  # the target never outranks itself
        larger = (scores > target_score[active][:, None]) & ~own
        counts[active] += larger.sum(-1)
        if k is not None:
            active = active[counts[active] < k]
    return counts.clamp(max=k) if k is not None else counts
