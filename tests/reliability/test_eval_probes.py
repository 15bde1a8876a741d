"""Probes: ``smoa-jax eval --metric exact-match`` on data it cannot score; one error line, exit
status 1 (2 for a flag that does not parse), before the model loads."""

from __future__ import annotations

import pytest

from tests.reliability import probe_cases
from tests.support.cli import run_cli
from tests.support.files import write_jsonl

CASES = {
    # name: (records, extra flags, exit code, text in the error line)
    "text records": ([{"text": "the cat"}], [], 1, "exact match needs"),
    "max new tokens of zero": ([{"prompt": "the cat", "completion": "sat"}],
                               ["--max-new-tokens", 0], 2, "--max-new-tokens"),
    "unknown metric": ([{"prompt": "the cat", "completion": "sat"}], ["--metric", "bleu"], 2,
                       "invalid choice: 'bleu'"),
}


@probe_cases("cli", {
    "text records": ("`smoa-jax eval --metric exact-match` on a file of `{\"text\"}` records",
                     "exit 1, one line `smoa-jax: error: ...: exact match needs {\"prompt\", "
                     "\"completion\"} or {\"messages\"} records ...`, no traceback"),
    "max new tokens of zero": ("`smoa-jax eval --metric exact-match --max-new-tokens 0`",
                               "exit 2, one usage error line naming `--max-new-tokens`"),
    "unknown metric": ("`smoa-jax eval --metric bleu`",
                       "exit 2, one usage error line listing the metrics (loss, exact-match)"),
})
@pytest.mark.parametrize("case", list(CASES))
def test_bad_exact_match_requests(case, chat_llama, tmp_path, capsys):
  rows, extra, expected, text = CASES[case]
  path = write_jsonl(tmp_path / "d.jsonl", rows)
  code, out, err = run_cli(capsys, "eval", "--model", chat_llama, "--data", path,
                           "--metric", "exact-match", *extra)
  errors = [line for line in err.splitlines() if "error: " in line]
  assert code == expected, err
  assert out == "" and "Traceback" not in err
  assert len(errors) == 1 and text in errors[0], err
