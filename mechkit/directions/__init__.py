"""Contrast directions, steering, directional ablation, abliteration and refusal measurement."""

from mechkit.directions.abliteration import make_abliterated, orthogonalize
from mechkit.directions.contrast import DirectionSet, find_direction
from mechkit.directions.files import load_direction, save_direction
from mechkit.directions.interventions import ablate_direction, steer
from mechkit.directions.refusal import is_refusal, mean_kl, refusal_rate, refusal_score
from mechkit.directions.selection import (
           DirectionChoice,
           refusal_direction,
           select_direction,
)

__all__ = ["DirectionChoice", "DirectionSet", "ablate_direction", "find_direction", "is_refusal", "load_direction",
           "make_abliterated", "mean_kl", "orthogonalize", "refusal_direction", "refusal_rate", "refusal_score",
           "save_direction", "select_direction", "steer"]
