"""``smoa-jax chat``: talk to a model (with a run's adapter) on stdin; each answer streams to stdout
token by token while it is generated, and the conversation is kept for the next turn.

One line is one user turn. ``/reset`` forgets the conversation (the ``--system`` message stays),
``/exit`` or end of input (Ctrl-D) quits. A turn that cannot be answered (say, the conversation
outgrew the model's context) prints one ``smoa-jax: error: ...`` line and the chat goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import numpy as np

from smoa_jax.app.commands import common
from smoa_jax.app.commands.generate import (add_model_source_flags, add_sampling_flags,
                                            load_for_generation, sampling_config)
from smoa_jax.errors import ConfigError, DataError


def register(add: common.AddCommand) -> None:
  parser = add("chat", run, "talk with a model (and a run's adapter) on stdin; answers stream as "
               "they are generated and the conversation is kept")
  add_model_source_flags(parser)
  parser.add_argument("--system", metavar="TEXT", help="a system message opening the conversation")
  add_sampling_flags(parser, max_new_tokens=256)


class Streamer:
  """Prints the text of the tokens generated so far as they arrive (a token may complete a
  character only with the next one, so text ending in U+FFFD waits)."""

  def __init__(self, tokenizer: Any, out: Any):
    self.tokenizer, self.out = tokenizer, out
    self.ids: list[int] = []
    self.shown = ""

  def __call__(self, tokens: np.ndarray) -> None:
    self.ids.append(int(tokens[0]))
    self._show(self.tokenizer.decode(self.ids, skip_special_tokens=True))

  def _show(self, text: str) -> None:
    if text.startswith(self.shown) and not text.endswith("\ufffd"):
      self.out.write(text[len(self.shown):])
      self.out.flush()
      self.shown = text

  def finish(self, reply: str) -> None:
    self._show(reply)
    self.out.write("\n")
    self.out.flush()


def run(args: argparse.Namespace) -> int:
  from smoa_jax.inference.text import generate_text

  sampling = sampling_config(args)
  model, tokenizer = load_for_generation(args)
  if not getattr(tokenizer, "chat_template", None):
    raise ConfigError("the model's tokenizer has no chat template, so there is no way to render "
                      "a conversation; use 'smoa-jax generate --prompt' for plain continuation.")
  opening = [{"role": "system", "content": args.system}] if args.system else []
  history = list(opening)
  interactive = sys.stdin.isatty()
  if interactive:
    common.log("type a message; /reset forgets the conversation, /exit or Ctrl-D quits")
  turn = 0
  while True:
    if interactive:
      sys.stdout.write("> ")
      sys.stdout.flush()
    line = sys.stdin.readline()
    if not line or line.strip() == "/exit":
      return 0
    text = line.strip()
    if text == "/reset":
      history = list(opening)
      continue
    if not text:
      continue
    conversation = history + [{"role": "user", "content": text}]
    streamer = Streamer(tokenizer, sys.stdout)
    try:
      reply = generate_text(model, tokenizer, [conversation],
                            dataclasses.replace(sampling, seed=sampling.seed + turn), chat=True,
                            on_token=streamer)[0]
    except DataError as err:
      common.log(f"error: {common.one_line(err)} (/reset starts a new conversation)")
      continue
    streamer.finish(reply)
    history = conversation + [{"role": "assistant", "content": reply}]
    turn += 1
