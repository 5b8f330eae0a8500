"""Triton kernels for vocabulary projections: the n x V scores live only in registers.

Both kernels take a batch of heads in one launch: ``Y`` ``(heads, n, r)`` and ``B``
``(heads, r, V)`` (bf16, fp16 or fp32; fp32 accumulation, and fp32 products are computed
in IEEE precision, never TF32). Each program owns a block of rows of one head, keeps them
in place and streams ``B`` through in column tiles, so memory is O(n) besides ``B``.

* :func:`rank_triton`: the number of columns scoring strictly higher than the row's target
  column (the tie rule of :mod:`mechkit.kernels.projection`). The target's score comes
  from a small first kernel that runs the same ``tl.dot`` over the gathered target
  columns, so that a target compares against scores from the same arithmetic. With
  ``k``, a row block stops as soon as every row has seen ``k`` larger scores; column
  tiles are visited in a scrambled order (a fixed stride coprime to the tile count) so
  that frequent and rare tokens alike are seen early.
* :func:`topk_triton`: a running top-k per row, merged tile by tile with a bitonic top-k on
  packed 64-bit keys (the score's order-preserving bits above the inverted column index,
  so ties go to the lower index, as in the reference).

Runs on CUDA GPUs, and on the CPU under ``TRITON_INTERPRET=1`` (slow, for tests).
"""

from __future__ import annotations

import math
import os
from typing import no_type_check

import torch
import triton
import triton.language as tl
from jaxtyping import Float, Int
from torch import Tensor


def _tile_order(n_tiles: int) -> int:
    """A stride coprime to ``n_tiles`` near n_tiles / golden ratio: visiting tiles as
    ``(j * stride) % n_tiles`` covers all of them, spread over the vocabulary."""
    stride = max(1, round(n_tiles / 1.618))
    while math.gcd(stride, n_tiles) != 1:
        stride += 1
    return stride


