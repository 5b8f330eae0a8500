"""Memory estimates from shapes, made before any forward pass runs.

On a CPU an out-of-memory kill cannot be caught, so the collector prevents it: it
estimates the bytes one example needs (its forward working set and the activations it
keeps), picks the batch size that fits ``max_memory``, and refuses with a clear
message when not even one example fits.
"""

from __future__ import annotations

import re

from mechkit.errors import MemoryBudgetError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

# Floats live at once per token in a forward pass without grad, as multiples of the widths
# below. Deliberately generous: on Gemma-3-270M (batch 16 x ~37 tokens) the estimate is
# about 1.6x the peak RSS that benchmarks/bench_collect.py measures.
_RESIDUAL_COPIES = 24
_MLP_COPIES = 6
_ATTENTION_COPIES = 6


def parse_bytes(value: int | float | str | None) -> int | None:
    """``2_000_000``, ``"2GB"`` or ``"512MiB"`` to bytes (None stays None)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        if value <= 0:
            raise MemoryBudgetError(f"max_memory must be positive, got {value}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", value)
    if not match or match.group(2).upper() not in _UNITS:
        raise MemoryBudgetError(f"cannot read memory size {value!r}; write e.g. '4GB' or '512MiB'")
    return parse_bytes(float(match.group(1)) * _UNITS[match.group(2).upper()])


def human(n_bytes: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024:
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} TiB"


def forward_bytes_per_example(cfg, n_tokens: int, *, logits: bool, itemsize: int = 4) -> int:
    """Peak working memory of one example's forward pass (no grad), from the config."""
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    d_attn = cfg.n_heads * cfg.d_head
    per_token = (_RESIDUAL_COPIES * cfg.d_model + _MLP_COPIES * d_mlp + _ATTENTION_COPIES * d_attn
                 + 4 * cfg.n_heads * n_tokens)
    if logits:
        per_token += 3 * cfg.d_vocab
    return per_token * n_tokens * itemsize


def plan_batch_size(
    *,
    cfg,
    max_tokens: int,
    kept_bytes_per_example: int,
    n_examples: int,
    logits: bool,
    max_memory: int | None,
    requested: int | None,
    streaming: bool,
) -> int:
    """Largest batch size (at most ``requested``, default 32) whose estimate fits the budget."""
    default = requested or 32
    if max_memory is None:
        return default
    forward = forward_bytes_per_example(cfg, max_tokens, logits=logits)
    kept_total = 0 if streaming else kept_bytes_per_example * n_examples
    available = max_memory - kept_total
    one = forward + 2 * kept_bytes_per_example
    if available < one:
        if not streaming and kept_total >= max_memory:
            raise MemoryBudgetError(
                f"the activations kept for {n_examples} examples need {human(kept_total)}, more than "
                f"max_memory={human(max_memory)}; stream them to disk with out=PATH, collect fewer "
                "hooks or positions, or raise max_memory"
            )
        raise MemoryBudgetError(
            f"max_memory={human(max_memory)} is too small for even one example: one example of "
            f"{max_tokens} tokens needs about {human(one)} for its forward pass"
            + ("" if streaming else f" on top of {human(kept_total)} of kept activations")
            + f"; raise max_memory to at least {human(one + kept_total)} or shorten the prompts"
        )
    return max(1, min(default, available // one))
