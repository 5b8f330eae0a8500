"""Choosing one direction among the candidates by what it does (Arditi et al. 2024, section 2.3).

For every candidate (layer, position) of a :class:`~mechkit.directions.contrast.DirectionSet`:

* **bypass**: the behaviour metric on the positive (e.g. harmful) prompts with the direction
  ablated from every residual write: the lower, the more the ablation removes the behaviour;
* **induce**: the metric on the negative (harmless) prompts with the direction added (steering
  by the candidate's ``shift`` at its own layer): adding it should induce the behaviour;
* **kl**: mean KL divergence of the next-token distribution on the negative prompts between the
  model and the model with the direction ablated: the edit's cost where it should do nothing.

A candidate is eligible when its layer lies below ``max_layer_fraction`` of the depth (Arditi et
al. skip the last 20%, whose directions act on the unembedding directly), its KL is below
``kl_max`` and its induce score exceeds the unmodified negative prompts' score; the eligible one
with the lowest bypass score wins. Departure from the paper: Arditi et al. require the induce
score to be positive (a refusal made likely); models of 135M-270M parameters barely refuse, so
mechkit requires an increase over the unmodified score and, when no candidate shows one, drops
that filter and says so in ``criterion``. With no candidate under the KL bound (Gemma-3-270M,
whose mean differences are dominated by its few massive residual dimensions), the least damaging
candidate (lowest KL) among those whose ablation lowers the metric wins, also said in ``criterion``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from mechkit.activations import Prompt
from mechkit.data.prompts import as_prompts
from mechkit.data.safety import harmful_vs_harmless
from mechkit.directions.contrast import DirectionSet, find_direction
from mechkit.directions.interventions import ablate_direction, steer
from mechkit.directions.refusal import mean_kl, next_token_logprobs, refusal_score
from mechkit.errors import MechkitError
from mechkit.models.loading import model_info
from mechkit.results import LabelledArray

MEASURES = ("bypass", "induce", "kl", "auc", "eligible")
Metric = Callable[[object, Tensor], Tensor]  # (model, next-token log-probs (prompt, vocab)) -> (prompt,)


def refusal_metric(model, logprobs: Tensor) -> Tensor:
    """The default behaviour metric: :func:`~mechkit.directions.refusal.refusal_score` of the next token."""
    return refusal_score(model, logprobs=logprobs)


@dataclass
class DirectionChoice:
    """The chosen direction, every candidate's scores ``(layer, position, measure)`` and how it was chosen."""

    layer: int
    position: str
    direction: Tensor
    scores: LabelledArray
    baseline: dict
    criterion: str

    def summary(self) -> dict:
        """A JSON-ready record of the choice (kept with abliterated models)."""
        row = self.scores.values[self.scores.labels["layer"].index(self.layer),
                                 self.scores.labels["position"].index(self.position)]
        return {"layer": self.layer, "position": self.position, "criterion": self.criterion,
                "baseline": self.baseline, **{m: float(v) for m, v in zip(MEASURES, row)}}


