"""mechkit: where inside a language model does a behaviour live?

The entry points, importable from the top level::

    import mechkit
    model = mechkit.load_model("gemma-3-270m")
    acts = mechkit.collect_activations(model, prompts, ["blocks.8.hook_resid_post"], [-1])
    heads = mechkit.classify_heads(model)                       # MAPS, from the weights
    heads = mechkit.classify_heads(mechkit.CheckpointWeights(folder))  # ... read one layer at a time
    heads = mechkit.classify_heads_distributed(model)           # sharded by layer under torchrun
    layers = mechkit.probe_layers(model, mechkit.ProbeDataset(...))
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from mechkit._lazy import lazy_getattr
from mechkit.errors import MechkitError, MemoryBudgetError, ModelNotFoundError

# Entry points are imported on first use, so that ``import mechkit.kernels`` (e.g. on a GPU
# machine running only the kernels) does not pull in TransformerLens and transformers.
_ENTRY_POINTS = {
    "Prompt": "mechkit.activations", "collect_activations": "mechkit.activations",
    "ProbeDataset": "mechkit.data", "Relation": "mechkit.data",
    "classify_heads": "mechkit.heads", "scale_heads": "mechkit.heads.interventions",
    "CheckpointWeights": "mechkit.heads.weights", "classify_heads_distributed": "mechkit.heads.distributed",
    "list_models": "mechkit.models", "load_model": "mechkit.models",
    "probe_layers": "mechkit.probing", "probe_positions": "mechkit.probing",
    "LabelledArray": "mechkit.results",
    "Task": "mechkit.data.tasks", "attribute_heads": "mechkit.heads.attribution",
    "attribute_components": "mechkit.components", "checkpoint_diff": "mechkit.components",
    "attribute_heads_distributed": "mechkit.heads.distributed",
    "find_direction": "mechkit.directions", "steer": "mechkit.directions", "ablate_direction": "mechkit.directions",
    "orthogonalize": "mechkit.directions", "select_direction": "mechkit.directions",
    "refusal_direction": "mechkit.directions", "function_heads": "mechkit.heads.function_heads",
}


def _make_abliterated(base: str, argument: str | None):
    """``load_model("<model>+abliterated[:<direction file>]")``: built by ``directions/`` on first use."""
    from mechkit.directions.abliteration import make_abliterated

    return make_abliterated(base, argument)


def _register_variants() -> None:
    # The top level wires the layers together: models/ learns the variant without importing directions/.
    from mechkit.models.registry import register_variant

    register_variant("abliterated", _make_abliterated)


_register_variants()

if TYPE_CHECKING:
    from mechkit.activations import Prompt, collect_activations
    from mechkit.data import ProbeDataset, Relation
    from mechkit.heads import classify_heads
    from mechkit.heads.distributed import classify_heads_distributed
    from mechkit.heads.interventions import scale_heads
    from mechkit.heads.weights import CheckpointWeights
    from mechkit.models import list_models, load_model
    from mechkit.probing import probe_layers, probe_positions
    from mechkit.results import LabelledArray
    from mechkit.data.tasks import Task
    from mechkit.heads.attribution import attribute_heads


__getattr__ = lazy_getattr("mechkit", globals(), _ENTRY_POINTS)


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CheckpointWeights", "LabelledArray", "MechkitError", "MemoryBudgetError", "ModelNotFoundError", "ProbeDataset",
    "Prompt", "Relation", "__version__", "classify_heads", "classify_heads_distributed", "collect_activations",
    "list_models", "load_model", "probe_layers", "probe_positions", "scale_heads", "Task", "attribute_heads",
    "attribute_components", "checkpoint_diff", "attribute_heads_distributed", "find_direction", "steer",
    "ablate_direction", "orthogonalize", "select_direction", "refusal_direction", "function_heads",
]
