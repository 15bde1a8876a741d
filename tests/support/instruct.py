"""Instruction data for tests: a word tokenizer with a small ChatML-like chat template, and chat
records."""

from __future__ import annotations

from pathlib import Path

from tests.support.hf import word_tokenizer

# A ChatML-like template over four added special tokens; the word tokenizer splits on whitespace.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_WORDS = ["is", "this", "review", "positive", "or", "negative", "the", "film", "was", "dull", "great", "be", "brief", "yes", "no"]


def chat_tokenizer(directory: Path, texts=(" ".join(CHAT_WORDS),), template: str | None = CHAT_TEMPLATE):
  """The word-level tokenizer of ``texts`` (``<pad>`` 0, ``<s>`` 2, ``</s>`` 3) with the chat
  tokens added and ``template`` as its chat template, saved to ``directory``."""
  tokenizer = word_tokenizer({w for text in texts for w in text.split()}, directory)
  tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
  tokenizer.chat_template = template
  tokenizer.save_pretrained(directory)
  return tokenizer


def chat(question: str, answer: str, system: str | None = None) -> dict:
  turns = ([{"role": "system", "content": system}] if system else [])
  return {"messages": turns + [{"role": "user", "content": question},
                               {"role": "assistant", "content": answer}]}
