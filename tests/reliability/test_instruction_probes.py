"""Probes: instruction data (prompt/completion, chat messages) that is malformed or does not fit."""

import pytest

from smoa_jax.errors import DataError
from smoa_jax.training import data
from tests.reliability import probe, probe_cases
from tests.support.files import write_jsonl
from tests.support.instruct import chat, chat_tokenizer

CASES = {
    "no_assistant_turn": ("a training `messages` record with no assistant turn",
                          "DataError `path:line: the conversation has no assistant turn ...`"),
    "mixed_kinds": ("a JSONL file mixing record kinds (text, then prompt/completion)",
                    "DataError naming `path:line` of the first record of the other kind and the "
                    "line of the file's first record"),
    "unknown_role": ("a chat message with an unknown role (`tool`)",
                     "DataError `path:line: message N has the unknown role 'tool'; roles are "
                     "system, user, assistant`"),
}


@probe_cases("instruction data", CASES)
@pytest.mark.parametrize("rows,match", [
    ([chat("q", "a"), {"messages": [{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "q"}]}],
     r"d\.jsonl:2: the conversation has no assistant turn"),
    ([{"text": "a"}, {"text": "b"}, {"prompt": "p", "completion": "c"}, {"text": "d"}],
     r"d\.jsonl:3: a prompt-completion record in a file of text records \(the first is at "
     r".*d\.jsonl:1\)"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"},
                    {"role": "assistant", "content": "a"}]}],
     r"d\.jsonl:1: message 2 has the unknown role 'tool'; roles are system, user, assistant"),
], ids=list(CASES))
def test_bad_instruction_records_name_file_and_line(tmp_path, rows, match):
  with pytest.raises(DataError, match=match):
    data.read_jsonl(write_jsonl(tmp_path / "d.jsonl", rows), "causal-lm")


@probe("instruction data", "`messages` records with a tokenizer that has no chat template",
       "DataError naming the file and suggesting `{\"prompt\", \"completion\"}` records")
def test_tokenizer_without_chat_template(tmp_path):
  tok = chat_tokenizer(tmp_path, template=None)
  records = data.read_jsonl(write_jsonl(tmp_path / "d.jsonl", [chat("q", "a")]), "causal-lm")
  with pytest.raises(DataError, match=r"d\.jsonl: .*chat template.*has none.*\"prompt\": \.\.\., "
                     r"\"completion\": \.\.\.\} records instead"):
    data.tokenize(records, tok, 32)


@probe("instruction data", "a completion longer than the sequence length (one example; then all)",
       "the example is skipped and counted (`num_skipped`, a stderr line and run_config.json in "
       "the CLI), never cut; when every example is skipped, DataError `all N examples were "
       "skipped ... --seq-len`")
def test_completion_that_cannot_fit(tmp_path):
  tok = chat_tokenizer(tmp_path)
  rows = [{"prompt": "is this review positive", "completion": "yes"},
          {"prompt": "is this review positive", "completion": "no " * 12}]
  tokens = data.tokenize(data.from_rows(rows, source="d"), tok, 8)
  assert (tokens.num_examples, tokens.num_skipped, len(tokens)) == (1, 1, 1)
  with pytest.raises(DataError, match=r"d: all 2 examples were skipped.*--seq-len"):
    data.tokenize(data.from_rows(rows, source="d"), tok, 2)
