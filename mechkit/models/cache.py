"""Where mechkit keeps converted models and other cached artefacts, and how it writes there.

The cache root is ``$MECHKIT_CACHE`` (default ``~/.cache/mechkit``). Every folder is
written into a temporary sibling first and renamed into place, so an interrupted
conversion never leaves a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """The cache root folder (created on first use)."""
    root = Path(os.environ.get("MECHKIT_CACHE", Path.home() / ".cache" / "mechkit")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_dir() -> Path:
    """Folder holding one sub-folder per converted or edited model."""
    path = cache_root() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_sha256(path: Path, block: int = 1 << 24) -> str:
    """The SHA-256 of a file's contents, read in blocks (GGUF files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield a temporary folder that is renamed to ``final`` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
