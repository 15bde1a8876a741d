"""End-to-end tests of the ``smoa-jax`` command (smoa_jax/app/cli.py) on tiny random HF models.

The models and data are session fixtures (``tests/conftest.py``): a two-layer Llama and a
two-layer BERT with word tokenizers, labelled sentences as JSONL files, and a finished causal-LM
run (``cli_lm_run``, read-only). Most tests call ``cli.main(argv)`` in-process; the console script
and ``python -m smoa_jax`` run as real subprocesses, and so does the run killed for the resume
test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import smoa_jax
from smoa_jax.app import assets
from smoa_jax.app.commands import common
from tests.support.cli import LM_RUN_EXTRA, adapter_tensors, finetune_argv, ours_with_adapter, run_cli
from tests.support import xla
from tests.support.files import copy_of, tree_digest, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


# -- the main path ---------------------------------------------------------------------------------
def test_causal_lm_finetune_eval_export_and_reload_in_transformers(cli_lm_run, cli_files, tmp_path,
                                                                   capsys):
  run = cli_lm_run
  assert {p.name for p in run.iterdir()} >= {"adapter", "checkpoints", "metrics.jsonl",
                                             "run_config.json", "loss.png"}
  assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
  assert [r["step"] for r in records if r["split"] == "eval"] == [2, 4]
  assert all(np.isfinite(r["loss"]) for r in records)
  config = json.loads((run / "run_config.json").read_text())
  assert config["flags"]["r"] == 4 and config["flags"]["model"] == str(cli_files["llama"])
  assert config["flags"]["data"] == str(cli_files["lm_train"]) and config["versions"]["jax"]
  assert config["adapter_config"]["target_modules"] == ["q_proj", "v_proj", "up_proj"]
  assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]

  code, out, err = run_cli(capsys, "eval", "--run", run, "--data", cli_files["lm_eval"])
  assert code == 0, err
  metrics = json.loads(out)  # exactly one JSON object on stdout
  assert metrics["perplexity"] == pytest.approx(np.exp(metrics["loss"]), rel=1e-6)
  assert metrics["loss"] == pytest.approx(records[-1]["loss"], rel=1e-5)  # the run's last eval

  code, out, err = run_cli(capsys, "export", "--run", run, "--output", tmp_path / "merged")
  assert code == 0, err
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
  ids = np.array([[2, 5, 9, 11, 4, 7, 3]])
  with torch.no_grad():
    theirs = hf(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(ours_with_adapter(cli_files["llama"], run)(ids))
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  assert transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")("the cat")["input_ids"]

  code, _, err = run_cli(capsys, "export", "--run", run, "--output", tmp_path / "portable",
                         "--adapter-only")
  assert code == 0, err
  for name in ("adapter_config.json", "adapter_model.safetensors"):
    assert (tmp_path / "portable" / name).read_bytes() == (run / "adapter" / name).read_bytes()


def test_classification_finetune_eval_export_and_reload_in_transformers(cli_files, tmp_path,
                                                                       capsys):
  run = tmp_path / "run"
  code, out, err = run_cli(capsys, *finetune_argv(cli_files, run, "classification"))
  assert code == 0, err
  summary = json.loads(out.strip().splitlines()[-1])  # after the adapter table
  assert summary["step"] == 4 and set(summary["eval"]) == {"loss", "accuracy"}
  assert "freshly initialized" in err  # the new head is reported as a one-line warning
  assert "smoa-jax: warning:" in err
  config = json.loads((run / "run_config.json").read_text())
  assert config["num_labels"] == 2
  assert config["adapter_config"]["target_modules"] == common.DEFAULT_TARGETS.split(",")
  assert "base_model.model.classifier.kernel" in adapter_tensors(run)  # the trained head

  code, out, err = run_cli(capsys, "eval", "--run", run, "--data", cli_files["cls_eval"])
  assert code == 0, err
  assert "freshly initialized" not in err  # the run's adapter holds the trained head
  metrics = json.loads(out)
  assert set(metrics) == {"loss", "accuracy", "num_examples"} and metrics["num_examples"] == 16

  code, _, err = run_cli(capsys, "export", "--run", run, "--output", tmp_path / "merged")
  assert code == 0, err
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
  ids = np.array([[2, 5, 9, 11, 4, 0], [2, 7, 3, 0, 0, 0]])
  mask = (ids > 0).astype(np.int32)
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  ours = ours_with_adapter(cli_files["bert"], run, num_labels=2)(ids, attention_mask=mask)
  ours = np.asarray(ours)
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", pytest.param("full", marks=pytest.mark.slow),
                                    pytest.param("hira", marks=pytest.mark.slow)])
def test_other_methods_train_and_export(method, cli_files, tmp_path, capsys):
  run = tmp_path / "run"
  mesh = ("--mesh", "data=1,fsdp=1,tp=1") if method == "lora" else ()  # a trivial mesh works
  code, _, err = run_cli(capsys, *finetune_argv(cli_files, run, "causal-lm", "--method", method,
                                                "--steps", 2, "--targets", "v_proj", *mesh))
  assert code == 0, err
  assert "learning rate 0.01 (given; --lr sets another)" in err
  assert json.loads((run / "adapter" / "adapter_config.json").read_text())["method"] == method
  code, _, err = run_cli(capsys, "export", "--run", run, "--output", tmp_path / "merged")
  assert code == 0, err
  reloaded = smoa_jax.from_hf(tmp_path / "merged")
  ids = np.array([[2, 5, 9, 11]])
  np.testing.assert_allclose(np.asarray(reloaded(ids)),
                             np.asarray(ours_with_adapter(cli_files["llama"], run)(ids)), atol=1e-5)


# -- resume ----------------------------------------------------------------------------------------
def interrupt_after_save(step_to_stop: int, exception: type[BaseException]):
  """A ``smoa_jax.train`` that raises ``exception`` right after checkpoint ``step_to_stop``."""
  original = smoa_jax.train

  def train(*args, on_save, **kwargs):
    def hook(step):
      on_save(step)
      if step == step_to_stop:
        raise exception

    return original(*args, on_save=hook, **kwargs)

  return train


@pytest.mark.slow  # resume is covered by training/test_loop by default
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(cli_lm_run, cli_files, tmp_path,
                                                                capsys, monkeypatch):
  run = tmp_path / "run"
  argv = finetune_argv(cli_files, run, "causal-lm", *LM_RUN_EXTRA)
  with monkeypatch.context() as patch:
    patch.setattr(smoa_jax, "train", interrupt_after_save(2, KeyboardInterrupt))
    code, _, err = run_cli(capsys, *argv)
  assert code == 130 and err.strip().splitlines()[-1] == "smoa-jax: interrupted"
  code, _, err = run_cli(capsys, *argv)
  assert code == 1 and "--resume" in err  # a non-empty run directory is never reused silently
  code, _, err = run_cli(capsys, "finetune", "--output", run, "--resume", "--no-progress")
  assert code == 0, err
  whole, resumed = adapter_tensors(cli_lm_run), adapter_tensors(run)
  assert whole.keys() == resumed.keys()
  for key in whole:
    np.testing.assert_array_equal(resumed[key], whole[key], err_msg=key)
  assert (run / "metrics.jsonl").read_text().count('"split": "eval"') == 2
  assert len(json.loads((run / "run_config.json").read_text())["resumed"]) == 1


KILL_AFTER_SAVE = """
import os, signal, sys
import smoa_jax
from smoa_jax.app import assets
from smoa_jax.app import cli
from smoa_jax.app.commands import common

