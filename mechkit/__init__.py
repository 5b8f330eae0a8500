"""mechkit: where inside a language model does a behaviour live?

The entry points, importable from the top level::

    import mechkit
    model = mechkit.load_model("gemma-3-270m")
    acts = mechkit.collect_activations(model, prompts, ["blocks.8.hook_resid_post"], [-1])
    heads = mechkit.classify_heads(model)                       # MAPS, from the weights
    layers = mechkit.probe_layers(model, mechkit.ProbeDataset(...))
"""

__version__ = "0.1.0"

from mechkit.activations import Prompt, collect_activations
from mechkit.data import ProbeDataset, Relation
from mechkit.errors import MechkitError, MemoryBudgetError, ModelNotFoundError
from mechkit.heads import classify_heads
from mechkit.heads.interventions import scale_heads
from mechkit.models import list_models, load_model
from mechkit.probing import probe_layers, probe_positions
from mechkit.results import LabelledArray

__all__ = [
    "LabelledArray", "MechkitError", "MemoryBudgetError", "ModelNotFoundError", "ProbeDataset", "Prompt", "Relation",
    "__version__", "classify_heads", "collect_activations", "list_models", "load_model", "probe_layers",
    "probe_positions", "scale_heads",
]
