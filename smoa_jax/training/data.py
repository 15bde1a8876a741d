"""Training data: JSONL reading with line-precise errors, tokenization, packing, batches.

A JSONL file has one JSON object per line, all of ONE kind (detected from the first record):

* ``{"text": ...}``: plain text; causal LM on every token. Classification adds
  ``"label": <int in 0..n-1>``.
* ``{"prompt": ..., "completion": ...}``: an instruction pair; loss on the completion only, with
  EOS appended to it.
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation rendered with the
  tokenizer's chat template; loss on the assistant turns only. Roles are ``system``, ``user``
  and ``assistant`` (nothing else, whatever a template might accept); every ``content`` is a
  non-empty string and a training conversation has at least one assistant turn.

Blank lines are skipped; extra fields of a record are ignored. Every problem (including a file
that mixes kinds) is a :class:`~smoa_jax.errors.DataError` naming the file and line. How the
instruction kinds become tokens (chat templates, the answer mask, truncation that keeps the
answer) is :mod:`smoa_jax.training.instruct`.

Token arrays (:class:`Tokenized`), all ``(N, T)`` int32 and right-padded: ``input_ids``,
``attention_mask`` (1 = token), and for instruction data ``loss_mask`` (1 = token ``t`` is a loss
target, predicted from position ``t - 1``). :func:`pack` puts several examples into each row and
adds ``segment_ids`` (1, 2, ... per example, 0 for padding) and ``position_ids`` (restarting at
0 per example); :class:`~smoa_jax.training.tasks.CausalLMTask` feeds them to the model, so
attention never crosses examples and the loss equals the unpacked loss.

Batches are drawn without replacement from a permutation of the rows seeded by ``(seed, epoch)``,
so a position ``(epoch, batch index)`` identifies the rest of the stream: that is what a
checkpoint stores to resume exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from smoa_jax.errors import DataError
from smoa_jax.training import instruct

__all__ = ["Records", "read_jsonl", "from_rows", "Tokenized", "tokenize", "pack", "digest",
           "batch_at", "batches_per_epoch", "KINDS", "ROLES"]

TASKS = ("causal-lm", "classification")
# Record kind -> the fields that mark it.
KINDS: dict[str, tuple[str, ...]] = {"text": ("text",),
                                     "prompt-completion": ("prompt", "completion"),
                                     "messages": ("messages",)}
ROLES = ("system", "user", "assistant")
_EXAMPLE = {"text": '{"text": ...}', "prompt-completion": '{"prompt": ..., "completion": ...}',
            "messages": '{"messages": [{"role": ..., "content": ...}, ...]}'}


@dataclasses.dataclass(frozen=True)
class Records:
  """Examples of one kind read from a JSONL file (or built in memory with :func:`from_rows`).

  Attributes:
    texts: the ``"text"`` kind's texts (empty for the other kinds).
    labels, num_labels: classification labels ``(N,)`` int32 and the class count, else None.
    source: where the examples came from (the file path), used in error messages.
    kind: ``"text"``, ``"prompt-completion"`` or ``"messages"`` (see :data:`KINDS`).
    pairs: ``(prompt, completion)`` per example of the ``"prompt-completion"`` kind.
    conversations: the ``messages`` list per example of the ``"messages"`` kind.
    lines: the line of each example in ``source`` (empty: example numbers are used instead).
  """

  texts: list[str]
  labels: np.ndarray | None
  num_labels: int | None
  source: str
  kind: str = "text"
  pairs: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  conversations: list[list[dict[str, str]]] = dataclasses.field(default_factory=list)
  lines: list[int] = dataclasses.field(default_factory=list)

  def __len__(self) -> int:
    return len({"text": self.texts, "prompt-completion": self.pairs,
                "messages": self.conversations}[self.kind])

  def where(self, index: int) -> str:
    """``file:line`` of example ``index`` (``source example N`` for in-memory records)."""
    return _where(self.source, self.lines, index)


def _where(source: str, lines: Sequence[int], index: int) -> str:
  return f"{source}:{lines[index]}" if lines else f"{source} example {index + 1}"


def read_jsonl(path: str | os.PathLike, task: str, *, num_labels: int | None = None) -> Records:
  """Read and validate a JSONL file for ``task`` (``"causal-lm"`` or ``"classification"``).

  For classification, ``num_labels`` defaults to ``max(label) + 1``; labels must lie in
  ``0..num_labels-1``. See the module docstring for the record kinds.

  Raises:
    DataError: missing/empty file, a line that is not UTF-8 or not a JSON object of a known
      kind, a file mixing kinds, a bad field (see :func:`from_rows`); the message starts with
      ``file:line:``.
  """
  if task not in TASKS:
    raise DataError(f"task={task!r} is invalid: expected one of {TASKS}.")
  path = Path(path)
  if not path.is_file():
    raise DataError(f"data file {str(path)!r} does not exist.")
  rows: list[tuple[int, Any]] = []
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
        rows.append((lineno, json.loads(line)))
      except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno}).") from None
  return _records([row for _, row in rows], task, str(path), num_labels,
                  [lineno for lineno, _ in rows])


def from_rows(rows: Iterable[Mapping[str, Any]], task: str = "causal-lm", *,
              source: str = "<memory>", num_labels: int | None = None) -> Records:
  """Validate in-memory records (dicts of one kind, as the JSONL lines) like :func:`read_jsonl`.

  Errors name ``source example N`` (1-based) instead of a line.
  """
  if task not in TASKS:
    raise DataError(f"task={task!r} is invalid: expected one of {TASKS}.")
  return _records(list(rows), task, source, num_labels, [])


def _records(rows: list[Any], task: str, source: str, num_labels: int | None,
             lines: list[int]) -> Records:
  if not rows:
    raise DataError(f"{source} holds no examples (it is empty or has only blank lines).")
  kind, first = None, 0
  texts, labels, pairs, conversations = [], [], [], []
  for i, record in enumerate(rows):
    where = _where(source, lines, i)
    this = _kind_of(record, where)
    if kind is None:
      kind, first = this, i
      if task == "classification" and kind != "text":
        raise DataError(f"{where}: classification data needs {{\"text\": ..., \"label\": ...}} "
                        f"records, got a {kind} record.")
    elif this != kind:
      raise DataError(f"{where}: a {this} record in a file of {kind} records (the first is at "
                      f"{_where(source, lines, first)}); one file holds one kind of record: "
                      "split it.")
    if kind == "text":
      texts.append(record["text"])
      if task == "classification":
        labels.append(_label(record.get("label"), num_labels, where))
    elif kind == "prompt-completion":
      pairs.append((_content(record, "prompt", where), _content(record, "completion", where)))
    else:
      conversations.append(_conversation(record["messages"], where))
  if task == "classification":
    found = max(labels) + 1
    n = num_labels if num_labels is not None else found
    if n < 2:
      raise DataError(f"{source}: classification needs at least 2 classes, found labels "
                      f"{sorted(set(labels))}.")
    return Records(texts, np.asarray(labels, np.int32), n, source, lines=lines)
  return Records(texts, None, None, source, kind, pairs, conversations, lines)


def _kind_of(record: Any, where: str) -> str:
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object like {{\"text\": ...}}, got "
                    f"{type(record).__name__}.")
  kinds = [kind for kind, fields in KINDS.items() if any(f in record for f in fields)]
  if len(kinds) > 1:
    raise DataError(f"{where}: the record has the fields of {' and '.join(kinds)} records; a "
                    f"record is one of {', '.join(_EXAMPLE.values())}.")
  if not kinds or (kinds == ["text"] and not isinstance(record["text"], str)):
    raise DataError(f"{where}: missing or non-string \"text\" field; a record is one of "
                    f"{', '.join(_EXAMPLE.values())}.")
  return kinds[0]


def _label(label: Any, num_labels: int | None, where: str) -> int:
  if isinstance(label, bool) or not isinstance(label, int):
    raise DataError(f"{where}: classification data needs an integer \"label\", got {label!r}.")
  if label < 0 or (num_labels is not None and label >= num_labels):
    raise DataError(f"{where}: label {label} is out of range; labels must be in "
                    f"0..{(num_labels or 1) - 1}.")
  return label


def _content(record: Mapping[str, Any], field: str, where: str) -> str:
  value = record.get(field)
  if not isinstance(value, str) or not value.strip():
    raise DataError(f"{where}: \"{field}\" must be a non-empty string, got {value!r}.")
  return value


def _conversation(messages: Any, where: str) -> list[dict[str, str]]:
  if not isinstance(messages, list) or not messages:
    raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\": ..., "
                    f"\"content\": ...}} objects, got {messages!r:.80}.")
  out = []
  for j, message in enumerate(messages, start=1):
    if not isinstance(message, dict) or set(message) != {"role", "content"}:
      raise DataError(f"{where}: message {j} must be an object with exactly the fields \"role\" "
                      f"and \"content\", got {message!r:.80}.")
    role = message["role"]
    if role not in ROLES:
      raise DataError(f"{where}: message {j} has the unknown role {role!r}; roles are "
                      f"{', '.join(ROLES)}.")
    out.append({"role": role, "content": _content(message, "content", f"{where}: message {j}")})
  if not any(m["role"] == "assistant" for m in out):
    raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn or "
                    "score (the loss is on assistant turns only); add one or drop the record.")
  return out


@dataclasses.dataclass(frozen=True)
class Tokenized:
  """Padded token arrays ``(N, seq_len)`` int32 (see the module docstring; + ``labels (N,)``).

  Attributes:
    arrays: ``input_ids``, ``attention_mask``, and ``loss_mask`` (instruction data, packed
      data), ``segment_ids`` and ``position_ids`` (packed data), ``labels`` (classification).
    num_truncated: examples cut to fit (text: its end; instruction data: its prompt's start).
    num_skipped: instruction examples left out because their answer does not fit.
    num_examples: examples held (rows hold one each unless packed).
  """

  arrays: dict[str, np.ndarray]
  num_truncated: int
  num_skipped: int = 0
  num_examples: int = 0

  def __len__(self) -> int:
    return len(self.arrays["input_ids"])


def tokenize(records: Records, tokenizer: Any, seq_len: int, *, add_eos: bool = False,
             train_on_prompt: bool = False, packing: bool = False) -> Tokenized:
  """Tokenize with a Hugging Face tokenizer into right-padded ``(N, seq_len)`` arrays.

  Text is truncated at its end (counted); ``add_eos`` appends EOS first. Instruction data
  (:mod:`smoa_jax.training.instruct`) carries a ``loss_mask`` on the completion / assistant
  tokens (every token with ``train_on_prompt``); a too-long prompt loses its start, and an
  example whose answer does not fit is skipped (counted; all skipped is an error). ``packing``
  then fills each row with several examples (:func:`pack`). Padding uses the tokenizer's pad
  token (or 0 when it has none); padded positions never enter a loss.
  """
  if not isinstance(seq_len, int) or seq_len < 2:
    raise DataError(f"seq_len={seq_len!r} is invalid: expected an int >= 2.")
  if packing and records.labels is not None:
    raise DataError(f"{records.source}: packing is for causal-LM data, not classification.")
  pad = getattr(tokenizer, "pad_token_id", None)
  pad = 0 if pad is None else pad
  if records.kind == "text":
    encoded = tokenizer(list(records.texts), add_special_tokens=True)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    rows = [list(seq) + ([eos] if add_eos and eos is not None else []) for seq in encoded]
    truncated = sum(len(seq) > seq_len for seq in rows)
    ids, mask = _pad([seq[:seq_len] for seq in rows], seq_len, pad)
    arrays = {"input_ids": ids, "attention_mask": mask}
    if records.labels is not None:
      arrays["labels"] = records.labels
    tokens = Tokenized(arrays, truncated, 0, len(rows))
  else:
    encoded = instruct.encode(records, tokenizer)
    fitted = [f for ids, answer in encoded if (f := instruct.fit(ids, answer, seq_len))]
    if not fitted:
      raise DataError(
          f"{records.source}: all {len(encoded)} examples were skipped: no answer (a completion "
          "with its EOS, or a last assistant turn) fits in seq_len={seq_len} tokens with a token "
          "of context before it. Raise the sequence length (--seq-len) or shorten the answers.")
    ids, mask = _pad([ids for ids, _, _ in fitted], seq_len, pad)
    answers = mask if train_on_prompt else _pad([a for _, a, _ in fitted], seq_len, 0)[0]
    tokens = Tokenized({"input_ids": ids, "attention_mask": mask, "loss_mask": answers},
                       sum(cut for _, _, cut in fitted), len(encoded) - len(fitted), len(fitted))
  return pack(tokens, pad_id=pad) if packing else tokens


def _pad(rows: Sequence[Sequence[int]], seq_len: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  """``(input_ids, attention_mask)`` ``(N, seq_len)`` int32 of right-padded rows."""
  ids = np.full((len(rows), seq_len), pad, np.int32)
  mask = np.zeros((len(rows), seq_len), np.int32)
  for i, seq in enumerate(rows):
    ids[i, :len(seq)] = seq
    mask[i, :len(seq)] = 1
  return ids, mask


def pack(tokens: Tokenized, *, pad_id: int = 0) -> Tokenized:
  """Several examples per row: greedy first-fit in data order (deterministic).

  Each example (a row of ``tokens``, its real tokens being ``attention_mask == 1``, contiguous
  from the left) goes into the first row with room left, else into a new row. Adds
  ``segment_ids (N', T)`` (1, 2, ... in each row, 0 for padding) and ``position_ids (N', T)``
  (0.. within each example); ``loss_mask`` is kept (text: every token). The model masks
  attention across segments and the task drops targets across them, so the mean loss over
  the packed rows equals the unpacked one.
  """
  arrays = tokens.arrays
  if "labels" in arrays:
    raise DataError("packing is for causal-LM data; classification examples keep a row each.")
  ids, mask = arrays["input_ids"], arrays["attention_mask"]
  loss = arrays.get("loss_mask", mask)
  seq_len = ids.shape[1]
  lengths = mask.sum(axis=1)
  free = np.empty(len(ids), np.int64)  # room left in each open row
  placed = np.empty((len(ids), 2), np.int64)  # example -> (row, offset)
  rows = 0
  for i, length in enumerate(lengths):
    fits = free[:rows] >= length
    row = int(np.argmax(fits)) if rows and fits.any() else rows
    if row == rows:
      free[row], rows = seq_len, rows + 1
    placed[i] = row, seq_len - free[row]
    free[row] -= length
  out = {"input_ids": np.full((rows, seq_len), pad_id, np.int32),
         **{k: np.zeros((rows, seq_len), np.int32)
            for k in ("attention_mask", "loss_mask", "segment_ids", "position_ids")}}
  segments = np.zeros(rows, np.int32)
  for i, ((row, start), length) in enumerate(zip(placed, lengths)):
    span = slice(start, start + length)
    segments[row] += 1
    out["input_ids"][row, span] = ids[i, :length]
    out["attention_mask"][row, span] = 1
    out["loss_mask"][row, span] = loss[i, :length]
    out["segment_ids"][row, span] = segments[row]
    out["position_ids"][row, span] = np.arange(length)
  return dataclasses.replace(tokens, arrays=out)


def digest(*datasets: Mapping[str, np.ndarray] | None) -> str:
  """sha256 (hex) of datasets' arrays: names, dtypes, shapes and bytes (None counts as empty)."""
  hasher = hashlib.sha256()
  for arrays in datasets:
    hasher.update(b"|dataset|")
    for name in sorted(arrays or {}):
      value = np.ascontiguousarray(arrays[name])
      hasher.update(f"{name}:{value.dtype.str}:{value.shape}".encode())
      hasher.update(value.data)
  return hasher.hexdigest()


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
