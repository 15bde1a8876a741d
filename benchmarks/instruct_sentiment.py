"""Benchmark: instruction-tuning SmolLM2-135M-Instruct on a chat task, SMoA vs LoRA (issue 13).

The task: the movie-review sentences of :func:`smoa_jax.app.datasets.split_sentiment` (the fixed
split of the demo, the CLI and ``benchmarks/quality_real.py``) posed as a chat task by
:func:`smoa_jax.app.datasets.sentiment_chat`: the user asks ``"Is this review positive or
negative?"`` followed by the review, the assistant answers ``"positive"`` or ``"negative"``.
Training takes the loss on the assistant turn only (end-of-turn token included), with packed
sequences (:func:`smoa_jax.data.tokenize` with ``packing=True``).

The metric is the accuracy of GENERATED answers on the test split: every review is asked as one
user turn with the chat template, the model answers greedily (:func:`smoa_jax.generate` with the KV
cache, at most ``--max-new-tokens`` tokens), and the label is the first word of the normalised
answer when it is ``positive`` or ``negative`` (:func:`smoa_jax.app.datasets.sentiment_label`);
any other answer counts as wrong. "In format" is the share of answers that start with a label.
The base model's zero-shot accuracy is measured the same way; "mentions one label" is a lenient
reading of the base model's answers (exactly one of the two words appears anywhere), for context.

Methods, at an equal budget of trainable parameters (``p`` = LoRA's rank,
:class:`benchmarks._budgets.EqualBudget`): SMoA r = 2p in K = 2 spectral blocks against LoRA r = p
on ``q_proj, k_proj, v_proj, up_proj, down_proj`` of all 30 layers, ``alpha / r = 2``; the same
steps, batch, data order (per seed) and schedule (AdamW, warmup then cosine decay, clipping 1.0;
:func:`smoa_jax.app.llm_demo.tune`, which ``smoa-jax demo --llm`` runs too).
Each method trains at its default learning rate (SMoA 3e-2, LoRA 5e-3: the values
``benchmarks/quality_real.py`` chose on validation data; ``default_learning_rate`` of the configs);
no grid is searched here. Seeds set the adapter
initialisation and the data order; we report mean and sample standard deviation over seeds.

Budget: sized for about half an hour on 2 CPU cores; the test split is an evenly spaced subset of
``--test-limit`` reviews (all 1,000 with ``--test-limit 1000``). ``--quick``: a tiny random Llama
with SmolLM2's tokenizer, a few examples and steps, one seed (a smoke test that never writes).

Run from the repository root: ``python -m benchmarks.instruct_sentiment``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks import _budgets, _common, _models
from smoa_jax.core.lora import LoRAConfig
from smoa_jax.core.smoa import SMoAConfig

METHODS = {"SMoA": SMoAConfig, "LoRA": LoRAConfig}  # name in the report -> config class
SECTION = "instruct_sentiment"
MODULE = "benchmarks.instruct_sentiment"
EXAMPLES_SHOWN = 4  # before/after generations in the report


@dataclasses.dataclass(frozen=True)
class Plan:
  """Sizes and hyper-parameters (identical for both methods)."""

  p: int
  steps: int
  batch_size: int
  seq_len: int
  warmup_steps: int
  seeds: tuple[int, ...]
  test_limit: int
  train_limit: int | None
  max_new_tokens: int
  eval_batch: int

  @property
  def budget(self) -> _budgets.EqualBudget:
    return _budgets.EqualBudget(self.p, num_blocks=2)


FULL = Plan(p=8, steps=24, batch_size=4, seq_len=128, warmup_steps=2, seeds=(0, 1, 2),
            test_limit=100, train_limit=None, max_new_tokens=8, eval_batch=25)
QUICK = Plan(p=2, steps=2, batch_size=2, seq_len=128, warmup_steps=1, seeds=(0,), test_limit=4,
             train_limit=32, max_new_tokens=4, eval_batch=4)


def _evenly(n: int, limit: int) -> np.ndarray:
  """``min(limit, n)`` evenly spaced indices of ``range(n)``."""
  return np.linspace(0, n - 1, min(limit, n)).round().astype(int)


@dataclasses.dataclass(frozen=True)
class Scored:
  """Answers of one model to the test reviews."""

  answers: list[str]
  labels: list[int | None]  # read from the answers (None: not in format)
  truth: np.ndarray

  @property
  def accuracy(self) -> float:
    return float(np.mean([a == t for a, t in zip(self.labels, self.truth)]))

  @property
  def in_format(self) -> float:
    return float(np.mean([a is not None for a in self.labels]))

  @property
  def lenient(self) -> float:
    """Accuracy when an answer that mentions exactly one of the two labels gives that label."""
    from smoa_jax.app.datasets import SENTIMENT_ANSWERS
    from smoa_jax.inference import normalize_answer

    def label(answer: str) -> int | None:
      words = {normalize_answer(w) for w in normalize_answer(answer).split()}
      found = [i for i, name in enumerate(SENTIMENT_ANSWERS) if name in words]
      return found[0] if len(found) == 1 else None

    return float(np.mean([label(a) == t for a, t in zip(self.answers, self.truth)]))


@dataclasses.dataclass
class Context:
  plan: Plan
  model_dir: Path
  tokenizer: Any
  train: dict[str, np.ndarray]
  train_examples: int
  test_texts: list[str]
  test_labels: np.ndarray


def make_context(plan: Plan, quick: bool, workdir: Path) -> Context:
  """The packed training split, the test subset, and the model directory (real or tiny)."""
  import transformers

  from smoa_jax.app import assets, datasets, llm_demo

  real_dir = assets.fetch_smollm2()
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(real_dir))
  if quick:
    model_dir = _models.save_random_llama(_models.tiny_llama_config(len(tokenizer), 256),
                                          workdir / "tiny")
  else:
    model_dir = real_dir
  split = datasets.split_sentiment(assets.load_sentiment())
  texts, labels = split["train"]
  if plan.train_limit is not None:
    texts, labels = texts[:plan.train_limit], labels[:plan.train_limit]
  train = llm_demo.chat_training_data(tokenizer, texts, labels, plan.seq_len)
  test_texts, test_labels = split["test"]
  rows = _evenly(len(test_texts), plan.test_limit)
  return Context(plan, model_dir, tokenizer, train.arrays, train.num_examples,
                 [test_texts[i] for i in rows], test_labels[rows])


def score(ctx: Context, model: Any) -> Scored:
  from smoa_jax.app.datasets import answer_sentiment

  answers, labels = answer_sentiment(model, ctx.tokenizer, ctx.test_texts,
                                     max_new_tokens=ctx.plan.max_new_tokens,
                                     batch_size=ctx.plan.eval_batch)
  return Scored(answers, labels, ctx.test_labels)


@dataclasses.dataclass
class Run:
  method: str
  seed: int
  trainable: int
  train_seconds: float
  final_loss: float
  scored: Scored


def train_run(ctx: Context, method: str, seed: int) -> Run:
  """A fresh model with the method's adapter, trained, then asked the test reviews."""
  import smoa_jax
  from smoa_jax.app import llm_demo

  plan = ctx.plan
  model = smoa_jax.from_hf(ctx.model_dir, scan_layers=True)
  config = {"SMoA": plan.budget.smoa, "LoRA": plan.budget.lora}[method](_models.LLAMA_TARGETS)
  trainable, loss, seconds = llm_demo.tune(
      model, ctx.train, config, steps=plan.steps, batch_size=plan.batch_size,
      warmup_steps=plan.warmup_steps, seed=seed)  # the method's default learning rate
  return Run(method, seed, trainable, seconds, loss, score(ctx, model))


