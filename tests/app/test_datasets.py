"""Tests for smoa_jax/app/datasets.py: the fixed splits shared by the demo, benchmarks and CLI."""

import json

import pytest

import smoa_jax
from smoa_jax.app import assets, datasets


def test_sentiment_split_is_seeded_disjoint_and_complete():
  examples = [(f"s{i}", i % 2) for i in range(100)]
  a = datasets.split_sentiment(examples, seed=3, val_size=10, test_size=20)
  b = datasets.split_sentiment(examples, seed=3, val_size=10, test_size=20)
  assert a["test"][0] == b["test"][0]
  sizes = {k: len(v[0]) for k, v in a.items()}
  assert sizes == {"validation": 10, "test": 20, "train": 70}
  seen = [t for texts, _ in a.values() for t in texts]
  assert sorted(seen) == sorted(t for t, _ in examples)
  assert datasets.split_sentiment(examples, seed=4, val_size=10, test_size=20)["test"][0] != a["test"][0]
  with pytest.raises(smoa_jax.DataError, match="needs more than"):
    datasets.split_sentiment(examples, val_size=60, test_size=40)


def test_sentiment_chat_records_ask_the_question_and_answer_the_label():
  rows = datasets.sentiment_chat(["A dull film.", "Lovely."], [0, 1])
  records = smoa_jax.data.from_rows(rows)  # valid messages records
  assert records.kind == "messages" and len(records) == 2
  assert rows[0]["messages"][0] == {"role": "user", "content": "Is this review positive or "
                                    "negative?\n\nA dull film."}
  assert [r["messages"][1]["content"] for r in rows] == ["negative", "positive"]


@pytest.mark.parametrize("answer,label", [
    ("positive", 1), ("Negative.", 0), ("  POSITIVE, clearly", 1), ("negative!\nIt is dull", 0),
    ("The review is positive.", None), ("positively", None), ("", None), ("neutral", None)])
def test_sentiment_label_is_the_first_word_of_the_answer(answer, label):
  assert datasets.sentiment_label(answer) == label


def test_answer_sentiment_asks_the_chat_question(chat_llama):
  import transformers

  model = smoa_jax.from_hf(chat_llama)
  tokenizer = transformers.AutoTokenizer.from_pretrained(chat_llama)
  texts = ["the cat sat", "a dog ran on the mat"]
  answers, labels = datasets.answer_sentiment(model, tokenizer, texts, max_new_tokens=5,
                                              batch_size=1)
  asked = [datasets.sentiment_chat([t], [0])[0]["messages"][:1] for t in texts]
  assert answers == smoa_jax.generate(model, tokenizer, asked, max_new_tokens=5, chat=True)
  assert labels == [datasets.sentiment_label(a) for a in answers]


def test_shakespeare_holds_out_whole_plays():
  plays = {"hamlet": "\n".join(f"h{i}" for i in range(20)), "tempest": "t1\nt2\n\nt3\nt4",
           "macbeth": "m1\nm2", "lear": "l1\nl2\nl3\nl4\nl5"}
  splits = datasets.split_shakespeare(plays, lines_per_passage=2)
  assert splits["test"][0] == "h0\nh1" and len(splits["test"]) == 10 + 1
  assert splits["validation"] == ["t1\nt2", "t3\nt4"]
  assert splits["train"] == ["l1\nl2", "l3\nl4"]
  with pytest.raises(smoa_jax.DataError, match="not in the corpus"):
    datasets.split_shakespeare({"lear": "x"})


@pytest.mark.assets
@pytest.mark.skipif(not (assets.is_cached("sentiment") and assets.is_cached("shakespeare")),
                    reason="real data not cached (run 'smoa-jax fetch-assets')")
def test_write_jsonl_splits_of_the_real_data(tmp_path):
  paths = datasets.write_jsonl_splits(tmp_path / "jsonl")
  assert set(paths) == {f"{d}_{s}" for d in ("sentiment", "shakespeare")
                        for s in ("train", "validation", "test")}
  test = [json.loads(line) for line in paths["sentiment_test"].read_text().splitlines()]
  assert len(test) == 1000 and {r["label"] for r in test} == {0, 1}
  records = smoa_jax.data.read_jsonl(paths["shakespeare_test"], "causal-lm")
  assert records.texts[0].startswith("HAMLET")
