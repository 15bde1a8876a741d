"""Training data: JSONL reading with line-precise errors, tokenization, deterministic batches.

A JSONL file has one JSON object per line: ``{"text": ...}`` for causal-LM data and
``{"text": ..., "label": <int in 0..n-1>}`` for classification. Blank lines are skipped. Every
problem is a :class:`~smoa_jax.errors.DataError` naming the file and line.

Batches are drawn without replacement from a permutation of the examples seeded by
``(seed, epoch)``, so a position ``(epoch, batch index)`` identifies the rest of the stream: that
is what a checkpoint stores to resume exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from smoa_jax.errors import DataError

__all__ = ["Records", "read_jsonl", "Tokenized", "tokenize", "batch_at", "batches_per_epoch"]

TASKS = ("causal-lm", "classification")


@dataclasses.dataclass(frozen=True)
class Records:
  """Texts (and integer labels for classification) read from a JSONL file."""

  texts: list[str]
  labels: np.ndarray | None
  num_labels: int | None
  source: str


def read_jsonl(path: str | os.PathLike, task: str, *, num_labels: int | None = None) -> Records:
  """Read and validate a JSONL file for ``task`` (``"causal-lm"`` or ``"classification"``).

  For classification, ``num_labels`` defaults to ``max(label) + 1``; labels must lie in
  ``0..num_labels-1``.

  Raises:
    DataError: missing/empty file, a line that is not UTF-8 or not a JSON object with a string
      ``"text"``, a missing or out-of-range ``"label"`` (message: ``file:line: what is wrong``).
  """
  if task not in TASKS:
    raise DataError(f"task={task!r} is invalid: expected one of {TASKS}.")
  path = Path(path)
  if not path.is_file():
    raise DataError(f"data file {str(path)!r} does not exist.")
  texts: list[str] = []
  labels: list[int] = []
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as err:
        raise DataError(f"{where}: not valid UTF-8 (byte {raw[err.start:err.start + 1]!r} at column "
                        f"{err.start + 1}); re-encode the file as UTF-8.") from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno}).") from None
      if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object like {{\"text\": ...}}, got "
                        f"{type(record).__name__}.")
      text = record.get("text")
      if not isinstance(text, str):
        raise DataError(f"{where}: missing or non-string \"text\" field.")
      if task == "classification":
        label = record.get("label")
        if isinstance(label, bool) or not isinstance(label, int):
          raise DataError(f"{where}: classification data needs an integer \"label\", got {label!r}.")
        if label < 0 or (num_labels is not None and label >= num_labels):
          raise DataError(f"{where}: label {label} is out of range; labels must be in "
                          f"0..{(num_labels or 1) - 1}.")
        labels.append(label)
      texts.append(text)
  if not texts:
    raise DataError(f"{path} holds no examples (it is empty or has only blank lines).")
  if task == "classification":
    found = max(labels) + 1
    n = num_labels if num_labels is not None else found
    if n < 2:
      raise DataError(f"{path}: classification needs at least 2 classes, found labels {sorted(set(labels))}.")
    return Records(texts, np.asarray(labels, np.int32), n, str(path))
  return Records(texts, None, None, str(path))


@dataclasses.dataclass(frozen=True)
class Tokenized:
  """Padded token arrays: ``input_ids``/``attention_mask`` ``(N, seq_len)`` int32 (+ ``labels (N,)``)."""

  arrays: dict[str, np.ndarray]
  num_truncated: int

  def __len__(self) -> int:
    return len(self.arrays["input_ids"])


def tokenize(records: Records, tokenizer: Any, seq_len: int, *, add_eos: bool = False) -> Tokenized:
  """Tokenize with a Hugging Face tokenizer; truncate to ``seq_len`` (counted) and right-pad.

  Padding uses the tokenizer's pad token (or 0 when it has none); padded positions have
  ``attention_mask == 0`` and never enter a loss.
  """
  if not isinstance(seq_len, int) or seq_len < 2:
    raise DataError(f"seq_len={seq_len!r} is invalid: expected an int >= 2.")
  encoded = tokenizer(list(records.texts), add_special_tokens=True)["input_ids"]
  eos = getattr(tokenizer, "eos_token_id", None)
  pad = getattr(tokenizer, "pad_token_id", None)
  pad = 0 if pad is None else pad
  ids = np.full((len(encoded), seq_len), pad, np.int32)
  mask = np.zeros((len(encoded), seq_len), np.int32)
  truncated = 0
  for i, seq in enumerate(encoded):
    seq = list(seq) + ([eos] if add_eos and eos is not None else [])
    if len(seq) > seq_len:
      truncated += 1
      seq = seq[:seq_len]
    ids[i, :len(seq)] = seq
    mask[i, :len(seq)] = 1
  arrays = {"input_ids": ids, "attention_mask": mask}
  if records.labels is not None:
    arrays["labels"] = records.labels
  return Tokenized(arrays, truncated)


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the last partial batch is dropped so every step has one shape)."""
  if num_examples < batch_size:
    raise DataError(f"{num_examples} examples cannot fill one batch of {batch_size}; lower the "
                    "batch size or add data.")
  return num_examples // batch_size


def batch_at(arrays: dict[str, np.ndarray], batch_size: int, seed: int, epoch: int,
             index: int) -> dict[str, np.ndarray]:
  """Batch number ``index`` of ``epoch``: a pure function of its arguments (resumable)."""
  n = len(next(iter(arrays.values())))
  order = np.random.default_rng([seed, epoch]).permutation(n)
  rows = order[index * batch_size:(index + 1) * batch_size]
  return {k: v[rows] for k, v in arrays.items()}


def iterate(arrays: dict[str, np.ndarray], batch_size: int, seed: int, *, start_epoch: int = 0,
            start_index: int = 0) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
  """Endless ``(epoch, index, batch)`` stream from a position (see :func:`batch_at`)."""
  per_epoch = batches_per_epoch(len(next(iter(arrays.values()))), batch_size)
  epoch, index = start_epoch, start_index
  while True:
    if index >= per_epoch:
      epoch, index = epoch + 1, 0
    yield epoch, index, batch_at(arrays, batch_size, seed, epoch, index)
    index += 1


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int) -> Sequence[dict[str, np.ndarray]]:
  """All examples in order, in batches of ``batch_size``; the last is padded with weight-0 rows."""
  n = len(next(iter(arrays.values())))
  out = []
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size)
    valid = rows < n
    rows = np.where(valid, rows, 0)
    batch = {k: v[rows] for k, v in arrays.items()}
    batch["example_weight"] = valid.astype(np.float32)
    out.append(batch)
  return out
