"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node=2``: not a test module itself.

1. Every rank builds the same seeded tiny model; the sharded classification lands in OUT/maps,
   exact head patching sharded by layer in OUT/patching.
2. Rank 1 builds a model with another seed; every rank writes the error it gets to OUT/rankR.err.
3. Rank 1's part of a run fails; every rank writes the error it gets to OUT/failedR.err.
"""

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from mechkit import distributed
from mechkit.errors import MechkitError
from mechkit.heads.distributed import attribute_heads_distributed, classify_heads_distributed
from mechkit.models.synthetic import tiny_model

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import RELATIONS, SHAPE, attribution_task

out = Path(sys.argv[1])
rank, world = distributed.init("gloo", timeout_s=120)
try:
    result = classify_heads_distributed(tiny_model("llama", seed=0, **SHAPE), RELATIONS, progress=False)
    if rank == 0:
        result.save(out / "maps")
    else:
        assert result is None
    patched = attribute_heads_distributed(tiny_model("llama", seed=0, **SHAPE), attribution_task(), "patching",
                                          progress=False)
    if rank == 0:
        patched.save(out / "patching.npz")
    other = tiny_model("llama", seed=rank, **SHAPE)  # rank 1 loads different weights
    try:
        classify_heads_distributed(other, RELATIONS, progress=False)
        (out / f"rank{rank}.err").write_text("no error")
    except MechkitError as error:
        (out / f"rank{rank}.err").write_text(str(error))
    try:
        distributed.run_everywhere(lambda: 1 / (rank - 1))
        (out / f"failed{rank}.err").write_text("no error")
    except MechkitError as error:
        (out / f"failed{rank}.err").write_text(str(error))
finally:
    torch.distributed.destroy_process_group()
