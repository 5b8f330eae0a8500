"""Activation collection: prompts, positions, batched bounded collection, disk streaming."""

from mechkit.activations.collect import collect_activations
from mechkit.activations.positions import NAMED_POSITIONS, Position, as_position
from mechkit.data.prompts import Prompt, encode
from mechkit.activations.store import ActivationSet

__all__ = ["ActivationSet", "NAMED_POSITIONS", "Position", "Prompt", "as_position", "collect_activations", "encode"]
