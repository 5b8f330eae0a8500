"""Per-layer component attribution (q/k/v/o/up/gate/down) and checkpoint diffs."""

from mechkit.components.attribution import (
    COMPONENTS,
    attribute_components,
    checkpoint_diff,
)

__all__ = ["COMPONENTS", "attribute_components", "checkpoint_diff"]
