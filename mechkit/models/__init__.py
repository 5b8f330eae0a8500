"""Models: load anything TransformerLens 4 supports, offline registry, synthetic models."""

from mechkit.models.loading import ModelInfo, load_model, model_info
from mechkit.models.registry import BUNDLED, DEFAULT_MODEL, list_models, register_cached_model

__all__ = ["BUNDLED", "DEFAULT_MODEL", "ModelInfo", "list_models", "load_model", "model_info", "register_cached_model"]
