"""Read a checkpoint one tensor at a time, without building the model.

Weight-only analyses (head classification) need a few matrices per layer; a 70B model
does not fit in memory, but its value and output projections, one layer at a time, do.
:class:`CheckpointReader` opens a Hugging Face folder of safetensors files (one file, or
shards listed in ``model.safetensors.index.json``) or a GGUF file, and returns any tensor
by its Hugging Face name (``model.layers.3.self_attn.v_proj.weight``), read from disk on
request. GGUF tensors are dequantised and un-permuted exactly as transformers does when it
loads the file. Nothing is cached here: callers keep what they need.

Example:
    >>> reader = CheckpointReader("~/.cache/mechkit/models/smollm2-135m-instruct")  # doctest: +SKIP
    >>> reader.tensor("model.layers.0.self_attn.v_proj.weight").shape               # doctest: +SKIP
    torch.Size([192, 576])
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from mechkit.errors import MechkitError, ModelNotFoundError

INDEX = "model.safetensors.index.json"


class CheckpointReader:
    """Tensors of a safetensors folder or a ``.gguf`` file, by Hugging Face name, read on request."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        if self.path.is_file() and self.path.suffix == ".gguf":
            self.kind = "gguf"
            self._files: dict[str, Path] = {}
        elif self.path.is_dir():
            self.kind = "safetensors"
            self._files = _safetensors_map(self.path)
        elif self.path.exists():
            raise ModelNotFoundError(f"{self.path} is neither a model folder nor a .gguf file")
        else:
            raise ModelNotFoundError(f"{self.path} does not exist: pass a Hugging Face model folder or a .gguf file")

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {self.kind})"

    # -- configuration and tokenizer -------------------------------------------------
    @cached_property
    def config(self):
        """The transformers config (from ``config.json``, or from the GGUF metadata)."""
        from transformers import AutoConfig

        if self.kind == "gguf":
            return AutoConfig.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        if not (self.path / "config.json").exists():
            raise ModelNotFoundError(f"{self.path} has no config.json: it is not a Hugging Face model folder")
        return AutoConfig.from_pretrained(str(self.path))

    def tokenizer(self):
        """The model's tokenizer, loaded from the folder (or from the GGUF file)."""
        from transformers import AutoTokenizer

        if self.kind == "gguf":
            return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        return AutoTokenizer.from_pretrained(str(self.path))

    @cached_property
    def meta_model(self) -> torch.nn.Module:
        """The model's module tree with every parameter on the meta device (no memory), buffers real.

        Weight-only analyses copy single modules out of it (a norm, an MLP) and fill them
        with tensors from :meth:`tensor`, so each architecture's own code runs.
        """
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        config = self.config
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        model.tie_weights()  # from_config under empty weights leaves tied heads untied
        if not getattr(config, "architectures", None):
            config.architectures = [type(model).__name__]
        return model.eval()

    # -- tensors --------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Hugging Face names of every tensor stored in the checkpoint."""
        return sorted(self._gguf_names if self.kind == "gguf" else self._files)

    def __contains__(self, name: object) -> bool:
        return name in (self._gguf_names if self.kind == "gguf" else self._files)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name`` on the CPU, in its stored dtype (GGUF: dequantised to float32)."""
        if name not in self:
            close = [n for n in self.names if n.rsplit(".", 2)[-2:] == name.rsplit(".", 2)[-2:]][:5]
            raise MechkitError(f"{self.path} has no tensor {name!r}" + (f"; similar: {close}" if close else ""))
        if self.kind == "gguf":
            return self._gguf_tensor(name)
        from safetensors import safe_open

        file = self._files[name]
        if not file.exists():
            raise ModelNotFoundError(f"{file.name} is listed in {self.path / INDEX} but missing from the folder")
        # Open per read: the file's pages are unmapped afterwards, so only the copy stays resident.
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)

    # -- GGUF -----------------------------------------------------------------------
    @cached_property
    def _gguf(self):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            read_field,
        )

        reader = GGUFReader(str(self.path))  # memory-maps the file: tensors are read when touched
        architecture = read_field(reader, "general.architecture")[0]
        parsed = {"config": self.config.to_dict(), "tensors": {}}
        processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
        to_hf = _gguf_to_hf_names(architecture, self.meta_model) or get_gguf_hf_weights_map(self.meta_model, processor)
        by_hf = {to_hf[t.name]: t for t in reader.tensors if t.name in to_hf}
        return reader, processor, to_hf, parsed, by_hf

    @property
    def _gguf_names(self) -> dict:
        return self._gguf[4]

    def _gguf_tensor(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        _, processor, to_hf, parsed, by_hf = self._gguf
        stored = by_hf[name]
        weights = dequantize(stored.data, stored.tensor_type)
        weights = processor.process(weights=weights, name=stored.name, tensor_key_mapping=to_hf,
                                    parsed_parameters=parsed).weights
        return torch.from_numpy(np.array(weights, dtype=np.float32))  # a copy: the file's pages stay read-only

    # -- fingerprint ----------------------------------------------------------------
    def weights_hash(self, dtype: torch.dtype = torch.float32) -> str:
        """The hash :func:`mechkit.models.fingerprint.hash_state_dict` gives the model loaded in ``dtype``.

        Streams every tensor once (a full read of the checkpoint, about 2 s per GB);
        tied weights are hashed once, as in a loaded model.
        """
        digest = hashlib.sha256()
        state = self.meta_model.state_dict(keep_vars=True)
        stored_as: dict[int, str] = {}  # one checkpoint name per distinct parameter (tied heads share one)
        for name, tensor in state.items():
            if name in self:
                stored_as.setdefault(id(tensor), name)
        seen: set[int] = set()
        for name in sorted(state):
            key = id(state[name])
            if key not in stored_as:
                if state[name].device.type != "meta":
                    continue  # a buffer the model computes (never stored): not part of the weights
                raise MechkitError(f"{self.path} has no tensor {name!r}, which the model needs")
            data = self.tensor(stored_as[key])
            if data.is_floating_point():
                data = data.to(dtype)
            digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
            if key in seen:
                continue
            seen.add(key)
            digest.update(memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy()))
        return digest.hexdigest()[:16]


def _gguf_to_hf_names(architecture: str, model: torch.nn.Module) -> dict[str, str]:
    """GGUF tensor name -> HF name for a flat decoder (Llama, Gemma); ``{}`` for architectures gguf does not know.

    The same map transformers builds (``get_gguf_hf_weights_map``) in one pass instead of
    one per submodule (0.01 s instead of 9 s for SmolLM2).
    """
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == architecture), None)
    if arch is None:
        return {}
    names = get_tensor_name_map(arch, model.config.get_text_config().num_hidden_layers)
    mapping = {}
    for hf_name in model.state_dict():
        module, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(module)
        if gguf_name is not None:
            mapping[f"{gguf_name}.{suffix}"] = hf_name
    return mapping


def _safetensors_map(folder: Path) -> dict[str, Path]:
    """Tensor name -> file, from the shard index or from the headers of the folder's files."""
    index = folder / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise MechkitError(f"{index} is not a safetensors index (no weight_map): {error}") from None
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        hint = (f" It has {others[:3]}: re-save it with model.save_pretrained(folder, safe_serialization=True)."
                if others else "")
        raise ModelNotFoundError(f"{folder} has no .safetensors weights.{hint}")
    from safetensors import safe_open

    found: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            found.update(dict.fromkeys(handle.keys(), file))
    return found
