"""Heads: classification from the weights (MAPS), attribution per task, interventions."""

from mechkit.heads.classification import (
    CATEGORY_LABELS,
    HeadClassification,
    classify_heads,
)

__all__ = ["CATEGORY_LABELS", "HeadClassification", "classify_heads"]
