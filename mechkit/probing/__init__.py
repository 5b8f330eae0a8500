"""Probing: the batched probe trainer, held-out evaluation, layer and position probing."""

from mechkit.probing.probe import DEFAULT_POSITIONS, STREAMS, ProbeResult, probe_layers, probe_positions
from mechkit.probing.trainer import BatchedProbe, fit_probes

__all__ = ["BatchedProbe", "DEFAULT_POSITIONS", "ProbeResult", "STREAMS", "fit_probes", "probe_layers",
           "probe_positions"]
