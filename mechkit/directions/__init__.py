"""Contrast directions, steering and directional ablation (weight orthogonalisation to follow)."""

from mechkit.directions.contrast import DirectionSet, find_direction
from mechkit.directions.interventions import ablate_direction, steer

__all__ = ["DirectionSet", "ablate_direction", "find_direction", "steer"]
