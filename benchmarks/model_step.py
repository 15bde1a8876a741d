"""Benchmark: a full training step of SmolLM2-135M with every adapter, and the authors' algorithm.

What one **step** is, for every candidate: the forward pass of the whole causal LM on a batch of
``B x S`` tokens (default 4 x 256 = 1,024 tokens), the mean next-token cross-entropy, the backward
pass, global-norm clipping (1.0) and an AdamW update of the trainable arrays -- a real training
step, not a layer in isolation. Targets: ``q_proj, k_proj, v_proj, up_proj, down_proj`` of all 30
layers (150 kernels). The model is SmolLM2-135M from the asset cache (``smoa-jax fetch-assets``);
without it, the same config with random weights (the speed is the same).

JAX candidates (one jitted, donated step each; ``lower().compile()`` ahead of time, not timed),
built from ONE loaded model (``nnx.clone`` shares the frozen arrays) with the optimizer of
:func:`smoa_jax.train` (``smoa_jax.training.loop.make_optimizer``) over the ``TrainableParam`` arrays:

* ``SMoA K=2 r=8``, ``SMoA K=4 r=8``, ``LoRA r=8``, ``HiRA r=8``: equal rank r = 8;
* ``SMoA K=2 r=16`` vs ``LoRA r=8``: equal trainable parameters (SMoA r = 2p, K = 2 vs LoRA r = p);
* ``full FT``: the 150 targeted kernels themselves are trained;
* ``frozen``: no adapter; only the first layer's input RMSNorm scale is trainable, so the
  backward pass still runs through every layer (input gradients only): the floor any adapter
  pays. Adapters' ``b`` factors are set to small random values first, as after some training.

PyTorch candidates (item 3), with ``torch.set_num_threads`` = the cores XLA uses: the
transformers ``LlamaForCausalLM`` on the same weights, every target ``nn.Linear`` replaced by
:class:`benchmarks.authors_torch.AuthorsSMoALinear` (the authors' per-forward algorithm: full
``dW`` built every forward, a second full matmul, anchor copies of the blocks), built from the
JAX SMoA layers (same blocks and factors) -- ``authors K=2 r=8`` and ``authors K=4 r=8`` -- and
``torch frozen``: the unmodified model with only the first input-norm weight trainable (the
PyTorch twin of ``frozen``), so ``authors / torch frozen`` is the algorithm's own cost and
``torch frozen / frozen`` the frameworks' speed difference. Same loss (transformers' shifted
cross-entropy), clipping and AdamW.

Timing: all candidates in ONE interleaved run (:func:`benchmarks._common.time_interleaved`),
JAX and torch in separate groups with a pause after each; ratios are medians of per-round
ratios. Tokens/s = ``B * S`` / median step time. **Merged inference**: forward only, the SMoA
K=2 r=8 model after ``merge_and_unload`` vs the base model (the same group, same run).

Memory. JAX, from XLA's buffer assignment of the compiled step (``compiled.memory_analysis()``):
``resident`` = argument bytes (frozen weights + trainable arrays + optimizer state + batch) and
``step`` = ``temp + output - alias`` bytes (what one step allocates beyond its donated inputs:
activations kept for the backward pass, gradients, logits). Their sum is the step's peak. We do
not use the process RSS: every candidate lives in the same process, so RSS is the union of all of
them. Torch: ``resident`` = parameters + buffers (incl. the anchor copies) + optimizer state, and
``step`` = the peak of live bytes created during one step (profiler memory timeline).
``optimizer state`` = the AdamW moments (plus counters).

Cost model (docs/design.md, section 4), printed next to the measurement: with ``F_frozen`` the flops of the
frozen step (``4 T d_in d_out`` per matmul incl. the LM head, plus attention), ``F_lora`` =
``F_frozen + 6 T r (d_in + d_out)`` per target, and ``A = sum over targets of 4 T d_in d_out``,
SMoA/LoRA ~ ``1 + (A / 2K) / F_lora`` (HiRA and full FT: K = 1) and authors/torch frozen ~
``1 + 1.5 A / F_frozen`` (their extra ``6 T d_in d_out`` per target).

Run from the repository root: ``python -m benchmarks.model_step`` (``--quick``: a tiny random
Llama, 2 rounds; a smoke test). ``--no-torch`` times the JAX candidates alone and writes its own
section (``model_step_jax_only``): in a process that also holds the PyTorch models, some JAX
candidates have measured persistently slower (see RESULTS.md), so both runs are kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import smoa_jax
from benchmarks import _budgets, _common, _models
from benchmarks.authors_torch import AuthorsSMoALinear, peak_live_bytes
from smoa_jax.training.config import make_optimizer

SECTION = "model_step"
MODULE = "benchmarks.model_step"
TARGETS = _models.LLAMA_TARGETS
SMOA_LORA_TARGET = 1.10  # SMoA / LoRA step time on the whole model
AUTHORS_TARGET = 2.0  # authors / SMoA step time
SETTLE_SECONDS = 1.0  # pause after each runtime's group; cheap next to multi-second steps
LEARNING_RATE = 1e-5  # small: the timed steps keep updating the same arrays
FROZEN_PATTERN = r"model/layers/0/input_layernorm/.*"


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A JAX training-step candidate: its adapter config (None: the frozen model)."""

  name: str
  config: smoa_jax.AdapterConfig | None