kill_at, argv, original = int(sys.argv[1]), sys.argv[2:], smoa_jax.train

def train(*args, on_save, **kwargs):
  def hook(step):
    on_save(step)
    if step == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
  return original(*args, on_save=hook, **kwargs)

smoa_jax.train = train
sys.exit(cli.main(argv))
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_killed_run_resumes_to_the_uninterrupted_result(cli_files, tmp_path, capsys):
  extra = ("--steps", 6, "--dropout", 0.1)  # dropout: the rng state must be restored too
  code, _, err = run_cli(capsys, *finetune_argv(cli_files, tmp_path / "whole", "causal-lm", *extra))
  assert code == 0, err
  killed = tmp_path / "killed"
  argv = [str(a) for a in finetune_argv(cli_files, killed, "causal-lm", *extra)]
  proc = subprocess.run([sys.executable, "-c", KILL_AFTER_SAVE, "4", *argv], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == -9, proc.stderr[-2000:]
  records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in records) == 4
  code, _, err = run_cli(capsys, "finetune", "--output", killed, "--resume", "--no-progress")
  assert code == 0, err
  whole, resumed = adapter_tensors(tmp_path / "whole"), adapter_tensors(killed)
  assert whole.keys() == resumed.keys()
  for key in whole:
    np.testing.assert_array_equal(resumed[key], whole[key], err_msg=key)


