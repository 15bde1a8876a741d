"""Instruction data (smoa_jax/training/data.py record kinds, smoa_jax/training/instruct.py): kind
detection, validation, the answer mask of prompt/completion pairs and chat conversations,
truncation that keeps the answer, and packing."""

from __future__ import annotations

import numpy as np
import pytest

from smoa_jax.errors import DataError
from smoa_jax.training import data, instruct
from tests.support.files import write_jsonl
from tests.support.instruct import chat, chat_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return chat_tokenizer(tmp_path_factory.mktemp("chat_tok"))


def ids_of(tok, text: str) -> list[int]:
  return tok(text, add_special_tokens=False)["input_ids"]


# -- reading -----------------------------------------------------------------------------------
def test_each_kind_is_detected_per_file(tmp_path):
  text = data.read_jsonl(write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b"}]),
                         "causal-lm")
  pairs = data.read_jsonl(write_jsonl(tmp_path / "p.jsonl", [
      {"prompt": "is this positive", "completion": " yes", "id": 7}, ""]), "causal-lm")
  convs = data.read_jsonl(write_jsonl(tmp_path / "m.jsonl", ["", chat("q", "a", "be brief")]),
                          "causal-lm")
  assert (text.kind, len(text), text.texts) == ("text", 2, ["a", "b"])
  assert (pairs.kind, len(pairs), pairs.pairs) == ("prompt-completion", 1, [("is this positive",
                                                                            " yes")])
  assert (convs.kind, len(convs), convs.lines) == ("messages", 1, [2])
  assert [m["role"] for m in convs.conversations[0]] == ["system", "user", "assistant"]
  assert convs.where(0).endswith("m.jsonl:2")
  memory = data.from_rows([chat("q", "a")], source="sentiment")
  assert memory.kind == "messages" and memory.where(0) == "sentiment example 1"


@pytest.mark.parametrize("rows,match", [
    ([{"text": "a"}, "", {"prompt": "p", "completion": "c"}, {"text": "b"}],
     r"m\.jsonl:3: a prompt-completion record in a file of text records \(the first is at "
     r".*m\.jsonl:1\)"),
    ([chat("q", "a"), {"text": "b"}], r"m\.jsonl:2: a text record in a file of messages"),
    ([{"text": "a", "prompt": "p"}],
     r":1: the record has the fields of text and prompt-completion"),
    ([{"prompt": "p"}], r":1: \"completion\" must be a non-empty string, got None"),
    ([{"prompt": " ", "completion": "c"}], r":1: \"prompt\" must be a non-empty string"),
    ([{"messages": []}], r":1: \"messages\" must be a non-empty list"),
    ([{"messages": [{"role": "user"}]}], r":1: message 1 must be an object with exactly"),
    ([{"messages": [{"role": "user", "content": "q", "name": "x"}]}], r"exactly the fields"),
    ([{"messages": [{"role": "tool", "content": "q"}]}],
     r":1: message 1 has the unknown role 'tool'; roles are system, user, assistant"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}],
     r":1: message 2: \"content\" must be a non-empty string"),
    ([{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}],
     r":1: the conversation has no assistant turn"),
])
def test_bad_instruction_records_name_file_and_line(tmp_path, rows, match):
  with pytest.raises(DataError, match=match):
    data.read_jsonl(write_jsonl(tmp_path / "m.jsonl", rows), "causal-lm")


def test_classification_takes_text_records_only(tmp_path):
  path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "completion": "c", "label": 1}])
  with pytest.raises(DataError, match=r":1: classification data needs .*got a prompt-completion"):
    data.read_jsonl(path, "classification")


# -- tokens and the answer mask ----------------------------------------------------------------
def test_prompt_completion_loss_is_on_the_completion_and_eos(tok):
  records = data.from_rows([{"prompt": "is this review positive", "completion": "yes"},
                            {"prompt": "the film was", "completion": "dull or great"}])
  tokens = data.tokenize(records, tok, 12)
  ids, mask, loss = (tokens.arrays[k] for k in ("input_ids", "attention_mask", "loss_mask"))
  first = [2] + ids_of(tok, "is this review positive")  # <s> from the tokenizer, then the prompt
  assert ids[0, :7].tolist() == first + ids_of(tok, "yes") + [tok.eos_token_id]
  assert loss[0].tolist() == [0] * 5 + [1, 1] + [0] * 5
  assert loss[1].tolist() == [0] * 4 + [1] * 4 + [0] * 4 and mask[1].sum() == 8
  assert (tokens.num_truncated, tokens.num_skipped, tokens.num_examples) == (0, 0, 2)
  everything = data.tokenize(records, tok, 12, train_on_prompt=True)
  np.testing.assert_array_equal(everything.arrays["loss_mask"], mask)


