"""``smoa-jax demo --llm`` (smoa_jax/app/llm_demo.py): the quick settings on the tiny chat Llama
with the real sentiment data, and the command dispatching to it."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from smoa_jax.app import assets, cli, datasets, llm_demo


@pytest.mark.skipif(not assets.is_cached("sentiment"), reason="the sentiment data is not cached; "
                    "fetch it with `smoa-jax fetch-assets sentiment`")
def test_quick_llm_demo_prints_answers_before_and_after(chat_llama):
  out = io.StringIO()
  answers = llm_demo.run_llm_demo(settings=llm_demo.QUICK, model_dir=chat_llama,
                                  console=Console(file=out, width=200))
  test_texts, test_labels = datasets.split_sentiment(assets.load_sentiment())["test"]
  assert [a.review for a in answers] == [test_texts[0], test_texts[-1]]
  assert [a.label for a in answers] == [datasets.SENTIMENT_ANSWERS[y]
                                        for y in (test_labels[0], test_labels[-1])]
  text = out.getvalue()
  for word in ("before", "after", "answered with the right label", "of 2 before", "SMoA r=4 K=2"):
    assert word in text, text


def test_demo_llm_flag_runs_the_llm_demo(monkeypatch):
  calls = []
  monkeypatch.setattr(llm_demo, "run_llm_demo", lambda **kwargs: calls.append(kwargs))
  assert cli.main(["demo", "--llm", "--quick"]) == 0
  assert calls == [{"quick": True}]
