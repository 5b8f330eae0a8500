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
* :func:`topk_triton`: two passes. The flag pass takes a threshold per row from the maxima of
  a strided sample of column tiles, then marks in a per-row bitmask the tiles whose maximum
  reaches it (one max per score; one store per row every 32 tiles). The gather pass scores only
  the marked (row, tile) pairs again, grouped by tile, and appends the scores at or above the
  threshold to a per-row buffer; a top-k over those few follows. Ties go to the lower index, as
  in the reference. (Earlier versions, on an H100: a running top-k merged tile by tile with a
  bitonic sort, 0.3% of the bf16 rate; candidates placed with a per-tile prefix sum, 3%; one
  collecting pass storing each hit from its tile, 7.4%: its per-score predicated stores, and
  the shared memory that allowed one program per multiprocessor, bounded it.)

Runs on CUDA GPUs, and on the CPU under ``TRITON_INTERPRET=1`` (slow, for tests).
"""

from __future__ import annotations

import math
import os
import time
from typing import no_type_check

import torch
import triton
import triton.language as tl
from jaxtyping import Float, Int
from torch import Tensor

from mechkit.kernels.projection import projection_topk_reference, top_by_score_then_index


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
def _tile_scores(y, B, ks, cols, sb_r, r: tl.constexpr, V: tl.constexpr, IEEE: tl.constexpr):
    """The scores of the resident row block ``y`` against the column tile ``cols`` (-inf past V)."""
    col_ok = cols < V
    b = tl.load(B + ks[:, None] * sb_r + cols[None, :], mask=(ks[:, None] < r) & col_ok[None, :], other=0.0)
    acc = _dot(y, b, tl.zeros((y.shape[0], cols.shape[0]), dtype=tl.float32), IEEE)
    return tl.where(col_ok[None, :], acc, float("-inf"))


@no_type_check  # Triton compiles these; the runtime shape checker must not wrap them
@triton.jit
def _tile_max(y, B, ks, cols, sb_r, r: tl.constexpr, V: tl.constexpr, IEEE: tl.constexpr):
    """Each row's largest score in the column tile ``cols``."""
    return tl.max(_tile_scores(y, B, ks, cols, sb_r, r, V, IEEE), axis=1)


