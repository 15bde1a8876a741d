"""BERT parity with transformers on tiny random checkpoints (fp32, atol 1e-4)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from smoa_jax.models import BertForSequenceClassification, BertModel
from smoa_jax.models.hf import from_hf, to_hf
from tests.support.hf import randomize, save_random

VOCAB, LENGTH = 91, 9
CONFIG = dict(vocab_size=VOCAB, hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
              intermediate_size=52, max_position_embeddings=32, type_vocab_size=3)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
  """A saved perturbed ``BertModel`` (no head); read-only."""
  return save_random(transformers.BertModel, transformers.BertConfig(**CONFIG),
                     tmp_path_factory.mktemp("encoder"))


def inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  rng = np.random.RandomState(0)
  ids, token_types = rng.randint(0, VOCAB, (2, LENGTH)), rng.randint(0, 3, (2, LENGTH))
  mask = np.ones((2, LENGTH), np.int64)
  mask[1, 6:] = 0
  return ids, mask, token_types


def run(model, *arrays):
  return np.asarray(nnx.jit(lambda m, *a: m(*a))(model, *(jnp.asarray(a) for a in arrays)))


def test_bert_model_hidden_states_and_pooler(encoder_dir):
  hf = transformers.BertModel.from_pretrained(encoder_dir).eval()
  model = from_hf(encoder_dir)
  assert isinstance(model, BertModel)
  ids, mask, token_types = inputs()
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
             token_type_ids=torch.tensor(token_types))
  hidden = run(model, ids, mask, token_types)
  valid = mask.astype(bool)
  np.testing.assert_allclose(hidden[valid], ref.last_hidden_state.numpy()[valid], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(model.pool(jnp.asarray(hidden))),
                             ref.pooler_output.numpy(), atol=1e-4, rtol=0)


def test_paths_mirror_hf_names(tmp_path):
  hf = randomize(transformers.BertForSequenceClassification(transformers.BertConfig(**CONFIG)))
  hf.save_pretrained(tmp_path)
  model = from_hf(tmp_path)
  layer = model.bert.encoder.layer[0]
  for linear in (layer.attention.self.query, layer.attention.output.dense,
                 layer.intermediate.dense, layer.output.dense):
    assert type(linear) is nnx.Linear
  assert layer.intermediate.dense.kernel.shape == (40, 52)  # (in, out)
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert "bert/encoder/layer/0/attention/self/query/kernel" in paths
  assert "bert/encoder/layer/1/attention/output/LayerNorm/scale" in paths
  assert {model.key_map().hf_for(p)[0] for p in paths} == set(hf.state_dict())


def test_sequence_classification_checkpoint(tmp_path):
  config = transformers.BertConfig(**CONFIG, num_labels=3)
  hf = randomize(transformers.BertForSequenceClassification(config))
  hf.save_pretrained(tmp_path)
  model = from_hf(tmp_path)
  assert isinstance(model, BertForSequenceClassification) and model.num_labels == 3
  ids, mask, token_types = inputs()
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
             token_type_ids=torch.tensor(token_types)).logits.numpy()
  np.testing.assert_allclose(run(model, ids, mask, token_types), ref, atol=1e-4, rtol=0)


def test_fresh_classifier_on_an_encoder_checkpoint_exports(encoder_dir, tmp_path):
  with pytest.warns(UserWarning, match=r"freshly initialized.*classifier/bias.*classifier/kernel"):
    model = from_hf(encoder_dir, num_labels=4)
  assert model.classifier.kernel.shape == (40, 4)
  assert float(jnp.abs(model.classifier.kernel[...]).max()) > 0
  np.testing.assert_array_equal(np.asarray(model.classifier.bias[...]), 0)
  to_hf(model, tmp_path / "classifier")
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier")
  assert reloaded.config.num_labels == 4
  ids, mask, _ = inputs()
  with torch.no_grad():
    ref = reloaded.eval()(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  np.testing.assert_allclose(run(model, ids, mask), ref, atol=1e-4, rtol=0)


def test_pretraining_checkpoint_loads_the_encoder(tmp_path):
  """A BertForMaskedLM file (``bert.*`` + ``cls.*`` keys) gives the encoder; ``cls`` is dropped."""
  hf = randomize(transformers.BertForMaskedLM(transformers.BertConfig(**CONFIG)))
  hf.save_pretrained(tmp_path)
  with pytest.warns(UserWarning, match="pooler"):  # BertForMaskedLM has no pooler
    model = from_hf(tmp_path)
  assert isinstance(model, BertModel)
  ids, mask, _ = inputs()
  with torch.no_grad():
    ref = hf.bert(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  valid = mask.astype(bool)
  np.testing.assert_allclose(run(model, ids, mask)[valid], ref[valid], atol=1e-4, rtol=0)


def test_legacy_layernorm_names_are_read():
  model = nnx.eval_shape(lambda: BertModel(CONFIG, rngs=nnx.Rngs(0)))
  key_map = model.key_map()
  canon = key_map.normalize(["bert.embeddings.LayerNorm.gamma", "bert.embeddings.LayerNorm.beta"])
  assert {key_map.path_for(k)[0] for k in canon} == {"embeddings/LayerNorm/scale",
                                                     "embeddings/LayerNorm/bias"}
