"""Fixed splits of the real text assets, shared by the demo, the benchmarks and ``fetch-assets --jsonl``.

* Sentiment (movie-review sentences, label = mean human rating > 0): one seeded permutation cut
  into ``validation``, ``test`` and ``train``; :func:`sentiment_chat` poses them as a chat task
  (``"Is this review positive or negative?"`` -> ``"positive"`` / ``"negative"``),
  :func:`answer_sentiment` asks a chat model that question and reads its label from the answer.
* Shakespeare (42 plays): passages of consecutive non-empty lines; whole plays are held out, so
  ``test`` and ``validation`` text is never seen in training.

Writing the splits as JSONL gives the command line the same data the demo and the benchmarks use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from smoa_jax.errors import DataError
from smoa_jax.io.files import atomic_directory

__all__ = ["split_sentiment", "sentiment_chat", "shakespeare_passages", "split_shakespeare",
           "write_jsonl_splits", "TEST_PLAYS", "VALIDATION_PLAYS", "SENTIMENT_QUESTION",
           "SENTIMENT_ANSWERS", "sentiment_prompt", "sentiment_label", "answer_sentiment"]

TEST_PLAYS = ("hamlet", "macbeth")
VALIDATION_PLAYS = ("tempest",)
SENTIMENT_QUESTION = "Is this review positive or negative?"
SENTIMENT_ANSWERS = ("negative", "positive")  # label 0, label 1


def split_sentiment(examples: Sequence[tuple[str, int]], *, seed: int = 0, val_size: int = 500,
                    test_size: int = 1000, train_size: int | None = None
                    ) -> dict[str, tuple[list[str], np.ndarray]]:
  """``{"train", "validation", "test"}`` -> ``(texts, labels int32)`` from one seeded permutation.

  ``validation`` is the first ``val_size`` sentences of the permutation, ``test`` the next
  ``test_size``, ``train`` the rest (or the next ``train_size``).
  """
  order = np.random.default_rng(seed).permutation(len(examples))
  start = val_size + test_size
  bounds = {"validation": (0, val_size), "test": (val_size, start),
            "train": (start, len(examples) if train_size is None else start + train_size)}
  if bounds["train"][1] > len(examples) or bounds["train"][0] >= bounds["train"][1]:
    raise DataError(f"a split of {val_size} validation + {test_size} test + "
                    f"{train_size or 'the rest'} train sentences needs more than the "
                    f"{len(examples)} available.")
  return {name: ([examples[i][0] for i in order[lo:hi]],
                 np.asarray([examples[i][1] for i in order[lo:hi]], np.int32))
          for name, (lo, hi) in bounds.items()}


def sentiment_prompt(text: str) -> str:
  """The user turn of the chat task: :data:`SENTIMENT_QUESTION`, a blank line, the review."""
  return f"{SENTIMENT_QUESTION}\n\n{text}"


def sentiment_chat(texts: Sequence[str], labels: Sequence[int]) -> list[dict]:
  """The sentiment sentences as a chat task: ``{"messages": [user: SENTIMENT_QUESTION + the
  review, assistant: "positive" | "negative"]}`` records (:mod:`smoa_jax.training.data`)."""
  return [{"messages": [{"role": "user", "content": sentiment_prompt(text)},
                        {"role": "assistant", "content": SENTIMENT_ANSWERS[int(label)]}]}
          for text, label in zip(texts, labels)]


def sentiment_label(answer: str) -> int | None:
  """The label a chat answer gives: the index in :data:`SENTIMENT_ANSWERS` of the first word of
  the normalised answer (:func:`smoa_jax.inference.normalize_answer`), else None (``"Positive."``
  -> 1, ``"The review is positive"`` -> None)."""
  from smoa_jax.inference import normalize_answer

  words = normalize_answer(answer).split(" ", 1)
  first = normalize_answer(words[0])  # "positive," -> "positive"
  return SENTIMENT_ANSWERS.index(first) if first in SENTIMENT_ANSWERS else None


def answer_sentiment(model: Any, tokenizer: Any, texts: Sequence[str], *, max_new_tokens: int = 8,
                     batch_size: int | None = None) -> tuple[list[str], list[int | None]]:
  """Ask a chat model :data:`SENTIMENT_QUESTION` about every review (greedy, one user turn with
  the chat template); returns the answers and the labels read from them (:func:`sentiment_label`,
  None for an answer that does not start with a label)."""
  from smoa_jax.inference import SamplingConfig
  from smoa_jax.inference.text import generate_text

  answers = generate_text(model, tokenizer, [sentiment_prompt(t) for t in texts],
                          SamplingConfig(max_new_tokens=max_new_tokens), chat=True,
                          batch_size=batch_size)
  return answers, [sentiment_label(a) for a in answers]


def shakespeare_passages(text: str, *, lines_per_passage: int = 8) -> list[str]:
  """Consecutive non-empty lines of a play, ``lines_per_passage`` at a time (newline-joined)."""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return ["\n".join(lines[i:i + lines_per_passage])
          for i in range(0, len(lines) - lines_per_passage + 1, lines_per_passage)]


def split_shakespeare(plays: Mapping[str, str], *, test_plays: Sequence[str] = TEST_PLAYS,
                      validation_plays: Sequence[str] = VALIDATION_PLAYS,
                      lines_per_passage: int = 8) -> dict[str, list[str]]:
  """Passages by split; ``test`` / ``validation`` are whole held-out plays, ``train`` the others."""
  missing = sorted((set(test_plays) | set(validation_plays)) - set(plays))
  if missing:
    raise DataError(f"plays {missing} are not in the corpus; available: {sorted(plays)}.")
  splits: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
  for name in sorted(plays):
    split = "test" if name in test_plays else "validation" if name in validation_plays else "train"
    splits[split].extend(shakespeare_passages(plays[name], lines_per_passage=lines_per_passage))
  return splits


def write_jsonl_splits(directory: str | os.PathLike, *, seed: int = 0) -> dict[str, Path]:
  """Write ``sentiment_{split}.jsonl`` and ``shakespeare_{split}.jsonl`` into ``directory``.

  Fetches the assets if needed. The directory is written atomically. Returns name -> path.
  """
  from smoa_jax.app import assets

  sentiment = split_sentiment(assets.load_sentiment(), seed=seed)
  shakespeare = split_shakespeare(assets.load_shakespeare())
  directory = Path(directory)
  with atomic_directory(directory) as staged:
    for split, (texts, labels) in sentiment.items():
      _write(staged / f"sentiment_{split}.jsonl",
             ({"text": t, "label": int(y)} for t, y in zip(texts, labels)))
    for split, passages in shakespeare.items():
      _write(staged / f"shakespeare_{split}.jsonl", ({"text": t} for t in passages))
  return {p.stem: p for p in sorted(directory.glob("*.jsonl"))}


def _write(path: Path, records) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
