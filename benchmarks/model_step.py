"""Benchmark: a training step of SmolLM2-135M with every adapter, PEFT, and the authors' algorithm.

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

PyTorch candidates, with ``torch.set_num_threads`` = the cores XLA uses, on the transformers
``LlamaForCausalLM`` with the same weights (:mod:`benchmarks._step_torch`): ``PEFT LoRA r=8`` and
``PEFT HiRA r=8`` (``peft.get_peft_model`` with ``LoraConfig`` / ``HiraConfig``, the adapters
users would pick instead; ``peft`` is pinned in the ``test`` extra); ``authors K=2 r=8`` and
``authors K=4 r=8``: every target ``nn.Linear`` replaced by
:class:`benchmarks.authors_torch.AuthorsSMoALinear` (the authors' per-forward algorithm: full
``dW`` built every forward, a second full matmul, anchor copies of the blocks) with the blocks and
factors of the JAX SMoA layers; and ``torch frozen``: the unmodified model with only the first
input-norm weight trainable (the PyTorch twin of ``frozen``), so ``authors / torch frozen`` is
the algorithm's own cost and ``torch frozen / frozen`` the frameworks' speed difference. Same
loss (transformers' shifted cross-entropy), clipping and AdamW.

Processes. Each framework runs in its own long-lived worker process (:mod:`benchmarks._procs`):
``benchmarks._step_jax`` never imports torch, ``benchmarks._step_torch`` never imports JAX (the
parent checks both). The parent asks each worker in turn for one round (every candidate once,
the start rotating, :func:`benchmarks._timing.run_round`), with a pause after each
(:func:`benchmarks._timing.time_rounds`); ratios are medians of per-round ratios, so a slow spell
of the shared machine hits both frameworks alike. Tokens/s = ``B * S`` / median step time.
**Merged inference**: forward only, the SMoA K=2 r=8 model after ``merge_and_unload`` vs the base
model (same worker, same rounds); it is "within noise" when 1 lies between the quartiles of the
per-round ratios, or the median is within :data:`MERGED_NOISE` of 1.

Why separate processes. Until 2026-11 every candidate lived in ONE process, and with the PyTorch
models in it some JAX candidates measured persistently slower (SMoA K=2 r=8 / LoRA r=8 1.475, the
merged forward 1.13x the base one) than in a JAX-only run (0.940). We measured the suspects in
one process (2026-11-30, a 4-layer Llama of SmolLM2's widths, batch 4 x 256, SMoA K=2 r=8 and
LoRA r=8 steps before, between and after torch training steps; per call: wall, user and system
CPU, minor page faults, and CPU per thread from ``/proc/self/task``): (1) torch's OpenMP threads
(GNU libgomp; ``KMP_BLOCKTIME`` is Intel's and does not apply) used no measurable CPU in the
0.2 s and the 1 s after a torch step, and at most 0.04 s during the JAX step that followed with
no pause at all, so they do not spin on XLA's cores; (2) each JAX step did the same work with or
without torch: 5.4-6.2 s user and 0.6-1.0 s system CPU, and exactly as many page faults as XLA's
temporary buffer has 4 KiB pages (187,335 for SMoA = 731.8 MiB, 180,575 for LoRA = 705.4 MiB:
XLA maps that buffer afresh every call, torch or not), so torch's allocator does not change
XLA's; (3) SMoA / LoRA was 1.05 with JAX alone, 0.88-1.00 right after torch steps and 1.01 with
the torch model loaded and idle (3 rounds each at a load average of 19-22 from other sessions,
so every wall time was about 5x the CPU time). So at that depth the slowdown did not reproduce,
and none of the suspects (spinning threads, thread counts, allocator) is it; what slowed one
candidate of the full model in the shared process stays unexplained. Separate processes remove
every interaction between the two runtimes by construction (threads, allocator, the memory
layout of one big process), which is why the benchmark now runs that way.

Memory. JAX, from XLA's buffer assignment of the compiled step (``compiled.memory_analysis()``):
``resident`` = argument bytes (frozen weights + trainable arrays + optimizer state + batch) and
``step`` = ``temp + output - alias`` bytes (what one step allocates beyond its donated inputs:
activations kept for the backward pass, gradients, logits). Their sum is the step's peak. We do
not use the process RSS: all candidates of a framework share one worker process, so RSS is the
union of all of them. Torch: ``resident`` = parameters + buffers (incl. the anchor copies) +
optimizer state, and ``step`` = the peak of live bytes created during one step (profiler memory
timeline).
``optimizer state`` = the AdamW moments (plus counters).

Cost model (docs/design.md, section 4), printed next to the measurement: with ``F_frozen`` the flops of the
frozen step (``4 T d_in d_out`` per matmul incl. the LM head, plus attention), ``F_lora`` =
``F_frozen + 6 T r (d_in + d_out)`` per target, and ``A = sum over targets of 4 T d_in d_out``,
SMoA/LoRA ~ ``1 + (A / 2K) / F_lora`` (HiRA and full FT: K = 1) and authors/torch frozen ~
``1 + 1.5 A / F_frozen`` (their extra ``6 T d_in d_out`` per target).

Run from the repository root: ``python -m benchmarks.model_step`` (``--quick``: a tiny random
Llama, 2 rounds; a smoke test). ``--no-torch`` times the JAX candidates alone (one worker) and
writes its own section (``model_step_jax_only``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import smoa_jax
from benchmarks import _budgets, _common, _models, _procs
from smoa_jax.training.config import make_optimizer

SECTION = "model_step"
MODULE = "benchmarks.model_step"
TARGETS = _models.LLAMA_TARGETS
SMOA_LORA_TARGET = 1.10  # SMoA / LoRA step time on the whole model (both smoa-jax)
PEFT_TARGET = 1.5  # SMoA K=2 tokens/s / PEFT LoRA tokens/s (SMoA and LoRA at the same rank)
AUTHORS_TARGET = 2.0  # authors / SMoA step time
MERGED_NOISE = 0.02  # merged/base within noise: 1 in the per-round quartiles, or |ratio - 1| <=
SETTLE_SECONDS = 1.0  # pause after each process's round; cheap next to multi-second steps
LEARNING_RATE = 1e-5  # small: the timed steps keep updating the same arrays
FROZEN_PATTERN = r"model/layers/0/input_layernorm/.*"


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A JAX training-step candidate: its adapter config (None: the frozen model)."""

  name: str
  config: smoa_jax.AdapterConfig | None


