"""Contrast directions: which residual-stream direction separates two prompt sets, per layer.

``find_direction`` reads the residual stream entering each layer (``blocks.L.hook_resid_pre``)
at chosen positions, splits each set into train and held-out prompts (seeded), and returns per
(layer, position) the unit direction from the training prompts and the held-out AUC of the
projection onto it, beside the same AUC for a direction found with shuffled labels (the
control: what a direction found in noise scores on these prompts).

Methods: ``"mean_diff"`` (difference of the class means, Arditi et al. 2024) and ``"probe"``
(the normal of a logistic-regression probe from :func:`mechkit.probing.trainer.fit_probes`,
mapped back from standardised to raw features). Selecting the best candidate by held-out AUC
is what :meth:`DirectionSet.best` does; the causal selection of Arditi et al. (ablation
removes a behaviour, addition induces it, small KL on harmless prompts, last ~20% of layers
skipped) is :func:`mechkit.directions.selection.select_direction`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from sklearn.metrics import roc_auc_score
from torch import Tensor

from mechkit.activations import Prompt, collect_activations
from mechkit.errors import MechkitError
from mechkit.probing.trainer import fit_probes
from mechkit.results import LabelledArray, Provenance

METHODS = ("mean_diff", "probe")


@dataclass
class DirectionSet:
    """Unit directions ``(layer, position, d_model)`` with held-out and shuffled-label AUCs ``(layer, position)``.

    ``shift`` is the mean projection of the positive minus the negative training prompts onto each
    direction: the size of step that turns one class into the other (what steering adds).
    """

    directions: LabelledArray
    auc: LabelledArray
    control_auc: LabelledArray
    shift: LabelledArray | None = None

    def direction(self, layer: int, position: int | str | None = None) -> Float[Tensor, " d_model"]:
        """The unit direction at ``layer`` (and ``position``; default the first one)."""
        layers, positions = self.directions.labels["layer"], self.directions.labels["position"]
        if layer not in layers:
            raise MechkitError(f"no direction for layer {layer}; this set has layers {layers}")
        key = positions[0] if position is None else str(position)
        if key not in positions:
            raise MechkitError(f"no direction at position {position!r}; this set has {positions}")
        vector = torch.from_numpy(self.directions.values[layers.index(layer), positions.index(key)].copy())
        if vector.norm() == 0:
            raise MechkitError(f"no direction at layer {layer}, position {key}: the two sets' activations are "
                               "identical there (e.g. the embedding of a chat template's last token)")
        return vector

    def best(self) -> tuple[int, str, Float[Tensor, " d_model"]]:
        """(layer, position, direction) with the highest held-out AUC."""
        li, pi = np.unravel_index(np.nanargmax(self.auc.values), self.auc.values.shape)
        layer, position = self.auc.labels["layer"][li], self.auc.labels["position"][pi]
        return layer, position, self.direction(layer, position)


def _split(n: int, test_size: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    n_test = min(max(1, round(test_size * n)), n - 1)
    return order[n_test:], order[:n_test]


def _unit(vectors: Tensor) -> Tensor:
    """Unit rows; a zero or non-finite row (the two sets' activations do not differ there, e.g. the
    embedding of a chat template's last token) stays zero and so scores every prompt alike."""
    vectors = torch.where(torch.isfinite(vectors).all(-1, keepdim=True), vectors, torch.zeros_like(vectors))
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(vectors.dtype).tiny)


def _fit(method: str, X: Tensor, y: Tensor) -> Tensor:
    """Directions ``(cell, d)`` from features ``(cell, n, d)`` and 0/1 labels."""
    if method == "mean_diff":
        return _unit(X[:, y == 1].mean(1) - X[:, y == 0].mean(1))
    probe = fit_probes(X, y)
    return _unit(probe.weight / probe.scale)


def _auc(X: Tensor, y: np.ndarray, directions: Tensor) -> np.ndarray:
    scores = torch.einsum("cnd,cd->cn", X, directions).numpy()
    return np.array([roc_auc_score(y, s) for s in scores])