def test_conversation_answer_is_each_assistant_turn_with_its_end_token(tok):
  conversation = [{"role": "system", "content": "be brief"},
                  {"role": "user", "content": "is the film great"},
                  {"role": "assistant", "content": "yes"},
                  {"role": "user", "content": "is it dull"},
                  {"role": "assistant", "content": "no no"},
                  {"role": "user", "content": "yes"}]
  ids, answer = instruct.encode_conversation(tok, conversation, "here")
  full = tok.apply_chat_template(conversation, tokenize=False)
  assert ids == ids_of(tok, full)
  answers = [tok.decode([i for i, a in zip(ids, answer) if a])]
  assert answers == [tok.decode(ids_of(tok, "yes <|end|> no no <|end|>"))]
  spans = np.flatnonzero(np.diff(np.r_[0, np.asarray(answer, int), 0]))  # starts and ends
  assert len(spans) == 4  # two separate assistant spans; the trailing user turn is context
  assert tok.decode(ids[spans[0] - 1]) == "<|assistant|>"  # predicted from the generation prompt


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
  # Shows only the last assistant turn's content: earlier answers vanish as the chat grows.
  rewriting = ("{% for m in messages %}<|{{ m['role'] }}|> {% if m['role'] != 'assistant' or "
               "loop.last %}{{ m['content'] }} {% endif %}<|end|> {% endfor %}"
               "{% if add_generation_prompt %}<|assistant|> {% endif %}")
  tok = chat_tokenizer(tmp_path, template=rewriting)
  records = data.from_rows([{"messages": [{"role": "user", "content": "is it great"},
                                          {"role": "assistant", "content": "yes"},
                                          {"role": "user", "content": "is it dull"},
                                          {"role": "assistant", "content": "no"}]}], source="d")
  with pytest.raises(DataError, match=r"d example 1: the chat template is not prefix-stable at "
                     r"message 4.*prompt.*completion"):
    data.tokenize(records, tok, 32)


def test_messages_without_a_chat_template_suggest_prompt_completion(tmp_path):
  tok = chat_tokenizer(tmp_path, template=None)
  with pytest.raises(DataError, match=r"d\.jsonl: .*has none.*\"prompt\": \.\.\., \"completion\""):
    data.tokenize(data.read_jsonl(write_jsonl(tmp_path / "d.jsonl", [chat("q", "a")]),
                                  "causal-lm"), tok, 32)


def test_template_errors_become_data_errors(tmp_path):
  refusing = "{{ raise_exception('system messages are not allowed') }}"
  tok = chat_tokenizer(tmp_path, template=refusing)
  with pytest.raises(DataError, match=r"d example 1: the tokenizer's chat template refused .*"
                     r"system messages are not allowed"):
    data.tokenize(data.from_rows([chat("q", "a")], source="d"), tok, 32)


# -- truncation --------------------------------------------------------------------------------
def test_fit_cuts_the_prompt_from_the_left_and_keeps_the_answer():
  ids, answer = list(range(10)), [False] * 6 + [True] * 3 + [False]
  assert instruct.fit(ids, answer, 10) == (ids, answer, False)
  assert instruct.fit(ids, answer, 6) == ([3, 4, 5, 6, 7, 8], [False] * 3 + [True] * 3, True)
  assert instruct.fit(ids, answer, 4) == ([5, 6, 7, 8], [False] + [True] * 3, True)
  assert instruct.fit(ids, answer, 3) is None  # the answer alone has no token of context
  # An earlier answer may lose its start; the last one is whole.
  two = [False, True, True, False, True]
  assert instruct.fit(list(range(5)), two, 4) == ([1, 2, 3, 4], [True, True, False, True], True)