def candidates(p: int, r: int, ks: Sequence[int], goals_only: bool = False) -> list[Candidate]:
  """Equal rank r (SMoA for each K, LoRA, HiRA), equal parameters (SMoA r=2p K=2 vs LoRA r=p,
  :class:`benchmarks._budgets.EqualBudget`), full fine-tuning, frozen. ``ks`` must contain 2.
  ``goals_only``: SMoA K=2 r, LoRA r and frozen only (what the goals compare; a third of the
  compile time, for a busy machine)."""
  if goals_only:
    return [Candidate(f"SMoA K=2 r={r}", _budgets.smoa_config(r, 2, TARGETS)),
            Candidate(f"LoRA r={r}", _budgets.lora_config(r, TARGETS)), Candidate("frozen", None)]
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
  xla_flops: float  # XLA's cost analysis of the compiled step (a scanned loop body counted once)
  xla_bytes: float


def jax_step(model: nnx.Module, batch: dict[str, jax.Array], task: Any = None) -> JaxStep:
  """AOT-compile forward + backward + clip + AdamW over the model's ``TrainableParam`` arrays,
  for ``task``'s loss (default ``smoa_jax.CausalLMTask()``)."""
  tx, _ = make_optimizer(smoa_jax.TrainConfig(steps=1000, learning_rate=LEARNING_RATE), 1000)
  task = smoa_jax.CausalLMTask() if task is None else task
  step, params, rest = _models.train_step(model, task, tx)
  params = jax.tree.map(jnp.copy, params)  # donated below: never the arrays other models share
  opt_state = tx.init(params)
  compiled = _common.aot_compile(step, params, opt_state, rest, batch, donate_argnums=(0, 1))
  state = [params, opt_state]

  def run():
    state[0], state[1], loss = compiled(state[0], state[1], rest, batch)
    return jax.block_until_ready((state[0], state[1], loss))

  return JaxStep(run, _common.tree_size(params), _common.tree_nbytes(opt_state),
                 compiled.memory_analysis().argument_size_in_bytes,
                 _common.allocated_bytes(compiled), *_common.compiled_cost(compiled))


