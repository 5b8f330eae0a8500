"""Activation sets in memory or on disk: one ``.npy`` file per hook, memory-mapped.

A folder being written is named ``NAME.partial`` and renamed to ``NAME`` only when every
batch is in; ``progress.json`` inside it records finished batches, so an interrupted run
resumes where it stopped and never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechkit.results import Provenance

FORMAT = "mechkit.ActivationSet/1"


def _file_name(hook: str) -> str:
    return hook.replace("/", "_") + ".npy"


@dataclass
class ActivationSet:
    """Collected activations: ``activations[hook]`` has shape ``(example, position, *hook_dims)``.

    ``examples`` are indices into the prompt list that was collected (prompts whose named
    positions were missing are dropped and listed in ``dropped``), ``positions`` the
    position labels, ``token_ids[e, p]`` the token at each collected position.
    """

    activations: dict[str, Tensor]
    positions: list[str]
    examples: list[int]
    token_ids: Int[Tensor, "example position"]
    dropped: dict[int, str] = field(default_factory=dict)
    provenance: Provenance = field(default_factory=Provenance)
    path: Path | None = None

    def __getitem__(self, hook: str) -> Float[Tensor, "example position ..."]:
        if hook not in self.activations:
            raise KeyError(f"no activations for {hook!r}; collected: {sorted(self.activations)}")
        return self.activations[hook]

    @property
    def hooks(self) -> list[str]:
        return list(self.activations)

    def summary(self) -> str:
        lines = [f"{len(self.examples)} examples x {len(self.positions)} positions {self.positions}"
                 + (f"; {len(self.dropped)} dropped" if self.dropped else "")]
        for hook, tensor in self.activations.items():
            t = tensor.float()
            lines.append(f"  {hook:<32} {tuple(tensor.shape)} {str(tensor.dtype):<14} mean {t.mean():+.3f} std {t.std():.3f}")
        return "\n".join(lines)

    def _meta(self) -> dict[str, Any]:
        return {"format": FORMAT, "hooks": self.hooks, "positions": self.positions, "examples": self.examples,
                "dropped": {str(k): v for k, v in self.dropped.items()}, "provenance": self.provenance.to_dict()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write to a folder (atomically)."""
        writer = DiskWriter(Path(path), self._meta(),
                            {h: (tuple(t.shape), t.dtype) for h, t in self.activations.items()},
                            n_examples=len(self.examples), n_positions=len(self.positions))
        writer.write(np.arange(len(self.examples)), self.token_ids, self.activations)
        return writer.finish()

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True) -> ActivationSet:
        """Open a saved set; with ``mmap`` the arrays stay on disk until read."""
        path = Path(path)
        if not (path / "meta.json").exists():
            partial = path.with_name(path.name + ".partial")
            hint = f" (an unfinished run left {partial}; re-run the collection to resume it)" if partial.exists() else ""
            raise FileNotFoundError(f"{path} is not a complete activation set{hint}")
        meta = json.loads((path / "meta.json").read_text())
        mode = "r" if mmap else None
        with warnings.catch_warnings():  # read-only memory maps: torch warns they are not writable
            warnings.simplefilter("ignore", UserWarning)
            acts = {h: torch.from_numpy(np.load(path / _file_name(h), mmap_mode=mode)) for h in meta["hooks"]}
        return cls(acts, meta["positions"], meta["examples"], torch.from_numpy(np.load(path / "token_ids.npy")),
                   {int(k): v for k, v in meta["dropped"].items()}, Provenance.from_dict(meta["provenance"]), path)


_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}


class DiskWriter:
    """Preallocated memory-mapped arrays filled batch by batch, resumable, renamed when done."""

    def __init__(self, final: Path, meta: dict, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 *, n_examples: int, n_positions: int, fingerprint: str | None = None) -> None:
        self.final = final
        self.partial = final.with_name(final.name + ".partial")
        self.meta = meta
        self.fingerprint = fingerprint
        progress = self.partial / "progress.json"
        resumable = progress.exists() and json.loads(progress.read_text()).get("fingerprint") == fingerprint and fingerprint
        if not resumable:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.mkdir(parents=True)
            self.done: set[int] = set()
            mode = "w+"
        else:
            self.done = set(json.loads(progress.read_text())["done"])
            mode = "r+"
        self.arrays = {}
        for hook, (shape, dtype) in shapes.items():
            if dtype not in _NP_DTYPES:
                raise ValueError(f"cannot store {dtype} on disk; use float32, float16 or float64")
            self.arrays[hook] = np.lib.format.open_memmap(self.partial / _file_name(hook), mode=mode,
                                                          dtype=_NP_DTYPES[dtype], shape=shape)
        self.token_ids = np.lib.format.open_memmap(self.partial / "token_ids.npy", mode=mode, dtype=np.int64,
                                                   shape=(n_examples, n_positions))
        self._save_progress()

    def _save_progress(self) -> None:
        tmp = self.partial / "progress.json.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": sorted(self.done)}))
        os.replace(tmp, self.partial / "progress.json")

    def write(self, rows: np.ndarray, token_ids: Tensor, acts: dict[str, Tensor], batch: int | None = None) -> None:
        """Fill output ``rows``; with ``batch`` given, flush and record it as finished."""
        self.token_ids[rows] = token_ids.numpy()
        for hook, tensor in acts.items():
            self.arrays[hook][rows] = tensor.numpy()
        if batch is not None:
            for array in (*self.arrays.values(), self.token_ids):
                array.flush()
            self.done.add(batch)
            self._save_progress()

    def finish(self) -> Path:
        for array in (*self.arrays.values(), self.token_ids):
            array.flush()
        (self.partial / "meta.json").write_text(json.dumps(self.meta))
        (self.partial / "progress.json").unlink()
        if self.final.exists():
            shutil.rmtree(self.final)
        self.partial.rename(self.final)
        return self.final
