"""Layer probing and position probing: at which layer (and token) is a label linearly decodable?

``probe_layers`` probes each layer's output in each stream (``resid_post``, ``attn_out``,
``mlp_out``, ``resid_pre``) at one position, for one or several models; ``probe_positions``
probes each (layer, position) cell of one model, positions named as in ``activations/positions``.
Every score comes with its control: the same probes on shuffled labels (what the data alone
gives), and with the spread over folds when ``folds`` is set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mechkit.activations import collect_activations
from mechkit.data.probe_dataset import ProbeDataset
from mechkit.errors import MechkitError
from mechkit.models import load_model, model_info
from mechkit.probing.evaluate import METRICS, evaluate_cells, group_splits
from mechkit.results import LabelledArray, Provenance

STREAMS = {"resid_post": "hook_resid_post", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out",
           "resid_pre": "hook_resid_pre"}
DEFAULT_POSITIONS = ("last_q", "first_answer", "second_answer", "exact_answer_before_first", "exact_answer_first",
                     "exact_answer_last", -8, -7, -6, -5, -4, -3, -2, -1)


@dataclass
class ProbeResult:
    """Held-out scores, their spread over folds, and the shuffled-label control (same axes)."""

    scores: LabelledArray
    std: LabelledArray
    control: LabelledArray

    def save(self, folder) -> None:
        from pathlib import Path

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("scores", "std", "control"):
            getattr(self, name).save(folder / f"{name}.npz")

    @classmethod
    def load(cls, folder) -> ProbeResult:
        from pathlib import Path

        return cls(*(LabelledArray.load(Path(folder) / f"{n}.npz") for n in ("scores", "std", "control")))


def _check_streams(streams: Sequence[str]) -> list[str]:
    streams = [streams] if isinstance(streams, str) else list(streams)
    unknown = [s for s in streams if s not in STREAMS]
    if unknown or not streams:
        raise MechkitError(f"unknown stream(s) {unknown}; choose from {list(STREAMS)}")
    return streams


def _imbalance(labels: np.ndarray) -> dict:
    counts = np.bincount(labels, minlength=2)
    return {"class_counts": counts.tolist(), "majority_fraction": float(counts.max() / counts.sum())}


def _scores_and_control(features: torch.Tensor, labels: np.ndarray, splits, *, seed: int, C: float, balanced: bool,
                        control: int):
    """Held-out scores (mean, std over splits) and the mean over ``control`` label shuffles."""
    mean, std = evaluate_cells(features, labels, splits, C=C, balanced=balanced)
    rng = np.random.default_rng(seed + 1)
    shuffles = [evaluate_cells(features, rng.permutation(labels), splits, C=C, balanced=balanced)[0]
                for _ in range(int(control))]
    control_mean = np.mean(shuffles, 0) if shuffles else np.full_like(mean, np.nan)
    return mean, std, control_mean


def probe_layers(
    models,
    dataset: ProbeDataset,
    streams: Sequence[str] = ("resid_post", "attn_out"),
    *,
    position: int | str = -1,
    folds: int | None = None,
    test_size: float = 0.25,
    seed: int = 0,
    C: float = 1.0,
    balanced: bool = False,
    align: str = "index",
    control: int = 5,
    batch_size: int | None = None,
    max_memory: int | str | None = None,
    progress: bool = True,
) -> ProbeResult:
    """Probe every layer of every stream of every model; ``model x stream x layer x metric``.

    Args:
        models: a model, a name, or a list of them (names are loaded with ``load_model``).
        dataset: a :class:`~mechkit.data.ProbeDataset`.
        streams: any of ``resid_post``, ``attn_out``, ``mlp_out``, ``resid_pre``.
        position: the token position read (default the last token).
        folds: k-fold CV (by group) instead of one seeded split of ``test_size``.
        balanced: weight classes equally in training (imbalance is reported either way).
        align: ``"index"`` (layer i of every model; shorter models padded with NaN) or
            ``"relative"`` (relative depth, the deepest model's number of bins).
        control: how many label shuffles the control averages (0: no control, NaN).
    """
    streams = _check_streams(streams)
    if align not in ("index", "relative"):
        raise MechkitError(f"align must be 'index' or 'relative', got {align!r}")
    model_list = list(models) if isinstance(models, (list, tuple)) else [models]
    loaded = [load_model(m) if isinstance(m, str) else m for m in model_list]
    labels = dataset.labels
    splits = group_splits(len(labels), dataset.groups, labels, folds=folds, test_size=test_size, seed=seed)
    per_model = []
    for model in loaded:
        n_layers = model.cfg.n_layers
        hooks = [f"blocks.{l}.{STREAMS[s]}" for s in streams for l in range(n_layers)]
        acts = collect_activations(model, dataset.prompts, hooks, [position], batch_size=batch_size,
                                   max_memory=max_memory, progress=progress)
        features = torch.stack([acts[h][:, 0].float() for h in hooks])  # (stream*layer, n, d)
        mean, std, ctrl = _scores_and_control(features, labels, splits, seed=seed, C=C, balanced=balanced,
                                              control=control)
        shape = (len(streams), n_layers, len(METRICS))
        per_model.append((model_info(model).name, n_layers, mean.reshape(shape), std.reshape(shape), ctrl.reshape(shape)))
    depth = max(n for _, n, *_ in per_model)
    out = np.full((3, len(per_model), len(streams), depth, len(METRICS)), np.nan)
    for m, (_, n_layers, *arrays) in enumerate(per_model):
        for a, values in enumerate(arrays):
            if align == "index":
                out[a, m, :, :n_layers] = values
            else:
                source = np.round(np.linspace(0, n_layers - 1, depth)).astype(int)
                out[a, m] = values[:, source]
    layer_labels = list(range(depth)) if align == "index" else [round(x, 3) for x in np.linspace(0, 1, depth)]
    labels_ = {"model": [name for name, *_ in per_model], "stream": streams, "layer": layer_labels,
               "metric": list(METRICS)}
    attrs = {"dataset": dataset.name, "n_examples": len(dataset), "position": str(position), "align": align,
             "n_layers": {name: n for name, n, *_ in per_model}, "folds": folds, "test_size": test_size,
             "split": "by group" if dataset.groups else "by example", **_imbalance(labels),
             "n_train": int(len(splits[0][0])), "n_test": int(len(splits[0][1]))}
    provenance = Provenance.for_model(loaded[0], data=dataset.fingerprint(), seed=seed, streams=streams,
                                      models=labels_["model"], C=C, balanced=balanced)
    axes = ("model", "stream", "layer", "metric")
    return ProbeResult(*(LabelledArray(out[a], axes, labels_, name=n, provenance=provenance, attrs=attrs)
                         for a, n in enumerate(("probe_score", "probe_score_std", "shuffled_label_score"))))


def probe_positions(
    model,
    dataset: ProbeDataset,
    positions: Sequence[int | str] = DEFAULT_POSITIONS,
    *,
    stream: str = "resid_post",
    strict: bool = False,
    folds: int | None = None,
    test_size: float = 0.25,
    seed: int = 0,
    C: float = 1.0,
    balanced: bool = False,
    control: int = 5,
    min_examples: int = 20,
    batch_size: int | None = None,
    progress: bool = True,
) -> ProbeResult:
    """Probe every (layer, position) cell of one model; ``layer x position x metric``.

    Examples lacking a named position are left out of that position's probes only, and the
    counts are reported in ``attrs["examples_per_position"]``; ``strict=True`` refuses instead.
    """
    (stream,) = _check_streams([stream])
    if isinstance(model, str):
        model = load_model(model)
    n_layers = model.cfg.n_layers
    hooks = [f"blocks.{l}.{STREAMS[stream]}" for l in range(n_layers)]
    acts = collect_activations(model, dataset.prompts, hooks, list(positions), batch_size=batch_size,
                               on_missing="raise" if strict else "nan", progress=progress)
    kept = acts.examples
    labels_all = dataset.labels[kept]
    groups_all = [dataset.groups[i] for i in kept] if dataset.groups else None
    shape = (n_layers, len(positions), len(METRICS))
    mean, std, ctrl = (np.full(shape, np.nan) for _ in range(3))
    counts = {}
    for p, name in enumerate(acts.positions):
        valid = (acts.token_ids[:, p] >= 0).numpy()
        counts[name] = int(valid.sum())
        labels = labels_all[valid]
        if valid.sum() < min_examples or len(np.unique(labels)) < 2:
            continue  # reported as NaN with its count
        groups = [g for g, v in zip(groups_all, valid) if v] if groups_all else None
        splits = group_splits(int(valid.sum()), groups, labels, folds=folds, test_size=test_size, seed=seed)
        features = torch.stack([acts[h][valid, p].float() for h in hooks])
        mean[:, p], std[:, p], ctrl[:, p] = _scores_and_control(features, labels, splits, seed=seed, C=C,
                                                                 balanced=balanced, control=control)
    labels_ = {"layer": list(range(n_layers)), "position": acts.positions, "metric": list(METRICS)}
    attrs = {"dataset": dataset.name, "stream": stream, "n_examples": len(dataset), "dropped": len(acts.dropped),
             "examples_per_position": counts, "min_examples": min_examples, **_imbalance(dataset.labels)}
    provenance = Provenance.for_model(model, data=dataset.fingerprint(), seed=seed, positions=acts.positions,
                                      stream=stream, C=C)
    axes = ("layer", "position", "metric")
    return ProbeResult(*(LabelledArray(a, axes, labels_, name=n, provenance=provenance, attrs=attrs)
                         for a, n in ((mean, "probe_score"), (std, "probe_score_std"), (ctrl, "shuffled_label_score"))))