@pytest.mark.slow
@pytest.mark.subprocess
def test_data_parallel_mesh_on_two_simulated_devices(cli_lm_run, cli_files, tmp_path):
  run = tmp_path / "run"
  argv = finetune_argv(cli_files, run, "causal-lm", *LM_RUN_EXTRA, "--mesh", "data=2")
  env = {**os.environ, "XLA_FLAGS": xla.with_devices(2)}
  proc = subprocess.run([sys.executable, "-m", "smoa_jax", *map(str, argv)], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  single, split = adapter_tensors(cli_lm_run), adapter_tensors(run)
  for key in single:
    np.testing.assert_allclose(split[key], single[key], atol=1e-5, err_msg=key)


def test_resume_refuses_to_change_what_defines_the_run(cli_lm_run, tmp_path, capsys):
  run = copy_of(cli_lm_run, tmp_path, "run")
  before = tree_digest(run)
  code, _, err = run_cli(capsys, "finetune", "--output", run, "--resume", "--r", 8)
  assert code == 1 and "--resume cannot change --r 8 (the run has 4)" in err
  changed = write_jsonl(tmp_path / "changed.jsonl", [{"text": "the cat"}] * 8)
  code, _, err = run_cli(capsys, "finetune", "--output", run, "--resume", "--data", changed)
  assert code == 1 and "--resume cannot change --data" in err
  assert tree_digest(run) == before  # nothing written, nothing removed


def test_remat_trains_to_the_same_adapter_and_may_change_on_resume(cli_lm_run, tmp_path, capsys,
                                                                    monkeypatch):
  seen = []
  train = smoa_jax.train
  monkeypatch.setattr(smoa_jax, "train", lambda model, task, data, config, **kw: (
      seen.append(config.remat), train(model, task, data, config, **kw))[1])
  runs = {}
  for remat in ("none", "full"):  # one more step of the finished run, with and without remat
    runs[remat] = copy_of(cli_lm_run, tmp_path, remat)
    code, _, err = run_cli(capsys, "finetune", "--output", runs[remat], "--resume", "--steps", 5,
                           "--remat", remat, "--no-progress")
    assert code == 0, err
  assert seen == ["none", "full"]
  assert json.loads((runs["full"] / "run_config.json").read_text())["flags"]["remat"] == "full"
  plain, remat = adapter_tensors(runs["none"]), adapter_tensors(runs["full"])
  for key in plain:
    np.testing.assert_allclose(remat[key], plain[key], rtol=1e-5, atol=1e-6, err_msg=key)
  code, _, err = run_cli(capsys, "finetune", "--output", runs["full"], "--resume", "--remat",
                         "partial")
  assert code == 2 and "'none', 'full', 'dots'" in err


def test_scan_layers_trains_a_scanned_model_whose_adapter_is_saved_unrolled(
    cli_lm_run, cli_files, tmp_path, capsys, monkeypatch):
  seen = []
  from_hf = smoa_jax.from_hf
  monkeypatch.setattr(smoa_jax, "from_hf", lambda *a, **k: (seen.append(k["scan_layers"]),
                                                            from_hf(*a, **k))[1])
  run = tmp_path / "scanned"
  code, _, err = run_cli(capsys, *finetune_argv(cli_files, run, "causal-lm", *LM_RUN_EXTRA,
                                                "--scan-layers"))
  assert code == 0, err
  assert seen == [True]
  assert json.loads((run / "run_config.json").read_text())["flags"]["scan_layers"] is True
  assert sorted(adapter_tensors(run)) == sorted(adapter_tensors(cli_lm_run))  # layer by layer
  # The unrolled model of `eval --run` with that adapter scores what the scanned run last did.
  code, out, err = run_cli(capsys, "eval", "--run", run, "--data", cli_files["lm_eval"])
  assert code == 0, err
  last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
  assert seen == [True, False] and json.loads(out)["loss"] == pytest.approx(last["loss"], rel=1e-5)
  unrolled = copy_of(cli_lm_run, tmp_path, "unrolled")  # its checkpoints hold unstacked layers
  code, _, err = run_cli(capsys, "finetune", "--output", unrolled, "--resume", "--steps", 5,
                         "--scan-layers")
  assert code != 0 and "--resume cannot change --scan-layers True (the run has False)" in err


def test_distributed_auto_lets_jax_find_every_setting(cli_files, tmp_path, capsys, monkeypatch):
  calls = []

  def initialize(*args, **kwargs):
    calls.append((args, kwargs))
    raise RuntimeError("no TPU metadata server here")

  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  code, _, err = run_cli(capsys, *finetune_argv(cli_files, tmp_path / "run"), "--distributed",
                         "auto")
  assert calls == [((None, None, None), {})]
  assert code != 0 and "no TPU metadata server here" in err


def test_bfloat16_base_trains_float32_adapters_unless_told(cli_files, tmp_path, capsys):
  for extra, expected in (((), "float32"), (("--adapter-dtype", "bfloat16"), "bfloat16")):
    run = tmp_path / expected
    argv = finetune_argv(cli_files, run, "causal-lm", "--dtype", "bfloat16", *extra)
    argv[argv.index("--steps") + 1] = 1
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    config = json.loads((run / "run_config.json").read_text())
    assert config["flags"]["dtype"] == "bfloat16"
    assert config["adapter_config"]["param_dtype"] == config["adapter_config"]["adapter_dtype"] == expected
    model = smoa_jax.from_hf(cli_files["llama"], dtype="bfloat16")
    smoa_jax.load_adapter(model, run / "adapter")
    assert {v.dtype.name for v in jax.tree.leaves(nnx.state(model, smoa_jax.TrainableParam))} == {expected}


def test_overwrite_replaces_a_run_but_never_foreign_files(cli_lm_run, cli_files, tmp_path, capsys):
  run = copy_of(cli_lm_run, tmp_path, "run")
  (run / "notes.txt").write_text("mine")
  argv = finetune_argv(cli_files, run, "causal-lm", "--steps", 1, "--overwrite")
  code, _, err = run_cli(capsys, *argv)
  assert code == 1 and "notes.txt" in err and (run / "notes.txt").exists()
  assert (run / "checkpoints" / "4").is_dir()  # the refused overwrite deleted nothing
  (run / "notes.txt").unlink()
  code, _, err = run_cli(capsys, *argv)
  assert code == 0, err
  assert json.loads((run / "run_config.json").read_text())["flags"]["steps"] == 1
  assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_authors_export_of_a_run(cli_lm_run, tmp_path, capsys):
  code, out, err = run_cli(capsys, "export", "--run", cli_lm_run, "--output", tmp_path / "authors",
                           "--format", "authors")
  assert code == 0, err
  assert json.loads(out)["format"] == "authors"
  document = json.loads((tmp_path / "authors" / "adapter_config.json").read_text())
  assert document["r"] == 4 and document["num_blocks"] == 2
  code, _, err = run_cli(capsys, "export", "--run", cli_lm_run, "--output", tmp_path / "authors",
                         "--format", "authors")
  assert code == 1 and "--overwrite" in err


def _peft_logits(model_dir: Path, adapter_dir: Path, ids: np.ndarray) -> np.ndarray:
  peft = pytest.importorskip("peft")
  base = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
  model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def test_peft_and_lora_exports_load_in_peft(cli_lm_run, cli_files, tmp_path, capsys):
  ids = np.array([[2, 5, 9, 11, 3]])
  code, out, err = run_cli(capsys, "export", "--run", cli_lm_run, "--output", tmp_path / "lora",
                           "--format", "lora", "--rank", 4)
  assert code == 0, err
  summary = json.loads(out)
  assert summary["format"] == "lora" and summary["layers"] == 6 and summary["mean_rank"] == 4
  assert 0 < summary["mean_relative_error"] <= summary["max_relative_error"] < 1
  ours = ours_with_adapter(cli_files["llama"], cli_lm_run)
  smoa_jax.to_lora(ours, rank=4)
  np.testing.assert_allclose(_peft_logits(cli_files["llama"], tmp_path / "lora", ids),
                             np.asarray(ours(ids)), atol=1e-4)
  code, _, err = run_cli(capsys, "export", "--run", cli_lm_run, "--output", tmp_path / "smoa",
                         "--format", "peft")
  assert code == 1 and "to_lora" in err  # PEFT has no SMoA
  run = tmp_path / "run"
  code, _, err = run_cli(capsys, *finetune_argv(cli_files, run, "causal-lm", "--method", "hira",
                                                "--steps", 2, "--targets", "v_proj"))
  assert code == 0, err
  code, out, err = run_cli(capsys, "export", "--run", run, "--output", tmp_path / "peft",
                           "--format", "peft")
  assert code == 0 and json.loads(out)["format"] == "peft", err
  np.testing.assert_allclose(_peft_logits(cli_files["llama"], tmp_path / "peft", ids),
                             np.asarray(ours_with_adapter(cli_files["llama"], run)(ids)), atol=1e-4)


@pytest.mark.parametrize("argv,match", [
    (("--format", "lora"), "--rank / --energy go with --format lora"),
    (("--rank", 4), "--rank / --energy go with --format lora"),
    (("--format", "lora", "--rank", 4, "--energy", 0.9), "not allowed with argument"),
    (("--format", "lora", "--energy", 1.5), "not a fraction"),
])
def test_lora_export_flags(cli_lm_run, tmp_path, capsys, argv, match):
  code, _, err = run_cli(capsys, "export", "--run", cli_lm_run, "--output", tmp_path / "x", *argv)
  assert code == 2 and match in err and not (tmp_path / "x").exists()


def test_eval_several_named_adapters_on_one_base(cli_lm_run, cli_files, tmp_path, capsys):
  other = tmp_path / "other"
  code, _, err = run_cli(capsys, *finetune_argv(cli_files, other, "causal-lm", "--method", "lora",
                                                "--steps", 2, "--targets", "q_proj"))
  assert code == 0, err
  alone = {}
  for run in (cli_lm_run, other):
    code, out, err = run_cli(capsys, "eval", "--run", run, "--data", cli_files["lm_eval"])
    assert code == 0, err
    alone[run] = json.loads(out)
  code, out, err = run_cli(capsys, "eval", "--run", cli_lm_run, "--data", cli_files["lm_eval"],
                           "--adapter", f"lora={other}")
  assert code == 0, err
  rows = [json.loads(line) for line in out.splitlines()]
  assert [r["adapter"] for r in rows] == ["default", "lora"]
  for row, run in zip(rows, (cli_lm_run, other)):
    assert row["loss"] == pytest.approx(alone[run]["loss"], rel=1e-5)
  code, _, err = run_cli(capsys, "eval", "--run", cli_lm_run, "--data", cli_files["lm_eval"],
                         "--adapter", f"default={other}")
  assert code == 2 and "must differ" in err
  code, _, err = run_cli(capsys, "eval", "--run", cli_lm_run, "--data", cli_files["lm_eval"],
                         "--adapter", str(other))
  assert code == 2 and "NAME=DIR" in err


# -- bad input -------------------------------------------------------------------------------------
# -- inspect ---------------------------------------------------------------------------------------
def test_inspect_reports_matches_budget_and_blocks(cli_files, capsys):
  code, out, err = run_cli(capsys, "inspect", "--model", cli_files["llama"], "--r", 4,
                           "--targets", "q_proj,up_proj", "--json")
  assert code == 0, err
  report = json.loads(out)
  assert [m["path"] for m in report["modules"]] == [
      f"model/layers/{i}/{m}" for i in (0, 1) for m in ("mlp/up_proj", "self_attn/q_proj")]
  # SMoA r=4, K=2 on 64x64: 2 blocks x rank 2 x (32 + 32) = 256 = half of LoRA's 4 x 128.
  q_proj = report["modules"][1]
  assert q_proj["trainable"] == 256 and q_proj["ranks"] == [2, 2]
  assert report["lora_params"] == 4 * 2 * (128 + 160)
  for block in report["blocks"]:
    assert block["total_entry_share"] == pytest.approx(0.5, abs=0.01)
    assert 0 < block["total_energy_share"] < 1
  code, out, _ = run_cli(capsys, "inspect", "--model", cli_files["llama"], "--r", 4)
  assert code == 0 and "spectral blocks" in out and "LoRA at the same r" in out


def test_inspect_run_analyses_the_learned_updates(cli_lm_run, tmp_path, capsys):
  code, out, err = run_cli(capsys, "inspect", "--run", cli_lm_run, "--json", "--plot",
                           tmp_path / "dw.json.png")
  assert code == 0, err
  report = json.loads(out)
  assert len(report["deltas"]) == 6 and Path(report["plot"]).read_bytes()[:4] == b"\x89PNG"
  for delta in report["deltas"]:
    assert delta["numerical_rank"] > delta["r"]  # SMoA's update is not limited to rank r
    assert 0 < delta["top_energy"] <= 1
  code, out, _ = run_cli(capsys, "inspect", "--run", cli_lm_run, "--plot", tmp_path / "dw.png")
  assert code == 0 and "effective rank" in out and (tmp_path / "dw.png").is_file()


def test_fetch_assets_prints_where_each_asset_is(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
  for name in ("sentiment", "shakespeare"):  # already complete: nothing is downloaded
    (tmp_path / name).mkdir()
    (tmp_path / name / ".complete").write_text("{}")
  code, out, err = run_cli(capsys, "fetch-assets", "sentiment", "shakespeare")
  assert code == 0, err
  assert out.splitlines() == [f"sentiment: {tmp_path / 'sentiment' / assets.SENTIMENT_FILE}",
                              f"shakespeare: {tmp_path / 'shakespeare'}"]


# -- the real command ------------------------------------------------------------------------------
@pytest.mark.subprocess
def test_console_script_and_module_entry_point(cli_files, tmp_path):
  script = Path(sys.executable).with_name("smoa-jax")
  if not script.is_file():
    pytest.skip("the smoa-jax console script is not installed (pip install -e .)")
  shown = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
  assert shown.returncode == 0
  for command in ("finetune", "eval", "export", "inspect", "demo", "fetch-assets"):
    assert command in shown.stdout
  bad = [sys.executable, "-m", "smoa_jax", "finetune", "--model", str(tmp_path / "nope"),
         "--data", str(cli_files["lm_train"]), "--output", str(tmp_path / "run")]
  failed = subprocess.run(bad, capture_output=True, text=True, timeout=120)
  assert failed.returncode == 1
  assert failed.stderr.strip().splitlines() == [
      f"smoa-jax: error: model directory {tmp_path / 'nope'} does not exist."]
  debug = subprocess.run(bad + ["--debug"], capture_output=True, text=True, timeout=120)
  assert debug.returncode == 1 and "Traceback" in debug.stderr


@pytest.mark.parametrize("command", ["finetune", "eval", "export", "inspect", "demo",
                                     "fetch-assets"])
def test_every_command_has_help(command, capsys):
  code, out, _ = run_cli(capsys, command, "--help")
  assert code == 0 and out.startswith(f"usage: smoa-jax {command}")