@no_type_check  # Triton compiles these; the runtime shape checker must not wrap them
@triton.jit
def _tile_pair_max(y, B, ks, cols, sb_r, r: tl.constexpr, V: tl.constexpr, IEEE: tl.constexpr):
    """Each row's largest score in each half of the column tile ``cols``: two adjacent flag tiles
    scored by one product twice as wide (fewer instructions per score around the product)."""
    acc = _tile_scores(y, B, ks, cols, sb_r, r, V, IEEE)
    first, second = tl.split(tl.permute(tl.reshape(acc, (y.shape[0], 2, cols.shape[0] // 2)), (0, 2, 1)))
    return tl.max(first, axis=1), tl.max(second, axis=1)


# How far below its threshold a row's tiles are flagged, relative to its largest sampled maximum:
# far above the float32 rounding of a d_head-long sum (about 1e-5 of it) and cheap (few scores lie
# in the band).
FLAG_SLACK = 2.0**-10
_FLAG_SLACK = tl.constexpr(FLAG_SLACK)  # (a kernel reads globals only as constexpr)


@no_type_check  # Triton compiles these; the runtime shape checker must not wrap them
@triton.jit
def _flag_kernel(Y, B, FLAGS, THRESH, n,
                 sy_h, sy_n, sb_h, sb_r, sf_h, sf_w, st_h,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, IEEE: tl.constexpr,
                 r: tl.constexpr, V: tl.constexpr, EVERY: tl.constexpr, PICK: tl.constexpr, SLOTS: tl.constexpr,
                 PAIRED: tl.constexpr):
    """Pass 1 of the top-k: per row, a threshold and a bitmask of the column tiles that reach it.

    The row block stays resident. First every ``EVERY``-th column tile is scored and each row
    keeps the ``PICK`` largest tile maxima in registers; the smallest of them is the row's
    threshold THRESH[h, i] (at least PICK scores reach it). Then every tile is scored and bit
    ``j % 32`` of FLAGS[h, j // 32, i] says whether tile j's maximum reaches the threshold, less
    FLAG_SLACK times the largest sampled maximum (``PAIRED``: two tiles per product). The per-score work is one max; stores happen once per row
    every 32 tiles."""
    pid, head = tl.program_id(0), tl.program_id(1)
    Y += head.to(tl.int64) * sy_h  # the head's offset on the scalar base keeps the tile offsets int32
    B += head.to(tl.int64) * sb_h
    FLAGS += head.to(tl.int64) * sf_h
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    ks = tl.arange(0, R_PAD)
    y = tl.load(Y + rows[:, None] * sy_n + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < r), other=0.0)
    n_tiles: tl.constexpr = (V + BLOCK_N - 1) // BLOCK_N
    sampled: tl.constexpr = (n_tiles + EVERY - 1) // EVERY
    slot = tl.arange(0, SLOTS)[None, :]
    # slots past PICK hold +inf so that they are never the smallest and never replaced
    best = tl.where(slot < PICK, float("-inf"), float("inf")) + tl.zeros((BLOCK_M, SLOTS), dtype=tl.float32)
    for s in range(sampled):
        top = _tile_max(y, B, ks, s * EVERY * BLOCK_N + tl.arange(0, BLOCK_N), sb_r, r, V, IEEE)
        low = tl.min(best, axis=1)
        at = tl.argmin(best, axis=1)
        best = tl.where((slot == at[:, None]) & (top > low)[:, None], top[:, None], best)
    thresh = tl.min(best, axis=1)
    tl.store(THRESH + head * st_h + rows, thresh, mask=row_ok)
    # Flags reach a little below the threshold: the gather pass scores the tiles again with products
    # of another shape, whose float sums may round differently; every tile holding a score at or
    # above the threshold by its arithmetic must be flagged. (Extra tiles only cost a little work.)
    scale = tl.max(tl.where((slot < PICK) & (best > float("-inf")), tl.abs(best), 0.0), axis=1)
    thresh = thresh - _FLAG_SLACK * scale
    bits = tl.zeros((BLOCK_M,), dtype=tl.int32)
    if PAIRED:  # (with an odd tile count the last pair's second half lies past V: its bit is never read)
        for j in range(0, n_tiles, 2):
            first, second = _tile_pair_max(y, B, ks, j * BLOCK_N + tl.arange(0, 2 * BLOCK_N), sb_r, r, V, IEEE)
            bits |= ((first >= thresh).to(tl.int32) << (j % 32)) | ((second >= thresh).to(tl.int32) << ((j + 1) % 32))
            if (j % 32 == 30) | (j + 2 >= n_tiles):
                tl.store(FLAGS + (j // 32) * sf_w + rows, bits, mask=row_ok)
                bits = tl.zeros((BLOCK_M,), dtype=tl.int32)
    else:
        for j in range(n_tiles):
            top = _tile_max(y, B, ks, j * BLOCK_N + tl.arange(0, BLOCK_N), sb_r, r, V, IEEE)
            bits |= (top >= thresh).to(tl.int32) << (j % 32)
            if (j % 32 == 31) | (j == n_tiles - 1):
                tl.store(FLAGS + (j // 32) * sf_w + rows, bits, mask=row_ok)
                bits = tl.zeros((BLOCK_M,), dtype=tl.int32)


@no_type_check  # Triton compiles these; the runtime shape checker must not wrap them
@triton.jit
def _gather_kernel(Y, B, FLAGS, THRESH, OUT_S, OUT_I, COUNT, SCRATCH, n, items,
                   sy_h, sy_n, sb_h, sb_r, sf_h, sf_w, st_h, so_h, so_n, sc_h,
                   CAP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                   R_PAD: tl.constexpr, IEEE: tl.constexpr, r: tl.constexpr, V: tl.constexpr):
    """Pass 2 of the top-k: the flagged (row, tile) pairs scored again, grouped by tile so that
    the products run on whole blocks of rows, and every score at or above its row's threshold
    appended to the row's buffer OUT[h, i, :CAP] (slots from an atomic add on COUNT[h, i]; a
    count over CAP means the buffer overflowed).

    A persistent grid walks the ``items`` work items (head, tile, chunk of CHUNK rows; program p
    takes items p, p + programs, ...): the chunk's flagged rows are compacted (a prefix sum,
    through the program's own SCRATCH slice), then scored BLOCK_R at a time against the tile's
    columns of B. (Both loops are ``while`` loops: Triton 3.6's interpreter cannot run a ``for``
    over a bound computed at run time.)"""
    pid = tl.program_id(0)
    n_tiles: tl.constexpr = (V + BLOCK_N - 1) // BLOCK_N
    n_chunks = tl.cdiv(n, CHUNK)
    ks = tl.arange(0, R_PAD)
    scratch = SCRATCH + pid * CHUNK
    item = pid
    while item < items:
        head = item // (n_tiles * n_chunks)
        j = (item // n_chunks) % n_tiles
        rows = (item % n_chunks) * CHUNK + tl.arange(0, CHUNK)
        words = tl.load(FLAGS + head.to(tl.int64) * sf_h + (j // 32) * sf_w + rows, mask=rows < n, other=0)
        hit = (words >> (j % 32)) & 1
        total = tl.sum(hit)
        if total > 0:
            tl.store(scratch + tl.cumsum(hit, axis=0) - 1, rows, mask=hit != 0)
            tl.debug_barrier()  # the compacted rows are read back by other threads of the program
            cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < V
            b = tl.load(B + head.to(tl.int64) * sb_h + ks[:, None] * sb_r + cols[None, :],
                        mask=(ks[:, None] < r) & col_ok[None, :], other=0.0)
            s = 0
            while s < total:
                taken = s + tl.arange(0, BLOCK_R) < total
                picked = tl.load(scratch + s + tl.arange(0, BLOCK_R), mask=taken, other=0, cache_modifier=".cg")
                y = tl.load(Y + head.to(tl.int64) * sy_h + picked[:, None] * sy_n + ks[None, :],
                            mask=taken[:, None] & (ks[None, :] < r), other=0.0)
                acc = _dot(y, b, tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32), IEEE)
                thresh = tl.load(THRESH + head * st_h + picked, mask=taken, other=float("inf"))
                keep = (acc >= thresh[:, None]) & col_ok[None, :]
                counters = tl.broadcast_to((COUNT + head * sc_h + picked)[:, None], (BLOCK_R, BLOCK_N))
                slot = tl.atomic_add(counters, 1, mask=keep, sem="relaxed")
                write = keep & (slot < CAP)
                where = head.to(tl.int64) * so_h + picked[:, None] * so_n + slot
                tl.store(OUT_S + where, acc, mask=write)
                tl.store(OUT_I + where, cols[None, :] + tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.int32), mask=write)
                s += BLOCK_R
            tl.debug_barrier()  # every thread is done with the scratch before the next item refills it
        item += tl.num_programs(0)


@no_type_check  # Triton compiles these; the runtime shape checker must not wrap them
@triton.jit
def _select_kernel(CAND_S, CAND_I, OUT_S, OUT_I, rows, k,
                   CAP: tl.constexpr, K_PAD: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """Pass 3 of the top-k: each row's ``k`` best of its CAP candidates, descending, ties to the
    lower column, by one bitonic top-k (``tl.topk``) over int64 keys holding the score's
    order-preserving bits above the inverted column (the rule of ``top_by_score_then_index``)."""
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = row < rows
    at = row.to(tl.int64)[:, None] * CAP + tl.arange(0, CAP)[None, :]
    score = tl.load(CAND_S + at, mask=row_ok[:, None], other=float("-inf"))
    col = tl.load(CAND_I + at, mask=row_ok[:, None], other=0).to(tl.int64)
    bits = score.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    best = tl.topk((ordered.to(tl.int64) << 32) | (0xFFFFFFFF - col), K_PAD, dim=1)
    high = (best >> 32).to(tl.int32)
    slot = tl.arange(0, K_PAD)[None, :]
    out = row.to(tl.int64)[:, None] * k + slot
    keep = row_ok[:, None] & (slot < k)
    tl.store(OUT_S + out, (high ^ ((high >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True), mask=keep)
    tl.store(OUT_I + out, 0xFFFFFFFF - (best & 0xFFFFFFFF), mask=keep)


def _rows_contiguous(X: Tensor) -> Tensor:
    """Unit stride along the last axis; other strides (a stride-0 head axis for a shared B) are kept."""
    return X if X.stride(-1) == 1 else X.contiguous()


def _interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _ieee(Y: Tensor) -> bool:
    """fp32 inputs, or any input under the interpreter, go through the widened IEEE dot."""
    return Y.dtype == torch.float32 or _interpreted()


def _block_k(r: int) -> int:
    return max(16, min(64, triton.next_power_of_2(r)))


# Tile sizes and launch settings on CUDA (benchmarks/bench_kernels.py sweeps them on the GPU it runs
# on). RANK_CONFIG is the best the sweep found on an H100. TOPK_CONFIG: the flag pass (block_m x
# block_n tiles, two per product with ``paired``; num_warps, num_stages; a threshold from every
# ``every``-th tile, set to let about margin * k scores through), the gather pass (persistent
# programs, ``gather_per_sm`` a multiprocessor, chunks of ``chunk`` rows scored ``block_r`` at a time
# with ``gather_warps``, registers capped at ``gather_maxnreg`` so that four programs fit). Not yet
# swept on a GPU: chosen from the compiled code's instruction counts, shared memory and registers
# (benchmarks/kernel_sass.py, RESULTS.md).
RANK_CONFIG = dict(block_m=128, block_n=64, num_warps=4, num_stages=3)
TOPK_CONFIG = dict(block_m=128, block_n=64, num_warps=4, num_stages=3, paired=False, every=8, margin=2.0,
                   chunk=2048, block_r=64, gather_warps=4, gather_stages=1, gather_per_sm=4, gather_maxnreg=128)
# float32 inputs multiply on CUDA cores (IEEE, never TF32); with the tiles above their operands
# spill to local memory by the thousand instructions (counted in the compiled code), with these a
# few dozen; paired tiles spill again.
TOPK_CONFIG_FP32 = dict(block_m=32, block_r=16, paired=False)


def _launch_config(device: torch.device, config: dict, prefix: str = "") -> dict:
    """``num_warps``/``num_stages`` (and ``maxnreg`` where set) from ``config`` (keys ``prefix +
    "warps"``/``"stages"``/``"maxnreg"``, or the plain names), on CUDA only: the interpreter takes none."""
    if device.type != "cuda":
        return {}
    if prefix:
        launch = dict(num_warps=config[prefix + "warps"], num_stages=config[prefix + "stages"])
        if config.get(prefix + "maxnreg"):
            launch["maxnreg"] = config[prefix + "maxnreg"]
        return launch
    return dict(num_warps=config["num_warps"], num_stages=config["num_stages"])


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


def _flag_pass(Y: Tensor, B: Tensor, pick: int, config: dict) -> tuple[Tensor, Tensor]:
    """:func:`_flag_kernel` over heads x rows: flags ``(heads, words, n)`` int32 (bit j % 32 of word
    j // 32: column tile j reaches the row's threshold) and the thresholds ``(heads, n)``."""
    H, n, r = Y.shape
    V = B.shape[-1]
    tiles = triton.cdiv(V, config["block_n"])
    flags = torch.empty(H, triton.cdiv(tiles, 32), n, dtype=torch.int32, device=Y.device)
    thresh = torch.empty(H, n, device=Y.device)
    _flag_kernel[(triton.cdiv(n, config["block_m"]), H)](
        Y, B, flags, thresh, n, Y.stride(0), Y.stride(1), B.stride(0), B.stride(1), flags.stride(0), flags.stride(1),
        thresh.stride(0), BLOCK_M=config["block_m"], BLOCK_N=config["block_n"], R_PAD=_r_pad(r), IEEE=_ieee(Y), r=r,
        V=V, EVERY=config["every"], PICK=pick, SLOTS=triton.next_power_of_2(pick), PAIRED=bool(config["paired"]),
        **_launch_config(Y.device, config))
    return flags, thresh


def _gather_pass(Y: Tensor, B: Tensor, flags: Tensor, thresh: Tensor, cap: int,
                 config: dict) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_gather_kernel` over the flags: each row's scores at or above its threshold in a
    buffer of ``cap`` (-inf where unfilled), their columns, and their number (over ``cap``: the
    buffer overflowed)."""
    H, n, r = Y.shape
    V = B.shape[-1]
    cand_s = torch.full((H, n, cap), float("-inf"), device=Y.device)
    cand_i = torch.zeros((H, n, cap), dtype=torch.int32, device=Y.device)
    count = torch.zeros((H, n), dtype=torch.int32, device=Y.device)
    items = H * triton.cdiv(V, config["block_n"]) * triton.cdiv(n, config["chunk"])
    if Y.device.type == "cuda":
        per_device = torch.cuda.get_device_properties(Y.device).multi_processor_count * config["gather_per_sm"]
    else:
        per_device = 2  # the interpreter runs programs one after another; two still exercise the striding
    programs = min(items, per_device)
    scratch = torch.empty(programs, config["chunk"], dtype=torch.int32, device=Y.device)
    _gather_kernel[(programs,)](
        Y, B, flags, thresh, cand_s, cand_i, count, scratch, n, items, Y.stride(0), Y.stride(1), B.stride(0),
        B.stride(1), flags.stride(0), flags.stride(1), thresh.stride(0), cand_s.stride(0), cand_s.stride(1),
        count.stride(0), CAP=cap, CHUNK=config["chunk"], BLOCK_R=config["block_r"], BLOCK_N=config["block_n"],
        R_PAD=_r_pad(r), IEEE=_ieee(Y), r=r, V=V, **_launch_config(Y.device, config, "gather_"))
    return cand_s, cand_i, count


def _r_pad(r: int) -> int:
    """The resident rows' width: ``r`` rounded up to a power of two (tl.arange), at least 16 (tl.dot)."""
    return max(16, triton.next_power_of_2(r))


def _select(cand_s: Tensor, cand_i: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best of each row of ``(heads, n, cap)`` candidates (cap a power of two): scores
    (float32) and columns (int64), ties to the lower column. :func:`_select_kernel` on a GPU;
    under the interpreter, whose bitonic network costs seconds per thousand candidates, the same
    rule in torch (``tests/test_kernels_triton.py`` checks the kernel against it)."""
    if _interpreted():
        return top_by_score_then_index(cand_s, cand_i, k)
    H, n, cap = cand_s.shape
    scores = torch.empty(H, n, k, device=cand_s.device)
    index = torch.empty(H, n, k, dtype=torch.long, device=cand_s.device)
    block_rows = max(1, SELECT_ELEMENTS // cap)
    _select_kernel[(triton.cdiv(H * n, block_rows),)](
        cand_s, cand_i, scores, index, H * n, k, CAP=cap, K_PAD=triton.next_power_of_2(k), BLOCK_ROWS=block_rows,
        **({"num_warps": 4} if cand_s.device.type == "cuda" else {}))
    return scores, index


# Candidates (rows x buffer) one program of the select sorts at once.
SELECT_ELEMENTS = 2048

# Bytes of candidate buffers (score + column) one gather launch may fill.
CANDIDATE_BYTES = 1 << 30


@torch.no_grad()
def topk_triton(
    Y: Float[Tensor, "heads n r"],
    B: Float[Tensor, "heads r V"],
    k: int,
    *,
    config: dict | None = None,
    timings: dict | None = None,
) -> tuple[Float[Tensor, "heads n k"], Int[Tensor, "heads n k"]]:
    """Top-``k`` scores (descending) and column indices of each row of ``Y[h] @ B[h]``.

    (1) The flag pass scores every ``every``-th column tile, takes a threshold per row (the
    ``ceil(margin * k / every)``-th largest sampled tile maximum: about margin * k scores reach it
    on typical rows), then scores every tile and marks, per row, the tiles whose maximum reaches
    it. (2) The gather pass scores the marked (row, tile) pairs again, grouped by tile, and keeps
    the scores at or above the threshold. (3) The select takes the top k of those few. A row with at least k kept
    scores that fit its buffer is exact whatever the threshold was; the others go through both
    passes again with the *safe* threshold (the k-th largest sampled maximum: k tiles hold a score
    at or above it) and a larger buffer, and any still short or over it are redone with the torch
    reference. Ties go to the lower index. ``config`` overrides :data:`TOPK_CONFIG` (and, for
    float32 inputs, :data:`TOPK_CONFIG_FP32`); ``timings``, if given, receives seconds per step
    (synchronising the GPU, for the benchmark) and the number of redone rows.
    """
    config = {**TOPK_CONFIG, **(TOPK_CONFIG_FP32 if Y.dtype == torch.float32 else {}), **(config or {})}
    H, n, r = Y.shape
    V = B.shape[-1]
    Y, B = _rows_contiguous(Y), _rows_contiguous(B)
    pick, cap, safe_cap = _plan(k, V, config)
    out_scores = torch.empty(H, n, k, device=Y.device)
    out_index = torch.empty(H, n, k, dtype=torch.long, device=Y.device)
    clock = _Clock(Y.device, timings)
    rows = max(config["block_m"], CANDIDATE_BYTES // (cap * 8))
    for h0, h1, n0, n1 in _work_blocks(H, n, rows):
        Yb, Bb = Y[h0:h1, n0:n1], B[h0:h1]
        flags, thresh = _flag_pass(Yb, Bb, pick, config)
        clock.lap("flag pass")
        cand_s, cand_i, count = _gather_pass(Yb, Bb, flags, thresh, cap, config)
        del flags, thresh
        clock.lap("gather pass")
        scores, index = _select(cand_s, cand_i, k)
        del cand_s, cand_i
        clock.lap("select")
        redo = ((count < k) | (count > cap)).nonzero()
        for h in redo[:, 0].unique().tolist():
            rows_h = redo[redo[:, 0] == h, 1]
            Yh, Bh = Yb[h, rows_h][None], Bb[h][None]
            s2, i2, c2 = _gather_pass(Yh, Bh, *_flag_pass(Yh, Bh, k, config), safe_cap, config)
            scores[h, rows_h], index[h, rows_h] = (part[0] for part in _select(s2, i2, k))
            still = ((c2[0] < k) | (c2[0] > safe_cap)).nonzero()[:, 0]
            if still.numel():  # short (float rounding at the threshold) or over the larger buffer: exact redo
                exact = projection_topk_reference(Yb[h, rows_h[still]], Bb[h], k)
                scores[h, rows_h[still]], index[h, rows_h[still]] = exact
        if timings is not None:
            timings["redone rows"] = timings.get("redone rows", 0) + len(redo)
        clock.lap("redo")
        out_scores[h0:h1, n0:n1], out_index[h0:h1, n0:n1] = scores, index
    return out_scores, out_index


def _plan(k: int, V: int, config: dict) -> tuple[int, int, int]:
    """Settle ``config["every"]`` (at least k sampled tiles where the vocabulary allows) and return
    the tight threshold's rank among the sampled maxima and the two buffer sizes, powers of two
    about twice the scores each threshold lets through on typical rows (the whole vocabulary
    where too few tiles are sampled for a threshold: every column is a candidate)."""
    tiles = triton.cdiv(V, config["block_n"])
    config["every"] = every = max(1, min(config["every"], tiles // k))
    sampled = triton.cdiv(tiles, every)
    pick = min(k, math.ceil(config["margin"] * k / every))
    smallest, whole = triton.next_power_of_2(k), triton.next_power_of_2(V)  # (the select sorts powers of two)
    cap = whole if sampled < pick else min(whole, max(smallest, triton.next_power_of_2(2 * pick * every)))
    safe_cap = whole if sampled < k else min(whole, max(smallest, triton.next_power_of_2(4 * k * every)))
    return pick, cap, safe_cap


def _work_blocks(heads: int, n: int, rows: int):
    """(h0, h1, n0, n1) blocks of about ``rows`` rows: several whole heads, or one head in row chunks."""
    if n <= rows:
        step = max(1, rows // n)
        for h0 in range(0, heads, step):
            yield h0, min(heads, h0 + step), 0, n
        return
    for h in range(heads):
        for n0 in range(0, n, rows):
            yield h, h + 1, n0, min(n, n0 + rows)


class _Clock:
    """Adds the seconds since the last lap to ``timings[name]`` (no-op without ``timings``)."""

    def __init__(self, device: torch.device, timings: dict | None):
        self.device, self.timings = device, timings
        self.last = self._now()

    def _now(self) -> float:
        if self.timings is None:
            return 0.0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is not None:
            now = self._now()
            self.timings[name] = self.timings.get(name, 0.0) + now - self.last
            self.last = now