def candidates(p: int, r: int, ks: Sequence[int]) -> list[Candidate]:
  """Equal rank r (SMoA for each K, LoRA, HiRA), equal parameters (SMoA r=2p K=2 vs LoRA r=p,
  :class:`benchmarks._budgets.EqualBudget`), full fine-tuning, frozen. ``ks`` must contain 2."""
  out = [Candidate(f"SMoA K={k} r={r}", _budgets.smoa_config(r, k, TARGETS)) for k in ks]
  out += [Candidate(f"LoRA r={r}", _budgets.lora_config(r, TARGETS)),
          Candidate(f"HiRA r={r}", _budgets.hira_config(r, TARGETS))]
  budget = _budgets.EqualBudget(p, num_blocks=2)
  if budget.smoa_rank != r:
    out.append(Candidate(f"SMoA K={budget.num_blocks} r={budget.smoa_rank}", budget.smoa(TARGETS)))
  if budget.lora_rank != r:
    out.append(Candidate(f"LoRA r={budget.lora_rank}", budget.lora(TARGETS)))
  out += [Candidate("full FT", smoa_jax.FullFineTuneConfig(target_modules=TARGETS)),
          Candidate("frozen", None)]
  return out


# -- JAX -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class JaxStep:
  """A compiled step and what it holds."""

  run: Callable[[], Any]
  trainable: int
  optimizer_bytes: int
  resident_bytes: int
  step_bytes: int
  flops: float  # XLA's cost analysis of the compiled step (a scanned loop body counted once)


def jax_step(model: nnx.Module, batch: dict[str, jax.Array]) -> JaxStep:
  """AOT-compile forward + backward + clip + AdamW over the model's ``TrainableParam`` arrays."""
  tx, _ = make_optimizer(smoa_jax.TrainConfig(steps=1000, learning_rate=LEARNING_RATE), 1000)
  step, params, rest = _models.train_step(model, smoa_jax.CausalLMTask(), tx)
  params = jax.tree.map(jnp.copy, params)  # donated below: never the arrays other models share
  opt_state = tx.init(params)
  compiled = _common.aot_compile(step, params, opt_state, rest, batch, donate_argnums=(0, 1))
  state = [params, opt_state]

  def run():
    state[0], state[1], loss = compiled(state[0], state[1], rest, batch)
    return jax.block_until_ready((state[0], state[1], loss))

  return JaxStep(run, _common.tree_size(params), _common.tree_nbytes(opt_state),
                 compiled.memory_analysis().argument_size_in_bytes,
                 _common.allocated_bytes(compiled), _common.compiled_flops(compiled))


def jax_forward(model: nnx.Module, batch: dict[str, jax.Array]) -> Callable[[], Any]:
  """AOT-compiled logits of the whole model (merged-inference timing)."""
  graphdef, state = nnx.split(model)
  args = (state, batch["input_ids"], batch["attention_mask"])
  compiled = _common.aot_compile(
      lambda state, ids, mask: nnx.merge(graphdef, state)(ids, attention_mask=mask), *args)
  return _common.blocking_call(compiled, *args)


# -- PyTorch ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class TorchStep:
  run: Callable[[], Any]
  model: torch.nn.Module
  optimizer: torch.optim.Optimizer
  trainable: int


