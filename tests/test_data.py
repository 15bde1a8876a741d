"""Tests for smoa_jax/data.py: JSONL validation with file:line errors, tokenization, batches."""

import numpy as np
import pytest

from smoa_jax import data
from smoa_jax.errors import DataError


def _write(tmp_path, content: bytes, name="d.jsonl"):
  path = tmp_path / name
  path.write_bytes(content)
  return path


def test_reads_texts_and_labels(tmp_path):
  path = _write(tmp_path, b'{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n')
  records = data.read_jsonl(path, "classification")
  assert records.texts == ["a", "b"] and records.labels.tolist() == [1, 0] and records.num_labels == 2
  assert data.read_jsonl(path, "causal-lm").labels is None


@pytest.mark.parametrize("content,task,match", [
    (b"", "causal-lm", "no examples"),
    (b"\n  \n", "causal-lm", "no examples"),
    (b'{"text": "ok"}\n{"text": broken}\n', "causal-lm", r"d\.jsonl:2: not valid JSON"),
    (b'{"text": "ok"}\n["text"]\n', "causal-lm", r":2: expected a JSON object"),
    (b'{"txt": "ok"}\n', "causal-lm", r":1: missing or non-string \"text\""),
    (b'{"text": 3}\n', "causal-lm", r":1: missing or non-string"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "causal-lm", r":2: not valid UTF-8"),
    (b'{"text": "a"}\n', "classification", r":1: classification data needs an integer \"label\""),
    (b'{"text": "a", "label": "1"}\n', "classification", "integer"),
    (b'{"text": "a", "label": -1}\n', "classification", "out of range"),
    (b'{"text": "a", "label": 0}\n{"text": "b", "label": 0}\n', "classification", "at least 2 classes"),
])
def test_bad_files_name_file_and_line(tmp_path, content, task, match):
  with pytest.raises(DataError, match=match):
    data.read_jsonl(_write(tmp_path, content), task)


def test_labels_beyond_num_labels_and_missing_file(tmp_path):
  path = _write(tmp_path, b'{"text": "a", "label": 0}\n{"text": "b", "label": 2}\n')
  with pytest.raises(DataError, match=r":2: label 2 is out of range; labels must be in 0\.\.1"):
    data.read_jsonl(path, "classification", num_labels=2)
  with pytest.raises(DataError, match="does not exist"):
    data.read_jsonl(tmp_path / "missing.jsonl", "causal-lm")
  with pytest.raises(DataError, match="task="):
    data.read_jsonl(path, "translation")


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
