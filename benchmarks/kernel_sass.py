"""What the projection kernels cost per tile, read off their compiled code (no GPU needed).

Triton compiles for a CUDA target without a driver, and its wheel carries ``ptxas`` and
``cuobjdump``. This script compiles the rank and top-k kernels for an H100 (sm_90) at the
Llama-3.1-70B top-k shapes (bf16, d_head 128, vocabulary 128,256, launch configs as the
dispatch uses them) and prints, for each loop of each kernel, the instructions one warp issues
per iteration (one column tile, or one block of gathered rows; a kernel without loops: the
whole program), the issue cycles that make per
multiprocessor sub-partition (instructions x warps / 4), the instruction mix, the shared memory
a program needs, the registers per thread, and the programs per multiprocessor that shared
memory (227 KiB) and registers (65,536) leave room for.

These are static counts, not timings: they say how much work the epilogue adds to each tile
and whether two programs fit a multiprocessor, which is what limited the earlier top-k (see
benchmarks/RESULTS.md); a GPU run of bench_kernels.py is what measures speed.

    python benchmarks/kernel_sass.py          # the table
    python benchmarks/kernel_sass.py --json   # the rows as JSON (tests/test_kernel_costs.py reads them)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile the kernels, do not interpret them

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table  # noqa: E402

from mechkit.kernels import triton_projection as tp  # noqa: E402

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
H100 = GPUTarget("cuda", 90, 32)
SHARED_PER_SM = 227 * 1024
REGISTERS_PER_SM = 65536
CUDA = torch.device("cuda")  # only names the target for the launch settings; nothing runs on it
INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)[.A-Z0-9_]*\s*([^;]*);")


def compile_kernel(fn, args: dict, constants: dict, launch: dict):
    """Compile ``fn`` for sm_90. ``args``: name -> (Triton type, example value); pointers and
    integers divisible by 16 get the divisibility hint the JIT would give them at launch."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        kind, value = args[name]
        signature[name] = kind
        if kind.startswith("*") or value % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, constants, attrs), target=H100, options=launch)


