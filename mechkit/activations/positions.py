"""Token positions: integers counted from either end, or positions named by a span.

A :class:`Position` is resolved per prompt, so one position names a different token
index in prompts of different lengths or with answers at different places.

Named positions (as in Orgad et al. 2024, "LLMs Know More Than They Show"):

==============================  =====================================================
``last_q``                      last token of the ``question`` span
``first_answer``                first token of the ``answer`` span
``second_answer``               second token of the ``answer`` span
``exact_answer_before_first``   the token just before the ``exact_answer`` span
``exact_answer_first``          first token of the ``exact_answer`` span
``exact_answer_last``           last token of the ``exact_answer`` span
``-8`` ... ``-1``, ``0``, ...   counted in the whole prompt (negative: from its end)
==============================  =====================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mechkit.data.prompts import EncodedPrompt
from mechkit.errors import MechkitError


@dataclass(frozen=True)
class Position:
    """``anchor`` + ``offset`` within ``span`` (or within the whole prompt if ``span`` is None).

    ``anchor="start"`` counts from the span's first token, ``"end"`` from its last. An
    offset that stays inside the span but runs past it (the second token of a one-token
    answer) makes the position *missing* for that prompt; an offset that steps out on
    purpose (``before_first``) only has to stay inside the prompt.
    """

    name: str
    span: str | None = None
    anchor: Literal["start", "end"] = "start"
    offset: int = 0

    def resolve(self, prompt: EncodedPrompt) -> int | None:
        """Token index in ``prompt``, or None when its span is absent or too short."""
        n = len(prompt.ids)
        if self.span is None:
            index = self.offset if self.offset >= 0 else n + self.offset
            if not 0 <= index < n:
                raise MechkitError(
                    f"position {self.name} is outside a prompt of {n} tokens; use an index in [-{n}, {n - 1}]"
                )
            return index
        if self.span not in prompt.spans:
            return None
        start, end = prompt.spans[self.span]
        if self.anchor == "start":
            index = start + self.offset
            if self.offset >= 0 and index >= end:
                return None
        else:
            index = end - 1 + self.offset
            if self.offset <= 0 and index < start:
                return None
        if not 0 <= index < n:
            return None
        return index


NAMED_POSITIONS: dict[str, Position] = {
    p.name: p
    for p in (
        Position("last_q", "question", "end", 0),
        Position("first_answer", "answer", "start", 0),
        Position("second_answer", "answer", "start", 1),
        Position("exact_answer_before_first", "exact_answer", "start", -1),
        Position("exact_answer_first", "exact_answer", "start", 0),
        Position("exact_answer_last", "exact_answer", "end", 0),
    )
}


def as_position(position: int | str | Position) -> Position:
    """Parse an int, a numeric string, a named position, or ``span:NAME:first|last``."""
    if isinstance(position, Position):
        return position
    if isinstance(position, bool):
        raise MechkitError(f"position must be an int or a name, got {position!r}")
    if isinstance(position, int):
        return Position(str(position), None, "start", position)
    if isinstance(position, str):
        text = position.strip()
        if text.lstrip("-").isdigit():
            return Position(text, None, "start", int(text))
        if text in NAMED_POSITIONS:
            return NAMED_POSITIONS[text]
        if text.startswith("span:") and text.count(":") == 2:
            _, span, which = text.split(":")
            if which in ("first", "last"):
                return Position(text, span, "start" if which == "first" else "end", 0)
    raise MechkitError(
        f"unknown position {position!r}: use an integer (negative counts from the end), "
        f"one of {sorted(NAMED_POSITIONS)}, or 'span:NAME:first' / 'span:NAME:last'"
    )
