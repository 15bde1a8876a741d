"""``smoa-jax eval --metric exact-match`` on the tiny chat Llama: the model's own greedy answers
score 1, other answers 0, next to the answer-token loss (bad input: tests/reliability/
test_eval_probes.py)."""

from __future__ import annotations

import json

import pytest
import transformers

import smoa_jax
from tests.support.cli import run_cli
from tests.support.files import write_jsonl

PROMPTS = ["the cat sat on the", "a dog ran", "the bird"]
NEW = 6


@pytest.fixture(scope="module")
def own_answers(chat_llama) -> list[str]:
  """The chat Llama's greedy answers to :data:`PROMPTS` as one user turn each."""
  model = smoa_jax.from_hf(chat_llama)
  tokenizer = transformers.AutoTokenizer.from_pretrained(chat_llama)
  replies = smoa_jax.generate(model, tokenizer, PROMPTS, max_new_tokens=NEW, chat=True)
  assert all(r.strip() for r in replies)  # the test needs non-empty answers
  return replies


def _messages(path, replies):
  return write_jsonl(path, [{"messages": [{"role": "user", "content": p},
                                          {"role": "assistant", "content": r}]}
                            for p, r in zip(PROMPTS, replies)])


def test_exact_match_next_to_the_loss(chat_llama, own_answers, tmp_path, capsys):
  right = _messages(tmp_path / "right.jsonl", own_answers)
  wrong = _messages(tmp_path / "wrong.jsonl", [f"{r} too" for r in own_answers])
  scores = {}
  for name, path in (("right", right), ("wrong", wrong)):
    code, out, err = run_cli(capsys, "eval", "--model", chat_llama, "--data", path, "--seq-len",
                             64, "--metric", "exact-match", "--max-new-tokens", NEW,
                             "--batch-size", 2)
    assert code == 0, err
    scores[name] = json.loads(out)
  assert scores["right"]["exact_match"] == 1.0 and scores["wrong"]["exact_match"] == 0.0
  assert scores["right"]["num_examples"] == len(PROMPTS)
  assert {"loss", "perplexity"} <= set(scores["right"])
  code, out, _ = run_cli(capsys, "eval", "--model", chat_llama, "--data", right, "--seq-len", 64)
  assert code == 0 and "exact_match" not in json.loads(out)  # the default metric is the loss

