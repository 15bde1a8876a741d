"""Benchmark: greedy generation with the KV cache (:func:`smoa_jax.generate_ids`) vs transformers.

What is measured, on SmolLM2-135M-Instruct from the asset cache (``smoa-jax fetch-assets``;
without it the same config with random weights, equally fast), float32:

* **Tokens/s of greedy decoding** at each batch size (default 1 and 8): ``B`` prompts of
  ``--prompt-len`` random token ids, ``--new-tokens`` new tokens each, EOS disabled on both
  sides so every row runs to the end. One sample is one complete call -- prefill and decode:
  ``smoa_jax.generate_ids`` (one jitted program, compiled before timing) against
  ``transformers``' ``model.generate(do_sample=False)`` on the same weights with
  ``torch.set_num_threads`` = the cores XLA uses. Tokens/s = ``B * new_tokens / median time``.
  ``SMoA (unmerged)`` is the same model with an SMoA adapter (K=2, r=8, on q/k/v/up/down, its
  ``b`` factors random) left unmerged: its decode steps cost the base model's (the adapters are
  folded once per call, before the loop), so the gap to the base model is the per-call fold.
* **One decode step at a context of C tokens** (default 64 and 1,024) at batch 1: a jitted
  forward of one token per row against a cache of ``C + 64`` slots already filled with ``C``
  tokens (the cache donated, so it is updated in place as in the decode loop), timed over
  ``--step-repeats`` consecutive steps per sample. Next to it the bytes one step must read --
  the weights plus the keys and values of every slot -- and XLA's own count of bytes accessed
  (``compiled.cost_analysis()``): on a CPU a decode step is bound by memory traffic, so their
  ratio predicts the time ratio.

Timing: every candidate of a table in ONE interleaved run
(:func:`benchmarks._common.time_interleaved`); JAX and torch in separate groups with a pause after
each. Ratios are medians of per-round ratios. The tokens of ours and transformers' are compared at
batch 1 (greedy: they must be identical).

Run from the repository root: ``python -m benchmarks.generate`` (``--quick``: a tiny random Llama,
short prompts and contexts, 2 rounds: a smoke test that never writes).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

import smoa_jax
from benchmarks import _common, _models
from benchmarks.model_step import model_directory
from smoa_jax.inference import decode

SECTION = "generate"
MODULE = "benchmarks.generate"
SPEEDUP_TARGET = 2.0  # ours / transformers tokens/s at the largest batch
CONTEXT_TARGET = 1.5  # decode step at the longest context / at the shortest
SETTLE_SECONDS = 1.0
STEP_SLACK = 64  # free cache slots after the context in the step measurement
ADAPTER = dict(r=8, num_blocks=2, alpha=16.0,
               target_modules=("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = _common.benchmark_parser(
      MODULE,
      "Tokens/s of greedy generation (ours vs transformers' generate) at batch 1 and "
      "8, and the time of one decode step at a long context vs a short one.")
  parser.add_argument("--batches", type=_common.parse_ints, default=(1, 8),
                      help="batch sizes of the tokens/s table (default 1,8)")
  parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
  parser.add_argument("--new-tokens", type=int, default=32, help="new tokens (default 32)")
  parser.add_argument("--contexts", type=_common.parse_ints, default=(64, 1024),
                      help="contexts of the decode-step table, shortest first (default 64,1024)")
  parser.add_argument("--step-batch", type=int, default=1,
                      help="batch of the step table (default 1)")
  parser.add_argument("--step-repeats", type=int, default=8,
                      help="consecutive decode steps per timing sample (default 8)")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
  parser.add_argument("--max-seconds", type=float, default=900.0,
                      help="stop timing a table after this long, once 3 rounds are done")
  parser.add_argument("--seed", type=int, default=0)
  _common.add_run_flags(parser,
                        quick="tiny random Llama, "
                              "short prompts and contexts, 2 rounds (never writes)")
  args = parser.parse_args(argv)
  if args.quick:
    args.batches, args.prompt_len, args.new_tokens, args.contexts = (1, 2), 5, 6, (8, 40)
    args.rounds, args.step_repeats, args.no_write = 2, 2, True
  return args


@dataclasses.dataclass
class Measured:
  """Everything the report needs."""

  model: str
  tokens: _common.Timings
  steps: _common.Timings
  same_tokens: bool
  traces: int  # decode programs compiled for the tokens/s table
  first_call: float  # seconds of the first batch-1 call (compile + run)
  weight_bytes: int
  cache_bytes: dict[int, int]  # context -> key/value bytes one step reads
  xla_bytes: dict[int, float]  # context -> XLA's bytes accessed per step


def _hf_generate(hf: Any, ids: torch.Tensor, new_tokens: int) -> Callable[[], list[list[int]]]:
  mask = torch.ones_like(ids)

  def run() -> list[list[int]]:
    with torch.no_grad():
      out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                        pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()

  return run


def _random_b(model: nnx.Module, seed: int) -> None:
  """Small random ``b`` factors, as after some training (``b = 0`` would be a no-op adapter)."""
  for i, (_, layer) in enumerate(smoa_jax.adapter_layers(model)):
    b = layer.lora_b[...]
    layer.lora_b[...] = 0.01 * jax.random.normal(jax.random.key(seed + i), b.shape, b.dtype)


def _step_program(model: nnx.Module, batch: int, context: int,
                  seed: int) -> tuple[Callable[[int], None], float]:
  """``(run, bytes)``: ``run(n)`` times n consecutive decode steps at ``context`` (blocking), the
  cache donated and fed back; ``bytes``: XLA's bytes accessed by one step."""
  graphdef, state = nnx.split(model)
  vocab = model.hf_config["vocab_size"]

  @jax.jit
  def prefill(state, ids):
    cache = nnx.merge(graphdef, state).init_cache(batch, context + STEP_SLACK)
    return nnx.merge(graphdef, state)(ids, cache=cache, logits_to_keep=1)[1]

  def step(state, cache, tokens, positions):
    logits, cache = nnx.merge(graphdef, state)(tokens[:, None], None, positions[:, None],
                                               cache=cache)
    return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache

  cache = prefill(state, jax.random.randint(jax.random.key(seed), (batch, context), 3, vocab))
  tokens = jnp.zeros((batch,), jnp.int32)
  positions = jnp.full((batch,), context, jnp.int32)
  compiled = jax.jit(step, donate_argnums=1).lower(state, cache, tokens, positions).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  holder = {"cache": cache}

  def run(repeats: int) -> None:
    # Every step writes slot ``context`` again, so the context stays C.
    cache, out = holder["cache"], tokens
    for _ in range(repeats):
      out, cache = compiled(state, dataclasses.replace(cache, index=jnp.int32(context)), out,
                            positions)
    jax.block_until_ready(out)
    holder["cache"] = cache

  return run, float(cost.get("bytes accessed", float("nan")))


