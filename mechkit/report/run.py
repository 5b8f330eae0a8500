"""``mechkit report``: run every analysis on one or more models into one folder, with a cache.

The folder holds one sub-folder per analysis and model (``layer-probes/all``,
``head-classification/<model>``, ...), each finished one marked by a ``done.json`` holding the
key it was computed under (models, the analysis's settings, mechkit's version and a hash of
the built-in data files). Re-running the same command reuses every finished unit and resumes
after the last one; ``force`` recomputes. ``report.json`` records the run (settings, versions,
timings, each figure's readability checks) and ``index.html`` shows it; the page is written
last and removed when a run starts, so a folder with an ``index.html`` holds a finished report.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mechkit.errors import MechkitError
from mechkit.models.cache import file_sha256
from mechkit.models.registry import model_identity
from mechkit.report.analyses import ANALYSES, Unit, display_name, resolve_settings
from mechkit.report.page import index_html

ALL = tuple(ANALYSES)
MARKER = "done.json"
MANIFEST = "report.json"


def slug(text: str) -> str:
    """A file-name-safe form of a model name (a path keeps its last part)."""
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in display_name(text)).strip("_") or "model"


def _data_hash() -> str:
    """A hash of every built-in data file, so that edited data invalidates the cache."""
    root = Path(__file__).resolve().parent.parent / "data"
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".pyc"):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _file_digests(value) -> dict[str, str]:
    """Content hashes of every setting value that names an existing file (a user's task or dataset
    file), so that editing such a file invalidates the results made from it."""
    values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
    digests: dict[str, str] = {}
    for item in values:
        if isinstance(item, (dict, list)):
            digests.update(_file_digests(item))
        elif isinstance(item, str) and Path(item).expanduser().is_file():
            digests[item] = file_sha256(Path(item).expanduser())[:16]
    return digests


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def versions() -> dict:
    import importlib.metadata

    import torch

    import mechkit

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {"mechkit": mechkit.__version__, "transformer_lens": version("transformer-lens"), "torch": torch.__version__,
            "transformers": version("transformers"), "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}


def _check_folder(out: Path, models: list[str], settings: dict, force: bool) -> dict | None:
    """The earlier manifest when ``out`` holds a run with the same models and settings; None for an
    empty or new folder; an error for anything else unless ``force``."""
    if not out.exists() or not any(out.iterdir()):
        return None
    manifest_path = out / MANIFEST
    if not manifest_path.exists():
        if force:
            return None
        raise MechkitError(f"{out} exists and holds files that are not a mechkit report; choose another --out, "
                           "or pass --force to write the report there anyway")
    try:
        old = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        if force:
            return None
        raise MechkitError(f"{manifest_path} is unreadable ({error}); pass --force to start over") from error
    different = [] if old.get("models") == models else [f"models {old.get('models')} -> {models}"]
    for name, values in settings.items():
        if name in old.get("settings", {}) and old["settings"][name] != values:
            different.append(f"{name} settings {old['settings'][name]} -> {values}")
    if different and not force:
        raise MechkitError(f"{out} holds a report made with other settings ({'; '.join(different)}); choose another "
                           "--out, or pass --force to replace it")
    return None if different else old


def report(
    models: Sequence[str],
    out: str | os.PathLike,
    *,
    analyses: Sequence[str] | None = None,
    settings: dict[str, dict] | None = None,
    force: bool = False,
    progress: bool = True,
    device: str | None = None,
    echo: Callable[[str], None] = print,
) -> Path:
    """Run ``analyses`` (default: all of :data:`ALL`) on ``models`` into ``out``; returns ``out/index.html``.

    Args:
        models: bundled or cached model names, local model folders or ``.gguf`` files.
        out: the report folder (created; an existing one must hold the same run, or ``force``).
        analyses: a subset of :data:`ALL`, in any order (run in the order of :data:`ALL`).
        settings: per-analysis overrides of the defaults, e.g. ``{"head-attribution": {"method": "atp*"}}``.
        force: recompute everything, and write into a folder that holds something else.
        progress: show each analysis's progress bars.
        device: where models are loaded (default: ``"cuda"`` when a GPU is there, so that head
            classification takes the Triton kernels; else the CPU). Not part of the cache key.
        echo: where the one-line progress display goes.
    """
    from mechkit.models import load_model
    from mechkit.models.loading import check_model_name

    models = list(dict.fromkeys(str(m) for m in models))
    if not models:
        raise MechkitError("give at least one model (--model NAME)")
    chosen = [a for a in ALL if a in set(analyses or ALL)]
    settings = resolve_settings(list(analyses or ALL), settings)
    for name in models:
        check_model_name(name)
    out = Path(out)
    old = _check_folder(out, models, settings, force)
    out.mkdir(parents=True, exist_ok=True)
    page = out / "index.html"
    if page.exists():
        page.unlink()  # a folder with an index.html holds a finished report; this one is not, yet
    run_versions = versions()
    base = {"mechkit": run_versions["mechkit"], "data": _data_hash()}
    identities = {m: model_identity(m) for m in models}
    folders: dict[str, str] = {}  # model -> its sub-folder name, unique even for two folders named alike
    for m in models:
        name, n = slug(m), 2
        while name in folders.values():
            name, n = f"{slug(m)}-{n}", n + 1
        folders[m] = name
    units = [(a, [m]) for a in chosen if ANALYSES[a].per_model for m in models] + \
            [(a, models) for a in chosen if not ANALYSES[a].per_model]
    units.sort(key=lambda unit: chosen.index(unit[0]))
    manifest = {"models": models, "analyses": chosen, "settings": settings, "versions": run_versions, "status": "running",
                "units": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if old:
        manifest["units"] = {k: v for k, v in old.get("units", {}).items() if k.split("/")[0] in chosen}
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else None)
    loaded: dict = {}

    def loader(name: str):
        def load():
            if name not in loaded:
                loaded[name] = load_model(name, device=device)
            return loaded[name]
        return load

    started = time.perf_counter()
    try:
        _write_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
        for i, (analysis, unit_models) in enumerate(units, 1):
            label = f"{analysis}/{folders[unit_models[0]] if ANALYSES[analysis].per_model else 'all'}"
            folder = out / label
            key = _key({**base, "analysis": analysis, "models": [identities[m] for m in unit_models],
                        "settings": settings[analysis], "files": _file_digests(settings[analysis])})
            marker = folder / MARKER
            head = f"[{i}/{len(units)}] {ANALYSES[analysis].title} · {', '.join(unit_models)}"
            if not force and marker.exists():
                done = json.loads(marker.read_text(encoding="utf-8"))
                if done.get("key") == key:
                    manifest["units"][label] = {**done, "reused": True}
                    echo(f"{head}: reused (finished earlier, {done['seconds']:.0f} s)")
                    continue
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            echo(f"{head} ...")
            unit = Unit(folder, settings[analysis], progress, device)
            t0 = time.perf_counter()
            ANALYSES[analysis].run(unit, [(m, loader(m)) for m in unit_models])
            done = {"key": key, "analysis": analysis, "models": unit_models, "seconds": round(time.perf_counter() - t0, 1),
                    "figures": [{**f, "png": os.path.relpath(f["png"], out), "svg": os.path.relpath(f["svg"], out)}
                                for f in unit.figures], "summary": unit.summary}
            _write_atomic(marker, json.dumps(done, indent=1))
            manifest["units"][label] = {**done, "reused": False}
            _write_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
            problems = [p for f in unit.figures for p in f["problems"]]
            echo(f"{head}: done in {done['seconds']:.0f} s" + (f"; figure problems: {problems}" if problems else ""))
        manifest["status"] = "complete"
        manifest["seconds"] = round(time.perf_counter() - started, 1)
        _write_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
        _write_atomic(page, index_html(manifest))
    except BaseException as error:
        manifest["status"] = f"stopped: {type(error).__name__}: {error}"
        try:
            _write_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
        except OSError:
            pass  # the disk may be what failed; the missing index.html already says the report is unfinished
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise MechkitError(f"the disk is full while writing the report in {out}; it is incomplete (no index.html). "
                               "Free some space and run the same command again: finished analyses are kept") from error
        raise
    echo(f"report: {page} ({time.perf_counter() - started:.0f} s)")
    return page


__all__ = ["ALL", "report", "versions"]
