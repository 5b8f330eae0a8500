"""Head classification sharded over two gloo ranks under torchrun equals the single-process run."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mechkit import distributed
from mechkit.data import Relation
from mechkit.errors import MechkitError
from mechkit.heads import HeadClassification, classify_heads
from mechkit.results import LabelledArray

SHAPE = dict(n_layers=5, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, vocab_size=120)
RELATIONS = [Relation("next", "linguistic", [(f"w{i}", f"w{i + 1}") for i in range(40)]),
             Relation("jump", "knowledge", [(f"w{i}", f"w{i + 50}") for i in range(40)])]


def attribution_task():
    from mechkit.data.tasks import Task

    clean = tuple(f"w{i} w{i + 1} w{i + 2}" for i in range(6))
    corrupted = tuple(f"w{i} w{i + 9} w{i + 2}" for i in range(6))
    return Task("toy", clean, tuple(f" w{i + 3}" for i in range(6)), corrupted, tuple(f" w{i + 12}" for i in range(6)))


def test_shard_covers_items_in_order_with_balanced_blocks():
    for n in range(12):
        for world in range(1, 6):
            blocks = [distributed.shard(range(n), r, world) for r in range(world)]
            assert [item for block in blocks for item in block] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    with pytest.raises(MechkitError, match=r"rank must be an int in \[0, 2\)"):
        distributed.shard([1, 2], 2, 2)
    with pytest.raises(MechkitError, match="world size must be a positive int"):
        distributed.shard([1, 2], 0, 0)


def test_single_process_fallbacks():
    array = LabelledArray(np.zeros((2, 3)), ("layer", "head"))
    assert distributed.rank_and_world() == (0, 1)
    assert distributed.gather_labelled(array, "layer") is array
    with pytest.raises(MechkitError, match="cannot gather along 'relation'"):
        distributed.gather_labelled(array, "relation")
    with pytest.raises(ZeroDivisionError):  # one process: the original error, unchanged
        distributed.run_everywhere(lambda: 1 / 0)


def test_outside_torchrun_the_wrapper_is_classify_heads():
    from mechkit.heads.distributed import classify_heads_distributed
    from mechkit.models.synthetic import tiny_model

    model = tiny_model("llama", seed=0, **SHAPE)
    alone = classify_heads_distributed(model, RELATIONS, layers=[3, 1], progress=False)
    assert np.array_equal(alone.scores.values, classify_heads(model, RELATIONS, layers=[3, 1], progress=False).scores.values)
    with pytest.raises(MechkitError, match=r"layers \[7\] out of range"):
        classify_heads_distributed(model, RELATIONS, layers=[7])
    with pytest.raises(MechkitError, match=r"dst must be a rank in \[0, 1\), got 1"):
        classify_heads_distributed(model, RELATIONS, dst=1)


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    worker = Path(__file__).with_name("_distributed_worker.py")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(worker), str(out)], capture_output=True, text=True, timeout=240, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_two_gloo_ranks_gather_the_single_process_result(torchrun):
    from mechkit.models.synthetic import tiny_model

    gathered = HeadClassification.load(torchrun / "maps")
    single = classify_heads(tiny_model("llama", seed=0, **SHAPE), RELATIONS, progress=False)
    for mine, theirs in ((gathered.scores, single.scores), (gathered.suppression, single.suppression),
                         (gathered.null_scores, single.null_scores)):
        assert np.array_equal(mine.values, theirs.values) and mine.labels == theirs.labels
        ours, reference = mine.provenance.to_dict(), theirs.provenance.to_dict()
        ours.pop("created"), reference.pop("created")
        assert ours == reference
    assert gathered.relations == single.relations and gathered.notes == single.notes
    assert gathered.scores.labels["layer"] == list(range(SHAPE["n_layers"]))


def test_ranks_that_loaded_different_models_fail_naming_the_ranks(torchrun):
    for rank in (0, 1):
        message = (torchrun / f"rank{rank}.err").read_text()
        assert message.startswith("ranks disagree on the model (rank 0: 'tiny-llama-s0' with weights hash")
        assert "rank 1: 'tiny-llama-s1'" in message and "Every rank must load the same model" in message


def test_a_rank_that_fails_makes_every_rank_fail_naming_it(torchrun):
    for rank in (0, 1):
        message = (torchrun / f"failed{rank}.err").read_text()
        assert message == "the sharded run failed on rank 1 of 2; rank 1: ZeroDivisionError: division by zero"


def test_sharded_head_patching_equals_the_single_process_run(torchrun):
    from mechkit.heads.attribution import attribute_heads
    from mechkit.models.synthetic import tiny_model

    gathered = LabelledArray.load(torchrun / "patching.npz")
    single = attribute_heads(tiny_model("llama", seed=0, **SHAPE), attribution_task(), "patching", progress=False)
    assert gathered.labels == single.labels and gathered.labels["layer"] == list(range(SHAPE["n_layers"]))
    np.testing.assert_allclose(gathered.values, single.values, rtol=1e-5, atol=1e-6)