def torch_step(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> TorchStep:
  """Forward (transformers' shifted cross-entropy) + backward + clip + AdamW, like the JAX step."""
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
  model.train()

  def run():
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss

  return TorchStep(run, model, optimizer, sum(p.numel() for p in params))


def authors_model(model_dir: Path, jax_model: nnx.Module) -> torch.nn.Module:
  """The transformers model with every target replaced by the authors' layer (same blocks, factors)."""
  import transformers

  model = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
  model.requires_grad_(False)
  for path, layer in smoa_jax.adapter_layers(jax_model):
    parts = path.split("/")  # model/layers/3/self_attn/q_proj
    parent = model.get_submodule(".".join(parts[:-1]))
    setattr(parent, parts[-1], AuthorsSMoALinear.from_smoa_dense(layer))
  return model


def frozen_torch_model(model_dir: Path) -> torch.nn.Module:
  import transformers

  model = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
  model.requires_grad_(False)
  model.model.layers[0].input_layernorm.weight.requires_grad_(True)
  return model


def torch_resident_bytes(step: TorchStep) -> tuple[int, int]:
  """``(parameters + buffers + optimizer state, optimizer state)`` bytes (after a first step)."""
  tensors = list(step.model.parameters()) + list(step.model.buffers())
  optimizer = _common.tree_nbytes(list(step.optimizer.state.values()))
  return _common.tree_nbytes(tensors) + optimizer, optimizer


def torch_peak_bytes(step: TorchStep) -> int:
  """Peak of live bytes torch allocates during one step, gradients cleared first."""
  step.optimizer.zero_grad(set_to_none=True)
  return peak_live_bytes(step.run)


# -- cost model ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Flops:
  """Flops of one training step, counted from the config (docs/design.md, section 4).

  Attributes:
    frozen: F_frozen, the frozen model's forward + input gradients: ``4 T d_in d_out`` for every
      matmul (the LM head included) plus attention (``QK^T`` and ``PV``, backward = 2x forward).
    adapted: A, ``4 T d_in d_out`` summed over the targets (their share of ``frozen``).
    lora_unit: ``6 T (d_in + d_out)`` summed over the targets; LoRA rank r adds r times this.
  """

  frozen: float
  adapted: float
  lora_unit: float

  def lora(self, r: int) -> float:
    return self.frozen + r * self.lora_unit

  def smoa(self, k: int) -> float:
    """SMoA adds the block gradients ``(x_k^T dy_k) * W_k``: ``2 T d_in d_out / K`` per target."""
    return self.frozen + self.adapted / (2 * k)

  @property
  def authors(self) -> float:
    """The authors' algorithm adds ``6 T d_in d_out`` per target (second matmul, dense dW grad,
    its input gradient)."""
    return self.frozen + 1.5 * self.adapted

  def of(self, config: smoa_jax.AdapterConfig | None) -> float:
    """The step flops of a JAX candidate (HiRA is SMoA with K = 1; full fine-tuning adds the
    kernels' weight gradients, ``2 T d_in d_out`` per target, the same amount)."""
    if config is None:
      return self.frozen
    if isinstance(config, smoa_jax.SMoAConfig):
      return self.smoa(config.num_blocks)
    if isinstance(config, smoa_jax.LoRAConfig):
      return self.lora(config.r)
    return self.smoa(1)


def flops(config: dict[str, Any], batch: int, seq: int) -> Flops:
  """:class:`Flops` of a Llama config (an HF ``config.json`` dict) for ``batch x seq`` tokens."""
  h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
  heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
  hd = config.get("head_dim") or h // heads
  layers = config["num_hidden_layers"]
  tokens = batch * seq
  shapes = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd),
            "o_proj": (heads * hd, h), "gate_proj": (h, inter), "up_proj": (h, inter),
            "down_proj": (inter, h)}
  per_layer = sum(i * o for i, o in shapes.values())
  attention = 3 * 4 * batch * heads * seq * seq * hd
  frozen = 4 * tokens * (layers * per_layer + h * vocab) + layers * attention
  adapted = 4 * tokens * layers * sum(shapes[t][0] * shapes[t][1] for t in TARGETS)
  lora_unit = 6 * tokens * layers * sum(sum(shapes[t]) for t in TARGETS)
  return Flops(float(frozen), float(adapted), float(lora_unit))


