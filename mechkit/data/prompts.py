"""Prompts and their tokenisation, under one policy for BOS and chat templates.

Policy (documented in docs/getting-started.md):

* **BOS exactly once.** Plain text gets the BOS token prepended exactly when the
  model's own tokenizer does so (its training convention: Gemma-3 yes, SmolLM2 no),
  and never a second time, even if the text already starts with it.
* **Chat only when asked.** A :class:`Prompt` with ``chat=True`` is a user message: it
  goes through the tokenizer's chat template (with the generation prompt, so the next
  token is the assistant's first), and the template decides about BOS. Plain text is
  never wrapped. A model without a chat template refuses chat prompts.
* **Named spans** are character ranges of the prompt text; they are carried through
  tokenisation (and through the chat template) as token ranges.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mechkit.errors import MechkitError


@dataclass(frozen=True)
class Prompt:
    """One input text, optional named character spans, and whether it is a chat message.

    Example:
        >>> q = "Q: What is the capital of France? A: Paris"
        >>> p = Prompt(q, spans={"question": (0, 33), "answer": (37, 42)})
        >>> q[slice(*p.spans["answer"])]
        'Paris'
    """

    text: str
    spans: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    chat: bool = False

    @classmethod
    def from_record(cls, record: Mapping) -> Prompt:
        """From a JSON-like record ``{"text": ..., "spans": {name: [start, end]}?, "chat": bool?}``."""
        spans = {name: tuple(span) for name, span in (record.get("spans") or {}).items()}
        return cls(record["text"], spans, bool(record.get("chat", False)))

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise MechkitError(f"a prompt must be a string, got {type(self.text).__name__}")
        for name, (start, end) in self.spans.items():
            if not (0 <= start < end <= len(self.text)):
                raise MechkitError(
                    f"span {name!r}=({start}, {end}) is not a non-empty range inside the "
                    f"prompt's {len(self.text)} characters: {self.text[:60]!r}"
                )


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of one prompt and its spans as token ranges ``[start, end)``."""

    ids: tuple[int, ...]
    spans: Mapping[str, tuple[int, int]]


def as_prompts(prompts: Sequence[str | Prompt] | str) -> list[Prompt]:
    """Normalise strings to :class:`Prompt` (plain text) and check the list is usable."""
    if isinstance(prompts, (str, Prompt)):
        raise MechkitError("prompts must be a list of strings or Prompt objects, not a single one; wrap it in a list")
    result = [p if isinstance(p, Prompt) else Prompt(p) for p in prompts]
    if not result:
        raise MechkitError("the prompt list is empty: give at least one prompt")
    for i, prompt in enumerate(result):
        if not prompt.text:
            raise MechkitError(f"prompt {i} is the empty string")
    return result


def _render(model, prompt: Prompt) -> tuple[str, int]:
    """The text to tokenise and the character offset of the prompt's text inside it."""
    if not prompt.chat:
        return prompt.text, 0
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(getattr(model, "mechkit", None), "name", "this model")
        raise MechkitError(
            f"prompt marked chat=True, but {name} has no chat template (it is not a chat "
            "model); pass plain text instead"
        )
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt.text}], tokenize=False, add_generation_prompt=True
    )
    offset = rendered.rfind(prompt.text)
    if offset < 0:
        raise MechkitError("the chat template altered the message text, so its spans cannot be located")
    return rendered, offset


def render_text(model, prompt: str | Prompt) -> str:
    """The text the model reads for ``prompt`` (a chat prompt rendered with the model's chat template)."""
    return _render(model, prompt if isinstance(prompt, Prompt) else Prompt(prompt))[0]


def encode(model, prompt: Prompt) -> EncodedPrompt:
    """Tokenise one prompt under the module's BOS and chat policy."""
    tokenizer = model.tokenizer
    text, offset = _render(model, prompt)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(prompt.spans))
    ids = list(encoding["input_ids"])
    bos = tokenizer.bos_token_id
    prepend = (not prompt.chat) and getattr(getattr(model, "mechkit", None), "prepend_bos", True)
    shift = 0
    if prepend and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
        shift = 1
    spans = {}
    if prompt.spans:
        char_spans = encoding["offset_mapping"]
        for name, (start, end) in prompt.spans.items():
            start, end = start + offset, end + offset
            tokens = [i for i, (a, b) in enumerate(char_spans) if b > a and a < end and b > start]
            if not tokens:
                raise MechkitError(f"span {name!r} of prompt {prompt.text[:40]!r} covers no token")
            spans[name] = (tokens[0] + shift, tokens[-1] + 1 + shift)
    return EncodedPrompt(tuple(ids), spans)
