"""Shard an analysis over ranks with ``torch.distributed``; gather labelled results on rank 0.

The mechanism every sharded analysis uses (head classification shards by layer):

* :func:`init` joins the process group that ``torchrun`` describes in the environment;
* :func:`shard` gives each rank a contiguous block of the work items, so that the blocks
  in rank order are the items in order;
* :func:`check_same_model` fails on every rank, naming the ranks that disagree, unless all
  loaded the same weights;
* :func:`run_everywhere` runs the rank's part and re-raises on every rank if any rank
  failed (instead of leaving the others waiting in a collective);
* :func:`gather_labelled` concatenates each rank's :class:`~mechkit.results.LabelledArray`
  along one axis on rank 0.

Outside a process group everything degrades to one process (rank 0 of 1), so the same
script runs with ``python`` and with ``torchrun``.

Example (``torchrun --standalone --nproc_per_node=2 classify.py``)::

    import mechkit
    import mechkit.distributed
    from mechkit.heads.distributed import classify_heads_distributed

    mechkit.distributed.init()                   # before loading: sets each rank's GPU
    model = mechkit.load_model("smollm2-135m-instruct")
    result = classify_heads_distributed(model)   # a HeadClassification on rank 0, None elsewhere
    if result is not None:
        result.save("maps")
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from mechkit.errors import MechkitError
from mechkit.results import LabelledArray

T = TypeVar("T")
LAUNCH = "torchrun --nproc_per_node=N your_script.py"


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    """Whether the environment describes a process group (``RANK`` and ``WORLD_SIZE`` set by torchrun)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(backend: str | None = None, *, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Join the process group torchrun set up (once) and return ``(rank, world_size)``.

    Args:
        backend: ``"nccl"`` for GPUs, ``"gloo"`` for CPUs (default: nccl when CUDA is available).
        timeout_s: how long a collective waits for the other ranks before failing.
    """
    if dist.is_initialized():
        return rank_and_world()
    if not launched_by_torchrun():
        raise MechkitError(f"not launched by torchrun (RANK/WORLD_SIZE are unset): run `{LAUNCH}`, "
                           "or call torch.distributed.init_process_group yourself")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("nccl", "gloo"):
        raise MechkitError(f"backend must be 'nccl' (GPUs) or 'gloo' (CPUs), got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise MechkitError("backend 'nccl' needs CUDA GPUs; use backend='gloo' on CPUs")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return rank_and_world()


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s contiguous block of ``items`` (block sizes differ by at most one).

    >>> [shard(range(5), r, 2) for r in range(2)]
    [[0, 1, 2], [3, 4]]
    """
    if not isinstance(world, int) or world < 1:
        raise MechkitError(f"world size must be a positive int, got {world!r}")
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise MechkitError(f"rank must be an int in [0, {world}), got {rank!r}")
    items = list(items)
    size, extra = divmod(len(items), world)
    start = rank * size + min(rank, extra)
    return items[start:start + size + (rank < extra)]


def _all_gather(value: Any) -> list[Any]:
    _, world = rank_and_world()
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def _ranks(indices: list[int]) -> str:
    return ("rank " if len(indices) == 1 else "ranks ") + ", ".join(map(str, indices))


def check_same_model(model) -> str:
    """The weights hash every rank agrees on; raises on every rank, naming the groups, if they differ.

    ``model`` is a bridge or a weight source (e.g. ``CheckpointWeights``): anything with
    ``model.mechkit`` provenance.
    """
    from mechkit.models.loading import model_info

    info = model_info(model)
    mine = (info.weights_hash(model), info.name)
    everyone = _all_gather(mine)
    if len({digest for digest, _ in everyone}) > 1:
        groups: dict[tuple[str, str], list[int]] = {}
        for r, key in enumerate(everyone):
            groups.setdefault(tuple(key), []).append(r)
        detail = "; ".join(f"{_ranks(ranks)}: {name!r} with weights hash {digest}" for (digest, name), ranks in groups.items())
        raise MechkitError(f"ranks disagree on the model ({detail}). Every rank must load the same model "
                           "(same name or path, dtype and edits) before a sharded run")
    return mine[0]


def run_everywhere(work: Callable[[], T]) -> T:
    """Run this rank's ``work``; if it fails on any rank, raise on every rank, naming the ranks that failed."""
    try:
        result, error = work(), None
    except Exception as caught:  # reported to every rank below, then re-raised
        result, error = None, caught
    failures = _all_gather(None if error is None else f"{type(error).__name__}: {error}")
    failed = [r for r, message in enumerate(failures) if message is not None]
    if failed:
        _, world = rank_and_world()
        if error is not None and world == 1:
            raise error
        first = failures[failed[0]]
        raise MechkitError(f"the sharded run failed on {_ranks(failed)} of {world}; rank {failed[0]}: {first}") from error
    return result


def gather_labelled(array: LabelledArray, axis: str, *, dst: int = 0) -> LabelledArray | None:
    """Concatenate every rank's ``array`` along ``axis``, in rank order, on rank ``dst``; ``None`` elsewhere.

    The other axes must carry the same labels on every rank. Name, provenance and attrs
    are rank ``dst``'s. Outside a process group this returns ``array`` itself.
    """
    if axis not in array.axes:
        raise MechkitError(f"cannot gather along {axis!r}: the array's axes are {array.axes}")
    rank, world = rank_and_world()
    if world == 1:
        return array
    if not 0 <= dst < world:
        raise MechkitError(f"dst must be a rank in [0, {world}), got {dst}")
    parts: list[Any] | None = [None] * world if rank == dst else None
    dist.gather_object((array.values, array.axes, array.labels), parts, dst=dst)
    if rank != dst:
        return None
    for r, (values, axes, labels) in enumerate(parts):
        others = {a: labels[a] for a in axes if a != axis}
        if axes != array.axes or others != {a: array.labels[a] for a in array.axes if a != axis}:
            raise MechkitError(f"rank {r}'s {array.name!r} has axes {axes} and labels that differ from rank {dst}'s "
                               f"off the {axis!r} axis: the ranks did not run the same analysis")
    index = array.axes.index(axis)
    labels = {**array.labels, axis: [label for _, _, part in parts for label in part[axis]]}
    values = np.concatenate([values for values, _, _ in parts], axis=index)
    return LabelledArray(values, array.axes, labels, name=array.name, provenance=array.provenance, attrs=array.attrs)
