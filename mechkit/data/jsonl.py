"""Reading the JSONL data files users write (tasks, chains, seeds): one JSON object a line.

Errors name the file and line, so that a typo in line 212 says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from mechkit.errors import MechkitError


def read_jsonl(path: str | Path, what: str) -> list[tuple[int, dict]]:
    """(line number, JSON object) for the non-blank lines of ``path``; ``what`` names the file in errors."""
    path = Path(path)
    if not path.exists():
        raise MechkitError(f"{what} file {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise MechkitError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise MechkitError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    if not rows:
        raise MechkitError(f"{what} file {path} holds nothing; write one JSON object a line")
    return rows


__all__ = ["read_jsonl"]
