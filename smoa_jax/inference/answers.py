"""Scoring generated answers of instruction data: exact match after normalisation.

Normalisation (:func:`normalize_answer`), applied to the generated answer and to the reference::

    Unicode NFKC  ->  lowercase  ->  collapse runs of whitespace to one space
                  ->  strip whitespace and punctuation (Unicode category P*) at both ends

so ``"  Positive."`` and ``"positive"`` match, and ``"very  good"`` matches ``"Very good!"``;
punctuation inside the answer is kept (``"3.5"`` differs from ``"35"``).

What is generated (:func:`answer_prompts`): for ``{"prompt", "completion"}`` records, the prompt
as plain text (tokenized with the tokenizer's special tokens, as training does), the reference
being the completion; for ``{"messages"}`` records, the conversation up to its LAST assistant turn,
rendered with the chat template and the generation prompt, the reference being that turn's
content. Decoding is greedy; every prompt gets at most :func:`default_max_new_tokens` new tokens
(the longest reference in tokens plus :data:`SLACK`, room for an end-of-turn token) unless told
otherwise, and stops at EOS.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from typing import Any, Sequence

from flax import nnx

from smoa_jax.errors import DataError

__all__ = ["normalize_answer", "exact_match_score", "answer_prompts", "default_max_new_tokens",
           "ExactMatch", "exact_match", "SLACK"]

SLACK = 4  # new tokens beyond the longest reference: its end-of-turn / EOS, and a little more


def normalize_answer(text: str) -> str:
  """``text`` normalised for exact match (see the module docstring)."""
  text = " ".join(unicodedata.normalize("NFKC", text).lower().split())
  start, end = 0, len(text)
  while start < end and _strippable(text[start]):
    start += 1
  while end > start and _strippable(text[end - 1]):
    end -= 1
  return text[start:end]


def _strippable(char: str) -> bool:
  return char.isspace() or unicodedata.category(char).startswith("P")


def exact_match_score(predictions: Sequence[str], references: Sequence[str]) -> float:
  """The fraction of ``predictions`` equal to their reference after :func:`normalize_answer`.

  Raises:
    DataError: no predictions, or not one reference per prediction.
  """
  if len(predictions) != len(references):
    raise DataError(f"exact match needs one reference per prediction, got {len(predictions)} "
                    f"predictions and {len(references)} references.")
  if not predictions:
    raise DataError("exact match of no predictions is undefined; give at least one example.")
  hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
  return hits / len(predictions)


def answer_prompts(records: Any) -> tuple[list[Any], list[str], bool]:
  """``(prompts, references, chat)`` of instruction records (:class:`smoa_jax.data.Records`):
  what :func:`smoa_jax.generate` answers, and the answers expected (module docstring).

  Raises:
    DataError: ``{"text"}`` records, which hold no reference answer.
  """
  if records.kind == "prompt-completion":
    return [p for p, _ in records.pairs], [c for _, c in records.pairs], False
  if records.kind == "messages":
    prompts, references = [], []
    for messages in records.conversations:
      last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
      prompts.append(messages[:last])
      references.append(messages[last]["content"])
    return prompts, references, True
  raise DataError(f"{records.source}: exact match needs {{\"prompt\", \"completion\"}} or "
                  f"{{\"messages\"}} records (a reference answer per example), but the file "
                  f"holds {{\"{records.kind}\"}} records; score text with the loss instead.")


def default_max_new_tokens(tokenizer: Any, references: Sequence[str]) -> int:
  """The longest reference in tokens (no special tokens) plus :data:`SLACK`."""
  lengths = tokenizer(list(references), add_special_tokens=False)["input_ids"]
  return max(len(ids) for ids in lengths) + SLACK


@dataclasses.dataclass(frozen=True)
class ExactMatch:
  """What :func:`exact_match` measured.

  Attributes:
    score: the fraction of examples answered exactly (after normalisation), in [0, 1].
    predictions: the generated answer of every example, in order (not normalised).
    references: the expected answer of every example.
    max_new_tokens: the generation limit used.
  """

  score: float
  predictions: list[str]
  references: list[str]
  max_new_tokens: int


def exact_match(model: nnx.Module, tokenizer: Any, records: Any, *,
                max_new_tokens: int | None = None, batch_size: int | None = None) -> ExactMatch:
  """Greedy answers of ``model`` to every example of instruction ``records``, scored by exact
  match against the reference answers (module docstring).

  Args:
    model: a causal LM of smoa-jax (with its adapter active, if any).
    tokenizer: its Hugging Face tokenizer (with a chat template for ``{"messages"}`` records).
    records: :class:`smoa_jax.data.Records` of kind ``"prompt-completion"`` or ``"messages"``.
    max_new_tokens: the generation limit (default: :func:`default_max_new_tokens`).
    batch_size: prompts generated together (default: all at once).

  Raises:
    DataError: text records, or a prompt longer than the context minus ``max_new_tokens``.
    ConfigError: a bad ``max_new_tokens``, or a model that cannot generate.
  """
  from smoa_jax.inference.sampling import SamplingConfig
  from smoa_jax.inference.text import generate_text

  prompts, references, chat = answer_prompts(records)
  limit = (default_max_new_tokens(tokenizer, references) if max_new_tokens is None
           else max_new_tokens)
  predictions = generate_text(model, tokenizer, prompts, SamplingConfig(max_new_tokens=limit),
                              chat=chat, batch_size=batch_size)
  return ExactMatch(exact_match_score(predictions, references), predictions, references, limit)
