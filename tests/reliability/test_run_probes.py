"""Probes: runs that go wrong -- bad command lines, NaN losses, kills and full disks mid-save."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import smoa_jax
from smoa_jax.training import data as data_lib
from tests.reliability import probe, probe_cases
from tests.support.cli import finetune_argv, run_cli
from tests.support.state import adapter_arrays
from tests.support.toy import ToyLM, lm_run, token_data

ROOT = Path(__file__).resolve().parents[2]


def _damaged(tmp_path: Path, lines: list[str]) -> Path:
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return path


BAD_INPUT = {
    # name: (argv builder (files, tmp_path) -> argv, exit code, text in the error)
    "missing model dir": (lambda f, t: finetune_argv(f, t / "run") + ["--model", t / "nope"], 1,
                          "does not exist"),
    "model dir without tokenizer": (
        lambda f, t: finetune_argv(f, t / "run") + ["--model", t], 1, "tokenizer"),
    "missing data file": (lambda f, t: finetune_argv(f, t / "run") + ["--data", t / "x.jsonl"], 1,
                          "does not exist"),
    "bad JSONL line": (lambda f, t: finetune_argv(f, t / "run") + [
        "--data", _damaged(t, ['{"text": "a b"}', '{"text": "c d"}', "{oops"])], 1, "bad.jsonl:3"),
    "missing text": (lambda f, t: finetune_argv(f, t / "run") + [
        "--data", _damaged(t, ['{"txt": "a"}'])], 1, "\"text\""),
    "label out of range": (lambda f, t: finetune_argv(f, t / "run", "classification") + [
        "--data", _damaged(t, ['{"text": "a", "label": 0}', '{"text": "b", "label": 2}']),
        "--num-labels", 2], 1, "label 2 is out of range"),
    "eval label beyond the training labels": (
        lambda f, t: finetune_argv(f, t / "run", "classification") + [
            "--eval-data", _damaged(t, ['{"text": "a", "label": 5}'])], 1, "out of range"),
    "non-empty run dir": (lambda f, t: finetune_argv(f, t), 1, "not empty"),
    "resume without a run": (lambda f, t: ["finetune", "--output", t / "empty", "--resume"], 1,
                             "no run to resume"),
    "resume and overwrite": (lambda f, t: finetune_argv(f, t / "run") + ["--resume", "--overwrite"],
                             2, "not allowed with"),
    "bad mesh spec": (lambda f, t: finetune_argv(f, t / "run") + ["--mesh", "data=two"], 1,
                      "mesh spec"),
    "mesh larger than the devices": (lambda f, t: finetune_argv(f, t / "run") + ["--mesh",
                                                                                 "data=64"], 1,
                                     "devices"),
    "unknown method": (lambda f, t: finetune_argv(f, t / "run") + ["--method", "dora"], 2,
                       "invalid choice"),
    "unknown target": (lambda f, t: finetune_argv(f, t / "run") + ["--targets", "qkv"], 1,
                       "no linear layer matched"),
    "rank zero": (lambda f, t: finetune_argv(f, t / "run") + ["--r", 0], 2, "--r"),
    "dropout of one": (lambda f, t: finetune_argv(f, t / "run") + ["--dropout", 1], 1, "dropout"),
    "negative learning rate": (lambda f, t: finetune_argv(f, t / "run") + ["--lr", -1], 1,
                               "learning_rate"),
    "steps and epochs": (lambda f, t: finetune_argv(f, t / "run") + ["--epochs", 1], 2,
                         "not allowed with"),
    "batch larger than the data": (lambda f, t: finetune_argv(f, t / "run") + ["--batch-size", 99],
                                   1, "cannot fill one batch"),
    "sequence longer than the positions": (
        lambda f, t: finetune_argv(f, t / "run", "classification") + ["--seq-len", 999], 1,
        "positions"),
    "classification head on a causal LM": (
        lambda f, t: finetune_argv(f, t / "run", "classification") + ["--model", f["llama"]], 1,
        "num_labels"),
    "too many blocks": (lambda f, t: finetune_argv(f, t / "run") + ["--num-blocks", 99], 1,
                        "num_blocks"),
    "eval of a directory that is no run": (lambda f, t: ["eval", "--run", t, "--data",
                                                         f["lm_eval"]], 1, "not a smoa-jax run"),
    "export of a directory that is no run": (lambda f, t: ["export", "--run", t, "--output",
                                                           t / "out"], 1, "not a smoa-jax run"),
    "missing required flag": (lambda f, t: ["eval", "--model", f["llama"]], 2, "--data"),
    "no command": (lambda f, t: [], 2, "choose a command"),
    "unknown asset": (lambda f, t: ["fetch-assets", "minilm", "imagenet"], 2,
                      "unknown asset imagenet"),
}


@probe_cases("cli", {case: (f"`smoa-jax` with {case}", f"exit {code}, one line `smoa-jax: error: "
                                                     f"...{text}...`, no traceback, no run dir")
                     for case, (_, code, text) in BAD_INPUT.items()})
@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gives_one_line_and_a_nonzero_exit(case, cli_files, tmp_path, capsys):
  build, expected_code, text = BAD_INPUT[case]
  (tmp_path / "leftover.txt").write_text("makes tmp_path a non-empty directory")
  code, _, err = run_cli(capsys, *build(cli_files, tmp_path))
  errors = [line for line in err.splitlines() if line.startswith("smoa-jax: error: ")]
  assert code == expected_code, err
  assert len(errors) == 1 and text in errors[0], err
  assert "Traceback" not in err
  assert all(line.startswith("smoa-jax: ") for line in err.splitlines()), err
  assert not (tmp_path / "run").exists()  # nothing half-written


@probe("runs", "the loss becomes NaN at some step (a poisoned batch)",
       "NonFiniteLossError naming the step and the last good checkpoint, which stays the latest")
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  class PoisonedTask(smoa_jax.CausalLMTask):
    """NaN loss as soon as a batch holds the poisoned example."""

    def loss(self, model, batch):
      loss, weight, metrics = super().loss(model, batch)
      poisoned = jnp.any(batch["input_ids"] == 30)
      return jnp.where(poisoned, jnp.nan, loss), weight, metrics

  data = token_data(40)
  data["input_ids"] = np.where(data["input_ids"] == 30, 29, data["input_ids"])
  first_bad = 3  # poison an example of the third batch (seed 3, epoch 0)
  data["input_ids"][np.random.default_rng([3, 0]).permutation(40)[(first_bad - 1) * 8], 0] = 30
  assert 30 in data_lib.batch_at(data, 8, 3, 0, first_bad - 1)["input_ids"]
  assert all(30 not in data_lib.batch_at(data, 8, 3, 0, i)["input_ids"] for i in range(first_bad - 1))
  model = ToyLM(seed=0)
  smoa_jax.apply_adapter(model, smoa_jax.SMoAConfig(4, 2, 8.0, target_modules=["q_proj"]),
                         rngs=nnx.Rngs(1), verbose=False)
  config = smoa_jax.TrainConfig(steps=20, batch_size=8, save_every=1, log_every=1, seed=3,
                                progress=False)
  with pytest.raises(smoa_jax.NonFiniteLossError, match=f"at step {first_bad}.*step {first_bad - 1}"):
    smoa_jax.train(model, PoisonedTask(), data, config, output_dir=tmp_path)
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert max(steps) == first_bad - 1
  # The last good checkpoint restores.
  ckpt = smoa_jax.TrainCheckpointer(tmp_path / "checkpoints")
  assert ckpt.latest_step() == first_bad - 1
  ckpt.close()


@probe("data", "texts longer than --seq-len",
       "truncated, and stderr reports how many (`N of M training texts were truncated`)")
def test_truncation_is_counted(cli_files, tmp_path, capsys):
  long_text = " ".join(["the cat sat on the mat"] * 20)
  data = tmp_path / "long.jsonl"
  data.write_text("".join(json.dumps({"text": long_text if i % 4 == 0 else "a cat"}) + "\n"
                          for i in range(16)))
  code, _, err = run_cli(capsys, *finetune_argv(cli_files, tmp_path / "run") + ["--data", data,
                                                                            "--steps", 1])
  assert code == 0, err
  assert "4 of 16 training texts were truncated" in err


@probe("runs", "SIGKILL while a checkpoint is being committed (after its files are written)",
       "the interrupted step never appears; the previous checkpoint stays valid and resume works")
@pytest.mark.slow  # a subprocess killed mid-save; test_loop's SIGKILL resume runs by default
@pytest.mark.subprocess
def test_sigkill_during_checkpoint_save(toy_run, tmp_path):
  killed = tmp_path / "run"
  script = ("import os, signal\n"
            "from orbax.checkpoint._src.path import atomicity\n"
            "from tests.support.toy import lm_run\n"
            "original = atomicity.AtomicRenameTemporaryPath.finalize\n"
            "async def finalize(self, *args, **kwargs):\n"
            "  if self.get_final().name == '4':  # step 4: every item written, not yet committed\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "  return await original(self, *args, **kwargs)\n"
            "atomicity.AtomicRenameTemporaryPath.finalize = finalize\n"
            f"lm_run({str(killed)!r})\n")
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  checkpoint = smoa_jax.TrainCheckpointer(killed / "checkpoints")
  assert checkpoint.all_steps() == [2]
  checkpoint.close()
  resumed, result = lm_run(killed, resume=True)
  assert result.step == 6
  arrays = adapter_arrays(resumed)
  assert arrays.keys() == toy_run.keys()
  for key, reference in toy_run.items():  # the uninterrupted run
    np.testing.assert_array_equal(arrays[key], reference, err_msg=key)


@probe("runs", "disk write failure (ENOSPC) while saving the training checkpoint",
       "the OSError stops training; earlier checkpoints stay valid and a resume continues from them")
def test_disk_full_during_training_checkpoint(toy_run, tmp_path, monkeypatch):
  original = ocp.CheckpointManager.save
  saves = []

  def failing_save(self, step, *args, **kwargs):
    saves.append(step)
    if step == 4:
      raise OSError(28, "No space left on device")
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
  with pytest.raises(OSError, match="No space left"):
    lm_run(tmp_path / "run")
  monkeypatch.setattr(ocp.CheckpointManager, "save", original)
  checkpoint = smoa_jax.TrainCheckpointer(tmp_path / "run" / "checkpoints")
  assert checkpoint.all_steps() == [2]
  checkpoint.close()
  resumed, result = lm_run(tmp_path / "run", resume=True)
  assert result.step == 6
  arrays = adapter_arrays(resumed)
  for key, reference in toy_run.items():  # the uninterrupted run
    np.testing.assert_array_equal(arrays[key], reference, err_msg=key)
