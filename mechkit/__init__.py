"""mechkit: where inside a language model does a behaviour live?"""

__version__ = "0.1.0"

from mechkit.errors import MechkitError, MemoryBudgetError, ModelNotFoundError
from mechkit.models import list_models, load_model

__all__ = ["MechkitError", "MemoryBudgetError", "ModelNotFoundError", "__version__", "list_models", "load_model"]
