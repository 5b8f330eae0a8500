"""The top-k kernels keep the costs their design rests on, read off code compiled for an H100.

No GPU is needed: ``benchmarks/kernel_sass.py`` compiles the kernels for sm_90 with Triton's own
``ptxas`` and counts the instructions of each loop (see benchmarks/RESULTS.md for how these counts
tracked the rates measured on an H100). A change that puts per-score work (stores, compares)
back into the flag pass, or pushes a pass to fewer programs per multiprocessor, fails here before
anyone times it. (Counts are of whole loop bodies, conditional blocks included.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_sass.py"


@pytest.fixture(scope="module")
def costs() -> dict[tuple[str, str], dict]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}  # compile, not interpret
    out = subprocess.run([sys.executable, str(SCRIPT), "--json"], capture_output=True, text=True, env=env,
                         timeout=600)
    if out.returncode != 0 and "cuobjdump" in out.stderr + out.stdout:
        pytest.skip("this Triton wheel ships no cuobjdump")
    assert out.returncode == 0, out.stderr[-2000:]
    return {(row["kernel"], row["loop"]): row for row in json.loads(out.stdout)}


def test_the_flag_pass_issues_at_most_half_the_rank_kernels_work_per_tile(costs):
    rank = costs[("rank (compare + count)", "column tile")]
    flags = costs[("top-k flag pass", "column tile (flags)")]
    # (per-score work, such as a compare-and-store per score, would add several instructions per score)
    assert flags["instructions"] * flags["warps"] <= 0.6 * rank["instructions"] * rank["warps"]
    assert flags["opcodes"].get("HGMMA", 0) > 0  # the products on tensor cores


def test_the_top_k_passes_leave_room_for_several_programs_per_multiprocessor(costs):
    assert costs[("top-k flag pass", "column tile (flags)")]["programs_per_sm"] >= 2
    assert costs[("top-k flag pass (paired, 2 stages)", "two column tiles (flags)")]["programs_per_sm"] >= 2
    assert costs[("top-k gather pass", "block of 64 gathered rows")]["programs_per_sm"] >= 4
    assert costs[("top-k select", next(loop for kernel, loop in costs if kernel == "top-k select"))]["registers"] < 128
