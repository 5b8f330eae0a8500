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
* :func:`topk_triton`: a threshold per row from the maxima of a strided sample of column tiles,
  then one kernel pass that appends only the scores at or above it to a per-row buffer (slots
  from an atomic add on the row's counter), and a top-k over those few. (Earlier versions: a
  running top-k merged tile by tile with a bitonic sort ran at 0.3% of the H100's bf16 rate;
  placing candidates with a per-tile prefix sum, at 3%.) Ties go to the lower index, as in the
  reference.

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
def _score_tile(Y, B, rows, row_ok, cols, col_ok, sy_n, sb_r, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, IEEE: tl.constexpr, r: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) fp32 tile ``Y[rows] @ B[:, cols]`` (zeros outside the masks)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.static_range(0, r, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        y = tl.load(Y + rows[:, None] * sy_n + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < r), other=0.0)
        b = tl.load(B + ks[:, None] * sb_r + cols[None, :], mask=(ks[:, None] < r) & col_ok[None, :], other=0.0)
        acc = _dot(y, b, acc, IEEE)
    return acc


@no_type_check  # Triton compiles these; the runtime shape checker must not wrap them
@triton.jit
def _sampled_max_kernel(Y, B, OUT, n,
                        sy_h, sy_n, sb_h, sb_r, so_h, so_s,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                        r: tl.constexpr, V: tl.constexpr, EVERY: tl.constexpr, SAMPLED: tl.constexpr):
    """OUT[h, j, i] = the largest score of row i of Y[h] @ B[h] in column tile j * EVERY."""
    pid, head = tl.program_id(0), tl.program_id(1)
    Y += head.to(tl.int64) * sy_h  # the head's offset on the scalar base keeps the tile offsets int32
    B += head.to(tl.int64) * sb_h
    OUT += head.to(tl.int64) * so_h
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    for j in range(SAMPLED):
        cols = j * EVERY * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < V
        acc = _score_tile(Y, B, rows, row_ok, cols, col_ok, sy_n, sb_r, BLOCK_M, BLOCK_N, BLOCK_K, IEEE, r)
        best = tl.max(tl.where(col_ok[None, :], acc, float("-inf")), axis=1)
        tl.store(OUT + j * so_s + rows, best, mask=row_ok)


@no_type_check  # Triton compiles these; the runtime shape checker must not wrap them
@triton.jit
def _collect_kernel(Y, B, THRESH, OUT_S, OUT_I, COUNT, n,
                    sy_h, sy_n, sb_h, sb_r, st_h, so_h, so_n, sc_h,
                    CAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    IEEE: tl.constexpr, r: tl.constexpr, V: tl.constexpr, LANE_CAP: tl.constexpr):
    """Keep every (score, column) of row i of Y[h] @ B[h] with score >= THRESH[h, i] in
    OUT[h, i, :CAP] and write their number to COUNT[h, i] (over CAP: the buffer overflowed and
    the caller redoes the row). No atomics and no scan: with ``LANE_CAP`` > 0 the buffer is
    ``BLOCK_N`` lanes of ``LANE_CAP`` slots, lane j holding the hits of columns = j mod BLOCK_N,
    counted in registers laid out like the scores (CAP = BLOCK_N * LANE_CAP; a row overflows
    when one lane does). With ``LANE_CAP`` = 0 slots come from an atomic add on the row's
    counter instead, stored one tile later so the atomic's round trip overlaps the next tile."""
    pid, head = tl.program_id(0), tl.program_id(1)
    Y += head.to(tl.int64) * sy_h  # the head's offset on the scalar base keeps the tile offsets int32
    B += head.to(tl.int64) * sb_h
    OUT_S += head.to(tl.int64) * so_h
    OUT_I += head.to(tl.int64) * so_h
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    thresh = tl.load(THRESH + head * st_h + rows, mask=row_ok, other=float("inf"))
    out_row = (rows * so_n)[:, None]
    lane = tl.arange(0, BLOCK_N)[None, :]
    ones = tl.full((BLOCK_M, BLOCK_N), 1, tl.int32)
    counters = tl.broadcast_to((COUNT + head * sc_h + rows)[:, None], (BLOCK_M, BLOCK_N))
    held = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # LANE_CAP: hits per lane; atomic: last tile's slots
    last = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    last_keep = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int1)
    for c0 in range(0, V, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < V
        acc = _score_tile(Y, B, rows, row_ok, cols, col_ok, sy_n, sb_r, BLOCK_M, BLOCK_N, BLOCK_K, IEEE, r)
        keep = (acc >= thresh[:, None]) & col_ok[None, :]
        if LANE_CAP > 0:
            write = keep & (held < LANE_CAP)
            where = out_row + held * BLOCK_N + lane
            tl.store(OUT_S + where, acc, mask=write)
            tl.store(OUT_I + where, lane + c0 + tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32), mask=write)
            held += keep.to(tl.int32)
        else:
            write = last_keep & (held < CAP)
            where = out_row + tl.where(write, held, 0)
            tl.store(OUT_S + where, last, mask=write)
            tl.store(OUT_I + where, lane + (c0 - BLOCK_N) + tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32), mask=write)
            held = tl.atomic_add(counters, ones, mask=keep, sem="relaxed")
            last, last_keep = acc, keep
    if LANE_CAP > 0:
        total = tl.sum(held, axis=1)
        total = tl.where(tl.max(held, axis=1) > LANE_CAP, CAP + 1, total)
        tl.store(COUNT + head * sc_h + rows, total, mask=row_ok)
    else:  # the last tile's hits
        c_last = ((V - 1) // BLOCK_N) * BLOCK_N
        write = last_keep & (held < CAP)
        where = out_row + tl.where(write, held, 0)
        tl.store(OUT_S + where, last, mask=write)
        tl.store(OUT_I + where, lane + c_last + tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32), mask=write)


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
COLLECT_CONFIG = dict(block_m=128, block_n=64, num_warps=8, num_stages=3, lane_cap=8, margin=1.5)


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


