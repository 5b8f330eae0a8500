"""Models: load anything TransformerLens 4 supports, offline registry, synthetic models.

Names are imported on first use, so that the registry (which ``mechkit`` fills at import time)
does not pull in TransformerLens.
"""

from mechkit._lazy import lazy_getattr

_NAMES = {
    "BUNDLED": "mechkit.models.registry", "DEFAULT_MODEL": "mechkit.models.registry",
    "list_models": "mechkit.models.registry", "register_cached_model": "mechkit.models.registry",
    "ModelInfo": "mechkit.models.loading", "load_model": "mechkit.models.loading", "model_info": "mechkit.models.loading",
}


__getattr__ = lazy_getattr("mechkit.models", globals(), _NAMES)


__all__ = ["BUNDLED", "DEFAULT_MODEL", "ModelInfo", "list_models", "load_model", "model_info", "register_cached_model"]