def _logits(graphdef: Any, state: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state)(ids, attention_mask=mask)


DEBUG_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def program_text(compiled: jax.stages.Compiled) -> str:
  """The optimized HLO of ``compiled`` without its debug information (op metadata and the
  source-location tables, which name the caller's line): two programs with equal text are the
  same executable."""
  text = re.sub(r", metadata=\{[^}]*\}", "", compiled.as_text())
  return "\n\n".join(block for block in text.split("\n\n") if not block.startswith(DEBUG_TABLES))


def jax_forward(model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[Callable[[], Any], str]:
  """AOT-compiled logits of the whole model (merged-inference timing), and that program's
  :func:`program_text`."""
  graphdef, state = nnx.split(model)
  args = (state, batch["input_ids"], batch["attention_mask"])
  compiled = _common.aot_compile(functools.partial(_logits, graphdef), *args)
  return _common.blocking_call(compiled, *args), program_text(compiled)


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
  parser.add_argument("--goals-only", action="store_true",
                      help="only what the goals compare: SMoA K=2, LoRA, frozen, merged/base "
                           "(JAX); authors K=2, PEFT LoRA and HiRA, torch frozen (implies --ks 2)")
  parser.add_argument("--seed", type=int, default=0)
  _common.add_run_flags(
      parser, quick="tiny random Llama, batch 2 x 16, 2 rounds: a smoke test (never writes)")
  args = parser.parse_args(argv)
  if args.goals_only:
    args.ks = (2,)
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

  names: list[str]  # JAX steps
  torch_names: list[str]  # PyTorch steps
  timings: _common.Timings
  info: dict[str, dict[str, float]]  # name -> trainable, resident, optimizer, step (+ xla_*)
  predicted: dict[str, float]  # name -> step flops of the cost model
  flops: Flops
  tokens: int
  model: str
  merged_is_base: bool  # the merged model's forward compiled to the base model's very program


def torch_predicted(cost: Flops, r: int, ks: Sequence[int]) -> dict[str, float]:
  """Cost-model flops of the PyTorch candidates (PEFT's HiRA does SMoA's work with K = 1)."""
  out = {f"authors K={k} r={r}": cost.authors for k in ks}
  out.update({f"PEFT LoRA r={r}": cost.lora(r), f"PEFT HiRA r={r}": cost.smoa(1),
              "torch frozen": cost.frozen})
  return out


def measure(args: argparse.Namespace, log: Callable[[str], None]) -> Measured:
  """Build the candidates in one worker process per framework, then time interleaved rounds."""
  threads = _common.num_cores()
  with tempfile.TemporaryDirectory(prefix="smoa-model-step-") as workdir:
    model_dir, description = model_directory(args.quick, Path(workdir))
    config = json.loads((model_dir / "config.json").read_text())
    ids = np.random.default_rng(args.seed).integers(0, config["vocab_size"],
                                                    (args.batch, args.seq), dtype=np.int32)
    cost = flops(config, args.batch, args.seq)
    predicted = {c.name: cost.of(c.config) for c in candidates(args.p, args.r, args.ks,
                                                                 args.goals_only)}
    log(f"model: {description}; batch {args.batch} x {args.seq}")
    with contextlib.ExitStack() as stack:
      jax_worker = stack.enter_context(_procs.Worker("benchmarks._step_jax"))
      info = jax_worker.call("build", model_dir=str(model_dir), workdir=workdir,
                             ids=ids.tolist(), r=args.r, p=args.p, ks=list(args.ks),
                             seed=args.seed, quick=args.quick, goals_only=args.goals_only)
      _check_imports(info.pop("imported"), "benchmarks._step_jax", "torch")
      merged_is_base = info.pop("merged_is_base")
      names = list(info)
      log(f"JAX worker (pid {jax_worker.process.pid}) compiled {len(names)} steps")
      workers = [jax_worker]
      torch_names: list[str] = []
      if not args.no_torch:
        torch_worker = stack.enter_context(_procs.Worker("benchmarks._step_torch"))
        torch_info = torch_worker.call("build", model_dir=str(model_dir), workdir=workdir,
                                       ids=ids.tolist(), r=args.r, ks=list(args.ks),
                                       targets=list(TARGETS), learning_rate=LEARNING_RATE,
                                       threads=threads)
        _check_imports(torch_info.pop("imported"), "benchmarks._step_torch", "jax")
        torch_names = list(torch_info)
        info.update(torch_info)
        predicted.update(torch_predicted(cost, args.r, args.ks))
        workers.append(torch_worker)
        log(f"PyTorch worker (pid {torch_worker.process.pid}) built {len(torch_names)} steps")
      log(f"timing {len(names) + 2 + len(torch_names)} candidates in {len(workers)} processes, "
          f"up to {args.rounds} interleaved rounds")
      timings = _common.time_rounds(
          [w.round for w in workers], rounds=args.rounds, max_seconds=args.max_seconds,
          settle_seconds=SETTLE_SECONDS,
          on_round=lambda n, seconds: log(f"round {n}: " + ", ".join(
              f"{name} {s:.3g} s" for name, s in seconds.items())))
      if torch_names:
        for name, memory in torch_worker.call("memory").items():
          info[name].update(memory)
  return Measured(names, torch_names, timings, info, predicted, cost, args.batch * args.seq,
                  description, merged_is_base)


def _check_imports(imported: list[str], module: str, forbidden: str) -> None:
  """The process split is the point: a worker that imported the other runtime is an error."""
  if forbidden in imported:
    raise _procs.WorkerError(f"{module} imported {forbidden}; each framework must stay in its "
                             "own process (see benchmarks/model_step.py).")


def render(m: Measured, args: argparse.Namespace, threads: int) -> str:
  """The markdown body: speed and cost model, memory, and the goals' verdicts."""
  t, f, r, p = m.timings, m.flops, args.r, args.p
  lora, peft_lora, smoa2 = f"LoRA r={r}", f"PEFT LoRA r={r}", f"SMoA K=2 r={r}"

  def tokens_s(name: str) -> str:
    return f"{m.tokens / t.median(name):,.0f}"

  def vs(name: str, reference: str) -> tuple[str, str]:
    """Measured and predicted (flops) ratio of two candidates."""
    return f"{t.ratio(name, reference):.3f}", f"{m.predicted[name] / m.predicted[reference]:.3f}"

  def speedup(name: str) -> str:
    """Tokens/s against PEFT LoRA's, per round (> 1: faster)."""
    return f"{t.ratio(peft_lora, name):.2f}" if peft_lora in t.samples else "-"

  speed, memory = [], []
  for name in m.names + m.torch_names:
    is_torch = name in m.torch_names
    info = m.info[name]
    label = f"{name} (torch)" if is_torch else name
    xla = (("-", "-") if is_torch else
           (f"{info['xla_flops'] / 1e9:.3g}", f"{info['xla_bytes'] / 1e9:.3g}"))
    speed.append([label, f"{int(info['trainable']):,}", f"{m.predicted[name] / 1e9:.3g}", *xla,
                  f"{t.median(name):.3g}", tokens_s(name), speedup(name),
                  *(("-", "-") if is_torch else vs(name, lora)),
                  *vs(name, "torch frozen" if is_torch else "frozen")])
    memory.append([label, *(_common.format_mib(int(info[k])) for k in
                            ("optimizer", "resident", "step")),
                   _common.format_mib(int(info["resident"] + info["step"]))])
  processes = ("two worker processes, one per framework (the JAX one never imports torch, the "
               "PyTorch one never imports JAX), each asked in turn for one round over a pipe "
               f"with a {SETTLE_SECONDS:g} s pause after each" if m.torch_names
               else "one JAX worker process")
  parts = [
      f"A full training step (forward + backward + clip + AdamW) of {m.model}, batch "
      f"{args.batch} x {args.seq} = {m.tokens:,} tokens, float32, targets {', '.join(TARGETS)} of "
      f"every layer. All candidates were timed in interleaved rounds ({t.rounds} rounds; ratios "
      f"are medians of per-round ratios) in {processes}. What is measured and how: the docstring "
      f"of `benchmarks/model_step.py`. JAX uses {threads} CPU threads, torch "
      f"`set_num_threads({threads})`. `GFLOP` and `pred.` come from the cost model in "
      "docs/design.md section 4 (frozen step + LoRA's 6 T r (d_in + d_out), SMoA's 2 T d_in "
      "d_out / K, HiRA's and full FT's 2 T d_in d_out, the authors' 6 T d_in d_out per target); "
      "`XLA GFLOP` and `XLA GB` are XLA's cost analysis of the compiled step (flops, bytes "
      f"accessed); `x {peft_lora}` is tokens/s against PEFT LoRA's in the same round; `/ frozen` "
      "is against the frozen step of the same framework.",
      _common.markdown_table(["candidate", "trainable", "GFLOP", "XLA GFLOP", "XLA GB",
                              "step s", "tokens/s", f"x {peft_lora}", f"/ {lora}", "pred.",
                              "/ frozen", "pred."], speed),
      "Memory (MiB): `resident` = what the step keeps between calls (frozen weights, trainable "
      "arrays, optimizer state; torch: parameters + buffers incl. anchor copies + optimizer "
      "state); `step` = what one step allocates on top (JAX: XLA temp + output - donated alias "
      "bytes; torch: peak live bytes created during the step); `peak` = their sum.",
      _common.markdown_table(["candidate", "optimizer state", "resident", "step", "peak"], memory),
  ]
  ratio = t.ratio(smoa2, lora)
  budget = _budgets.EqualBudget(p, num_blocks=2)
  budget_smoa = f"SMoA K={budget.num_blocks} r={budget.smoa_rank}"
  budget_lora = f"LoRA r={budget.lora_rank}"
  merged = t.ratio("merged fwd", "base fwd")
  q1, q3 = t.ratio_quartiles("merged fwd", "base fwd")
  merged_met = m.merged_is_base or q1 <= 1.0 <= q3 or abs(merged - 1.0) <= MERGED_NOISE
  verdicts = []
  if m.torch_names:
    peft_speedup = t.ratio(peft_lora, smoa2)
    verdicts.append(
        f"- Goal 1: {smoa2} tokens/s / {peft_lora} (torch) tokens/s = {peft_speedup:.2f} "
        f"({tokens_s(smoa2)} vs {tokens_s(peft_lora)}; target >= {PEFT_TARGET:g}: "
        f"**{'MET' if peft_speedup >= PEFT_TARGET else 'MISSED'}**). Same rank, same targets; "
        f"the frameworks alone (frozen steps): torch frozen / frozen = "
        f"{t.ratio('torch frozen', 'frozen'):.2f}; PEFT LoRA over its frozen step "
        f"{t.ratio(peft_lora, 'torch frozen'):.3f} (predicted "
        f"{m.predicted[peft_lora] / f.frozen:.3f}), smoa-jax SMoA over its frozen step "
        f"{t.ratio(smoa2, 'frozen'):.3f} (predicted {f.smoa(2) / f.frozen:.3f}).")
  for k in args.ks:
    name = f"authors K={k} r={r}"
    if name in m.torch_names:
      ratio_a = t.ratio(name, f"SMoA K={k} r={r}")
      verdicts.append(
          f"- {'Goal 2: ' if k == 2 else ''}{name} (torch) / smoa-jax SMoA K={k} r={r} = "
          f"{ratio_a:.2f} (target >= {AUTHORS_TARGET:g}: "
          f"**{'MET' if ratio_a >= AUTHORS_TARGET else 'MISSED'}**; flops ratio "
          f"{f.authors / f.smoa(k):.2f}). Algorithm alone, each against its own framework's "
          f"frozen step: authors {t.ratio(name, 'torch frozen'):.2f} (predicted "
          f"{f.authors / f.frozen:.2f}), smoa-jax {t.ratio(f'SMoA K={k} r={r}', 'frozen'):.2f} "
          f"(predicted {f.smoa(k) / f.frozen:.2f}).")
  verdicts += [
      f"- {'Goal 3: m' if m.torch_names else 'M'}erged inference (forward only): {smoa2} after "
      f"`merge_and_unload` / base = {merged:.3f}, per-round quartiles {q1:.3f}-{q3:.3f}; "
      + ("the two forwards compiled to the very same XLA program (identical optimized HLO), so "
         "they run the same executable on the same inputs and the measured ratio is the "
         "machine's noise" if m.merged_is_base else
         "the two forwards compiled to DIFFERENT XLA programs")
      + f" (target 1 within noise: the same program, 1 inside the quartiles or within "
      f"{MERGED_NOISE:g}: **{'MET' if merged_met else 'MISSED'}**; {tokens_s('merged fwd')} vs "
      f"{tokens_s('base fwd')} tokens/s).",
      f"- {smoa2} / {lora} (both smoa-jax) = {ratio:.3f} (target <= {SMOA_LORA_TARGET:.2f}: "
      f"**{'MET' if ratio <= SMOA_LORA_TARGET else 'MISSED'}**); the cost model predicts "
      f"1 + (A / 2K) / F_lora = {f.smoa(2) / f.lora(r):.3f} with A = {f.adapted / 1e9:,.0f} GFLOP "
      f"of targeted frozen-layer work in F_lora = {f.lora(r) / 1e9:,.0f} GFLOP; XLA counts "
      f"{m.info[smoa2]['xla_flops'] / m.info[lora]['xla_flops']:.3f}x the flops and "
      f"{m.info[smoa2]['xla_bytes'] / m.info[lora]['xla_bytes']:.3f}x the bytes.",
      *(f"- SMoA K={k} r={r} / {lora} = {t.ratio(f'SMoA K={k} r={r}', lora):.3f} (predicted "
        f"{f.smoa(k) / f.lora(r):.3f})." for k in args.ks if k != 2),
  ]
  if budget_smoa in t.samples and budget_lora in t.samples:
    verdicts.append(
        f"- Equal trainable parameters: {budget_smoa} / {budget_lora} = "
        f"{t.ratio(budget_smoa, budget_lora):.3f} (predicted "
        f"{f.smoa(budget.num_blocks) / f.lora(budget.lora_rank):.3f}).")
  pairs = [(peft_lora, lora), (f"PEFT HiRA r={r}", f"HiRA r={r}")]
  pairs = [(a, b) for a, b in pairs if a in t.samples and b in t.samples]
  if pairs:
    verdicts.append("- PEFT against smoa-jax at the same method: " + ", ".join(
        f"{a} / {b} = {t.ratio(a, b):.2f}" for a, b in pairs) + ".")
  parts.append("\n".join(verdicts))
  return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> str:
  """Run the benchmark, print the results, update RESULTS.md unless told not to; return the body."""
  argv = _common.cli_argv(argv)
  args = parse_args(argv)
  load_at_start = _common.load_average()
  measured = measure(args, _common.minutes_log(time.perf_counter()))
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