def disassemble(kernel) -> tuple[str, int]:
    """(SASS text, registers per thread) of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([TOOLS / "cuobjdump", "-sass", cubin.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([TOOLS / "cuobjdump", "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    registers = re.search(r"REG:(\d+)", usage)
    return sass, int(registers.group(1)) if registers else -1


def loops(sass: str) -> list[tuple[int, Counter]]:
    """Each loop (a backward branch) in address order: (instructions in its body, their opcodes)."""
    code = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(INSTRUCTION.match, sass.splitlines()) if m]
    found = []
    for address, opcode, operands in code:
        target = re.match(r"\s*(0x[0-9a-f]+)", operands)
        if opcode == "BRA" and target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            body = Counter(op for a, op, _ in code if start <= a <= address)
            found.append((start, body))
    found.sort(key=lambda pair: pair[0])
    return [(sum(body.values()), body) for _, body in found]


def measure() -> tuple[str, list[dict]]:
    """Compile every kernel and count: a header line and one row per loop."""
    V = n = 128256
    r = 128
    pointer = lambda kind: (kind, 0)  # noqa: E731
    i32 = lambda value: ("i32", value)  # noqa: E731
    rank, topk = tp.RANK_CONFIG, tp.TOPK_CONFIG
    config = dict(topk)
    pick, cap, _ = tp._plan(64, V, config)
    every = config["every"]
    words = -(-V // topk["block_n"] // 32)
    kernels = [
        ("rank (compare + count)", tp._rank_kernel, tp._launch_config(CUDA, rank), ["column tile"],
         dict(Y=pointer("*bf16"), B=pointer("*bf16"), T=pointer("*i32"), S=pointer("*fp32"), OUT=pointer("*i32"),
              n=i32(n), k_limit=i32(10), sy_h=i32(n * r), sy_n=i32(r), sb_h=i32(r * V), sb_r=i32(V), st_h=i32(n),
              ss_h=i32(n), so_h=i32(n)),
         dict(BLOCK_M=rank["block_m"], BLOCK_N=rank["block_n"], BLOCK_K=64, IEEE=False, r=r, V=V,
              TILE_STRIDE=tp._tile_order(-(-V // rank["block_n"])), EARLY_EXIT=False)),
        *[(f"top-k flag pass{' (paired, 2 stages)' if paired else ''}", tp._flag_kernel,
           tp._launch_config(CUDA, {**topk, "num_stages": 2} if paired else topk),
           ["sampled tile (threshold)", "two column tiles (flags)" if paired else "column tile (flags)"],
           dict(Y=pointer("*bf16"), B=pointer("*bf16"), FLAGS=pointer("*i32"), THRESH=pointer("*fp32"), n=i32(n),
                sy_h=i32(n * r), sy_n=i32(r), sb_h=i32(r * V), sb_r=i32(V), sf_h=i32(n * words), sf_w=i32(n),
                st_h=i32(n)),
           dict(BLOCK_M=topk["block_m"], BLOCK_N=topk["block_n"], R_PAD=r, IEEE=False, r=r, V=V, EVERY=every,
                PICK=pick, SLOTS=triton.next_power_of_2(pick), PAIRED=paired))
          for paired in (False, True)],
        ("top-k gather pass", tp._gather_kernel, tp._launch_config(CUDA, topk, "gather_"),
         ["work item (with one block)", f"block of {topk['block_r']} gathered rows"],
         dict(Y=pointer("*bf16"), B=pointer("*bf16"), FLAGS=pointer("*i32"), THRESH=pointer("*fp32"),
              OUT_S=pointer("*fp32"), OUT_I=pointer("*i32"), COUNT=pointer("*i32"), SCRATCH=pointer("*i32"),
              n=i32(n), items=i32(1000), sy_h=i32(n * r), sy_n=i32(r), sb_h=i32(r * V), sb_r=i32(V),
              sf_h=i32(n * words), sf_w=i32(n), st_h=i32(n), so_h=i32(n * cap), so_n=i32(cap), sc_h=i32(n)),
         dict(CAP=cap, CHUNK=topk["chunk"], BLOCK_R=topk["block_r"], BLOCK_N=topk["block_n"], R_PAD=r, IEEE=False,
              r=r, V=V)),
        ("top-k select", tp._select_kernel, {"num_warps": 4, "num_stages": 1},
         [f"whole program ({tp.SELECT_ELEMENTS // cap} rows x {cap} candidates)"],
         dict(CAND_S=pointer("*fp32"), CAND_I=pointer("*i32"), OUT_S=pointer("*fp32"), OUT_I=pointer("*i64"),
              rows=i32(n), k=i32(64)),
         dict(CAP=cap, K_PAD=64, BLOCK_ROWS=tp.SELECT_ELEMENTS // cap)),
    ]
    header = (f"Compiled for sm_90 (H100) by Triton {triton.__version__}, bf16 inputs, d_head {r}, V {V}; "
              f"top-k k=64, every={every}, pick={pick}")
    rows = []
    for name, fn, launch, labels, args, constants in kernels:
        kernel = compile_kernel(fn, args, constants, launch)
        sass, registers = disassemble(kernel)
        shared = kernel.metadata.shared
        found = loops(sass) or [(sum(whole.values()), whole)
                                for whole in [Counter(m.group(2) for m in map(INSTRUCTION.match, sass.splitlines()) if m)]]
        programs = min(SHARED_PER_SM // max(shared, 1), REGISTERS_PER_SM // (registers * 32 * launch["num_warps"]))
        for index, (count, body) in enumerate(found):
            rows.append(dict(kernel=name, loop=labels[index] if index < len(labels) else f"loop {index + 1}",
                             instructions=count, issue_cycles=count * launch["num_warps"] / 4,
                             mix=", ".join(f"{op} {c}" for op, c in body.most_common(5)), opcodes=dict(body),
                             shared_kib=shared / 1024, registers=registers, warps=launch["num_warps"],
                             programs_per_sm=programs))
    return header, rows


def main() -> None:
    header, rows = measure()
    if "--json" in sys.argv:
        print(json.dumps(rows))
        return
    print(header)
    print_table(["kernel", "loop: one iteration is", "instructions per warp", "issue cycles per sub-partition",
                 "most frequent", "shared KiB", "registers", "warps", "programs per SM"],
                [[row["kernel"], row["loop"], f"{row['instructions']}", f"{row['issue_cycles']:.0f}", row["mix"],
                  f"{row['shared_kib']:.0f}", f"{row['registers']}", f"{row['warps']}", f"{row['programs_per_sm']}"]
                 for row in rows])


if __name__ == "__main__":
    main()
