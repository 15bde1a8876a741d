"""Session fixtures: the tiny Hugging Face checkpoints and the finished runs that several test
modules share, each built once per session (the builders live in ``tests/support``).

They are read-only. A test that writes into one copies it first
(:func:`tests.support.files.copy_of`); the directory fixtures compare a digest of their files at
the end of the session, so a test that modified one fails there instead of silently changing what
later tests see.
"""

from __future__ import annotations

from tests.support import xla

xla.compile_fast()  # before anything starts JAX: the workers and subprocesses inherit it
_SHARED_COMPILATIONS = xla.share_compilations()

import shutil  # noqa: E402
import types
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import transformers

from smoa_jax.app import cli
from tests.support import corpus, hf, sharded_run, toy
from tests.support.cli import LM_RUN_EXTRA, finetune_argv
from tests.support.files import tree_digest, write_jsonl
from tests.support.state import adapter_arrays


# The longest test files of the default run (1-3 min each on 2 cores), handed out first: with
# `--dist loadfile --no-loadscope-reorder` (pyproject.toml) a worker takes whole files in collection
# order, and a long file handed out last keeps one worker busy after the other is done (xdist's own
# order, most tests first, left the 90 s multi-process test to the end).
LONGEST_FIRST = ("app/test_cli.py", "test_readme.py", "parallel/test_multiprocess.py",
                 "training/test_loop.py", "models/test_remat.py", "inference/test_decode.py",
                 "app/test_demo.py", "models/test_gemma.py", "test_scripts.py", "test_examples.py")


def pytest_collection_modifyitems(config, items):
  tests = Path(__file__).parent
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.relative_to(tests).as_posix(), len(rank))
             if item.path.is_relative_to(tests) else len(rank))


def pytest_unconfigure(config):
  if _SHARED_COMPILATIONS is not None:  # the process that created it: the controller
    shutil.rmtree(_SHARED_COMPILATIONS)


def _read_only(path: Path) -> Iterator[Path]:
  before = tree_digest(path)
  yield path
  assert tree_digest(path) == before, (
      f"a test modified the shared fixture directory {path}; copy it first "
      "(tests.support.files.copy_of)")


def _frozen(arrays: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
  for array in arrays.values():
    array.setflags(write=False)
  return types.MappingProxyType(dict(arrays))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Iterator[Path]:
  """A saved tiny untied Llama (:data:`tests.support.hf.LLAMA`, perturbed) with a stand-in
  ``tokenizer.json``."""
  path = hf.save_random(transformers.LlamaForCausalLM, transformers.LlamaConfig(**hf.LLAMA),
                        tmp_path_factory.mktemp("llama"))
  (path / "tokenizer.json").write_text("{}")  # stands in for real tokenizer files
  yield from _read_only(path)


@pytest.fixture(scope="session")
def word_llama(tmp_path_factory) -> Iterator[Path]:
  """A two-layer Llama with a word tokenizer over :data:`tests.support.corpus.VOCABULARY`."""
  yield from _read_only(hf.word_llama(tmp_path_factory.mktemp("word-llama"), corpus.VOCABULARY))


@pytest.fixture(scope="session")
def chat_llama(tmp_path_factory) -> Iterator[Path]:
  """The word Llama with a chat template (``tests.support.hf.WORD_CHAT_TEMPLATE``)."""
  yield from _read_only(hf.chat_word_llama(tmp_path_factory.mktemp("chat-llama"),
                                           corpus.VOCABULARY))


@pytest.fixture(scope="session")
def word_bert(tmp_path_factory) -> Iterator[Path]:
  """A two-layer BERT encoder with a word tokenizer over the same vocabulary."""
  yield from _read_only(hf.word_bert(tmp_path_factory.mktemp("word-bert"), corpus.VOCABULARY))


@pytest.fixture(scope="session")
def cli_files(word_llama, word_bert, tmp_path_factory) -> Mapping[str, Path]:
  """The tiny models and train/eval JSONL files of both tasks (labelled sentences)."""
  root = tmp_path_factory.mktemp("cli-data")
  train, held_out = corpus.sentences(48, seed=0), corpus.sentences(16, seed=1)
  return types.MappingProxyType({
      "llama": word_llama, "bert": word_bert,
      "lm_train": write_jsonl(root / "lm_train.jsonl", [{"text": t} for t, _ in train]),
      "lm_eval": write_jsonl(root / "lm_eval.jsonl", [{"text": t} for t, _ in held_out]),
      "cls_train": write_jsonl(root / "cls_train.jsonl",
                               [{"text": t, "label": y} for t, y in train]),
      "cls_eval": write_jsonl(root / "cls_eval.jsonl",
                              [{"text": t, "label": y} for t, y in held_out]),
  })


@pytest.fixture(scope="session")
def cli_lm_run(cli_files, tmp_path_factory) -> Iterator[Path]:
  """A finished ``smoa-jax finetune`` SMoA causal-LM run of the word Llama (4 steps, checkpoints
  at 2 and 4, evaluated at both)."""
  run = tmp_path_factory.mktemp("cli-lm-run") / "run"
  argv = finetune_argv(cli_files, run, "causal-lm", *LM_RUN_EXTRA)
  assert cli.main([str(a) for a in argv]) == 0
  yield from _read_only(run)


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory) -> Mapping[str, np.ndarray]:
  """The adapter arrays after the uninterrupted :func:`tests.support.toy.lm_run` (6 steps)."""
  model, _ = toy.lm_run(tmp_path_factory.mktemp("toy-run"))
  return _frozen(adapter_arrays(model))


@pytest.fixture(scope="session")
def sharded_llama(tmp_path_factory) -> tuple[str, Mapping[str, np.ndarray]]:
  """``(checkpoint directory, single-device reference run)`` for the simulated-mesh tests."""
  checkpoint = sharded_run.make_checkpoint(tmp_path_factory.mktemp("sharded-llama"))
  return checkpoint, _frozen(sharded_run.reference(checkpoint))
