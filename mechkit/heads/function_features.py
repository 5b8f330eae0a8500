"""Per-head features of function-labelled sub-questions (Ma et al. 2025, "Cognitive Mirrors").

For each sub-question, every head's output (``blocks.L.attn.hook_z``, before W_O) is averaged over
chosen answer tokens; optionally the layer's mean head output is appended to each head's vector,
as in the paper. Answer tokens, three ways:

* ``"greedy"`` (default): the model's own greedy answer (its first line), teacher-forced after the
  prompt, averaged over its content tokens (a stop-word filter; all its tokens when every one is a
  stop word). Departure from the paper: it averages over the few most meaningful answer tokens
  chosen by an external language model, which an offline toolkit cannot call.
* ``"gold"``: the gold answer, teacher-forced (what the model reads, not what it says).
* ``"last_prompt"``: the last prompt token (the position that predicts the answer).

Sub-questions whose greedy answer is empty are dropped and counted. At most
:data:`MAX_ANSWER_TOKENS` answer tokens are read (answers are 1-3 words).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.activations import Prompt, collect_activations
from mechkit.activations.positions import Position
from mechkit.data.function_chains import FUNCTIONS, SubQuestion
from mechkit.errors import MechkitError
from mechkit.models.loading import model_info
from mechkit.probing.qa import generate

ANSWER_MODES = ("greedy", "gold", "last_prompt")
MAX_ANSWER_TOKENS = 6
STOP_WORDS = frozenset(
    "a an the of to in on at by for with from and or but is are was were be been am it its this that these those "
    "he she they we you i his her their our your my me him them us as so than then there here do does did not no "
    "yes".split()
)


@dataclass
class HeadFeatures:
    """``features[example, head, feature]`` (head = layer * n_heads + h) with the examples' labels.

    ``feature`` is d_head, or 2 * d_head with the layer's mean head output appended. ``residual``
    holds the residual stream (``resid_post``) of the middle and last layer pooled over the same
    tokens, for the baseline probe.
    """

    features: Float[Tensor, "example head feature"]
    labels: np.ndarray
    subquestions: list[SubQuestion]
    answers: list[str]
    n_layers: int
    n_heads: int
    mode: str
    layer_mean: bool
    model_name: str
    weights_hash: str
    dropped: dict[int, str] = field(default_factory=dict)
    residual: dict[str, Float[Tensor, "example d_model"]] = field(default_factory=dict)

    @property
    def functions(self) -> tuple[str, ...]:
        return FUNCTIONS

    def check_model(self, model) -> None:
        """Refuse features collected from another model."""
        info = model_info(model)
        if (self.n_layers, self.n_heads) != (model.cfg.n_layers, model.cfg.n_heads) or \
                self.weights_hash != info.weights_hash(model):
            raise MechkitError(f"these head features come from {self.model_name} ({self.n_layers} x {self.n_heads} "
                               f"heads), not from {info.name}: collect them on this model")


def is_content(token_text: str) -> bool:
    """Whether a token carries content: it has a letter or digit and is not a stop word."""
    word = token_text.strip().lower()
    return bool(re.search(r"[a-z0-9]", word)) and word not in STOP_WORDS


def answer_texts(model, subquestions: Sequence[SubQuestion], mode: str, *, max_new_tokens: int = 6,
                 batch_size: int = 16, progress: bool = True) -> list[str]:
    """The answer each sub-question's features are read from (empty for ``"last_prompt"`` or no answer)."""
    if mode == "gold":
        return [sq.answer for sq in subquestions]
    if mode == "last_prompt":
        return [""] * len(subquestions)
    generations = generate(model, [sq.prompt for sq in subquestions], max_new_tokens=max_new_tokens,
                           batch_size=batch_size, progress=progress)
    return [g.split("\n")[0].strip() for g in generations]


def head_features(model, subquestions: Sequence[SubQuestion], *, answer: str = "greedy", layer_mean: bool = True,
                  max_new_tokens: int = 6, batch_size: int | None = None, progress: bool = True) -> HeadFeatures:
    """Every head's output on every sub-question, averaged over the chosen answer tokens."""
    if answer not in ANSWER_MODES:
        raise MechkitError(f"answer must be one of {ANSWER_MODES}, got {answer!r}")
    subquestions = list(subquestions)
    if not subquestions:
        raise MechkitError("no sub-questions given")
    cfg = model.cfg
    answers = answer_texts(model, subquestions, answer, max_new_tokens=max_new_tokens, progress=progress)
    dropped = {i: "the model's greedy answer is empty" for i, a in enumerate(answers) if answer == "greedy" and not a}
    kept = [i for i in range(len(subquestions)) if i not in dropped]
    if not kept:
        raise MechkitError("every greedy answer was empty: use answer='gold' or answer='last_prompt'")
    prompts = []
    for i in kept:
        text = subquestions[i].prompt
        if answer == "last_prompt":
            prompts.append(Prompt(text))
        else:
            full = f"{text} {answers[i]}"
            prompts.append(Prompt(full, spans={"answer": (len(text) + 1, len(full))}))
    positions = [Position("-1", None, "start", -1)] if answer == "last_prompt" else \
        [Position(f"answer+{k}", "answer", "start", k) for k in range(MAX_ANSWER_TOKENS)]
    hooks = [f"blocks.{l}.attn.hook_z" for l in range(cfg.n_layers)]
    residual_layers = {"middle": cfg.n_layers // 2, "last": cfg.n_layers - 1}
    residual_hooks = {name: f"blocks.{l}.hook_resid_post" for name, l in residual_layers.items()}
    acts = collect_activations(model, prompts, hooks + list(residual_hooks.values()), positions, batch_size=batch_size, on_missing="nan",
                               progress=progress)
    for j in set(range(len(kept))) - set(acts.examples):
        dropped[kept[j]] = "its answer covers no token"
    kept = [kept[j] for j in acts.examples]
    tokens = acts.token_ids
    texts = [[model.tokenizer.decode([int(t)]) if t >= 0 else "" for t in row] for row in tokens.tolist()]
    present = tokens >= 0
    content = present & torch.tensor([[is_content(t) for t in row] for row in texts])
    use = torch.where(content.any(1, keepdim=True), content, present).float()  # all answer tokens if no content one
    weights = use / use.sum(1, keepdim=True)
    per_layer = []
    for hook in hooks:
        z = torch.nan_to_num(acts[hook].float())  # (example, position, head, d_head)
        pooled = torch.einsum("epnd,ep->end", z, weights)
        if layer_mean:
            pooled = torch.cat([pooled, pooled.mean(1, keepdim=True).expand_as(pooled)], dim=-1)
        per_layer.append(pooled)
    features = torch.cat(per_layer, dim=1)  # (example, layer * head, feature)
    residual = {f"{name} (layer {residual_layers[name]})": torch.einsum("epd,ep->ed", torch.nan_to_num(acts[hook].float()),
                                                                       weights)
                for name, hook in residual_hooks.items()}
    labels = np.array([FUNCTIONS.index(subquestions[i].function) for i in kept])
    info = model_info(model)
    return HeadFeatures(features, labels, [subquestions[i] for i in kept], [answers[i] for i in kept], cfg.n_layers,
                        cfg.n_heads, answer, layer_mean, info.name, info.weights_hash(model), dropped, residual)


__all__ = ["ANSWER_MODES", "MAX_ANSWER_TOKENS", "STOP_WORDS", "HeadFeatures", "answer_texts", "head_features",
           "is_content"]
