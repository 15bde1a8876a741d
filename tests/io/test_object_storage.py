"""Run directories, metrics and adapters on object storage (``gs://``), through ``etils.epath``.

A fake bucket: ``etils.epath.testing.mock_epath`` routes every ``gs://`` operation to a local
directory, so the code runs through epath's URI paths (no rename of directories, no local
string) without a network.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from etils.epath import testing as epath_testing

import smoa_jax
from smoa_jax.app.commands.common import absolute_path
from smoa_jax.io import rundir
from smoa_jax.io.files import as_path, is_local
from smoa_jax.training.loop import _MetricsLog
from tests.support.toy import ToyLM, token_data, trained


@pytest.fixture
def bucket(tmp_path):
  """``gs://bucket/...`` served from ``tmp_path/gcs/bucket/...``; yields that local root."""
  root = tmp_path / "gcs"
  root.mkdir()

  def local(path):
    text = os.fspath(path)
    return text.replace("gs://", f"{root}/", 1) if text.startswith("gs://") else text

  def routed(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def open_(original, path, mode):  # an object store has no directories to create first
    if any(m in mode for m in "wax"):
      os.makedirs(os.path.dirname(local(path)), exist_ok=True)
    return original(local(path), mode)

  def routed_two(original, path, dst, *args, **kwargs):
    return original(local(path), local(dst), *args, **kwargs)

  names = ("exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rmtree", "stat")
  with epath_testing.mock_epath(**{n: routed for n in names}, open=open_, rename=routed_two,
                                replace=routed_two, copy=routed_two):
    yield root


def test_uris_stay_uris_and_local_paths_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for uri in ("gs://b/x", "s3://b/run/"):
    assert not is_local(uri)
    assert str(as_path(uri)).rstrip("/") == uri.rstrip("/")
    assert not str(as_path(uri)).startswith(str(tmp_path))  # never <cwd>/gs:/b/x
    assert absolute_path(uri).rstrip("/") == uri.rstrip("/")
  assert absolute_path("run") == str(tmp_path / "run") and is_local("run")
  assert as_path("~/x") == epath.Path(os.path.expanduser("~/x"))


def test_an_adapter_saved_to_a_bucket_loads_back_and_replaces_the_old_one(bucket):
  model = trained()
  ids = jnp.asarray(token_data(4)["input_ids"])
  logits = model(ids)
  out = smoa_jax.save_adapter(model, "gs://bucket/runs/adapter")
  assert str(out) == "gs://bucket/runs/adapter"
  stored = bucket / "bucket" / "runs" / "adapter"
  assert sorted(p.name for p in stored.iterdir()) == ["adapter_config.json",
                                                      "adapter_model.safetensors"]
  assert sorted(p.name for p in stored.parent.iterdir()) == ["adapter"]  # nothing staged there
  (stored / "stale.bin").write_bytes(b"old")
  smoa_jax.save_adapter(model, "gs://bucket/runs/adapter")  # over an existing one
  assert not (stored / "stale.bin").exists()
  fresh = ToyLM(seed=0)
  smoa_jax.load_adapter(fresh, "gs://bucket/runs/adapter")
  fresh.eval()
  np.testing.assert_allclose(fresh(ids), logits, rtol=1e-6, atol=1e-6)


def test_a_run_directory_in_a_bucket(bucket):
  run = "gs://bucket/run"
  assert rundir.check_run_dir(run, resume=False, overwrite=False) is None
  with pytest.warns(UserWarning, match="object storage, which has no file locks"):
    with rundir.lock(run, "finetune") as stale:
      assert stale is None
  rundir.write_json(as_path(run) / rundir.RUN_CONFIG, {"flags": {"steps": 3}})
  assert rundir.read_run(run)["flags"] == {"steps": 3}
  with pytest.raises(smoa_jax.CheckpointError, match="gs://bucket/run is not empty"):
    rundir.check_run_dir(run, resume=False, overwrite=False)
  assert rundir.check_run_dir(run, resume=True, overwrite=False)["flags"] == {"steps": 3}
  (bucket / "bucket" / "run" / rundir.ADAPTER_DIR).mkdir()
  (bucket / "bucket" / "run" / rundir.ADAPTER_DIR / "x").write_text("")
  rundir.clear_run_dir(run)
  assert list((bucket / "bucket" / "run").iterdir()) == []


def test_metrics_in_a_bucket_are_rewritten_whole_and_trimmed_on_resume(bucket):
  path = as_path("gs://bucket/run/metrics.jsonl")
  log = _MetricsLog(path, resume_step=None)
  for step in (1, 2, 3):
    log.write({"step": step, "loss": 1.0 / step})
  stored = bucket / "bucket" / "run" / "metrics.jsonl"
  assert [json.loads(line)["step"] for line in stored.read_text().splitlines()] == [1, 2, 3]
  resumed = _MetricsLog(path, resume_step=2)  # the checkpoint was at step 2
  resumed.write({"step": 3, "loss": 0.5})
  steps = [json.loads(line)["step"] for line in stored.read_text().splitlines()]
  assert steps == [1, 2, 3] and json.loads(stored.read_text().splitlines()[-1])["loss"] == 0.5
