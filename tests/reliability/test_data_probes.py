"""Probes: training data that is empty, malformed, mislabelled or not UTF-8."""

import pytest

from smoa_jax.errors import DataError
from smoa_jax.training import data
from tests.reliability import probe, probe_cases
from tests.support.files import write_bytes

SITUATIONS = {
    'empty': 'an empty JSONL file',
    'blank': 'a file of blank lines only',
    'bad_json': 'a line that is not JSON',
    'not_object': 'a line holding a list, not an object',
    'no_text': 'a record without "text"',
    'text_not_string': 'a "text" that is a number',
    'non_utf8': 'a line with non-UTF-8 bytes',
    'no_label': 'classification data without "label"',
    'label_string': 'a "label" that is a string',
    'label_negative': 'a negative label',
    'one_class': 'classification data with a single class',
}


@probe_cases("data", {case: (situation, "DataError naming the file (and the line at fault: `path:line: ...`)")
                      for case, situation in SITUATIONS.items()})
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
], ids=list(SITUATIONS))
def test_bad_files_name_file_and_line(tmp_path, content, task, match):
  with pytest.raises(DataError, match=match):
    data.read_jsonl(write_bytes(tmp_path, content), task)


@probe("data", "labels beyond --num-labels; a data file that does not exist; an unknown task",
       "DataError with file:line and the valid label range / 'does not exist' / the valid tasks")
def test_labels_beyond_num_labels_and_missing_file(tmp_path):
  path = write_bytes(tmp_path, b'{"text": "a", "label": 0}\n{"text": "b", "label": 2}\n')
  with pytest.raises(DataError, match=r":2: label 2 is out of range; labels must be in 0\.\.1"):
    data.read_jsonl(path, "classification", num_labels=2)
  with pytest.raises(DataError, match="does not exist"):
    data.read_jsonl(tmp_path / "missing.jsonl", "causal-lm")
  with pytest.raises(DataError, match="task="):
    data.read_jsonl(path, "translation")