def _collect(Y: Tensor, B: Tensor, thresh: Tensor, cap: int, config: dict) -> tuple[Tensor, Tensor, Tensor]:
    """Run the collect kernel over heads x rows: candidate scores (-inf where unfilled),
    their columns, and each row's number of candidates (over the buffer's size: overflowed).
    ``config["lane_cap"]`` > 0 picks the lane buffer (its size then is block_n * lane_cap)."""
    H, n, r = Y.shape
    lane_cap = int(config.get("lane_cap", 0))
    if lane_cap:
        cap = config["block_n"] * lane_cap
    cand_s = torch.full((H, n, cap), float("-inf"), device=Y.device)
    cand_i = torch.zeros((H, n, cap), dtype=torch.int32, device=Y.device)
    count = torch.zeros((H, n), dtype=torch.int32, device=Y.device)
    thresh = thresh.float().contiguous()
    _collect_kernel[(triton.cdiv(n, config["block_m"]), H)](
        Y, B, thresh, cand_s, cand_i, count, n, Y.stride(0), Y.stride(1), B.stride(0), B.stride(1),
        thresh.stride(0), cand_s.stride(0), cand_s.stride(1), count.stride(0),
        CAP=cap, BLOCK_M=config["block_m"], BLOCK_N=config["block_n"], BLOCK_K=_block_k(r), IEEE=_ieee(Y), r=r,
        V=B.shape[-1], LANE_CAP=lane_cap, **_launch_config(Y.device, config))
    return cand_s, cand_i, count


