"""Heads: classification from the weights (MAPS); attribution and interventions come next."""

from mechkit.heads.classification import CATEGORY_LABELS, HeadClassification, classify_heads

__all__ = ["CATEGORY_LABELS", "HeadClassification", "classify_heads"]
