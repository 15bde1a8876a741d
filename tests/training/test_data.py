"""Tests for smoa_jax/training/data.py: JSONL validation with file:line errors, tokenization, batches."""

import numpy as np
import pytest

from smoa_jax.errors import DataError
from smoa_jax.training import data
from tests.support.files import write_bytes


def test_reads_texts_and_labels(tmp_path):
  path = write_bytes(tmp_path, b'{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n')
  records = data.read_jsonl(path, "classification")
  assert records.texts == ["a", "b"] and records.labels.tolist() == [1, 0] and records.num_labels == 2
  assert data.read_jsonl(path, "causal-lm").labels is None


class _CharTokenizer:
  """Each character is a token; pad id 0, eos id 1."""

  pad_token_id = 0
  eos_token_id = 1

  def __call__(self, texts, add_special_tokens=True):
    return {"input_ids": [[2 + (ord(c) % 50) for c in t] for t in texts]}


def test_tokenize_truncates_counts_and_pads():
  records = data.Records(["abc", "abcdefgh", ""], None, None, "mem")
  tok = data.tokenize(records, _CharTokenizer(), 5)
  assert tok.num_truncated == 1 and len(tok) == 3
  assert tok.arrays["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [0] * 5]
  assert tok.arrays["input_ids"][0, 3:].tolist() == [0, 0]
  with_eos = data.tokenize(records, _CharTokenizer(), 5, add_eos=True)
  assert with_eos.arrays["input_ids"][0, 3] == 1
  with pytest.raises(DataError, match="seq_len"):
    data.tokenize(records, _CharTokenizer(), 1)


def test_batches_are_a_pure_function_of_position():
  arrays = {"x": np.arange(20)}
  epoch0 = [data.batch_at(arrays, 4, seed=7, epoch=0, index=i)["x"] for i in range(5)]
  assert sorted(np.concatenate(epoch0).tolist()) == list(range(20))  # without replacement
  np.testing.assert_array_equal(data.batch_at(arrays, 4, 7, 0, 3)["x"], epoch0[3])
  assert not np.array_equal(data.batch_at(arrays, 4, 7, 1, 0)["x"], epoch0[0])
  stream = data.iterate(arrays, 4, 7, start_epoch=0, start_index=4)
  assert [next(stream)[:2] for _ in range(3)] == [(0, 4), (1, 0), (1, 1)]
  with pytest.raises(DataError, match="cannot fill one batch"):
    data.batches_per_epoch(3, 4)


def test_eval_batches_cover_everything_once_with_weights():
  batches = data.eval_batches({"x": np.arange(10)}, 4)
  assert [b["example_weight"].sum() for b in batches] == [4, 4, 2]
  seen = np.concatenate([b["x"][b["example_weight"] > 0] for b in batches])
  assert seen.tolist() == list(range(10))