def _select(cand_s: Tensor, cand_i: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best candidates of each row, ties to the lower index: a float top-(k+1),
    then the exact (score, index) order only where the k-th and (k+1)-th scores tie."""
    if cand_s.shape[-1] <= k + 1:
        return top_by_score_then_index(cand_s, cand_i, k)
    vals, pos = cand_s.topk(k + 1, dim=-1)
    scores, index = top_by_score_then_index(vals[..., :k], cand_i.gather(-1, pos[..., :k]), k)
    tied = vals[..., k - 1] == vals[..., k]
    if tied.any():
        scores[tied], index[tied] = top_by_score_then_index(cand_s[tied], cand_i[tied], k)
    return scores, index


# Bytes of candidate buffers (score + column) one collect launch may hold.
CANDIDATE_BYTES = 1 << 30


@torch.no_grad()
def topk_triton(
    Y: Float[Tensor, "heads n r"],
    B: Float[Tensor, "heads r V"],
    k: int,
    *,
    sample_every: int = 8,
    config: dict | None = None,
    timings: dict | None = None,
) -> tuple[Float[Tensor, "heads n k"], Int[Tensor, "heads n k"]]:
    """Top-``k`` scores (descending) and column indices of each row of ``Y[h] @ B[h]``.

    (1) A sampling kernel computes every ``sample_every``-th column tile and keeps each row's
    maximum per tile. The k-th largest of those maxima is a *safe* threshold (k tiles hold a
    score at or above it, so at least k scores are); a higher *tight* one (the
    ``ceil(margin * k / sample_every)``-th) lets through about margin * k candidates on typical
    rows. (2) One collecting pass over the whole vocabulary keeps the scores at or above the
    tight threshold in a per-row buffer (see :func:`_collect_kernel` for its two layouts). (3) A top-k over the buffer. A row whose candidates number
    at least k and fit the buffer is exact whatever the threshold was; the others (the tight
    guess let too few or too many through) are collected again with the safe threshold and a
    larger buffer, and any still over it are redone with the torch reference. Ties go to the
    lower index. ``config`` overrides :data:`COLLECT_CONFIG`; ``timings``, if given, receives
    seconds per step (synchronising the GPU, for the benchmark).
    """
    config = {**COLLECT_CONFIG, **(config or {})}
    H, n, r = Y.shape
    V = B.shape[-1]
    Y, B = _rows_contiguous(Y), _rows_contiguous(B)
    tiles = triton.cdiv(V, config["block_n"])
    every = max(1, min(sample_every, tiles // k))  # keep at least k sampled tiles where the vocabulary allows
    sampled = triton.cdiv(tiles, every)
    pick = min(k, math.ceil(config["margin"] * k / every))
    cap = V if sampled < k else min(V, 2 * pick * every + 64)
    if sampled < k:  # every column is a candidate: only the counter buffer holds them all
        config["lane_cap"] = 0
    safe_cap = V if sampled < k else min(V, 4 * k * every + 64)
    out_scores = torch.empty(H, n, k, device=Y.device)
    out_index = torch.empty(H, n, k, dtype=torch.long, device=Y.device)
    clock = _Clock(Y.device, timings)
    per_row = max(cap, config["block_n"] * config["lane_cap"]) * 8
    rows = max(config["block_m"], CANDIDATE_BYTES // per_row)
    for h0, h1, n0, n1 in _work_blocks(H, n, rows):
        Yb, Bb = Y[h0:h1, n0:n1], B[h0:h1]
        if sampled >= k:
            maxima = torch.empty(h1 - h0, sampled, n1 - n0, device=Y.device)
            _sampled_max_kernel[(triton.cdiv(n1 - n0, config["block_m"]), h1 - h0)](
                Yb, Bb, maxima, n1 - n0, Yb.stride(0), Yb.stride(1), Bb.stride(0), Bb.stride(1),
                maxima.stride(0), maxima.stride(1), BLOCK_M=config["block_m"], BLOCK_N=config["block_n"],
                BLOCK_K=_block_k(r), IEEE=_ieee(Y), r=r, V=V, EVERY=every, SAMPLED=sampled,
                **_launch_config(Y.device, config))
            best = maxima.topk(k, dim=1).values
            tight, safe = best[:, pick - 1], best[:, k - 1]
            del maxima, best
        else:  # too few tiles to sample: every column is a candidate
            tight = safe = torch.full((h1 - h0, n1 - n0), float("-inf"), device=Y.device)
        clock.lap("threshold")
        cand_s, cand_i, count = _collect(Yb, Bb, tight, cap, config)
        clock.lap("collect")
        scores, index = _select(cand_s, cand_i, k)
        width = cand_s.shape[-1]
        del cand_s, cand_i
        clock.lap("select")
        redo = ((count < k) | (count > width)).nonzero()
        for h in redo[:, 0].unique().tolist():
            rows_h = redo[redo[:, 0] == h, 1]
            s2, i2, c2 = _collect(Yb[h, rows_h][None], Bb[h][None], safe[h, rows_h][None], safe_cap,
                                  {**config, "lane_cap": 0})
            redone_s, redone_i = _select(s2, i2, k)
            scores[h, rows_h], index[h, rows_h] = redone_s[0], redone_i[0]
            still = ((c2[0] < k) | (c2[0] > safe_cap)).nonzero()[:, 0]
            if still.numel():  # more candidates than the larger buffer: exact redo
                exact = projection_topk_reference(Yb[h, rows_h[still]], Bb[h], k)
                scores[h, rows_h[still]], index[h, rows_h[still]] = exact
        if timings is not None:
            timings["redone rows"] = timings.get("redone rows", 0) + len(redo)
        clock.lap("redo")
        out_scores[h0:h1, n0:n1], out_index[h0:h1, n0:n1] = scores, index
    return out_scores, out_index


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
