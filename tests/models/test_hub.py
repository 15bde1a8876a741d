"""Hub ids (smoa_jax/models/hub.py): ``from_hf("org/name")`` and ``--model org/name`` resolve
through ``huggingface_hub``, offline (``HF_HUB_OFFLINE``), against a cache the tests lay out as
``huggingface_hub`` does (``models--org--name/snapshots/<commit>/``, ``refs/<branch>``)."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import constants, errors

import smoa_jax
from smoa_jax.models import hub
from tests.support.cli import run_cli

REPO = "smoa-test/tiny-llama"
COMMIT, OTHER_COMMIT = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
  """An empty offline hub cache under ``HF_HOME``; returns its ``hub`` directory."""
  cache = tmp_path / "hf-home" / "hub"
  cache.mkdir(parents=True)
  monkeypatch.setenv("HF_HOME", str(cache.parent))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  # huggingface_hub reads both variables once, at import: set what it derived from them.
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return cache


def cache_repo(cache: Path, repo: str, source: Path, commit: str = COMMIT,
               ref: str | None = "main", files: list[str] | None = None) -> Path:
  """Copy ``source``'s ``files`` (default: all) into the cached snapshot ``commit`` of ``repo``,
  with ``refs/<ref>`` pointing at it; returns the snapshot directory."""
  storage = cache / f"models--{repo.replace('/', '--')}"
  snapshot = storage / "snapshots" / commit
  snapshot.mkdir(parents=True)
  for name in files or [p.name for p in source.iterdir()]:
    shutil.copy(source / name, snapshot / name)
  if ref is not None:
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
  return snapshot


def test_a_cached_hub_id_loads_like_its_directory(hub_cache, llama_dir):
  snapshot = cache_repo(hub_cache, REPO, llama_dir)
  model = smoa_jax.from_hf(REPO)
  assert Path(model.source_dir) == snapshot.resolve()
  ids = np.arange(8)[None] % 50
  np.testing.assert_array_equal(np.asarray(model(ids)),
                                np.asarray(smoa_jax.from_hf(llama_dir)(ids)))


def test_a_revision_picks_its_snapshot(hub_cache, llama_dir):
  cache_repo(hub_cache, REPO, llama_dir)
  tagged = cache_repo(hub_cache, REPO, llama_dir, OTHER_COMMIT, ref="v1")
  assert Path(smoa_jax.from_hf(REPO, revision="v1").source_dir) == tagged.resolve()
  assert hub.resolve(REPO, revision=OTHER_COMMIT) == tagged


def test_only_config_tokenizer_and_safetensors_files_are_fetched(monkeypatch, tmp_path):
  calls = []

  def fake_download(repo_id, **kwargs):
    calls.append((repo_id, kwargs))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    return str(tmp_path)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
  assert hub.resolve(REPO, revision="main") == tmp_path
  (repo_id, kwargs), = calls
  assert repo_id == REPO and kwargs["revision"] == "main"

  def fetched(name: str) -> bool:
    return (any(fnmatch.fnmatch(name, p) for p in kwargs["allow_patterns"])
            and not any(fnmatch.fnmatch(name, p) for p in kwargs["ignore_patterns"]))

  wanted = ["config.json", "generation_config.json", "model.safetensors",
            "model-00001-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
            "merges.txt", "chat_template.jinja"]
  unwanted = ["pytorch_model.bin", "model.ckpt.index", "onnx/model.safetensors",
              "original/consolidated.00.pth", "flax_model.msgpack", "tf_model.h5", "README.md"]
  assert [n for n in wanted if not fetched(n)] == []
  assert [n for n in unwanted if fetched(n)] == []


def one_line_error(match: str, *args, **kwargs) -> str:
  with pytest.raises(smoa_jax.CheckpointError, match=match) as info:
    smoa_jax.from_hf(*args, **kwargs)
  assert "\n" not in str(info.value)
  return str(info.value)


def test_offline_without_a_cached_copy_is_one_line(hub_cache):
  message = one_line_error("smoa-test/absent is neither a local directory nor in the Hugging Face "
                           "cache", "smoa-test/absent")
  assert str(hub_cache) in message and "HF_HUB_OFFLINE is set" in message
  one_line_error(r"smoa-test/absent \(revision v2\) is neither", "smoa-test/absent",
                 revision="v2")


def test_a_repo_with_only_bin_weights_is_one_line(hub_cache, tmp_path):
  source = tmp_path / "bin-model"
  source.mkdir()
  (source / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
  (source / "pytorch_model.bin").write_bytes(b"not read")
  cache_repo(hub_cache, REPO, source)
  one_line_error(f"repo {REPO} has no safetensors weights \\(only PyTorch .bin files\\); "
                 "smoa-jax downloads safetensors only", REPO)


def test_a_repo_without_config_is_one_line(hub_cache, llama_dir):
  cache_repo(hub_cache, REPO, llama_dir, files=["model.safetensors"])
  one_line_error(f"repo {REPO} has no config.json", REPO)


def fake_http_error(cls: type, monkeypatch) -> None:
  class Response:  # what HfHubHTTPError reads from an httpx response
    headers: dict = {}
    request = None
    status_code = 404

  def fail(repo_id, **kwargs):
    raise cls(f"404 Client Error for {repo_id}", response=Response())

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)


def test_a_missing_repo_or_revision_is_one_line(monkeypatch):
  fake_http_error(errors.RepositoryNotFoundError, monkeypatch)
  message = one_line_error(f"Hugging Face repo {REPO} was not found and no local directory has "
                           "that name", REPO)
  assert "HF_TOKEN" in message
  fake_http_error(errors.RevisionNotFoundError, monkeypatch)
  one_line_error(f"revision 'v9' of Hugging Face repo {REPO} does not exist", REPO, revision="v9")


def test_local_paths_stay_local(tmp_path, llama_dir):
  assert not hub.is_hub_id(llama_dir) and not hub.is_hub_id(tmp_path / "absent")
  assert not hub.is_hub_id("a/b/c") and hub.is_hub_id(REPO)
  one_line_error("revision='main' applies to Hugging Face Hub ids", llama_dir, revision="main")
  with pytest.raises(smoa_jax.CheckpointError, match="does not exist"):
    smoa_jax.from_hf(tmp_path / "absent")


def test_cli_model_flag_takes_a_hub_id(hub_cache, word_llama, capsys):
  cache_repo(hub_cache, REPO, word_llama)
  argv = ["--prompt", "the cat", "--max-new-tokens", "3"]
  code, by_id, err = run_cli(capsys, "generate", "--model", REPO, *argv)
  assert code == 0, err
  code, by_dir, err = run_cli(capsys, "generate", "--model", word_llama, *argv)
  assert code == 0, err
  assert by_id == by_dir and json.loads(by_id)["prompt"] == "the cat"
  code, _, err = run_cli(capsys, "generate", "--model", "smoa-test/absent", *argv)
  assert code != 0 and "smoa-test/absent is neither a local directory" in err
