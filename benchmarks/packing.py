"""Benchmark: packing short instruction examples; training tokens/s of REAL tokens, packed vs padded

The data: the training split of the movie-review sentences (``smoa_jax.app.datasets``) as the chat
task ``"Is this review positive or negative?\\n\\n<review>"`` -> ``"positive"`` / ``"negative"``
(:func:`smoa_jax.app.datasets.sentiment_chat`), rendered with SmolLM2-135M-Instruct's chat
template (which adds its default system prompt): short examples of very different lengths.

Two layouts of the same examples at the same ``B x T`` (default 8 x 128; 128 is the smallest power
of two every example fits in):

* ``padded``: one example per row, right-padded (``smoa_jax.data.tokenize``);
* ``packed``: greedy first-fit in data order (``tokenize(..., packing=True)``), with segment ids
  (no attention across examples) and per-example positions.

The step is :func:`benchmarks.model_step.jax_step` (forward + backward of the whole model, loss on
the assistant tokens, clipping, AdamW over SMoA K=2 r=8 adapters on q, k, v, up, down), compiled
ahead of time for each layout's batch and timed interleaved
(:func:`benchmarks._common.time_interleaved`).
The two steps do the same dense work, so the gain is the fill: real tokens/s = (mean real tokens
per row over the whole split) x B / median step time, and an epoch takes rows / B steps. Packing
itself (host, once) is timed too.

Run from the repository root: ``python -m benchmarks.packing`` (SmolLM2 and the sentiment data
from the asset cache, fetched if missing). ``--quick``: a tiny random Llama with SmolLM2's
tokenizer, 64 examples, 2 rounds; a smoke test that never writes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

import smoa_jax
from benchmarks import _common, _models
from benchmarks.model_step import TARGETS, jax_step
from smoa_jax.app import assets, datasets
from smoa_jax.training import data

SECTION = "packing"
MODULE = "benchmarks.packing"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = _common.benchmark_parser(
      MODULE,
      "Training tokens/s of real tokens with packed vs padded sequences: SmolLM2-135M "
      "on the sentiment sentences as a chat task.")
  parser.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
  parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
  parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default 7)")
  parser.add_argument("--max-seconds", type=float, default=900.0,
                      help="stop timing after this long, once 3 rounds are done")
  parser.add_argument("--seed", type=int, default=0)
  _common.add_run_flags(parser,
                        quick="tiny random Llama, "
                              "64 examples, 2 rounds: a smoke test (never writes)")
  args = parser.parse_args(argv)
  if args.quick:
    args.batch, args.rounds, args.no_write = 2, 2, True
  return args


def examples(quick: bool) -> data.Records:
  """The sentiment training split as chat records (the first 64 with ``quick``)."""
  texts, labels = datasets.split_sentiment(assets.load_sentiment())["train"]
  if quick:
    texts, labels = texts[:64], labels[:64]
  return data.from_rows(datasets.sentiment_chat(texts, labels), source="sentiment/train")


def main(argv: Sequence[str] | None = None) -> str:
  """Run the benchmark, print the results, update RESULTS.md unless told not to; return the body."""
  import transformers

  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  load_at_start = _common.load_average()
  real_dir = assets.fetch_smollm2()
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(real_dir))
  records = examples(args.quick)
  padded = data.tokenize(records, tokenizer, args.seq)
  start = time.perf_counter()
  packed = data.pack(padded, pad_id=tokenizer.pad_token_id or 0)
  pack_seconds = time.perf_counter() - start
  layouts = {"padded": padded, "packed": packed}
  with tempfile.TemporaryDirectory(prefix="smoa-packing-") as workdir, _models.fast_compile(args.quick):
    if args.quick:
      config = {**_models.tiny_llama_config(len(tokenizer)), "max_position_embeddings": args.seq}
      model_dir = _models.save_random_llama(config, Path(workdir) / "tiny")
      model_name = "a tiny random Llama with SmolLM2's tokenizer (--quick)"
    else:
      model_dir, model_name = real_dir, "SmolLM2-135M-Instruct (real weights, dequantized Q4_1)"
    model = smoa_jax.from_hf(model_dir)
    smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(r=8, num_blocks=2, alpha=16.0,
                                                      target_modules=TARGETS),
                           rngs=nnx.Rngs(args.seed), verbose=False, show_progress=False)
    steps = {}
    for name, tokens in layouts.items():
      batch = data.batch_at(tokens.arrays, args.batch, args.seed, 0, 0)
      steps[name] = jax_step(model, {k: jnp.asarray(v) for k, v in batch.items()})
      print(f"compiled the {name} step", flush=True)
    timings = _common.time_interleaved({name: s.run for name, s in steps.items()},
                                       rounds=args.rounds, max_seconds=args.max_seconds)
  body = render(args, layouts, timings, pack_seconds, model_name, len(records))
  _common.publish(SECTION, "packing: real tokens/s of packed vs padded instruction data", body,
                  module=MODULE, argv=argv, write=not args.no_write,
                  load_at_start=load_at_start)
  return body


def render(args: argparse.Namespace, layouts: dict[str, data.Tokenized],
           timings: _common.Timings, pack_seconds: float, model_name: str, count: int) -> str:
  rows, fill = [], {}
  for name, tokens in layouts.items():
    mask = tokens.arrays["attention_mask"]
    fill[name] = float(mask.mean())
    seconds = timings.median(name)
    rate = fill[name] * args.batch * args.seq / seconds
    epoch_minutes = len(tokens) / args.batch * seconds / 60
    rows.append([name, f"{len(tokens):,}", f"{fill[name]:.1%}", f"{seconds:.3f}", f"{rate:,.0f}",
                 f"{epoch_minutes:,.1f}"])
  lengths = layouts["padded"].arrays["attention_mask"].sum(axis=1)
  paired = timings.ratio("padded", "packed")  # same-round step-time ratio (about 1)
  gain = fill["packed"] / fill["padded"] * paired
  table = _common.markdown_table(
      ["layout", "rows", "real tokens (fill)", "step s (median)", "real tokens/s", "epoch min"],
      rows)
  question = datasets.SENTIMENT_QUESTION
  return f"""{model_name}: {count:,} chat examples (the sentiment train split as "{question}" ->
"positive" / "negative", SmolLM2's chat template: {lengths.min()} to {lengths.max()} tokens,
median {int(np.median(lengths))}; {layouts["padded"].num_skipped} skipped as too long). Batch
{args.batch} x {args.seq} tokens, SMoA K=2 r=8 on {", ".join(TARGETS)}, {timings.rounds}
interleaved rounds. Real tokens/s = fill x {args.batch * args.seq} / median step time.

{table}

**Packing gain: {gain:.2f}x real tokens/s** = fill ratio {fill["packed"] / fill["padded"]:.2f} x the
step-time ratio padded / packed in the same round, {paired:.2f} (the two steps do the same dense
work, so it is about 1 and the gain is the fill). First-fit packing of the whole split took
{pack_seconds:.2f} s on the host, once. The packed loss equals the padded loss: segment ids keep
attention and targets inside each example (`tests/training/test_tasks.py`).
"""


if __name__ == "__main__":
  main()
