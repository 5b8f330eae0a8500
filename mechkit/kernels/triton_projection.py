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
* :func:`topk_triton`: a threshold per row from a strided sample of columns (a lower bound on
  the k-th largest score), then one kernel pass that writes out only the columns at or above
  it, and a top-k over those few. (A first version merged a running top-k tile by tile with a
  bitonic sort: 0.3% of the H100's bf16 rate, slower than the torch reference.) Ties go to the
  lower index, as in the reference.

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

from mechkit.kernels.projection import (
    projection_topk_reference,
    top_by_score_then_index,
)


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
    for j in range(n_tiles):
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
def _collect_kernel(Y, B, THRESH, OUT_S, OUT_I, COUNT, n,
                    sy_n, sb_r, so_n,
                    CAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    IEEE: tl.constexpr, r: tl.constexpr, V: tl.constexpr):
    """Write every (score, column) of row i of Y @ B with score >= THRESH[i] into OUT[i, :CAP]
    and their number into COUNT[i] (which may exceed CAP: the caller redoes such rows).
    A program owns its rows, so slots come from a running count and a scan, not atomics."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    thresh = tl.load(THRESH + rows, mask=row_ok, other=float("inf"))
    count = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for c0 in range(0, V, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < V
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.static_range(0, r, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            y = tl.load(Y + rows[:, None] * sy_n + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < r), other=0.0)
            b = tl.load(B + ks[:, None] * sb_r + cols[None, :], mask=(ks[:, None] < r) & col_ok[None, :], other=0.0)
            acc = _dot(y, b, acc, IEEE)
        keep = (acc >= thresh[:, None]) & col_ok[None, :]
        if tl.max(keep.to(tl.int32)) > 0:  # later tiles mostly hold no candidate at all
            slot = count[:, None] + tl.cumsum(keep.to(tl.int32), axis=1) - 1
            write = keep & (slot < CAP)
            tl.store(OUT_S + rows[:, None] * so_n + slot, acc, mask=write)
            tl.store(OUT_I + rows[:, None] * so_n + slot, tl.broadcast_to(cols[None, :], (BLOCK_M, BLOCK_N)), mask=write)
            count += tl.sum(keep.to(tl.int32), axis=1)
    tl.store(COUNT + rows, count, mask=row_ok)


def _rows_contiguous(X: Tensor) -> Tensor:
    """Unit stride along the last axis; other strides (a stride-0 head axis for a shared B) are kept."""
    return X if X.stride(-1) == 1 else X.contiguous()


def _ieee(Y: Tensor) -> bool:
    """fp32 inputs, or any input under the interpreter, go through the widened IEEE dot."""
    return Y.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def _block_k(r: int) -> int:
    return max(16, min(64, triton.next_power_of_2(r)))


# Tile sizes and launch settings of the rank and collect kernels on CUDA (benchmarks/bench_kernels.py
# sweeps them on the GPU it runs on; these are the best it found on an H100).
RANK_CONFIG = dict(block_m=128, block_n=64, num_warps=4, num_stages=3)
COLLECT_CONFIG = dict(block_m=64, block_n=128, num_warps=8, num_stages=3)


def _launch_config(device: torch.device, config: dict) -> dict:
    keep = ("num_warps", "num_stages")
    return {key: config[key] for key in keep} if device.type == "cuda" else {}


@torch.no_grad()
def rank_triton(
    Y: Float[Tensor, "heads n r"],
    B: Float[Tensor, "heads r V"],
    targets: Int[Tensor, "heads n"],
    *,
    k: int | None = None,
    config: dict | None = None,
) -> Int[Tensor, "heads n"]:
    """Strictly-larger counts of each row's target, batched over heads in one launch (see the module doc).
    ``config`` overrides :data:`RANK_CONFIG` (block_m, block_n, num_warps, num_stages)."""
    config = {**RANK_CONFIG, **(config or {})}
    block_m, block_n = config["block_m"], config["block_n"]
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
                               **_launch_config(Y.device, config))
    _rank_kernel[grid](Y, B, targets, score, out, n, V if k is None else k,
                       Y.stride(0), Y.stride(1), B.stride(0), B.stride(1), targets.stride(0), score.stride(0),
                       out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=_ieee(Y), r=r, V=V,
                       TILE_STRIDE=_tile_order(triton.cdiv(V, block_n)), EARLY_EXIT=k is not None,
                       **_launch_config(Y.device, config))
    return out.long()


@torch.no_grad()
def topk_triton(
    Y: Float[Tensor, "heads n r"],
    B: Float[Tensor, "heads r V"],
    k: int,
    *,
    sample_every: int = 8,
    row_chunk: int = 8192,
    config: dict | None = None,
) -> tuple[Float[Tensor, "heads n k"], Int[Tensor, "heads n k"]]:
    """Top-``k`` scores (descending) and column indices of each row of ``Y[h] @ B[h]``.

    Three steps per head: (1) a threshold per row, a little under the k-th largest score of
    every ``sample_every``-th column (a lower bound on the k-th largest overall); (2) one
    kernel pass that keeps only the columns at or above it (about ``k * sample_every`` a row);
    (3) a top-k over those few. Rows whose candidates overflow the buffer are redone exactly
    with the torch reference. Ties go to the lower index. ``config`` overrides :data:`COLLECT_CONFIG`.
    """
    config = {**COLLECT_CONFIG, **(config or {})}
    block_m, block_n = config["block_m"], config["block_n"]
    H, n, r = Y.shape
    V = B.shape[-1]
    Y, B = _rows_contiguous(Y), _rows_contiguous(B)
    cap = min(V, max(2 * k, 4 * k * sample_every) + 64)
    out_scores = torch.empty(H, n, k, device=Y.device)
    out_index = torch.empty(H, n, k, dtype=torch.long, device=Y.device)
    for h in range(H):
        sampled = B[h][:, ::sample_every]
        for start in range(0, n, row_chunk):
            Yc = Y[h, start:start + row_chunk]
            m = Yc.shape[0]
            # (1) the sample's k-th best, lowered past the sample GEMM's rounding (bf16 output)
            kth = (Yc @ sampled).float().topk(min(k, sampled.shape[1]), dim=1).values[:, -1]
            thresh = kth - 1e-2 * kth.abs() - 1e-6 if sampled.shape[1] >= k else torch.full_like(kth, float("-inf"))
            cand_s = torch.full((m, cap), float("-inf"), device=Y.device)
            cand_i = torch.zeros((m, cap), dtype=torch.int32, device=Y.device)
            count = torch.zeros(m, dtype=torch.int32, device=Y.device)
            _collect_kernel[(triton.cdiv(m, block_m),)](
                Yc, B[h], thresh.contiguous(), cand_s, cand_i, count, m, Yc.stride(0), B.stride(1), cand_s.stride(0),
                CAP=cap, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_block_k(r), IEEE=_ieee(Y), r=r, V=V,
                **_launch_config(Y.device, config))
            scores, index = top_by_score_then_index(cand_s, cand_i, k)
            over = (count > cap).nonzero()[:, 0]
            if over.numel():  # the threshold let through more than the buffer holds: exact redo
                scores[over], index[over] = projection_topk_reference(Yc[over], B[h], k)
            out_scores[h, start:start + m], out_index[h, start:start + m] = scores, index
    return out_scores, out_index
