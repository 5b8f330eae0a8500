"""Projection-rank and projection-top-k: Triton kernels vs the torch reference vs full logits.

One command on a GPU machine (``python benchmarks/bench_kernels.py``) prints:

1. the floor: this GPU's measured bf16 matrix rate and copy bandwidth, and the FLOPs and bytes
   of each problem with the time they imply;
2. projection-rank for every head of a Llama-3.1-70B-shaped model (80 layers x 64 query heads,
   d_model 8192, d_head 128, vocabulary 128,256) against every pair of the MAPS relation data
   (7,694 rows per head; random weights made on the GPU): the Triton kernel over all 5,120
   heads (exact ranks, and with k=10 as classification runs it), the chunked torch reference
   and "materialise the n x V logits per head" timed on a few heads and scaled up;
3. top-k (k=64) over the whole vocabulary for every token as a source (n = V rows), for one
   layer's 64 heads (timed on ``--topk-heads`` heads with all V rows each, and scaled).

Without a GPU it measures the CPU reference path at the two bundled models' shapes instead
(random weights of the same sizes), against materialising the logits.
Each head's projection is ``B_h = W_O,h W_U`` formed once per layer (cuBLAS, counted in the time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_description, print_table  # noqa: E402

from mechkit.kernels import projection_rank, projection_topk  # noqa: E402

MAPS_PAIRS = 7694  # single rows across the 23 built-in relation files (classification keeps ~all)
LLAMA_70B = dict(layers=80, heads=64, d_model=8192, d_head=128, vocab=128256)
BUNDLED_SHAPES = {  # (layers, heads, d_model, d_head, vocab) of the bundled models
    "gemma-3-270m": (18, 4, 640, 256, 262144),
    "smollm2-135m-instruct": (30, 9, 576, 64, 49152),
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int = 1) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def measure_floor(device: str) -> tuple[float, float]:
    """bf16 matrix rate (FLOP/s, 8192^3 products) and copy bandwidth (bytes read+written per s)."""
    size = 8192 if device == "cuda" else 512
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    rate = 2 * size**3 / timed(lambda: a @ b, repeats=10)
    src = torch.empty(2**30 if device == "cuda" else 2**24, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    bandwidth = 2 * src.numel() / timed(lambda: dst.copy_(src), repeats=10)
    del a, b, src, dst
    return rate, bandwidth


def materialised_rank(Y, B, targets):
    """The naive path: all n x V logits of one head at once, then count the larger ones."""
    logits = (Y @ B).float()
    own = logits.gather(1, targets[:, None])
    larger = logits > own
    larger.scatter_(1, targets[:, None], False)
    return larger.sum(1)


def peak(fn) -> tuple[float, float]:
    """(seconds, peak extra GPU memory in GiB) of ``fn``."""
    if not torch.cuda.is_available():  # --smoke on the CPU
        return timed(fn), float("nan")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    seconds = timed(fn)
    return seconds, (torch.cuda.max_memory_allocated() - base) / 2**30


RANK_SWEEP = [dict(block_m=m, block_n=nb, num_warps=w, num_stages=st)
              for m, nb in ((64, 128), (128, 128), (128, 64), (64, 256), (128, 256)) for w in (4, 8) for st in (3, 4)]
# The top-k sweep in three stages, each keeping its best for the next: the flag pass's tiles, the
# gather pass's shape and registers, then how many scores the threshold lets through.
TOPK_SWEEPS = [
    ("flag pass tiles", [dict(block_m=m, num_warps=w, num_stages=st, paired=paired)
                         for m, w, st, paired in ((128, 4, 3, False), (128, 4, 4, False), (128, 4, 2, False),
                                                  (128, 8, 3, False), (256, 8, 2, False), (64, 4, 4, False),
                                                  (128, 4, 2, True), (128, 4, 3, True), (128, 8, 2, True))]),
    ("gather pass", [dict(chunk=c, block_r=br, gather_warps=w, gather_per_sm=p, gather_maxnreg=reg)
                     for c, br, w, p, reg in ((2048, 64, 4, 4, 128), (2048, 64, 4, 2, None), (1024, 64, 4, 4, 128),
                                              (4096, 64, 4, 4, 128), (2048, 128, 8, 2, 128), (2048, 64, 4, 5, 96))]),
    ("threshold", [dict(margin=m, every=e) for m, e in ((2.0, 8), (1.5, 8), (3.0, 8), (2.0, 4), (2.0, 16), (1.5, 4))]),
]


def sweep(run, defaults: dict, configs: list[dict], what: str) -> None:
    """Time each launch config once (after a compile call); keep the fastest in ``defaults``."""
    if not torch.cuda.is_available():
        return
    timings = []
    for config in configs:
        try:
            run(config)
            timings.append((timed(lambda: run(config)), config))
        except Exception as error:  # noqa: BLE001 - a config that does not fit (shared memory) is skipped
            print(f"  config {config} failed: {type(error).__name__}")
    timings.sort(key=lambda pair: pair[0])
    defaults.update(timings[0][1])
    print(f"  sweep of {len(timings)} launch configs for {what}: best {timings[0][1]} "
          f"{timings[0][0] * 1e3:.1f} ms, worst {timings[-1][0] * 1e3:.1f} ms")


def gpu_rank(args, rate: float, bandwidth: float) -> None:
    from mechkit.kernels import triton_projection
    from mechkit.kernels.triton_projection import rank_triton

    s = args.shape
    L, H, d, r, V, n = args.layers, s["heads"], s["d_model"], s["d_head"], s["vocab"], args.pairs
    dev, bf = args.device, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    W_U = torch.randn(d, V, device=dev, dtype=bf, generator=g) / d**0.5
    W_O = torch.randn(H, r, d, device=dev, dtype=bf, generator=g) / r**0.5
    Y = torch.randn(H, n, r, device=dev, dtype=bf, generator=g)
    targets = torch.randint(0, V, (H, n), device=dev, generator=g)

    form_flops = 2 * H * r * d * V
    score_flops = 2 * H * n * r * V
    flops = L * (form_flops + score_flops)
    bytes_moved = L * (d * V * 2 + 2 * H * r * V * 2 + H * n * (r * 2 + 8))  # W_U read, B written+read, Y, targets
    print(f"\nProjection-rank, {L} layers x {H} heads = {L * H} heads, n = {n} rows/head, r = {r}, V = {V}")
    print(f"  FLOPs {flops:.3e} (forming B {L * form_flops:.2e}, scores {L * score_flops:.2e}); "
          f"floor {flops / rate:.2f} s at {rate / 1e12:.0f} TFLOP/s; bytes {bytes_moved:.2e} -> "
          f"{bytes_moved / bandwidth * 1e3:.0f} ms at {bandwidth / 1e12:.2f} TB/s")

    def one_layer_triton(k):
        B = (W_O @ W_U)  # (H, r, V): each head's W_O W_U, bf16 with fp32 accumulation
        return projection_rank(Y, B, targets, k=k, backend="triton")

    if not args.no_sweep:
        sweep(lambda config: rank_triton(Y, W_O @ W_U, targets, config=config), triton_projection.RANK_CONFIG,
              RANK_SWEEP, "rank (exact), one layer")
    one_layer_triton(None), one_layer_triton(10)  # compile
    rows = []
    for k in (None, 10):
        seconds, mem = peak(lambda: [one_layer_triton(k) for _ in range(L)])
        rows.append([f"Triton, {'exact' if k is None else 'k=10'}", L * H, f"{seconds:.2f}",
                     f"{flops / seconds / 1e12:.0f}", f"{flops / seconds / rate:.0%}", f"{mem:.2f}"])
    few = args.sample_heads
    B_few = W_O[:few] @ W_U
    ref_s, ref_mem = peak(lambda: projection_rank(Y[:few], B_few, targets[:few], backend="reference"))
    scale = L * H / few
    per_layer_form = timed(lambda: W_O @ W_U) / H  # B formation per head, added to the per-head paths
    ref_total = scale * ref_s + L * H * per_layer_form
    rows.append([f"torch reference (chunked), {few} heads scaled", L * H, f"{ref_total:.1f}",
                 f"{flops / ref_total / 1e12:.0f}", f"{flops / ref_total / rate:.0%}", f"{ref_mem:.2f}"])
    mat_s, mat_mem = peak(lambda: [materialised_rank(Y[h], B_few[h], targets[h]) for h in range(few)])
    mat_total = scale * mat_s + L * H * per_layer_form
    rows.append([f"materialise n x V logits, {few} heads scaled", L * H, f"{mat_total:.1f}",
                 f"{flops / mat_total / 1e12:.0f}", f"{flops / mat_total / rate:.0%}", f"{mat_mem:.2f}"])
    print_table(["method", "heads", "seconds (all heads)", "TFLOP/s*", "of bf16 rate*", "peak extra GiB"], rows)
    print("  * the full problem's FLOPs over the time; with k=10 a row block stops once every row has 10 larger "
          "scores, so it computes fewer")

    tri = projection_rank(Y[:few], B_few, targets[:few], backend="triton")
    mat = torch.stack([materialised_rank(Y[h], B_few[h], targets[h]) for h in range(few)])
    ref = projection_rank(Y[:few], B_few, targets[:few], backend="reference")
    print(f"  agreement on {few} heads x {n} rows: Triton = materialised (bf16 logits, ties) {(tri == mat).float().mean():.5f}, "
          f"Triton = reference {(tri == ref).float().mean():.5f}, max |rank diff| {int((tri - ref).abs().max())}")


def gpu_topk(args, rate: float) -> None:
    from mechkit.kernels import triton_projection
    from mechkit.kernels.triton_projection import topk_triton

    s = args.shape
    H, d, r, V, k = s["heads"], s["d_model"], s["d_head"], s["vocab"], 64
    heads = min(args.topk_heads, H)  # heads timed, each with every token (n = V rows) as a source
    n = V
    dev, bf = args.device, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(1)
    W_U = torch.randn(d, V, device=dev, dtype=bf, generator=g) / d**0.5
    W_O = torch.randn(heads, r, d, device=dev, dtype=bf, generator=g) / r**0.5
    Y = torch.randn(heads, n, r, device=dev, dtype=bf, generator=g)
    B = W_O @ W_U
    layer_flops = H * (2 * V * r * V + 2 * r * d * V)
    timed_flops = heads * 2 * n * r * V
    scale = layer_flops / timed_flops  # dominated by the scores; forming B is under 1% at n = V
    print(f"\nTop-{k} over the vocabulary for every token as a source (n = V = {V}) for one layer's {H} heads: "
          f"{layer_flops:.2e} FLOPs, floor {layer_flops / rate:.2f} s; timed on {heads} heads x {n} rows and scaled")
    if not args.no_sweep:
        for what, configs in TOPK_SWEEPS:
            sweep(lambda config: topk_triton(Y, B, k, config=config), triton_projection.TOPK_CONFIG,
                  [{**triton_projection.TOPK_CONFIG, **config} for config in configs],
                  f"top-{k} ({what}), {heads} heads x {n} rows")
    phases: dict = {}
    topk_triton(Y, B, k, timings=phases)
    total = sum(v for key, v in phases.items() if key != "redone rows")
    print("  steps (synchronised, one run): " + ", ".join(
        f"{key} {v * 1e3:.1f} ms ({v / total:.0%})" if key != "redone rows" else f"{key} {v} of {heads * n}"
        for key, v in phases.items()))
    rows = []
    results = {}
    best = triton_projection.TOPK_CONFIG
    for name, backend in ((f"Triton: flag pass ({'two tiles per product, ' if best['paired'] else ''}threshold from "
                           f"every {best['every']}th tile, margin {best['margin']}), "
                           "gather pass over the flagged (row, tile) pairs, top-k of the candidates", "triton"),
                          ("torch reference (blocked running top-k)", "reference")):
        seconds, mem = peak(lambda: results.__setitem__(backend, projection_topk(Y, B, k, backend=backend)))
        rows.append([name, f"{seconds * scale:.2f}", f"{timed_flops / seconds / 1e12:.1f}",
                     f"{timed_flops / seconds / rate:.1%}", f"{mem:.3f}"])
    print_table(["method", "seconds (one layer, scaled)", "TFLOP/s", "of bf16 rate", "peak extra GiB"], rows)
    (ts, ti), (rs, ri) = results["triton"], results["reference"]
    print(f"  agreement on {heads} x {n} rows: indices {(ti == ri).float().mean():.6f}, "
          f"max |score diff| {(ts - rs).abs().max():.2e}")


def gpu_topk_diagnosis(args, rate: float) -> None:
    """Where the top-k's time goes: the same problem (heads x V rows) through the rank kernel
    (compare + count: the lightest useful epilogue), the flag pass alone, the gather pass alone
    (on the flag pass's output), and the select; with the flagged pairs and kept scores per row."""
    from mechkit.kernels import triton_projection as tp

    s = args.shape
    r, V, heads, k = s["d_head"], s["vocab"], min(args.topk_heads, s["heads"]), 64
    dev, bf = args.device, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(2)
    Y = torch.randn(heads, V, r, device=dev, dtype=bf, generator=g)
    B = torch.randn(heads, r, V, device=dev, dtype=bf, generator=g) / r**0.5
    targets = torch.randint(0, V, (heads, V), device=dev, generator=g)
    flops = heads * 2 * V * r * V
    config = dict(tp.TOPK_CONFIG)
    pick, cap, _ = tp._plan(k, V, config)
    flags, thresh = tp._flag_pass(Y, B, pick, config)
    cand = tp._gather_pass(Y, B, flags, thresh, cap, config)
    runs = [("rank kernel (compare + count per row)", lambda: tp.rank_triton(Y, B, targets)),
            ("flag pass (threshold from sampled tiles, then a bitmask of tiles)", lambda: tp._flag_pass(Y, B, pick, config)),
            ("gather pass (the flagged pairs scored again, hits kept)",
             lambda: tp._gather_pass(Y, B, flags, thresh, cap, config)),
            ("select (top-k of the kept scores)", lambda: tp._select(cand[0], cand[1], k))]
    rows = []
    for name, fn in runs:
        fn()
        seconds = timed(fn)
        rows.append([name, f"{seconds * 1e3:.1f}", f"{flops / seconds / 1e12:.0f}", f"{flops / seconds / rate:.0%}"])
    pairs = sum(((flags >> b) & 1).sum(1) for b in range(32))  # flagged tiles per (head, row)
    print(f"\nDiagnosis: {heads} heads x {V} rows x V = {V}, config {config}, pick {pick}, buffer {cap}")
    print_table(["step", "ms", "TFLOP/s (of the whole problem)", "of bf16 rate"], rows)
    count = cand[2].float()
    print(f"  flagged (row, tile) pairs per row: mean {pairs.float().mean():.1f}; kept scores per row: "
          f"mean {count.mean():.1f}, under k {(count < k).float().mean():.2%} of rows, over the buffer "
          f"{(count > cap).float().mean():.2%}")


def cpu_reference(args) -> None:
    """The CPU story: the reference path at the bundled models' shapes, vs full logits per head."""
    torch.manual_seed(0)
    rows = []
    for name, (L, H, d, r, V) in BUNDLED_SHAPES.items():
        n = args.pairs
        W_U, W_O = torch.randn(d, V) / d**0.5, torch.randn(args.cpu_heads, r, d) / r**0.5
        Y, targets = torch.randn(args.cpu_heads, n, r), torch.randint(0, V, (args.cpu_heads, n))
        ref = timed(lambda: projection_rank(Y, W_O, targets, C=W_U, k=10, backend="reference"))
        exact = timed(lambda: projection_rank(Y, W_O, targets, C=W_U, backend="reference"))
        full = timed(lambda: [materialised_rank(Y[h], W_O[h] @ W_U, targets[h]) for h in range(args.cpu_heads)])
        scale = L * H / args.cpu_heads
        rows.append([name, L * H, f"{ref * scale:.1f}", f"{exact * scale:.1f}", f"{full * scale:.1f}",
                     f"{full / ref:.1f}x", f"{n * V * 4 / 2**20:.0f}"])
    print(f"\nCPU reference path, {args.pairs} rows/head, {args.cpu_heads} heads timed and scaled to all heads")
    print_table(["model shape", "heads", "reference k=10 s", "reference exact s", "materialise s",
                 "speed-up (k=10)", "full logits MiB/head"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=LLAMA_70B["layers"])
    parser.add_argument("--pairs", type=int, default=MAPS_PAIRS)
    parser.add_argument("--sample-heads", type=int, default=4, help="heads timed for the slow GPU baselines")
    parser.add_argument("--topk-heads", type=int, default=2, help="heads timed (n = V rows each) for the top-k problem")
    parser.add_argument("--smoke", action="store_true", help="run the GPU sections at toy shapes on the CPU "
                        "(under TRITON_INTERPRET=1), to check the script itself")
    parser.add_argument("--cpu-heads", type=int, default=2, help="heads timed per model on the CPU")
    parser.add_argument("--skip", nargs="*", default=(), choices=["rank", "topk"])
    parser.add_argument("--diagnose", action="store_true", help="time the top-k's passes one by one")
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch-config sweeps (use the defaults)")
    args = parser.parse_args()
    print(machine_description())
    args.shape, args.device = LLAMA_70B, "cuda"
    if args.smoke:
        args.shape, args.device = dict(heads=3, d_model=48, d_head=32, vocab=700), "cpu"
        args.layers, args.pairs, args.sample_heads, args.topk_heads = 2, 50, 2, 2
        rate, bandwidth = measure_floor("cpu")
    elif not torch.cuda.is_available():
        torch.set_num_threads(1)
        cpu_reference(args)
        return
    else:
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        rate, bandwidth = measure_floor("cuda")
    print(f"measured: bf16 matrix rate {rate / 1e12:.0f} TFLOP/s, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    if "rank" not in args.skip:
        gpu_rank(args, rate, bandwidth)
    if "topk" not in args.skip:
        gpu_topk(args, rate)
    if args.diagnose:
        gpu_topk_diagnosis(args, rate)


if __name__ == "__main__":
    main()
