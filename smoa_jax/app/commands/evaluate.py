"""``smoa-jax eval``: loss and perplexity or accuracy of a model (with a run's adapter) on a JSONL
file, printed as one JSON object. Prompt/completion and messages data are scored on the answer
tokens only (the completion + EOS, the assistant turns), like training. With ``--adapter NAME=DIR``
(repeatable): several adapters on one base model, one JSON object per adapter (the base is loaded
once; adapters switch by name). ``--metric exact-match`` (prompt/completion and messages data) adds
``exact_match``: the fraction of greedy answers equal to the reference after normalisation
(:func:`smoa_jax.inference.exact_match`)."""

from __future__ import annotations

import argparse
import json

from smoa_jax.app.commands import common
from smoa_jax.app.commands.common import RUN_DEFAULTS, TASKS, positive_int

METRICS = ("loss", "exact-match")


def register(add: common.AddCommand) -> None:
  parser = add("eval", run, "print the loss and perplexity or accuracy of a model, with a run's "
               "adapter, on a JSONL file, as one JSON object")
  common.add_model_flags(parser, "default: the --run's model")
  parser.add_argument("--run", type=common.absolute_path, metavar="RUN_DIR",
                      help="apply this run's adapter")
  parser.add_argument("--data", type=common.absolute_path, required=True,
                      help=f"{common.DATA_KINDS}; the loss and perplexity of instruction data are "
                      "over the answer tokens only")
  parser.add_argument("--task", choices=TASKS, help="default: the run's, else causal-lm")
  parser.add_argument("--seq-len", type=positive_int, help="default: the run's, else 128")
  parser.add_argument("--num-labels", type=positive_int,
                      help="classification: default: the run's, else the largest label + 1")
  parser.add_argument("--batch-size", type=positive_int, default=16,
                      help="examples per batch, also prompts generated together (default: 16)")
  parser.add_argument("--metric", choices=METRICS, default="loss",
                      help="loss: loss and perplexity (or accuracy); exact-match: also generate a "
                      "greedy answer to every prompt of prompt/completion or messages data and "
                      "report the fraction equal to the reference after normalisation (case, "
                      "Unicode form, surrounding whitespace and punctuation) (default: loss)")
  parser.add_argument("--max-new-tokens", type=positive_int,
                      help="exact-match: new tokens per answer at most (default: the longest "
                      "reference in tokens + 4)")
  common.add_adapter_flag(parser, "evaluate (one JSON object per adapter)")


def run(args: argparse.Namespace) -> int:
  """One JSON object with loss and perplexity or accuracy on stdout."""
  import smoa_jax
  from smoa_jax.inference import answers

  run_config = common.run_of(args)
  flags = run_config["flags"]
  task = args.task or flags.get("task") or RUN_DEFAULTS["task"]
  seq_len = args.seq_len or flags.get("seq_len") or RUN_DEFAULTS["seq_len"]
  tokenizer = common.load_tokenizer(common.model_dir(args, run_config))
  records, tokens = common.tokenized(args.data, task, tokenizer, seq_len,
                                     args.num_labels or run_config.get("num_labels"), "evaluation")
  exact = args.metric == "exact-match"
  if exact:
    answers.answer_prompts(records)  # text records: an error before the model loads
  names = common.adapter_names(args)
  model = common.model_with_adapter(args, run_config, task, records.num_labels, seq_len)
  skipped = {"num_skipped": tokens.num_skipped} if records.kind != "text" else {}
  for name in names:
    named = common.activate(model, args, name)
    metrics = smoa_jax.evaluate(model, common.task_of(task), tokens.arrays,
                                batch_size=args.batch_size)
    if exact:
      scored = answers.exact_match(model, tokenizer, records, max_new_tokens=args.max_new_tokens,
                                   batch_size=args.batch_size)
      metrics["exact_match"] = scored.score
    print(json.dumps({**named, **metrics, "num_examples": tokens.num_examples, **skipped}))
  return 0
