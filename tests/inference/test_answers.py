"""Exact match of generated answers (smoa_jax/inference/answers.py): normalisation, scoring, and
answers scored right or wrong by construction on the tiny chat Llama."""

from __future__ import annotations

import pytest
import transformers

import smoa_jax
from smoa_jax.inference import answers, exact_match, normalize_answer
from smoa_jax.training import data

NEW = 6
PROMPTS = ["the cat sat on the", "a dog ran", "the bird"]


@pytest.fixture(scope="module")
def chat(chat_llama):
  """``(model, tokenizer)`` of the tiny chat Llama."""
  return (smoa_jax.from_hf(chat_llama), transformers.AutoTokenizer.from_pretrained(chat_llama))


@pytest.mark.parametrize("text,expected", [
    ("positive", "positive"),
    ("  Positive.\n", "positive"),
    ("NEGATIVE!!", "negative"),
    ("\u201cPositive\u201d", "positive"),  # curly quotes are punctuation
    ("very   good,\tindeed ", "very good, indeed"),  # inner punctuation kept, spaces collapsed
    ("\uff30ositive", "positive"),  # fullwidth P -> P under NFKC
    ("caf\u0065\u0301", "caf\u00e9"),  # combining accent composed under NFKC
    ("3.5", "3.5"),
    ("...", ""),
    ("", ""),
])
def test_normalize_answer(text, expected):
  assert normalize_answer(text) == expected


def test_exact_match_score_counts_normalised_equality():
  score = answers.exact_match_score(["Positive.", "negative", " yes", "no"],
                                    ["positive", "positive", "YES!", "maybe"])
  assert score == 0.5
  with pytest.raises(smoa_jax.DataError, match="one reference per prediction"):
    answers.exact_match_score(["a"], ["a", "b"])
  with pytest.raises(smoa_jax.DataError, match="at least one example"):
    answers.exact_match_score([], [])


def _conversations(replies: list[str]) -> data.Records:
  return data.from_rows([{"messages": [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": p},
                                       {"role": "assistant", "content": a}]}
                         for p, a in zip(PROMPTS, replies)], source="chat")


def test_the_models_own_answers_score_one_and_others_zero(chat):
  model, tokenizer = chat
  with_system = smoa_jax.generate(
      model, tokenizer, [[{"role": "system", "content": "be brief"}, {"role": "user", "content": p}]
                         for p in PROMPTS], max_new_tokens=NEW, chat=True)
  assert all(a.strip() for a in with_system)  # the test needs non-empty answers
  right = exact_match(model, tokenizer, _conversations(with_system), max_new_tokens=NEW,
                      batch_size=2)
  assert right.score == 1.0 and right.predictions == with_system
  wrong = exact_match(model, tokenizer, _conversations([f"not {a}" for a in with_system]),
                      max_new_tokens=NEW)
  assert wrong.score == 0.0 and wrong.predictions == with_system
  half = [with_system[0], f"not {with_system[1]}", with_system[2].upper() + " ."]
  assert exact_match(model, tokenizer, _conversations(half),
                     max_new_tokens=NEW).score == pytest.approx(2 / 3)


def test_prompt_completion_records_are_answered_as_plain_prompts(chat):
  model, tokenizer = chat
  own = smoa_jax.generate(model, tokenizer, PROMPTS, max_new_tokens=NEW)
  assert all(a.strip() for a in own)
  records = data.from_rows([{"prompt": p, "completion": a} for p, a in zip(PROMPTS, own)])
  result = exact_match(model, tokenizer, records, max_new_tokens=NEW)
  assert result.score == 1.0 and result.predictions == own
  wrong = data.from_rows([{"prompt": p, "completion": f"{a} too"} for p, a in zip(PROMPTS, own)])
  assert exact_match(model, tokenizer, wrong, max_new_tokens=NEW).score == 0.0


def test_only_the_last_assistant_turn_is_the_reference():
  records = data.from_rows([{"messages": [
      {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
      {"role": "user", "content": "thanks"}]}])
  prompts, references, is_chat = answers.answer_prompts(records)
  assert is_chat and references == ["a2"]
  assert prompts == [records.conversations[0][:3]]


def test_default_limit_is_the_longest_reference_plus_slack(chat):
  _, tokenizer = chat
  refs = ["the cat", "a dog ran on the"]
  assert answers.default_max_new_tokens(tokenizer, refs) == 5 + answers.SLACK


def test_text_records_have_no_reference_answer():
  with pytest.raises(smoa_jax.DataError, match=r"texts: exact match needs .*\"prompt\", "
                     r"\"completion\".* or .*\"messages\".* records"):
    answers.answer_prompts(data.from_rows([{"text": "a cat"}], source="texts"))