def _pct(value: float) -> str:
  return f"{100 * value:.1f}%"


def render(ctx: Context, base: Scored, runs: list[Run], quick: bool, minutes: float) -> str:
  plan = ctx.plan
  from smoa_jax.app.datasets import SENTIMENT_QUESTION

  model_name = ("a tiny random Llama with SmolLM2's tokenizer (--quick: the numbers mean nothing)"
                if quick else "SmolLM2-135M-Instruct (real weights, dequantized Q4_1)")
  majority = float(np.mean(ctx.test_labels == np.bincount(ctx.test_labels).argmax()))
  rows = [["base model (zero-shot)", "0", "-", _pct(base.accuracy), "-", _pct(base.in_format),
           "-"]]
  by_method: dict[str, list[Run]] = {}
  for run in runs:
    by_method.setdefault(run.method, []).append(run)
  for method, group in by_method.items():
    accs = [r.scored.accuracy for r in group]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    name = (f"SMoA r={plan.budget.smoa_rank} K=2" if method == "SMoA"
            else f"LoRA r={plan.budget.lora_rank}")
    rows.append([name, f"{group[0].trainable:,}", f"{METHODS[method].default_learning_rate:g}",
                 f"{100 * statistics.mean(accs):.1f}% +- {100 * std:.1f}",
                 " / ".join(_pct(a) for a in accs),
                 _pct(statistics.mean(r.scored.in_format for r in group)),
                 f"{statistics.mean(r.train_seconds for r in group):.0f}"])
  table = _common.markdown_table(["model", "trainable", "lr", "test accuracy (mean +- std)",
                                  "per seed", "in format", "train s / run"], rows)
  first = {m: g[0] for m, g in by_method.items()}
  shown = [["review", "label", "base model"] + [f"{m} (seed {r.seed})" for m, r in first.items()]]
  for i in range(min(EXAMPLES_SHOWN, len(ctx.test_texts))):
    shown.append([_cell(ctx.test_texts[i], 90), ("negative", "positive")[ctx.test_labels[i]],
                  _cell(base.answers[i])] + [_cell(r.scored.answers[i]) for r in first.values()])
  examples = _common.markdown_table(shown[0], shown[1:])
  return f"""{model_name} instruction-tuned on the movie-review sentences as a chat task (user:
"{SENTIMENT_QUESTION}" + a blank line + the review; assistant: "positive" / "negative"), loss on
the assistant turn only. {ctx.train_examples:,} training conversations packed into
{len(ctx.train["input_ids"]):,} sequences of {plan.seq_len} tokens; {plan.steps} steps of
{plan.batch_size} sequences (about {plan.steps * plan.batch_size * ctx.train_examples
// len(ctx.train["input_ids"]):,} conversations seen), warmup {plan.warmup_steps}, seeds
{", ".join(map(str, plan.seeds))}. Equal trainable parameters: SMoA r={plan.budget.smoa_rank} K=2
vs LoRA r={plan.budget.lora_rank} on {", ".join(_models.LLAMA_TARGETS)} of every layer.

Accuracy of generated answers on {len(ctx.test_texts):,} test reviews (an evenly spaced subset of
the fixed 1,000-review test split, to fit the budget): greedy decoding with the KV cache (at most
{plan.max_new_tokens} new tokens), the label is the first word of the normalised answer; an answer
that does not start with "positive" or "negative" counts as wrong ("in format" is the share that
does). Majority class of the subset: {_pct(majority)}. The base model's answers read leniently
(exactly one of the two labels mentioned anywhere) score {_pct(base.lenient)}.

{table}

Before and after (the first test reviews of the subset; answers as generated):

{examples}

Learning rates: quality_real's choices for SmolLM2 (no grid here). Protocol: the docstring of
`benchmarks/instruct_sentiment.py`. Total wall time {minutes:.0f} min.
"""


