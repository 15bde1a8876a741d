"""The ``smoa-jax`` command: fine-tune, evaluate, export and inspect adapters of HF models.

Sub-commands (``smoa-jax COMMAND --help`` lists every flag), one module each in
:mod:`smoa_jax.app.commands`::

  finetune      train an adapter (SMoA, LoRA, HiRA, or full fine-tuning) on a JSONL file
  eval          loss and perplexity (causal LM) or accuracy (classification) on a JSONL file
  generate      continue prompts or chat conversations (with a run's adapter), JSONL out
  chat          talk to a model (with a run's adapter) on stdin, answers streamed
  export        a run as a merged Hugging Face directory, or its adapter alone
  inspect       what an adapter would adapt, its size vs LoRA, its spectral blocks; with --run,
                the rank and the directions of every learned dW
  demo          SMoA vs LoRA on a real encoder and real sentiment data (the main job)
  fetch-assets  download the real models and data into the cache

``finetune --output RUN_DIR`` fills a run directory (:mod:`smoa_jax.io.rundir`); ``eval``,
``export``, ``generate``, ``chat`` and ``inspect --run`` read the run's ``run_config.json`` for
whatever they are not told (model directory, task, sequence length, number of labels).

Bad input (an :class:`~smoa_jax.SMoAError`, a missing or unreadable file, a bad flag) prints ONE
line, ``smoa-jax: error: ...``, to stderr and exits with status 1 (2 for a bad flag); ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from typing import Sequence

from smoa_jax import __version__
from smoa_jax.app.commands import chat, demo, evaluate, export, finetune, generate, inspection
from smoa_jax.app.commands.common import PROG, Command, Parser, UsageError, log, one_line
from smoa_jax.errors import SMoAError

__all__ = ["main", "build_parser", "UsageError"]

# In the order ``smoa-jax --help`` lists them.
COMMAND_MODULES = (finetune, evaluate, generate, chat, export, inspection, demo)


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of ``smoa-jax`` (every sub-command and flag)."""
  parser = Parser(prog=PROG, description="SMoA (Spectrum Modulation Adapter) fine-tuning for "
                  "JAX/Flax. Start with 'smoa-jax demo'.")
  parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
  parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
  common = Parser(add_help=False)
  common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                      help="show tracebacks of errors")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

  names: list[str] = []

  def add(name: str, run: Command, help: str) -> Parser:
    sub = commands.add_parser(name, help=help, description=help, parents=[common])
    sub.set_defaults(func=run)
    names.append(name)
    return sub

  for module in COMMAND_MODULES:
    module.register(add)
  parser.set_defaults(command_names=tuple(names))
  return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
  del filename, lineno, file, line
  log(f"warning: {one_line(message)}" if category is UserWarning
      else f"warning: {category.__name__}: {one_line(message)}")


def main(argv: Sequence[str] | None = None) -> int:
  """Run ``smoa-jax`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv
  try:
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.command is None:
      raise UsageError(f"choose a command: {', '.join(args.command_names)} (see '{PROG} --help'; "
                       f"start with '{PROG} demo')")
    with warnings.catch_warnings():
      warnings.showwarning = _show_warning
      return args.func(args)
  except SystemExit as exit_:  # --help and --version
    return exit_.code if isinstance(exit_.code, int) else 0
  except KeyboardInterrupt:
    log("interrupted")
    return 130
  except (SMoAError, OSError) as err:
    if debug:
      traceback.print_exc()
    log(f"error: {one_line(err) or type(err).__name__}")
    return 2 if isinstance(err, UsageError) else 1


if __name__ == "__main__":
  sys.exit(main())
