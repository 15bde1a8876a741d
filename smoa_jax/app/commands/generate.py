"""``smoa-jax generate``: continue prompts (or chat conversations) with a model, with a run's
adapter, and write one JSON record per prompt.

Prompts come from ``--prompt TEXT ...`` or a JSONL file (``--data``) of ``{"prompt": TEXT}`` or
``{"messages": [{"role", "content"}, ...]}`` records, one kind per file (other fields, such as a
reference ``completion``, are carried over). ``--chat`` renders plain prompts as one user turn
with the tokenizer's chat template; ``messages`` records are always rendered with it. Output
records are ``{"prompt" | "messages": ..., "generation": TEXT}`` (with ``"adapter": NAME`` for
each ``--adapter NAME=DIR``, all on one base model), to ``--output`` (written
whole, then renamed into place) or to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from smoa_jax.app.commands import common
from smoa_jax.app.commands.common import positive_int
from smoa_jax.errors import DataError

KINDS = ("prompt", "messages")


def add_sampling_flags(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
  """``--max-new-tokens``, ``--temperature``, ``--top-k``, ``--top-p``, ``--seed`` (validated by
  :class:`smoa_jax.inference.SamplingConfig`, so bad values get its message)."""
  parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                      help=f"new tokens per prompt at most (default: {max_new_tokens})")
  parser.add_argument("--temperature", type=float, default=0.0,
                      help="0 = greedy decoding; > 0 samples (default: 0)")
  parser.add_argument("--top-k", type=int, help="sample among the K most likely tokens")
  parser.add_argument("--top-p", type=float, help="nucleus sampling: the most likely tokens "
                      "holding probability P, in (0, 1]")
  parser.add_argument("--seed", type=int, default=0, help="seed of sampling (default: 0)")


def sampling_config(args: argparse.Namespace):
  from smoa_jax.inference import SamplingConfig

  return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def add_model_source_flags(parser: argparse.ArgumentParser) -> None:
  common.add_model_flags(parser, "default: the --run's model")
  parser.add_argument("--run", type=common.absolute_path, metavar="RUN_DIR",
                      help="apply this run's adapter (unmerged)")


def load_for_generation(args: argparse.Namespace):
  """``(model, tokenizer)`` of ``--model`` / ``--run`` (with the run's adapter)."""
  run_config = common.run_of(args)
  tokenizer = common.load_tokenizer(common.model_dir(args, run_config))
  return common.model_with_adapter(args, run_config, "causal-lm", None), tokenizer


def register(add: common.AddCommand) -> None:
  parser = add("generate", run, "continue prompts or chat conversations with a model (and a run's "
               "adapter); one JSON record per prompt")
  add_model_source_flags(parser)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--prompt", nargs="+", metavar="TEXT", help="prompts to continue")
  source.add_argument("--data", type=common.absolute_path, metavar="PROMPTS.jsonl",
                      help='JSONL of {"prompt": ...} or {"messages": [...]} records')
  parser.add_argument("--chat", action="store_true",
                      help="render each prompt as a user turn with the tokenizer's chat template")
  add_sampling_flags(parser, max_new_tokens=128)
  parser.add_argument("--batch-size", type=positive_int, default=8,
                      help="prompts generated together (default: 8)")
  parser.add_argument("--output", type=common.absolute_path, metavar="GENERATIONS.jsonl",
                      help="write the records here (default: stdout)")
  common.add_adapter_flag(parser, "generate (each record then names its \"adapter\")")


def read_prompts(path: str) -> list[dict[str, Any]]:
  """The records of a prompts file; DataError (``file:line: ...``) for anything else."""
  from smoa_jax.inference.text import chat_messages

  source = Path(path)
  if not source.is_file():
    raise DataError(f"prompts file {path} does not exist.")
  records, kind = [], None
  with open(source, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
        record = json.loads(line) if line.strip() else None
      except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{where}: not a UTF-8 JSON object ({err}).") from None
      if record is None:
        continue
      found = [k for k in KINDS if isinstance(record, dict) and k in record]
      if len(found) != 1:
        raise DataError(f'{where}: expected an object with "prompt" (text) or "messages" (a chat '
                        f"conversation), got {line.strip()[:80]}.")
      if kind is not None and found[0] != kind:
        raise DataError(f"{where}: a {found[0]!r} record in a file of {kind!r} records; use one "
                        "kind per file.")
      kind = found[0]
      if kind == "prompt" and not isinstance(record["prompt"], str):
        raise DataError(f'{where}: "prompt" must be a string.')
      if kind == "messages":
        chat_messages(record["messages"], where)
      records.append(record)
  if not records:
    raise DataError(f"prompts file {path} holds no records.")
  return records


def write_jsonl(records: list[dict[str, Any]], output: str | None) -> None:
  """To stdout, or to ``output`` through a temporary file renamed into place."""
  text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
  if output is None:
    sys.stdout.write(text)
    return
  target = Path(output)
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, target)
  except BaseException:
    os.unlink(tmp)
    raise
  common.log(f"wrote {len(records)} generations to {target}")


def run(args: argparse.Namespace) -> int:
  from smoa_jax.inference.text import generate_text

  sampling = sampling_config(args)  # bad values fail before the model loads
  records = ([{"prompt": p} for p in args.prompt] if args.prompt else read_prompts(args.data))
  chat = args.chat or "messages" in records[0]
  prompts = [r.get("messages", r.get("prompt")) for r in records]
  names = common.adapter_names(args)
  model, tokenizer = load_for_generation(args)
  out = []
  for name in names:
    named = common.activate(model, args, name)
    generations = generate_text(model, tokenizer, prompts, sampling, chat=chat,
                                batch_size=args.batch_size)
    out += [{**r, **named, "generation": g} for r, g in zip(records, generations)]
  write_jsonl(out, args.output)
  return 0
