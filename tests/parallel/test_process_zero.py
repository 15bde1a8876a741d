"""One voice per pod: reports and progress bars on process 0 only, and ``to_hf`` written by
process 0 alone while every process takes part in its gathers; the same data on every host.
Other processes are simulated (``jax.process_index`` returning 1, a fake all-gather)."""

from __future__ import annotations

import socket

import jax
import numpy as np
import pytest
from flax import nnx

import smoa_jax
from smoa_jax.models import hf
from smoa_jax.parallel import sharding
from smoa_jax.training import data as data_lib
from tests.support.toy import SMOA, ToyLM, token_data


@pytest.fixture
def process(monkeypatch):
  """``process(i)``: from now on this process is process ``i`` of a job of 2."""
  from jax.experimental import multihost_utils

  def become(index: int) -> None:
    monkeypatch.setattr(jax, "process_index", lambda *a, **k: index)
    monkeypatch.setattr(jax, "process_count", lambda *a, **k: 2)
    # The other process holds the same data (train() compares it across processes).
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda mine, **k: np.stack([np.asarray(mine)] * 2))
  return become


@pytest.mark.parametrize("index", [0, 1])
def test_the_adapter_report_and_the_bars_print_on_process_zero_only(process, capsys, index):
  process(index)
  model = ToyLM(seed=0)
  smoa_jax.apply_adapter(model, SMOA, rngs=nnx.Rngs(1), verbose=True, show_progress=True)
  config = smoa_jax.TrainConfig(batch_size=4, steps=2, learning_rate=1e-2, log_every=1,
                                progress=True)
  smoa_jax.train(model, smoa_jax.CausalLMTask(), token_data(8), config)
  out, err = capsys.readouterr()
  if index == 0:
    assert "trainable" in out and "spectral blocks" in err and "train" in err
  else:
    assert out == "" and err == ""


@pytest.mark.parametrize("index", [0, 1])
def test_to_hf_gathers_on_every_process_and_writes_on_process_zero(llama_dir, tmp_path, process,
                                                                   monkeypatch, index):
  model = smoa_jax.from_hf(llama_dir)
  gathered = []
  to_host = sharding.to_host
  monkeypatch.setattr(sharding, "to_host", lambda v: gathered.append(v.shape) or to_host(v))
  process(index)
  out = smoa_jax.to_hf(model, tmp_path / "out")
  assert out == tmp_path / "out"
  assert len(gathered) == len(hf._export_entries(model))  # every tensor, on every process
  if index == 0:
    assert (tmp_path / "out" / "model.safetensors").is_file()
  else:
    assert list(tmp_path.iterdir()) == []


def _other_host(monkeypatch, change):
  """Two processes: this one, and one on host ``other`` whose gathered row ``change`` edits."""
  from jax.experimental import multihost_utils

  def allgather(mine):
    other = np.array(mine)
    other[-sharding._HOST_BYTES:] = 0
    other[-sharding._HOST_BYTES:][:5] = np.frombuffer(b"other", np.uint8)
    change(other)
    return np.stack([mine, other])

  monkeypatch.setattr(jax, "process_count", lambda *a, **k: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)


def test_the_same_data_on_every_host_passes_whatever_the_host_names(monkeypatch):
  _other_host(monkeypatch, lambda row: None)
  sharding.check_same_on_all_processes("training data", data_lib.digest(token_data(8)), [8, 0])


@pytest.mark.parametrize("where, match", [(0, r"process 1 on other: sha256 [0-9a-f]{16}\.\.\., "
                                              r"rows \[8, 0\]"),
                                          (32, r"process 1 on other: .*rows \[9, 0\]")],
                         ids=["other_copy", "other_row_count"])
def test_other_data_on_a_host_is_refused_naming_every_host(monkeypatch, where, match):
  def change(row):
    row[where] += 1
  _other_host(monkeypatch, change)
  digest = data_lib.digest(token_data(8))
  with pytest.raises(smoa_jax.DataError, match=match) as caught:
    sharding.check_same_on_all_processes("training data", digest, [8, 0])
  assert f"process 0 on {socket.gethostname()}: sha256 {digest[:16]}..., rows [8, 0]" in str(
      caught.value)


def test_train_checks_the_data_of_every_host_before_the_first_step(monkeypatch):
  _other_host(monkeypatch, lambda row: row.__setitem__(32, 7))
  model = ToyLM(seed=0)
  smoa_jax.apply_adapter(model, SMOA, rngs=nnx.Rngs(1), verbose=False)
  config = smoa_jax.TrainConfig(batch_size=4, steps=1, learning_rate=1e-2)
  with pytest.raises(smoa_jax.DataError, match="training data differs between processes"):
    smoa_jax.train(model, smoa_jax.CausalLMTask(), token_data(8), config)
