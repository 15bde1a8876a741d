"""``smoa-jax demo --llm``: a chat model answers the sentiment question before and after SMoA
instruction tuning.

The job: SmolLM2-135M-Instruct is asked ``"Is this review positive or negative?"`` about movie
reviews (:func:`smoa_jax.app.datasets.sentiment_chat`: one user turn with the chat template). The
base model answers in sentences ("This review is positive. The reviewer ..."); after a short SMoA
instruction tune on the training split (loss on the assistant turn only, packed sequences) it
answers with the label. The demo prints the answers to a few test reviews side by side, and the
share of them answered right: the label is the first word of the answer
(:func:`smoa_jax.app.datasets.sentiment_label`).

``benchmarks/instruct_sentiment.py`` measures the same thing over seeds against LoRA, with the
same data (:func:`chat_training_data`) and training (:func:`tune`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["LLMDemoSettings", "FULL", "QUICK", "TARGETS", "chat_training_data", "tune",
           "Answer", "run_llm_demo"]

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LLMDemoSettings:
  """Sizes and hyper-parameters of the LLM demo.

  Attributes:
    steps, batch_size, seq_len, warmup_steps: training length and shape (packed sequences).
    smoa_r: SMoA's total rank, in 2 spectral blocks, on :data:`TARGETS`.
    train_size: training conversations used (None: the whole training split).
    examples: test reviews shown; max_new_tokens: answer length at most.
    seed: adapter initialisation and data order.
  """

  steps: int = 24
  batch_size: int = 4
  seq_len: int = 128
  warmup_steps: int = 2
  smoa_r: int = 16
  train_size: int | None = None
  examples: int = 6
  max_new_tokens: int = 8
  seed: int = 0


FULL = LLMDemoSettings()
QUICK = LLMDemoSettings(steps=2, batch_size=2, warmup_steps=1, smoa_r=4, train_size=32,
                        examples=2, max_new_tokens=4)


def chat_training_data(tokenizer: Any, texts: Sequence[str], labels: Sequence[int],
                       seq_len: int) -> Any:
  """The reviews as chat conversations (:func:`~smoa_jax.app.datasets.sentiment_chat`), tokenized
  with the loss on the assistant turn and packed into ``(N, seq_len)`` rows
  (a :class:`smoa_jax.data.Tokenized`)."""
  from smoa_jax.app.datasets import sentiment_chat
  from smoa_jax.training import data

  records = data.from_rows(sentiment_chat(texts, labels), source="sentiment/train")
  return data.tokenize(records, tokenizer, seq_len, packing=True)


def tune(model: Any, train: dict[str, np.ndarray], config: Any, *, steps: int, batch_size: int,
         warmup_steps: int, seed: int,
         learning_rate: float | None = None) -> tuple[int, float, float]:
  """Add the adapter ``config`` to ``model`` (in place) and train it on the causal-LM arrays
  ``train`` (AdamW, warmup then cosine decay, at ``learning_rate`` or the method's default);
  returns ``(trainable parameters, final training loss, seconds training)``."""
  from flax import nnx

  import smoa_jax

  report = smoa_jax.apply_adapter(model, config, rngs=nnx.Rngs(seed), verbose=False,
                                  show_progress=False)
  train_config = smoa_jax.TrainConfig(steps=steps, batch_size=batch_size,
                                      learning_rate=learning_rate, warmup_steps=warmup_steps,
                                      seed=seed, log_every=steps, progress=False)
  start = time.perf_counter()
  result = smoa_jax.train(model, smoa_jax.CausalLMTask(), train, train_config)
  return (report.trainable_params, float(result.train_metrics.get("loss", float("nan"))),
          time.perf_counter() - start)


@dataclasses.dataclass(frozen=True)
class Answer:
  """One test review and the answers before and after tuning."""

  review: str
  label: str
  before: str
  after: str


def run_llm_demo(*, quick: bool = False, settings: LLMDemoSettings | None = None,
                 model_dir: str | Path | None = None, console: Any = None) -> list[Answer]:
  """Run the LLM demo (module docstring); returns the answers shown.

  ``model_dir`` replaces SmolLM2-135M-Instruct (a causal LM whose tokenizer has a chat template);
  ``settings`` overrides the preset (``QUICK`` with ``quick``, else ``FULL``).

  Raises:
    AssetError: SmolLM2 or the sentiment data are not cached and cannot be fetched.
  """
  import transformers
  from rich.console import Console
  from rich.table import Table

  import smoa_jax
  from smoa_jax.app import assets
  from smoa_jax.app.datasets import SENTIMENT_ANSWERS, answer_sentiment, split_sentiment

  started = time.perf_counter()
  settings = settings or (QUICK if quick else FULL)
  console = console or Console()
  model_dir = Path(model_dir) if model_dir is not None else assets.fetch_smollm2()
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
  split = split_sentiment(assets.load_sentiment(), seed=0)
  texts, labels = split["train"]
  if settings.train_size is not None:
    texts, labels = texts[:settings.train_size], labels[:settings.train_size]
  test_texts, test_labels = split["test"]
  shown = np.linspace(0, len(test_texts) - 1, settings.examples).round().astype(int)
  reviews = [test_texts[i] for i in shown]
  console.print(f"[bold]smoa-jax demo --llm[/bold]: {model_dir.name} asked \"Is this review "
                f"positive or negative?\"; SMoA r={settings.smoa_r} K=2 instruction-tuned for "
                f"{settings.steps} steps of {settings.batch_size} packed sequences"
                + (" (--quick: a smoke test)" if quick else ""))
  model = smoa_jax.from_hf(model_dir, scan_layers=True)
  before, before_labels = answer_sentiment(model, tokenizer, reviews,
                                           max_new_tokens=settings.max_new_tokens)
  config = smoa_jax.SMoAConfig(r=settings.smoa_r, num_blocks=2, alpha=2.0 * settings.smoa_r,
                               target_modules=TARGETS)
  trainable, _, seconds = tune(model, chat_training_data(tokenizer, texts, labels,
                                                         settings.seq_len).arrays, config,
                               steps=settings.steps, batch_size=settings.batch_size,
                               warmup_steps=settings.warmup_steps, seed=settings.seed)
  after, after_labels = answer_sentiment(model, tokenizer, reviews,
                                         max_new_tokens=settings.max_new_tokens)
  answers = [Answer(review, SENTIMENT_ANSWERS[test_labels[i]], b, a)
             for review, i, b, a in zip(reviews, shown, before, after)]
  table = Table(title="Is this review positive or negative? Before and after SMoA tuning")
  for column in ("review", "label", "before", "after"):
    table.add_column(column)
  for answer in answers:
    table.add_row(answer.review, answer.label, answer.before.strip(), answer.after.strip())
  console.print(table)
  truth = [test_labels[i] for i in shown]
  right = [sum(p == t for p, t in zip(found, truth)) for found in (before_labels, after_labels)]
  console.print(f"answered with the right label: {right[0]} of {len(truth)} before, {right[1]} "
                f"of {len(truth)} after ({trainable:,} trainable parameters, {seconds:.0f} s of "
                f"training; total {time.perf_counter() - started:.0f} s)")
  return answers
