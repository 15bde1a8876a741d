"""Running ``smoa-jax`` in-process on the tiny word models (the ``cli_files`` fixture)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import smoa_jax
from smoa_jax.app import cli

# The targets of the shared finished run (``cli_lm_run``); runs that must equal it use them too.
LM_RUN_EXTRA = ("--targets", "q_proj,v_proj,up_proj")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
  """``(exit code, stdout, stderr)`` of ``smoa-jax ARGV``."""
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def finetune_argv(files: dict[str, Path], run: Path, task: str = "causal-lm", *extra) -> list:
  """A small ``finetune`` (r 4, 4 steps of 8, checkpoints at 2 and 4) of the tiny Llama
  (``causal-lm``) or the tiny BERT (``classification``), with ``extra`` flags appended."""
  data = ("lm_train", "lm_eval") if task == "causal-lm" else ("cls_train", "cls_eval")
  model = files["llama"] if task == "causal-lm" else files["bert"]
  return ["finetune", "--model", model, "--data", files[data[0]], "--eval-data", files[data[1]],
          "--task", task, "--output", run, "--r", 4, "--steps", 4, "--batch-size", 8,
          "--seq-len", 16, "--save-every", 2, "--log-every", 1, "--lr", 1e-2, "--no-progress",
          *extra]


def adapter_tensors(run: Path) -> dict[str, np.ndarray]:
  return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def ours_with_adapter(model_dir: Path, run: Path, num_labels: int | None = None):
  """``model_dir`` as our model with ``run``'s adapter loaded."""
  with warnings.catch_warnings():  # a fresh classification head, overwritten by the adapter
    warnings.simplefilter("ignore")
    model = smoa_jax.from_hf(model_dir, num_labels=num_labels)
  smoa_jax.load_adapter(model, run / "adapter")
  return model