def _cache_bytes(model: nnx.Module, batch: int, slots: int) -> int:
  """Bytes of the keys and values of a ``slots``-slot cache (what a decode step reads)."""
  cache = jax.eval_shape(lambda: model.init_cache(batch, slots))
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves((cache.keys, cache.values)))


def measure(args: argparse.Namespace, log: Callable[[str], None]) -> Measured:
  threads = _common.num_cores()
  torch.set_num_threads(threads)
  with tempfile.TemporaryDirectory(prefix="smoa-generate-") as workdir:
    model_dir, description = model_directory(args.quick, Path(workdir))
    config = json.loads((Path(model_dir) / "config.json").read_text())
    vocab = config["vocab_size"]
    base = smoa_jax.from_hf(model_dir)
    smoa = nnx.clone(base)
    smoa_jax.apply_adapter(smoa, smoa_jax.SMoAConfig(**ADAPTER), rngs=nnx.Rngs(args.seed),
                           verbose=False, show_progress=False)
    _random_b(smoa, args.seed + 1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # run every row to the end, as ours does
    log(f"model: {description}")
    rng = np.random.default_rng(args.seed)
    jax_group: dict[str, Callable[[], Any]] = {}
    torch_group: dict[str, Callable[[], Any]] = {}
    outputs: dict[str, Any] = {}
    traces_before = decode.traces()
    first_call = 0.0
    for batch in args.batches:
      prompts = rng.integers(3, vocab, (batch, args.prompt_len))
      models = {f"ours B={batch}": base}
      if batch == args.batches[0]:
        models[f"SMoA (unmerged) B={batch}"] = smoa
      for name, model in models.items():
        def run(model=model, prompts=prompts.tolist()):
          return smoa_jax.generate_ids(model, prompts, max_new_tokens=args.new_tokens)
        start = time.perf_counter()
        outputs[name] = run()
        elapsed = time.perf_counter() - start
        first_call = first_call or elapsed
        jax_group[name] = run
        log(f"compiled {name} ({elapsed:.1f} s)")
      torch_group[f"transformers B={batch}"] = _hf_generate(
          hf, torch.from_numpy(prompts.astype(np.int64)), args.new_tokens)
    traces = decode.traces() - traces_before
    first = args.batches[0]
    same = outputs[f"ours B={first}"] == torch_group[f"transformers B={first}"]()
    log(f"timing {len(jax_group) + len(torch_group)} generation candidates, {args.rounds} rounds")
    tokens = _common.time_interleaved(jax_group, torch_group, rounds=args.rounds,
                                      max_seconds=args.max_seconds, settle_seconds=SETTLE_SECONDS)
    if decode.traces() != traces_before + traces:
      raise RuntimeError("a timed generate_ids call compiled a new program")

    step_group: dict[str, Callable[[], Any]] = {}
    xla_bytes: dict[int, float] = {}
    for context in args.contexts:
      run, xla_bytes[context] = _step_program(base, args.step_batch, context, args.seed)
      run(1)
      step_group[f"C={context}"] = lambda run=run: run(args.step_repeats)
      log(f"compiled the decode step at context {context}")
    steps = _common.time_interleaved(step_group, rounds=args.rounds, max_seconds=args.max_seconds)
    cache_bytes = {c: _cache_bytes(base, args.step_batch, c + STEP_SLACK) for c in args.contexts}
    weight_bytes = sum(v.nbytes for v in jax.tree.leaves(nnx.state(base, nnx.Param)))
    return Measured(description, tokens, steps, same, traces, first_call, weight_bytes,
                    cache_bytes, xla_bytes)


def render(m: Measured, args: argparse.Namespace) -> str:
  """The markdown body: the tokens/s table, the decode-step table and the goals' verdicts."""
  t, s = m.tokens, m.steps
  rows = []
  for batch in args.batches:
    tokens = batch * args.new_tokens
    ours, ref = f"ours B={batch}", f"transformers B={batch}"
    rows.append([f"{batch}", "smoa-jax (KV cache, one jitted loop)", f"{t.median(ours):.2f}",
                 f"{tokens / t.median(ours):,.1f}", f"{t.ratio(ref, ours):.2f}x"])
    smoa = f"SMoA (unmerged) B={batch}"
    if smoa in t.samples:
      rows.append([f"{batch}", "smoa-jax, SMoA adapter unmerged", f"{t.median(smoa):.2f}",
                   f"{tokens / t.median(smoa):,.1f}", f"{t.ratio(ref, smoa):.2f}x"])
    rows.append([f"{batch}", "transformers generate", f"{t.median(ref):.2f}",
                 f"{tokens / t.median(ref):,.1f}", "1.00x"])
  short, long_ = args.contexts[0], args.contexts[-1]
  step_rows = []
  for c in args.contexts:
    total = m.weight_bytes + m.cache_bytes[c]
    step_rows.append([f"{c}", f"{1000 * s.median(f'C={c}') / args.step_repeats:.1f}",
                      f"{m.weight_bytes / 2**20:,.0f} + {m.cache_bytes[c] / 2**20:,.1f}",
                      f"{total / 2**20:,.0f}", f"{m.xla_bytes[c] / 2**20:,.0f}"])
  big = args.batches[-1]
  speedup = t.ratio(f"transformers B={big}", f"ours B={big}")
  ratio = s.ratio(f"C={long_}", f"C={short}")
  predicted = ((m.weight_bytes + m.cache_bytes[long_]) / (m.weight_bytes + m.cache_bytes[short]))
  adapter = t.ratio(f"SMoA (unmerged) B={args.batches[0]}", f"ours B={args.batches[0]}")
  verdict = lambda ok: "met" if ok else "MISSED"
  parts = [
      f"Model: {m.model}, float32. Prompts of {args.prompt_len} random token ids, "
      f"{args.new_tokens} new tokens each (greedy, EOS disabled); one sample = one complete call "
      f"(prefill + decode), median of {t.rounds} interleaved rounds; speed-up = median of "
      "per-round ratios.",
      _common.markdown_table(["batch", "generator", "seconds / call", "tokens/s", "speed-up"],
                             rows),
      f"Decode programs compiled for this table: {m.traces} (one per batch size, bucket and "
      f"model structure; none during the timed rounds); the first batch-{args.batches[0]} call, "
      f"compile included, took {m.first_call:.1f} s. Greedy tokens at batch {args.batches[0]} "
      f"identical to transformers': {'yes' if m.same_tokens else 'NO'}.",
      f"One decode step at batch {args.step_batch} (a cache of C + {STEP_SLACK} slots filled with "
      f"C tokens; {args.step_repeats} steps per sample, median of {s.rounds} rounds). Bytes one "
      "step must read: the weights plus the keys and values of every cache slot; XLA's count "
      "from `cost_analysis()`.",
      _common.markdown_table(["context C", "ms / step", "weights + KV cache MiB",
                              "total MiB", "XLA bytes accessed MiB"], step_rows),
      "\n".join([
          f"- Tokens/s at batch {big}: {speedup:.2f}x transformers' generate (goal >= "
          f"{SPEEDUP_TARGET:g}x: {verdict(speedup >= SPEEDUP_TARGET)}).",
          f"- Decode step at context {long_} / {short}: {ratio:.2f} (goal <= {CONTEXT_TARGET:g}: "
          f"{verdict(ratio <= CONTEXT_TARGET)}); the bytes it must read predict {predicted:.2f}.",
          f"- SMoA adapter unmerged / base model, tokens/s at batch {args.batches[0]}: "
          f"{1 / adapter:.2f}. The adapters are folded into the kernels once per call, before "
          "the decode loop: a cost per call, not per token, which a longer generation "
          "amortizes.",
      ]),
  ]
  return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> str:
  """Run the benchmark, print the results, update RESULTS.md unless told not to; return the body."""
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  load_at_start = _common.load_average()
  with _models.fast_compile(args.quick):
    measured = measure(args, functools.partial(print, flush=True))
  body = render(measured, args)
  _common.publish(SECTION, "generate: greedy decoding with the KV cache vs transformers", body,
                  module=MODULE, argv=argv, write=not args.no_write, load_at_start=load_at_start,
                  torch_threads=_common.num_cores())
  return body


if __name__ == "__main__":
  main()