def find_direction(
    model,
    positive: Sequence[str | Prompt],
    negative: Sequence[str | Prompt],
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int | str] = (-1,),
    method: str = "mean_diff",
    test_size: float = 0.25,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = True,
) -> DirectionSet:
    """Directions separating ``positive`` from ``negative`` prompts at each layer and position.

    Args:
        positive, negative: the two prompt sets (strings or :class:`~mechkit.Prompt`; at least 2 each).
        layers: layers whose incoming residual stream is read (default all).
        positions: token positions (negative from the end) or named positions.
        method: ``"mean_diff"`` or ``"probe"``.
        test_size: fraction of each set held out for the AUC.

    Returns:
        A :class:`DirectionSet`; ``.best()`` picks the highest held-out AUC.
    """
    if method not in METHODS:
        raise MechkitError(f"unknown method {method!r}; use one of {METHODS}")
    if len(positive) < 2 or len(negative) < 2:
        raise MechkitError(f"each prompt set needs at least 2 prompts (one to fit, one to test); got "
                           f"{len(positive)} positive and {len(negative)} negative")
    if not 0 < test_size < 1:
        raise MechkitError(f"test_size must lie in (0, 1), got {test_size}")
    cfg = model.cfg
    layer_list = list(range(cfg.n_layers)) if layers is None else [int(l) for l in layers]
    bad = [l for l in layer_list if not 0 <= l < cfg.n_layers]
    if bad or not layer_list:
        raise MechkitError(f"layers {bad or layer_list} out of range: the model has {cfg.n_layers} layers")
    hooks = [f"blocks.{l}.hook_resid_pre" for l in layer_list]
    acts = collect_activations(model, list(positive) + list(negative), hooks, list(positions),
                               batch_size=batch_size, progress=progress)
    labels = np.array([1] * len(positive) + [0] * len(negative))
    rng = np.random.default_rng(seed)
    pos_train, pos_test = _split(len(positive), test_size, rng)
    neg_train, neg_test = _split(len(negative), test_size, rng)
    train = np.concatenate([pos_train, len(positive) + neg_train])
    test = np.concatenate([pos_test, len(positive) + neg_test])
    # features as cells: (layer * position, example, d_model)
    X = torch.stack([acts[h].float() for h in hooks])  # (layer, example, position, d_model)
    n_pos = X.shape[2]
    X = X.permute(0, 2, 1, 3).reshape(len(layer_list) * n_pos, X.shape[1], X.shape[3])
    y_train = torch.from_numpy(labels[train])
    directions = _fit(method, X[:, train], y_train)
    degenerate = (directions.norm(dim=-1) == 0).numpy()
    if degenerate.all():
        raise MechkitError("the two prompt sets give identical activations at every layer and position asked for: "
                           "no direction separates them")
    shuffled = torch.from_numpy(rng.permutation(labels[train]))
    control = _fit(method, X[:, train], shuffled)
    projections = torch.einsum("cnd,cd->cn", X[:, train], directions)
    shift = projections[:, y_train == 1].mean(1) - projections[:, y_train == 0].mean(1)
    auc = np.where(degenerate, np.nan, _auc(X[:, test], labels[test], directions))  # NaN: no direction there
    control_auc = np.where(degenerate, np.nan, _auc(X[:, test], labels[test], control))
    shape = (len(layer_list), n_pos)
    position_labels = [str(p) for p in acts.positions]
    settings = dict(method=method, test_size=test_size, layers=layer_list, positions=position_labels,
                    hook="resid_pre", n_positive=len(positive), n_negative=len(negative))
    provenance = Provenance.for_model(model, data={"positive": [str(p) for p in positive],
                                                   "negative": [str(p) for p in negative]}, seed=seed, **settings)
    labels_2d = {"layer": layer_list, "position": position_labels}
    return DirectionSet(
        LabelledArray(directions.reshape(*shape, -1).numpy(), ("layer", "position", "d_model"), labels_2d,
                      name="unit contrast direction", provenance=provenance, attrs=settings),
        LabelledArray(auc.reshape(shape), ("layer", "position"), labels_2d, name="held-out AUC of the projection",
                      provenance=provenance, attrs=settings),
        LabelledArray(control_auc.reshape(shape), ("layer", "position"), labels_2d,
                      name="held-out AUC, direction from shuffled labels", provenance=provenance, attrs=settings),
        LabelledArray(shift.reshape(shape).numpy(), ("layer", "position"), labels_2d,
                      name="mean projection, positive minus negative (training prompts)", provenance=provenance,
                      attrs=settings),
    )


__all__ = ["METHODS", "DirectionSet", "find_direction"]
