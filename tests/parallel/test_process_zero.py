"""One voice per pod: reports and progress bars on process 0 only, and ``to_hf`` written by
process 0 alone while every process takes part in its gathers. Other processes are simulated by
``jax.process_index`` returning 1."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

import smoa_jax
from smoa_jax.models import hf
from smoa_jax.parallel import sharding
from tests.support.toy import SMOA, ToyLM, token_data


@pytest.fixture
def process(monkeypatch):
  """``process(i)``: from now on this process is process ``i`` of a job of 2."""
  def become(index: int) -> None:
    monkeypatch.setattr(jax, "process_index", lambda *a, **k: index)
    monkeypatch.setattr(jax, "process_count", lambda *a, **k: 2)
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