def select_direction(model, directions: DirectionSet, positive: Sequence[str | Prompt],
                     negative: Sequence[str | Prompt], *, metric: Metric = refusal_metric,
                     max_layer_fraction: float = 0.8, kl_max: float = 0.1, batch_size: int | None = None,
                     progress: bool = True) -> DirectionChoice:
    """Pick the candidate whose ablation most lowers ``metric`` on ``positive`` prompts (see module doc).

    Use prompts that ``directions`` was not fitted on. ``metric`` maps next-token log-probabilities
    to one behaviour score per prompt (default: refusal log-odds).
    """
    positive, negative = as_prompts(positive), as_prompts(negative)
    if not 0 < max_layer_fraction <= 1:
        raise MechkitError(f"max_layer_fraction must lie in (0, 1], got {max_layer_fraction}")
    if directions.shift is None:
        raise MechkitError("this DirectionSet has no shift (it predates it): find the directions again")
    layers, positions = directions.auc.labels["layer"], directions.auc.labels["position"]
    n_layers = model.cfg.n_layers
    base_positive = next_token_logprobs(model, positive, batch_size=batch_size)
    base_negative = next_token_logprobs(model, negative, batch_size=batch_size)
    baseline = {"positive": float(metric(model, base_positive).mean()),
                "negative": float(metric(model, base_negative).mean())}
    scores = np.full((len(layers), len(positions), len(MEASURES)), np.nan)
    scores[..., MEASURES.index("auc")] = directions.auc.values
    scores[..., MEASURES.index("eligible")] = 0
    cells = [(li, pi) for li, layer in enumerate(layers) for pi in range(len(positions))
             if layer < max_layer_fraction * n_layers and not np.isnan(directions.auc.values[li, pi])]
    if not cells:
        raise MechkitError(f"no candidate lies below {max_layer_fraction:.0%} of the {n_layers} layers: "
                           "find directions at earlier layers or raise max_layer_fraction")
    for li, pi in tqdm(cells, desc="selecting a direction", disable=not progress):
        direction = directions.direction(layers[li], positions[pi])
        with ablate_direction(model, direction):
            ablated = next_token_logprobs(model, positive + negative, batch_size=batch_size)
        shift = float(directions.shift.values[li, pi])
        with steer(model, direction, shift, layers=[layers[li]]):
            induced = next_token_logprobs(model, negative, batch_size=batch_size)
        scores[li, pi, :3] = (float(metric(model, ablated[:len(positive)]).mean()),
                              float(metric(model, induced).mean()), mean_kl(base_negative, ablated[len(positive):]))
    bypass, induce, kl = (scores[..., MEASURES.index(m)] for m in ("bypass", "induce", "kl"))
    in_depth = ~np.isnan(bypass)
    eligible = in_depth & (kl < kl_max) & (induce > baseline["negative"])
    criterion = "causal: lowest bypass with KL < {kl_max} and induce above the unmodified score"
    if not eligible.any():
        eligible = in_depth & (kl < kl_max)
        criterion = "causal, induce filter dropped (no candidate raised the metric when added): lowest bypass with KL < {kl_max}"
    if eligible.any():
        li, pi = np.unravel_index(np.where(eligible, bypass, np.inf).argmin(), bypass.shape)
    else:  # every ablation costs more than kl_max: take the least damaging one that still lowers the metric
        lowers = in_depth & (bypass < baseline["positive"])
        pool = lowers if lowers.any() else in_depth
        li, pi = np.unravel_index(np.where(pool, kl, np.inf).argmin(), bypass.shape)
        criterion = ("lowest KL (no candidate kept KL below {kl_max})"
                     + (" among those whose ablation lowers the metric" if lowers.any() else ""))
    scores[..., MEASURES.index("eligible")] = eligible
    result = LabelledArray(scores, ("layer", "position", "measure"),
                           {"layer": list(layers), "position": list(positions), "measure": list(MEASURES)},
                           name="direction selection scores", provenance=directions.auc.provenance,
                           attrs={"baseline": baseline, "kl_max": kl_max, "max_layer_fraction": max_layer_fraction})
    layer, position = layers[li], positions[pi]
    return DirectionChoice(layer, position, directions.direction(layer, position), result, baseline,
                           criterion.format(kl_max=kl_max))


def refusal_direction(model, *, n: int | None = None, n_select: int = 32, seed: int = 0,
                      positions: Sequence[int | str] = (-1,), batch_size: int | None = None,
                      progress: bool = True) -> DirectionChoice:
    """The refusal direction of ``model`` from the built-in harmful-vs-harmless requests.

    Directions are found (difference of means at every layer) on all but ``n_select`` requests of
    each class and chosen by :func:`select_direction` on the ``n_select`` held back. Chat models
    read each request as a user message in their chat template.
    """
    data = harmful_vs_harmless(n=n, seed=seed, chat=model_info(model).chat)
    harmful = [p for p, label in zip(data.prompts, data.labels) if label == 1]
    harmless = [p for p, label in zip(data.prompts, data.labels) if label == 0]
    if not 2 <= n_select <= min(len(harmful), len(harmless)) - 4:
        raise MechkitError(f"n_select={n_select} leaves too few prompts to find directions on "
                           f"({len(harmful)} harmful, {len(harmless)} harmless)")
    rng = random.Random(f"refusal:{seed}")
    rng.shuffle(harmful)
    rng.shuffle(harmless)
    found = find_direction(model, harmful[n_select:], harmless[n_select:], positions=positions, seed=seed,
                           batch_size=batch_size, progress=progress)
    return select_direction(model, found, harmful[:n_select], harmless[:n_select], batch_size=batch_size,
                            progress=progress)


__all__ = ["MEASURES", "DirectionChoice", "refusal_direction", "refusal_metric", "select_direction"]
