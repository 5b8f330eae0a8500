"""Projection-rank: where a target ranks in a row of vocabulary scores, never storing the row.

Rows are ``Y @ B`` with ``Y`` (n, r) and ``B`` (r, V), or ``Y @ (A @ C)`` for a factored
``B = A @ C`` (e.g. a head's ``W_O`` and the shared ``W_U``), computed in vocabulary
chunks. **Ties:** the rank of a target is the number of *other* vocabulary entries whose
score is strictly larger than the target's (so rank 0 is the top; equal scores do not
push a target down). With ``k`` given, only "is the rank below k" matters: rows drop out
as soon as k larger scores are seen and their rank is reported as ``k`` (exact below k).
A first strided sample of ``chunk_size`` columns (every m-th: frequent and rare tokens
alike) settles most rows; the undecided rows then see the other columns in large blocks.
Accumulation is in float32 whatever the input dtype.

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


def _scores(Y: Tensor, A: Tensor, C: Tensor | None, columns) -> Tensor:
    """``Y @ (A @ C[:, columns])`` (or ``Y @ A[:, columns]``): one fixed association, so that
    every score, the target's included, comes from the same float path."""
    if C is None:
        return Y @ A[:, columns]
    return Y @ (A @ C[:, columns])


@torch.no_grad()
def projection_rank_reference(
    Y: Float[Tensor, "n r"],
    A: Float[Tensor, "r m"],
    targets: Int[Tensor, " n"],
    C: Float[Tensor, "m V"] | None = None,
    *,
    k: int | None = None,
    chunk_size: int = 512,
    block_size: int = 8192,
) -> Int[Tensor, " n"]:
    """Rank of ``targets[i]`` in row ``i`` of ``Y @ A`` (or ``Y @ A @ C``); see the module doc.

    Two phases: a strided sample of ``chunk_size`` columns (every m-th column) for all rows,
    where with ``k`` most rows already see k larger scores and drop out; then the other
    columns, in contiguous blocks of ``block_size``, for the rows still undecided.
    """
    vocab = check_projection(Y, A, C, targets, k)
    device = Y.device
    Y = Y.float()
    A = A.float()
    C = C.float() if C is not None else None
    # The target's score from a GEMM of the same association as the tiles (not a dot
    # product), so a target never ties with itself or differs from its tile by rounding.
    unique, where = torch.unique(targets, return_inverse=True)
    target_score = torch.empty(Y.shape[0], device=device)
    for group in range(0, unique.numel(), 256):  # rows by target group: no n x |targets| matrix
        rows = ((where >= group) & (where < group + 256)).nonzero()[:, 0]
        tile = _scores(Y[rows], A, C, unique[group:group + 256])
        target_score[rows] = tile.gather(1, (where[rows] - group)[:, None])[:, 0]
    counts = torch.zeros(Y.shape[0], dtype=torch.long, device=device)
    stride = max(1, -(-vocab // chunk_size))
    sampled = slice(0, vocab, stride)
    own = torch.arange(0, vocab, stride, device=device)[None, :] == targets[:, None]
    counts += ((_scores(Y, A, C, sampled) > target_score[:, None]) & ~own).sum(-1)
    active = torch.arange(Y.shape[0], device=device) if k is None else (counts < k).nonzero()[:, 0]
    for start in range(0, vocab, block_size):
        if active.numel() == 0:
            break
        columns = torch.arange(start, min(start + block_size, vocab), device=device)
        fresh = (columns % stride != 0)[None, :]  # sampled columns were counted in phase one
        not_own = columns[None, :] != targets[active][:, None]  # the target never outranks itself
        larger = (_scores(Y[active], A, C, slice(start, start + block_size)) > target_score[active][:, None])
        counts[active] += (larger & fresh & not_own).sum(-1)
        if k is not None:
            active = active[counts[active] < k]
    return counts.clamp(max=k) if k is not None else counts


def top_by_score_then_index(scores: Tensor, index: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best of each row by score, descending, and the lower index first among equal
    scores (``torch.topk`` alone leaves the order of ties unspecified): one top-k on int64 keys
    holding the score's order-preserving bits above the inverted index."""
    bits = scores.float().contiguous().view(torch.int32)
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()
    best = ((ordered << 32) + (0xFFFFFFFF - index.long())).topk(k, dim=-1).indices
    return scores.gather(-1, best), index.long().gather(-1, best)


@torch.no_grad()
def projection_topk_reference(
    Y: Float[Tensor, "n r"],
    A: Float[Tensor, "r m"],
    k: int,
    C: Float[Tensor, "m V"] | None = None,
    *,
    block_size: int = 8192,
) -> tuple[Float[Tensor, "n k"], Int[Tensor, "n k"]]:
    """Top-``k`` scores and vocabulary indices of each row of ``Y @ A`` (or ``Y @ A @ C``), by
    vocabulary blocks merged into a running top-k (never the whole n x V matrix).
    Ties: the lower index first."""
    vocab = check_projection(Y, A, C, None, k)
    Y, A = Y.float(), A.float()
    C = C.float() if C is not None else None
    best_scores = torch.full((Y.shape[0], 0), float("-inf"), device=Y.device)
    best_index = torch.zeros((Y.shape[0], 0), dtype=torch.long, device=Y.device)
    for start in range(0, vocab, block_size):
        scores = _scores(Y, A, C, slice(start, start + block_size))
        index = torch.arange(start, start + scores.shape[1], device=Y.device).expand_as(scores)
        merged_scores = torch.cat([best_scores, scores], 1)
        merged_index = torch.cat([best_index, index], 1)
        best_scores, best_index = top_by_score_then_index(merged_scores, merged_index, min(k, merged_scores.shape[1]))
    return best_scores, best_index