def _cell(text: str, width: int = 60) -> str:
  text = " ".join(text.split()).replace("|", "\\|") or "(empty)"
  return text if len(text) <= width else text[:width - 3] + "..."


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = _common.benchmark_parser(
      MODULE, "Instruction-tune SmolLM2-135M-Instruct on the sentiment chat task with SMoA and "
              "LoRA at equal trainable parameters; accuracy of generated answers before and after.",
      epilog="The defaults are the full run (about half an hour on 2 CPU cores).")
  parser.add_argument("--steps", type=int, default=FULL.steps)
  parser.add_argument("--batch", type=int, default=FULL.batch_size,
                      help="packed sequences per step")
  parser.add_argument("--seeds", type=int, default=len(FULL.seeds), help="seeds per method")
  parser.add_argument("--test-limit", type=int, default=FULL.test_limit,
                      help="test reviews (an evenly spaced subset of the 1,000)")
  parser.add_argument("--max-new-tokens", type=int, default=FULL.max_new_tokens)
  parser.add_argument("--methods", default="SMoA,LoRA", help="comma-separated: SMoA, LoRA")
  _common.add_run_flags(parser, quick="a tiny random Llama with SmolLM2's tokenizer, 2 steps, one "
                        "seed: a smoke test (never writes)")
  args = parser.parse_args(argv)
  if args.quick:
    args.no_write = True
  unknown = set(args.methods.split(",")) - set(METHODS)
  if unknown:
    parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
  return args


def plan_from_args(args: argparse.Namespace) -> Plan:
  if args.quick:
    return QUICK
  return dataclasses.replace(FULL, steps=args.steps, warmup_steps=max(1, args.steps // 10),
                             batch_size=args.batch,
                             seeds=tuple(range(args.seeds)), test_limit=args.test_limit,
                             max_new_tokens=args.max_new_tokens)


def main(argv: Sequence[str] | None = None) -> str:
  """Run the benchmark, print the results, update RESULTS.md unless told not to; return the body."""
  argv = _common.cli_argv(argv)
  args = parse_args(argv)
  plan = plan_from_args(args)
  load_at_start = _common.load_average()
  started = time.perf_counter()

  log = _common.minutes_log(started)

  with (tempfile.TemporaryDirectory(prefix="smoa-instruct-") as workdir,
        _models.fast_compile(args.quick)):
    ctx = make_context(plan, args.quick, Path(workdir))
    log(f"{ctx.train_examples} training conversations in {len(ctx.train['input_ids'])} packed "
        f"sequences; {len(ctx.test_texts)} test reviews")
    import smoa_jax

    base = score(ctx, smoa_jax.from_hf(ctx.model_dir, scan_layers=True))
    log(f"base model: accuracy {_pct(base.accuracy)}, in format {_pct(base.in_format)}")
    runs = []
    for method in args.methods.split(","):
      for seed in plan.seeds:
        run = train_run(ctx, method, seed)
        log(f"{method} seed {seed}: accuracy {_pct(run.scored.accuracy)}, in format "
            f"{_pct(run.scored.in_format)}, final loss {run.final_loss:.3f} "
            f"({run.train_seconds:.0f} s training)")
        runs.append(run)
    body = render(ctx, base, runs, args.quick, (time.perf_counter() - started) / 60)
  _common.publish(SECTION, "instruct_sentiment: instruction-tuning SmolLM2 on a chat task, SMoA vs "
                  "LoRA", body, module=MODULE, argv=argv, write=not args.no_write,
                  load_at_start=load_at_start)
  return body


if __name__ == "__main__":
  main()