# -- run -------------------------------------------------------------------------------------------
def _ks(text: str) -> tuple[int, ...]:
  ks = _common.parse_ints(text)
  if 2 not in ks:
    raise argparse.ArgumentTypeError(f"--ks {text!r} must include 2 (the headline SMoA)")
  return ks


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = _common.benchmark_parser(
      MODULE, "Time a full training step of SmolLM2-135M (targets q,k,v,up,down) with SMoA, "
              "LoRA, HiRA, full fine-tuning, the frozen model, and the authors' algorithm in "
              "PyTorch; memory, optimizer state, merged inference vs base.")
  parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
  parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
  parser.add_argument("--r", type=int, default=8, help="the equal rank (default 8)")
  parser.add_argument("--p", type=int, default=8,
                      help="equal parameters: SMoA r=2p K=2 vs LoRA r=p (default 8)")
  parser.add_argument("--ks", type=_ks, default=(2, 4),
                      help="SMoA block counts K, comma-separated, must include 2 (default 2,4)")
  parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds (default 9)")
  parser.add_argument("--max-seconds", type=float, default=1200.0,
                      help="stop timing after this long, once 3 rounds are done")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch candidates")
  parser.add_argument("--seed", type=int, default=0)
  _common.add_run_flags(
      parser, quick="tiny random Llama, batch 2 x 16, 2 rounds: a smoke test (never writes)")
  args = parser.parse_args(argv)
  if args.quick:
    args.batch, args.seq, args.r, args.p, args.ks, args.rounds = 2, 16, 4, 2, (2,), 2
    args.no_write = True
  return args


def model_directory(quick: bool, workdir: Path) -> tuple[Path, str]:
  """The HF directory to benchmark and a phrase saying what it is."""
  if quick:
    return (_models.save_random_llama(_models.tiny_llama_config(), workdir / "tiny"),
            "a tiny random Llama (--quick)")
  directory, real = _models.smollm2_directory(workdir)
  return directory, ("SmolLM2-135M-Instruct (real weights, dequantized Q4_1)" if real else
                     "SmolLM2-135M's config with random weights (the asset is not cached)")


@dataclasses.dataclass
class Measured:
  """Everything the report needs."""

  names: list[str]
  torch_names: list[str]
  timings: _common.Timings
  jax: dict[str, JaxStep]
  torch_memory: dict[str, tuple[int, int, int]]  # name -> (resident, optimizer, step)
  torch_trainable: dict[str, int]
  predicted: dict[str, float]  # name -> step flops of the cost model
  flops: Flops
  tokens: int
  model: str


