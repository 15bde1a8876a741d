"""CausalLMTask (smoa_jax/training/tasks.py) on instruction and packed data: the loss counts the
answer tokens only, and packing changes neither the loss nor its gradients."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import smoa_jax
from smoa_jax.models import GPT2LMHeadModel, LlamaForCausalLM
from smoa_jax.training import data
from tests.support.instruct import chat, chat_tokenizer

QUESTIONS = ["is this review positive or negative", "the film was dull", "be brief",
             "the film was great is this review positive", "yes or no", "is the film great"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return chat_tokenizer(tmp_path_factory.mktemp("chat_tok"))


def tiny(family: str, vocab: int) -> nnx.Module:
  if family == "gpt2":
    return GPT2LMHeadModel(dict(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4),
                           rngs=nnx.Rngs(1))
  return LlamaForCausalLM(dict(vocab_size=vocab, hidden_size=32, intermediate_size=40,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=64), rngs=nnx.Rngs(0))


def records(kind: str) -> data.Records:
  answers = ["positive", "no", "yes", "negative great", "yes", "no no"]
  rows = {"prompt-completion": [{"prompt": q, "completion": a} for q, a in zip(QUESTIONS, answers)],
          "messages": [chat(q, a) for q, a in zip(QUESTIONS, answers)],
          "text": [{"text": f"{q} {a}"} for q, a in zip(QUESTIONS, answers)]}[kind]
  return data.from_rows(rows)


def mean_loss_and_grads(model, arrays):
  task = smoa_jax.CausalLMTask()
  batch = {k: jnp.asarray(v) for k, v in arrays.items()}

  def mean(model):
    total, weight, _ = task.loss(model, batch)
    return total / weight, weight

  (loss, weight), grads = nnx.jit(nnx.value_and_grad(mean, has_aux=True))(model)
  return float(loss), float(weight), grads


# Chat messages on Llama by default; the other record kinds and GPT-2 with -m slow.
@pytest.mark.parametrize("family,kind", [
    pytest.param("llama", "prompt-completion", marks=pytest.mark.slow), ("llama", "messages"),
    pytest.param("llama", "text", marks=pytest.mark.slow),
    pytest.param("gpt2", "prompt-completion", marks=pytest.mark.slow)])
def test_packed_loss_and_gradients_equal_the_unpacked_ones(tok, family, kind):
  model = tiny(family, len(tok))
  plain = data.tokenize(records(kind), tok, 24, add_eos=True)
  packed = data.tokenize(records(kind), tok, 24, add_eos=True, packing=True)
  assert len(packed) < len(plain) and packed.num_examples == plain.num_examples == 6
  loss, weight, grads = mean_loss_and_grads(model, plain.arrays)
  packed_loss, packed_weight, packed_grads = mean_loss_and_grads(model, packed.arrays)
  # Same targets: the first token of each packed example is not a target of the one before.
  assert packed_weight == weight
  assert packed_loss == pytest.approx(loss, rel=1e-5)
  for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(packed_grads)):
    np.testing.assert_allclose(np.asarray(p), np.asarray(g), atol=1e-6, rtol=1e-4)


def test_loss_counts_the_answer_tokens_only(tok):
  model = tiny("llama", len(tok))
  tokens = data.tokenize(records("prompt-completion"), tok, 24)
  arrays = tokens.arrays
  forward = nnx.jit(lambda model, ids, mask: model(ids, attention_mask=mask))  # not op by op
  logits = np.asarray(forward(model, arrays["input_ids"], arrays["attention_mask"]))
  nll = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
      jnp.asarray(logits[:, :-1]), jnp.asarray(arrays["input_ids"][:, 1:])))
  answer = arrays["loss_mask"][:, 1:] > 0
  expected = nll[answer].mean()
  loss, weight, _ = mean_loss_and_grads(model, arrays)
  # Completion tokens + one EOS per example.
  assert weight == sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1
                       for _, a in records("prompt-completion").pairs)
  assert loss == pytest.approx(expected, rel=1e-5)
  assert loss != pytest.approx(nll[arrays["attention_mask"][:, 1:] > 0].mean(), rel=1e-3)
  metrics = smoa_jax.evaluate(model, smoa_jax.CausalLMTask(), arrays, batch_size=4)
  assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
  assert metrics["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
