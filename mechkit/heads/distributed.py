"""Head classification sharded by layer over ``torch.distributed`` ranks (launched with torchrun).

Each rank classifies a contiguous block of layers (:func:`mechkit.distributed.shard`);
rank 0 gathers the blocks into the same :class:`HeadClassification` a single process
computes (same scores, relations, notes and provenance settings). Every rank must load
the same model; a mismatch fails on every rank with the ranks named.

Example (``torchrun --standalone --nproc_per_node=8 classify.py``)::

    import mechkit
    import mechkit.distributed
    from mechkit.heads.distributed import classify_heads_distributed

    mechkit.distributed.init()                      # nccl on GPUs (sets each rank's GPU), gloo on CPUs
    weights = mechkit.CheckpointWeights("/models/Llama-3.1-70B", device="cuda")
    result = classify_heads_distributed(weights)    # rank 0: the result; other ranks: None
    if result is not None:
        result.save("maps-70b")
"""

from __future__ import annotations

from dataclasses import replace

from mechkit import distributed
from mechkit.data.relations import Relation
from mechkit.errors import MechkitError
from mechkit.heads.attribution import attribute_heads
from mechkit.heads.classification import HeadClassification, classify_heads
from mechkit.heads.weights import as_weights
from mechkit.results import LabelledArray


def classify_heads_distributed(
    model,
    relations: list[Relation] | Relation | None = None,
    *,
    layers: list[int] | None = None,
    dst: int = 0,
    **options,
) -> HeadClassification | None:
    """:func:`~mechkit.heads.classify_heads` with the layers split over the ranks; the result on ``dst``.

    Run under torchrun (it joins the process group if none is set up yet); in a plain
    process it is ``classify_heads``. ``options`` are ``classify_heads``'s keyword arguments.

    Returns:
        The gathered :class:`HeadClassification` on rank ``dst``, ``None`` on the other ranks.
    """
    if distributed.launched_by_torchrun():
        distributed.init()
    rank, world = distributed.rank_and_world()
    weights = as_weights(model)
    all_layers = list(range(weights.n_layers)) if layers is None else [int(l) for l in layers]
    bad = [l for l in all_layers if not 0 <= l < weights.n_layers]
    if bad:
        raise MechkitError(f"layers {bad} out of range: the model has {weights.n_layers}")
    if not 0 <= dst < world:
        raise MechkitError(f"dst must be a rank in [0, {world}), got {dst}")
    if world == 1:
        return classify_heads(model, relations, layers=all_layers, **options)
    distributed.check_same_model(model)
    mine = distributed.shard(all_layers, rank, world)
    local = distributed.run_everywhere(lambda: classify_heads(model, relations, layers=mine, **options))
    provenance = local.scores.provenance
    provenance = replace(provenance, settings={**provenance.settings, "layers": all_layers})
    gathered = []
    for array in (local.scores, local.suppression, local.null_scores):
        whole = distributed.gather_labelled(array, "layer", dst=dst) if array is not None else None
        if whole is not None:
            whole.provenance = provenance
        gathered.append(whole)
    if rank != dst:
        return None
    scores, suppression, null = gathered
    return HeadClassification(scores, suppression, null, local.threshold, local.relations, local.notes)


def attribute_heads_distributed(model, task, method: str = "atp*", *, dst: int = 0, **options) -> LabelledArray | None:
    """:func:`~mechkit.heads.attribution.attribute_heads` with the layers split over the ranks; the
    gathered ``layer x head`` scores on ``dst`` (``None`` elsewhere), equal to a single-process run.

    Exact patching (and mean/zero ablation), one forward per head, divides by the number of
    ranks; AtP, AtP* and DLA take the same forward and backward passes on every rank (each
    keeps its own layers), so they gain nothing from it. ``options`` are ``attribute_heads``'s.
    """
    if distributed.launched_by_torchrun():
        distributed.init()
    rank, world = distributed.rank_and_world()
    if not 0 <= dst < world:
        raise MechkitError(f"dst must be a rank in [0, {world}), got {dst}")
    all_layers = list(range(model.cfg.n_layers))
    if world == 1:
        return attribute_heads(model, task, method, **options)
    distributed.check_same_model(model)
    mine = distributed.shard(all_layers, rank, world)
    local = distributed.run_everywhere(lambda: attribute_heads(model, task, method, layers=mine, **options))
    whole = distributed.gather_labelled(local, "layer", dst=dst)
    if whole is not None:
        whole.provenance = replace(whole.provenance, settings={**whole.provenance.settings, "layers": all_layers})
        whole.attrs = {**whole.attrs, "layers": all_layers}
    return whole