def test_examples_whose_answer_cannot_fit_are_skipped_and_counted(tok):
  records = data.from_rows([
      {"prompt": "is this review positive or negative", "completion": "yes"},
      {"prompt": "the film", "completion": "great great great great great great"},
      {"prompt": "the film was", "completion": "dull"}], source="d")
  tokens = data.tokenize(records, tok, 6)
  assert (tokens.num_examples, tokens.num_skipped, tokens.num_truncated) == (2, 1, 1)
  assert len(tokens) == 2
  cut = tokens.arrays["input_ids"][0]
  assert cut[-2:].tolist() == ids_of(tok, "yes") + [tok.eos_token_id]  # the whole answer
  assert cut[:4].tolist() == ids_of(tok, "review positive or negative") and 2 not in cut  # no <s>
  with pytest.raises(DataError, match=r"d: all 3 examples were skipped.*--seq-len"):
    data.tokenize(records, tok, 2)


# -- packing -----------------------------------------------------------------------------------
def test_packing_is_first_fit_in_data_order_and_keeps_every_token():
  lengths = [5, 4, 2, 7, 3, 1]
  seq_len = 8
  ids = np.zeros((len(lengths), seq_len), np.int32)
  mask = (np.arange(seq_len)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  for i, n in enumerate(lengths):
    ids[i, :n] = 10 * (i + 1) + np.arange(n)
  loss = mask.copy()
  loss[:, 0] = 0
  tokens = data.Tokenized({"input_ids": ids, "attention_mask": mask, "loss_mask": loss}, 0, 0,
                          len(lengths))
  packed = data.pack(tokens, pad_id=99)
  a = packed.arrays
  # First fit: [5, 2, 1], [4, 3], [7]; each row in data order.
  assert a["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 2, 2, 2, 0],
                                       [1] * 7 + [0]]
  assert a["input_ids"][1].tolist() == [20, 21, 22, 23, 50, 51, 52, 99]
  assert a["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 0]
  assert a["loss_mask"][0].tolist() == [0, 1, 1, 1, 1, 0, 1, 0]
  np.testing.assert_array_equal(a["attention_mask"], (a["segment_ids"] > 0).astype(np.int32))
  assert (packed.num_examples, len(packed)) == (6, 3)
  assert all(v.dtype == np.int32 for v in a.values())
  with pytest.raises(DataError, match="classification"):
    data.pack(data.Tokenized({"input_ids": ids, "attention_mask": mask,
                              "labels": np.zeros(6, np.int32)}, 0))


def test_tokenize_packs_text_and_instruction_data(tok):
  texts = data.from_rows([{"text": "the film was great"}, {"text": "dull"}, {"text": "yes no"}])
  packed = data.tokenize(texts, tok, 8, add_eos=True, packing=True)
  # <s> ... </s>: 6, 3 and 4 tokens; the third fills the second row.
  assert packed.arrays["segment_ids"].tolist() == [[1] * 6 + [0] * 2, [1] * 3 + [2] * 4 + [0]]
  np.testing.assert_array_equal(packed.arrays["loss_mask"], packed.arrays["attention_mask"])
  pairs = data.from_rows([{"prompt": "is it great", "completion": "yes"}] * 3)
  packed = data.tokenize(pairs, tok, 14, packing=True)
  assert packed.arrays["loss_mask"][0].tolist() == [0, 0, 0, 0, 1, 1] * 2 + [0, 0]
  with pytest.raises(DataError, match="classification"):
    data.tokenize(data.from_rows([{"text": "a", "label": 0}, {"text": "b", "label": 1}],
                                 "classification"), tok, 8, packing=True)


@pytest.mark.assets
def test_smollm2_chat_template_answer_is_the_assistant_text_and_end_token():
  import transformers

  from smoa_jax.app import assets

  if not assets.is_cached("smollm2"):
    pytest.skip("SmolLM2 is not in the asset cache (smoa-jax fetch-assets smollm2)")
  tok = transformers.AutoTokenizer.from_pretrained(assets.fetch_smollm2())
  records = data.from_rows([chat("Is this review positive or negative?\n\nA dull film.",
                                 "negative"),
                            {"messages": [
                                {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello! How can I help?"},
                                {"role": "user", "content": "Say yes."},
                                {"role": "assistant", "content": "Yes."}]}])
  tokens = data.tokenize(records, tok, 128)
  ids, loss = tokens.arrays["input_ids"], tokens.arrays["loss_mask"].astype(bool)
  assert tok.decode(ids[0][loss[0]]) == "negative<|im_end|>\n"
  assert tok.decode(ids[1][loss[1]]) == "Hello! How can I help?<|im_end|>\nYes.<|im_end|>\n"
  assert "<|im_start|>system" in tok.decode(ids[0][tokens.arrays["attention_mask"][0] > 0])