@no_type_check  # Triton compiles these; the runtime shape checker must not wrap them
@triton.jit
def _dot(y, b, acc, IEEE: tl.constexpr):
    """``acc + y @ b`` in fp32; fp32 inputs in IEEE precision (never TF32). Under the
    interpreter (whose bf16 ``tl.dot`` is wrong in Triton 3.6) inputs are widened first,
    which computes the same exact products."""
    if IEEE:
        return tl.dot(y.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(y, b, acc)


@no_type_check  # Triton compiles these; the runtime shape checker must not wrap them
@triton.jit
def _target_score_kernel(Y, B, T, OUT, n,
                         sy_h, sy_n, sb_h, sb_r, st_h, so_h,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, r: tl.constexpr):
    """OUT[h, i] = Y[h, i] . B[h, :, T[h, i]] through tl.dot on the gathered columns."""
    pid, head = tl.program_id(0), tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    tgt = tl.load(T + head * st_h + rows, mask=row_ok, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for k0 in tl.static_range(0, r, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        y = tl.load(Y + head * sy_h + rows[:, None] * sy_n + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < r), other=0.0)
        b = tl.load(B + head * sb_h + ks[:, None] * sb_r + tgt[None, :], mask=(ks[:, None] < r) & row_ok[None, :], other=0.0)
        acc = _dot(y, b, acc, IEEE)
    diag = tl.arange(0, BLOCK_M)[:, None] == tl.arange(0, BLOCK_M)[None, :]
    tl.store(OUT + head * so_h + rows, tl.sum(tl.where(diag, acc, 0.0), axis=1), mask=row_ok)


@no_type_check  # Triton compiles these; the runtime shape checker must not wrap them
@triton.jit
def _rank_kernel(Y, B, T, S, OUT, n, k_limit,
                 sy_h, sy_n, sb_h, sb_r, st_h, ss_h, so_h,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                 r: tl.constexpr, V: tl.constexpr, TILE_STRIDE: tl.constexpr, EARLY_EXIT: tl.constexpr):
    """OUT[h, i] = #{j != T[h, i] : (Y[h] @ B[h])[i, j] > S[h, i]}, capped at k_limit."""
    pid, head = tl.program_id(0), tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    tgt = tl.load(T + head * st_h + rows, mask=row_ok, other=-1)
    score = tl.load(S + head * ss_h + rows, mask=row_ok, other=float("inf"))
    count = tl.zeros((BLOCK_M,), dtype=tl.int32)
    n_tiles: tl.constexpr = (V + BLOCK_N - 1) // BLOCK_N
    for j in range(0, n_tiles):
        if EARLY_EXIT:  # skip the tile once every row of the block has seen k_limit larger scores
            busy = tl.min(tl.where(row_ok, count, k_limit)) < k_limit
        else:
            busy = True
        if busy:
            cols = ((j * TILE_STRIDE) % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < V
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in tl.static_range(0, r, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                y = tl.load(Y + head * sy_h + rows[:, None] * sy_n + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < r), other=0.0)
                b = tl.load(B + head * sb_h + ks[:, None] * sb_r + cols[None, :], mask=(ks[:, None] < r) & col_ok[None, :], other=0.0)
                acc = _dot(y, b, acc, IEEE)
            larger = (acc > score[:, None]) & col_ok[None, :] & (cols[None, :] != tgt[:, None])
            count += tl.sum(larger.to(tl.int32), axis=1)
    tl.store(OUT + head * so_h + rows, tl.minimum(count, k_limit), mask=row_ok)


@no_type_check  # Triton compiles these; the runtime shape checker must not wrap them
@triton.jit
def _ordered_key(acc, cols, col_ok):
    """Pack fp32 scores and column indices into int64 keys that sort like (score, -column)."""
    bits = acc.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = (ordered.to(tl.int64) << 32) + (0xFFFFFFFF - cols.to(tl.int64))
    return tl.where(col_ok, key, -9223372036854775807 - 1)


@no_type_check  # Triton compiles these; the runtime shape checker must not wrap them
@triton.jit
def _topk_kernel(Y, B, OUT_KEY, n,
                 sy_h, sy_n, sb_h, sb_r, so_h, so_n,
                 K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 IEEE: tl.constexpr, r: tl.constexpr, V: tl.constexpr):
    """OUT_KEY[h, i, :K] = the K largest packed keys of row i of Y[h] @ B[h], descending."""
    pid, head = tl.program_id(0), tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    best = tl.full((BLOCK_M, K), -9223372036854775807 - 1, dtype=tl.int64)
    for c0 in range(0, V, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < V
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.static_range(0, r, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            y = tl.load(Y + head * sy_h + rows[:, None] * sy_n + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < r), other=0.0)
            b = tl.load(B + head * sb_h + ks[:, None] * sb_r + cols[None, :], mask=(ks[:, None] < r) & col_ok[None, :], other=0.0)
            acc = _dot(y, b, acc, IEEE)
        keys = _ordered_key(acc, tl.broadcast_to(cols[None, :], (BLOCK_M, BLOCK_N)), col_ok[None, :])
        tile_best = tl.topk(keys, K, dim=1)
        merged = tl.reshape(tl.join(best, tile_best), (BLOCK_M, 2 * K))
        best = tl.topk(merged, K, dim=1)
    out = OUT_KEY + head * so_h + rows[:, None] * so_n + tl.arange(0, K)[None, :]
    tl.store(out, best, mask=row_ok[:, None])


def _rows_contiguous(X: Tensor) -> Tensor:
    """Unit stride along the last axis; other strides (a stride-0 head axis for a shared B) are kept."""
    return X if X.stride(-1) == 1 else X.contiguous()


def _ieee(Y: Tensor) -> bool:
    """fp32 inputs, or any input under the interpreter, go through the widened IEEE dot."""
    return Y.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def _block_k(r: int) -> int:
    return max(16, min(64, triton.next_power_of_2(r)))


def _launch_config(device: torch.device) -> dict:
    return dict(num_warps=8, num_stages=3) if device.type == "cuda" else {}


@torch.no_grad()
def rank_triton(
    Y: Float[Tensor, "heads n r"],
    B: Float[Tensor, "heads r V"],
    targets: Int[Tensor, "heads n"],
    *,
    k: int | None = None,
    block_m: int = 64,
    block_n: int = 128,
) -> Int[Tensor, "heads n"]:
    """Strictly-larger counts of each row's target, batched over heads in one launch (see the module doc)."""
    H, n, r = Y.shape
    V = B.shape[-1]
    Y, B = _rows_contiguous(Y), _rows_contiguous(B)
    targets = targets.to(torch.int32).contiguous()
    block_k = _block_k(r)
    score = torch.empty(H, n, dtype=torch.float32, device=Y.device)
    out = torch.empty(H, n, dtype=torch.int32, device=Y.device)
    grid = (triton.cdiv(n, block_m), H)
    _target_score_kernel[grid](Y, B, targets, score, n, Y.stride(0), Y.stride(1), B.stride(0), B.stride(1),
                               targets.stride(0), score.stride(0), BLOCK_M=block_m, BLOCK_K=block_k, IEEE=_ieee(Y), r=r,
                               **_launch_config(Y.device))
    _rank_kernel[grid](Y, B, targets, score, out, n, V if k is None else k,
                       Y.stride(0), Y.stride(1), B.stride(0), B.stride(1), targets.stride(0), score.stride(0),
                       out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=_ieee(Y), r=r, V=V,
                       TILE_STRIDE=_tile_order(triton.cdiv(V, block_n)), EARLY_EXIT=k is not None,
                       **_launch_config(Y.device))
    return out.long()


def _unpack_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of the kernel's key packing: fp32 scores and int64 column indices."""
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    index = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    return bits.view(torch.float32), index


@torch.no_grad()
def topk_triton(
    Y: Float[Tensor, "heads n r"],
    B: Float[Tensor, "heads r V"],
    k: int,
    *,
    block_m: int = 32,
    block_n: int = 128,
) -> tuple[Float[Tensor, "heads n k"], Int[Tensor, "heads n k"]]:
    """Top-``k`` scores (descending) and column indices of each row of ``Y[h] @ B[h]``, one launch for all heads."""
    H, n, r = Y.shape
    V = B.shape[-1]
    Y, B = _rows_contiguous(Y), _rows_contiguous(B)
    K = max(16, triton.next_power_of_2(k))  # the bitonic top-k works on powers of two
    block_n = max(block_n, K)
    keys = torch.empty(H, n, K, dtype=torch.int64, device=Y.device)
    grid = (triton.cdiv(n, block_m), H)
    _topk_kernel[grid](Y, B, keys, n, Y.stride(0), Y.stride(1), B.stride(0), B.stride(1),
                       keys.stride(0), keys.stride(1), K=K, BLOCK_M=block_m, BLOCK_N=block_n,
                       BLOCK_K=_block_k(r), IEEE=_ieee(Y), r=r, V=V, **_launch_config(Y.device))
    scores, index = _unpack_keys(keys[..., :k])
    return scores, index