def measure(args: argparse.Namespace, log: Callable[[str], None]) -> Measured:
  _common.set_torch_threads()
  with tempfile.TemporaryDirectory(prefix="smoa-model-step-") as workdir:
    model_dir, description = model_directory(args.quick, Path(workdir))
    config = json.loads((model_dir / "config.json").read_text())
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, config["vocab_size"], (args.batch, args.seq), dtype=np.int32)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(jnp.asarray(ids))}
    base = smoa_jax.from_hf(model_dir)
    log(f"model: {description}; batch {args.batch} x {args.seq}")
    cost = flops(config, args.batch, args.seq)
    predicted: dict[str, float] = {"torch frozen": cost.frozen}
    steps: dict[str, JaxStep] = {}
    adapted: dict[str, nnx.Module] = {}
    blocks: dict[int, dict[str, Any]] = {}  # K -> spectral blocks by module path (computed once)
    for cand in candidates(args.p, args.r, args.ks):
      model = nnx.clone(base)
      if cand.config is None:
        smoa_jax.mark_trainable(model, FROZEN_PATTERN)
      else:
        k = getattr(cand.config, "num_blocks", None)
        smoa_jax.apply_adapter(model, cand.config, rngs=nnx.Rngs(args.seed), verbose=False,
                               show_progress=False, blocks=blocks.get(k))
        if isinstance(cand.config, smoa_jax.SMoAConfig) and k not in blocks:
          blocks[k] = {path: layer.blocks for path, layer in smoa_jax.adapter_layers(model)}
        _models.randomize_lora_b(model, args.seed + 1)
      adapted[cand.name] = model
      steps[cand.name] = jax_step(model, batch)
      predicted[cand.name] = cost.of(cand.config)
      log(f"compiled {cand.name}")
    merged_from = f"SMoA K=2 r={args.r}"
    merged = smoa_jax.merge_and_unload(nnx.clone(adapted[merged_from]))
    jax_group: dict[str, Callable[[], Any]] = {name: s.run for name, s in steps.items()}
    jax_group["merged fwd"] = jax_forward(merged, batch)
    jax_group["base fwd"] = jax_forward(base, batch)
    torch_group: dict[str, Callable[[], Any]] = {}
    torch_steps: dict[str, TorchStep] = {}
    if not args.no_torch:
      ids_t = torch.from_numpy(ids.astype(np.int64))
      mask_t = torch.ones_like(ids_t)
      for k in args.ks:
        name = f"authors K={k} r={args.r}"
        predicted[name] = cost.authors
        torch_steps[name] = torch_step(authors_model(model_dir, adapted[f"SMoA K={k} r={args.r}"]),
                                       ids_t, mask_t)
      torch_steps["torch frozen"] = torch_step(frozen_torch_model(model_dir), ids_t, mask_t)
      torch_group = {name: s.run for name, s in torch_steps.items()}
      log("built the PyTorch models")
    del adapted
    log(f"timing {len(jax_group) + len(torch_group)} candidates, {args.rounds} interleaved rounds")
    groups = [jax_group] + ([torch_group] if torch_group else [])
    timings = _common.time_interleaved(*groups, rounds=args.rounds, max_seconds=args.max_seconds,
                                       settle_seconds=SETTLE_SECONDS)
    torch_memory = {}
    for name, step in torch_steps.items():
      resident, optimizer = torch_resident_bytes(step)
      torch_memory[name] = (resident, optimizer, torch_peak_bytes(step))
    return Measured(list(steps), list(torch_steps), timings, steps, torch_memory,
                    {n: s.trainable for n, s in torch_steps.items()}, predicted, cost,
                    args.batch * args.seq, description)


