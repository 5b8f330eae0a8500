"""Convert a GGUF file once into a cached Hugging Face folder (safetensors + tokenizer).

transformers dequantises GGUF tensors on every load (about a minute for Gemma-3-270M on
two cores); after one conversion the folder loads in seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mechkit.models.cache import atomic_folder, file_sha256
from mechkit.models.fingerprint import hash_state_dict
from mechkit.models.registry import write_meta


def convert_gguf(gguf_path: Path, folder: Path, *, name: str, chat: bool, description: str) -> Path:
    """Dequantise ``gguf_path`` to float32 and save it as a loadable HF folder at ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    # A GGUF-loaded config has no `architectures`; the bridge needs it to pick an adapter.
    model.config.architectures = [type(model).__name__]
    # The weights are plain float32 tensors now; drop the GGUF quantizer so they save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_meta(
            tmp,
            {
                "name": name,
                "kind": "converted",
                "chat": chat,
                "description": description,
                "source_gguf": gguf_path.name,
                "source_sha256": file_sha256(gguf_path),
                "weights_hash": hash_state_dict(model),
                "dtype": "float32",
                "conversion_seconds": round(time.perf_counter() - started, 1),
            },
        )
    return folder
