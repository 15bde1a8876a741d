"""Property-based probes: the math never invents NaNs, round trips hold, inputs fail cleanly."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import smoa_jax
from smoa_jax.core import ops
from smoa_jax.core.config import config_from_dict, split_sizes
from smoa_jax.core.smoa import SMoAOp
from smoa_jax.training import data
from tests.reliability import probe

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layers(draw):
  # Few distinct sizes keep XLA's compilation cache warm; uneven ones exercise the padding.
  m, n = draw(st.sampled_from([1, 5, 9, 16])), draw(st.sampled_from([2, 7, 16]))
  k = draw(st.integers(1, min(m, n)))
  r = draw(st.integers(1, 6))
  dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
  scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
  return m, n, k, r, dtype, scale, draw(st.integers(0, 2**31 - 1))


@probe("fuzzing", "random layer shapes, K, r, dtypes and weight scales (finite inputs)",
       "forward, gradients and dW are finite; merge then unmerge restores W within dtype tolerance")
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=layers())
def test_ops_stay_finite_and_merge_round_trips(case):
  m, n, k, r, dtype, scale, seed = case
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.standard_normal((m, n)) * scale, dtype)
  blocks = smoa_jax.spectral_blocks(w, k)
  layout = ops.BlockLayout(blocks.in_sizes, blocks.out_sizes, split_sizes(r, k))
  op = SMoAOp(layout, 2.0 / r)
  perms = (blocks.in_perm, blocks.out_perm)
  a, b = op.init_factors(jax.random.key(seed % 1000))
  b = b + 0.05 * jnp.asarray(rng.standard_normal(b.shape), jnp.float32)  # |1 + s ab| stays > 0
  x = jnp.asarray(rng.standard_normal((3, m)) * scale, dtype)

  @jax.jit  # one program per drawn shape: op by op, each example compiled dozens of them
  def check(x, w, a, b, perms):
    y, grads = jax.value_and_grad(
        lambda a, b: jnp.sum(op.apply(x, None, w, a, b, perms).astype(jnp.float32)),
        argnums=(0, 1))(a, b)
    restored = op.unmerged_kernel(op.merged_kernel(w, a, b, perms), a, b, perms)
    return y, grads, op.delta(w, a, b, perms), restored

  y, grads, delta, restored = check(x, w, a, b, perms)
  assert np.isfinite(float(y)) and all(np.all(np.isfinite(np.asarray(g))) for g in grads)
  assert np.all(np.isfinite(np.asarray(delta)))
  rtol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(restored, np.float32), np.asarray(w, np.float32),
                             rtol=rtol, atol=rtol * scale * 1e-3)


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.floats(allow_nan=True),
                    st.text(max_size=6), st.lists(st.integers(-3, 9), max_size=5),
                    st.lists(st.text(max_size=4), max_size=3))


@probe("fuzzing", "random values for every config field (SMoA/LoRA/HiRA/full) and from_dict",
       "either a valid config or ConfigError (a ValueError); no other exception type")
@FUZZ
@given(method=st.sampled_from([smoa_jax.SMoAConfig, smoa_jax.LoRAConfig, smoa_jax.HiRAConfig,
                               smoa_jax.FullFineTuneConfig]), data_=st.data())
def test_configs_accept_or_raise_config_error(method, data_):
  fields = [f.name for f in dataclasses.fields(method) if f.name != "_"]
  kwargs = data_.draw(st.dictionaries(st.sampled_from(fields), _VALUES, max_size=4))
  try:
    config = method(**kwargs)
  except smoa_jax.ConfigError:
    return
  assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config


@probe("fuzzing", "random bytes and random JSON objects as JSONL data, both tasks",
       "records, or DataError naming file and line; no other exception type")
@FUZZ
@given(lines=st.lists(st.one_of(st.binary(max_size=30),
                                st.dictionaries(st.sampled_from(["text", "label", "x"]), _VALUES,
                                                max_size=3).map(lambda d: json.dumps(d).encode())),
                      max_size=5),
       task=st.sampled_from(["causal-lm", "classification"]))
def test_jsonl_reader_accepts_or_raises_data_error(tmp_path_factory, lines, task):
  path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
  path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
  try:
    records = data.read_jsonl(path, task)
  except smoa_jax.DataError as err:
    assert str(path) in str(err)
    return
  assert records.texts and all(isinstance(t, str) for t in records.texts)