def render(m: Measured, args: argparse.Namespace, threads: int) -> str:
  """The markdown body: speed and cost model, memory, and the targets' verdicts."""
  t, f, r, p = m.timings, m.flops, args.r, args.p
  lora = f"LoRA r={r}"

  def tokens_s(name: str) -> str:
    return f"{m.tokens / t.median(name):,.0f}"

  def vs(name: str, reference: str) -> tuple[str, str]:
    """Measured and predicted (flops) ratio of two candidates."""
    return f"{t.ratio(name, reference):.3f}", f"{m.predicted[name] / m.predicted[reference]:.3f}"

  speed, memory = [], []
  for name in m.names + m.torch_names:
    is_torch = name in m.torch_names
    frozen = "torch frozen" if is_torch else "frozen"
    label = f"{name} (torch)" if is_torch else name
    trainable = m.torch_trainable[name] if is_torch else m.jax[name].trainable
    speed.append([label, f"{trainable:,}", f"{m.predicted[name] / 1e9:.3g}",
                  f"{t.median(name):.3g}", tokens_s(name),
                  *(("-", "-") if is_torch else vs(name, lora)), *vs(name, frozen)])
    if is_torch:
      resident, optimizer, step = m.torch_memory[name]
    else:
      s = m.jax[name]
      resident, optimizer, step = s.resident_bytes, s.optimizer_bytes, s.step_bytes
    memory.append([label, *map(_common.format_mib, (optimizer, resident, step, resident + step))])
  parts = [
      f"A full training step (forward + backward + clip + AdamW) of {m.model}, batch "
      f"{args.batch} x {args.seq} = {m.tokens:,} tokens, float32, targets {', '.join(TARGETS)} of "
      f"every layer. All candidates were timed in one interleaved run ({t.rounds} rounds; ratios "
      "are medians of per-round ratios). What is measured and how: the docstring of "
      f"`benchmarks/model_step.py`. JAX uses {threads} CPU threads, torch "
      f"`set_num_threads({threads})`. `GFLOP` and `pred.` come from the cost model in docs/design.md "
      "section 4 (frozen step + LoRA's 6 T r (d_in + d_out), SMoA's 2 T d_in d_out / K, HiRA's "
      "and full FT's 2 T d_in d_out, the authors' 6 T d_in d_out per target); "
      f"`/ frozen` is against the frozen step of the same framework.",
      _common.markdown_table(["candidate", "trainable", "GFLOP", "step s", "tokens/s",
                              f"/ {lora}", "pred.", "/ frozen", "pred."], speed),
      "Memory (MiB): `resident` = what the step keeps between calls (frozen weights, trainable "
      "arrays, optimizer state; torch: parameters + buffers incl. anchor copies + optimizer "
      "state); `step` = what one step allocates on top (JAX: XLA temp + output - donated alias "
      "bytes; torch: peak live bytes created during the step); `peak` = their sum.",
      _common.markdown_table(["candidate", "optimizer state", "resident", "step", "peak"], memory),
  ]
  smoa2 = f"SMoA K=2 r={r}"
  ratio = t.ratio(smoa2, lora)
  budget = _budgets.EqualBudget(p, num_blocks=2)
  budget_smoa = f"SMoA K={budget.num_blocks} r={budget.smoa_rank}"
  budget_lora = f"LoRA r={budget.lora_rank}"
  verdicts = [
      f"- {smoa2} / {lora} = {ratio:.3f} (target <= {SMOA_LORA_TARGET:.2f}: "
      f"**{'MET' if ratio <= SMOA_LORA_TARGET else 'MISSED'}**); the cost model predicts "
      f"1 + (A / 2K) / F_lora = {f.smoa(2) / f.lora(r):.3f} with A = {f.adapted / 1e9:,.0f} GFLOP "
      f"of targeted frozen-layer work in F_lora = {f.lora(r) / 1e9:,.0f} GFLOP.",
      *(f"- SMoA K={k} r={r} / {lora} = {t.ratio(f'SMoA K={k} r={r}', lora):.3f} (predicted "
        f"{f.smoa(k) / f.lora(r):.3f})." for k in args.ks if k != 2),
      f"- Equal trainable parameters: {budget_smoa} / {budget_lora} = "
      f"{t.ratio(budget_smoa, budget_lora):.3f} (predicted "
      f"{f.smoa(budget.num_blocks) / f.lora(budget.lora_rank):.3f}).",
      f"- Merged inference (forward only): SMoA K=2 r={r} after `merge_and_unload` / base = "
      f"{t.ratio('merged fwd', 'base fwd'):.3f} (target 1.00; {tokens_s('merged fwd')} vs "
      f"{tokens_s('base fwd')} tokens/s).",
  ]
  for k in args.ks:
    name = f"authors K={k} r={r}"
    if name in m.torch_names:
      ratio = t.ratio(name, f"SMoA K={k} r={r}")
      verdicts.append(
          f"- {name} (torch) / smoa-jax SMoA K={k} r={r} = {ratio:.2f} (target >= "
          f"{AUTHORS_TARGET:g}: **{'MET' if ratio >= AUTHORS_TARGET else 'MISSED'}**; flops "
          f"ratio {f.authors / f.smoa(k):.2f}). Algorithm alone, each against its own framework's "
          f"frozen step: authors {t.ratio(name, 'torch frozen'):.2f} (predicted "
          f"{f.authors / f.frozen:.2f}), smoa-jax {t.ratio(f'SMoA K={k} r={r}', 'frozen'):.2f} "
          f"(predicted {f.smoa(k) / f.frozen:.2f}).")
  if m.torch_names:
    verdicts.append(f"- Frameworks on the same frozen step: torch / JAX = "
                    f"{t.ratio('torch frozen', 'frozen'):.2f}.")
  parts.append("\n".join(verdicts))
  return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> str:
  """Run the benchmark, print the results, update RESULTS.md unless told not to; return the body."""
  argv = _common.cli_argv(argv)
  args = parse_args(argv)
  load_at_start = _common.load_average()

  def log(text: str) -> None:
    print(text, flush=True)

  with _models.fast_compile(args.quick):
    measured = measure(args, log)
  threads = _common.num_cores()
  body = render(measured, args, threads)
  # A JAX-only run gets its own section: it does not replace the run that includes PyTorch.
  section, title = ((f"{SECTION}_jax_only", "model_step, JAX only (--no-torch)") if args.no_torch
                    else (SECTION, "model_step: a full training step of SmolLM2-135M"))
  _common.publish(section, title, body, module=MODULE, argv=argv, write=not args.no_write,
                  load_at_start=load_at_start, torch_threads=None if args.no_torch else threads)
  return body


if __name__ == "__main__":
  main()
