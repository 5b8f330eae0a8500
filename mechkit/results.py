"""Labelled results: arrays with named axes, tick labels and provenance.

Every analysis returns a :class:`LabelledArray` (or a small dataclass of them) and
every figure takes one. They save to a single ``.npz`` file and load back unchanged.

Example:
    >>> import numpy as np
    >>> scores = LabelledArray(np.zeros((2, 3)), axes=("layer", "head"),
    ...                        labels={"layer": [0, 1], "head": [0, 1, 2]}, name="score")
    >>> scores.sel(layer=1).axes
    ('head',)
    >>> scores.to_pandas().shape
    (6, 3)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Label = str | int | float


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("mechkit", "transformer-lens", "transformers", "torch"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def _git_commit() -> str | None:
    head = Path(__file__).resolve().parent.parent / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (head.parent / ref[5:]).read_text().strip()[:12]
        return ref[:12]
    except OSError:
        return None


def data_hash(data: Any) -> str:
    """A short stable hash of any JSON-serialisable data (prompts, labels, settings)."""
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Provenance:
    """Where a result came from: model and weights, data, seed, settings, versions."""

    model: str | None = None
    weights_hash: str | None = None
    data_hash: str | None = None
    seed: int | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=_versions)
    git_commit: str | None = field(default_factory=_git_commit)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "weights_hash": self.weights_hash, "data_hash": self.data_hash,
            "seed": self.seed, "settings": dict(self.settings), "versions": dict(self.versions),
            "git_commit": self.git_commit, "created": self.created,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Provenance:
        return cls(**data)

    @classmethod
    def for_model(cls, model: Any, *, data: Any = None, seed: int | None = None, **settings: Any) -> Provenance:
        """Provenance of a result computed on ``model`` (a bridge) from ``data``."""
        from mechkit.models.loading import model_info

        info = model_info(model)
        return cls(
            model=info.name, weights_hash=info.weights_hash(model),
            data_hash=data_hash(data) if data is not None else None, seed=seed, settings=settings,
        )


class LabelledArray:
    """An n-d numpy array whose axes have names and whose indices have tick labels."""

    def __init__(
        self,
        values: Any,
        axes: Sequence[str],
        labels: Mapping[str, Sequence[Label]] | None = None,
        *,
        name: str = "value",
        provenance: Provenance | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        values = np.asarray(values)
        axes = tuple(axes)
        if values.ndim != len(axes):
            raise ValueError(f"values have {values.ndim} dimensions but {len(axes)} axis names {axes} were given")
        if len(set(axes)) != len(axes):
            raise ValueError(f"axis names must be distinct, got {axes}")
        if values.dtype == object:
            raise ValueError("object arrays cannot be saved losslessly; use a numeric, bool or string dtype")
        labels = dict(labels or {})
        unknown = set(labels) - set(axes)
        if unknown:
            raise ValueError(f"labels given for unknown axes {sorted(unknown)}; axes are {axes}")
        for axis, size in zip(axes, values.shape):
            ticks = list(labels.get(axis, range(size)))
            if len(ticks) != size:
                raise ValueError(f"axis {axis!r} has {size} entries but {len(ticks)} labels")
            labels[axis] = [t.item() if isinstance(t, np.generic) else t for t in ticks]
        self.values = values
        self.axes = axes
        self.labels: dict[str, list[Label]] = {axis: labels[axis] for axis in axes}
        self.name = name
        self.provenance = provenance or Provenance()
        self.attrs: dict[str, Any] = dict(attrs or {})

    # -- access -----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def __repr__(self) -> str:
        dims = ", ".join(f"{a}={n}" for a, n in zip(self.axes, self.shape))
        return f"LabelledArray({self.name!r}: {dims}, dtype={self.values.dtype})"

    def index_of(self, axis: str, label: Label) -> int:
        """Integer index of ``label`` on ``axis`` (clear error naming the valid labels)."""
        self._check_axis(axis)
        ticks = self.labels[axis]
        for i, tick in enumerate(ticks):
            if tick == label or str(tick) == str(label):
                return i
        raise KeyError(f"{label!r} is not a label of axis {axis!r}; labels: {ticks[:20]}{' ...' if len(ticks) > 20 else ''}")

    def _check_axis(self, axis: str) -> None:
        if axis not in self.axes:
            raise KeyError(f"no axis {axis!r}; axes are {self.axes}")

    def sel(self, **selection: Label | Sequence[Label]) -> LabelledArray:
        """Select by label: a single label drops the axis, a list keeps it."""
        indices = {axis: ([self.index_of(axis, l) for l in sel] if isinstance(sel, (list, tuple)) else self.index_of(axis, sel))
                   for axis, sel in selection.items()}
        return self.isel(**indices)

    def isel(self, **selection: int | Sequence[int]) -> LabelledArray:
        """Select by integer position, like :meth:`sel`."""
        index: list[Any] = []
        axes, labels = [], {}
        for axis in self.axes:
            if axis in selection:
                chosen = selection[axis]
                if isinstance(chosen, (list, tuple, np.ndarray)):
                    chosen = list(chosen)
                    index.append(chosen)
                    axes.append(axis)
                    labels[axis] = [self.labels[axis][i] for i in chosen]
                else:
                    index.append(int(chosen))
            else:
                index.append(slice(None))
                axes.append(axis)
                labels[axis] = self.labels[axis]
        for axis in selection:
            self._check_axis(axis)
        values = self.values
        for dim in reversed(range(len(index))):  # one axis at a time: numpy fancy indexing mixes axes otherwise
            key = [slice(None)] * dim + [index[dim]]
            values = values[tuple(key)]
        return LabelledArray(values, axes, labels, name=self.name, provenance=self.provenance, attrs=self.attrs)

    def with_values(self, values: Any, *, name: str | None = None) -> LabelledArray:
        """The same axes, labels, provenance and attrs around new ``values`` of the same shape."""
        values = np.asarray(values)
        if values.shape != self.values.shape:
            raise ValueError(f"new values have shape {values.shape}, not {self.values.shape}")
        return LabelledArray(values, self.axes, self.labels, name=name or self.name, provenance=self.provenance,
                             attrs=self.attrs)

    def transpose(self, *axes: str) -> LabelledArray:
        for axis in axes:
            self._check_axis(axis)
        order = [self.axes.index(a) for a in axes]
        return LabelledArray(self.values.transpose(order), axes, {a: self.labels[a] for a in axes},
                             name=self.name, provenance=self.provenance, attrs=self.attrs)

    def to_pandas(self):
        """Long format: one column per axis (its labels) and one named ``self.name``."""
        import pandas as pd

        grids = np.meshgrid(*[np.arange(n) for n in self.shape], indexing="ij")
        columns = {axis: np.asarray(self.labels[axis], dtype=object)[grid.ravel()] for axis, grid in zip(self.axes, grids)}
        columns[self.name] = self.values.ravel()
        return pd.DataFrame(columns)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelledArray):
            return NotImplemented
        return (self.axes == other.axes and self.labels == other.labels and self.name == other.name
                and self.values.dtype == other.values.dtype and np.array_equal(self.values, other.values, equal_nan=True)
                and self.attrs == other.attrs and self.provenance == other.provenance)

    # -- persistence ------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write to one ``.npz`` file (atomically: a partial file never has the final name)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
        meta = {"format": "mechkit.LabelledArray/1", "axes": list(self.axes), "labels": self.labels,
                "name": self.name, "provenance": self.provenance.to_dict(), "attrs": self.attrs}
        try:
            meta_text = json.dumps(meta)
        except TypeError as error:
            raise ValueError(f"labels and attrs must be JSON-serialisable to save: {error}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        with open(tmp, "wb") as handle:
            np.savez(handle, values=self.values, meta=np.array(meta_text))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LabelledArray:
        with np.load(Path(path), allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            values = data["values"]
        if meta.get("format") != "mechkit.LabelledArray/1":
            raise ValueError(f"{path} is not a mechkit LabelledArray file")
        return cls(values, meta["axes"], meta["labels"], name=meta["name"],
                   provenance=Provenance.from_dict(meta["provenance"]), attrs=meta["attrs"])
