"""Benchmark: bytes moved by collectives in one training step, SMoA vs LoRA vs HiRA, from the HLO.

What is measured: the training step of :func:`smoa_jax.train` (forward, backward, AdamW update;
:func:`smoa_jax.training.loop.lower_train_step`) of a small random Llama, compiled by XLA for a
mesh of simulated CPU devices. Nothing runs; the optimized HLO module is read and every
``all-gather``, ``all-reduce``, ``reduce-scatter`` and ``all-to-all`` (and their async ``-start``
forms) contributes the bytes of its operands, multiplied by the trip count of the loops it sits
in (:func:`collective_bytes`). The numbers are per device and per step: an all-gather of a kernel
over ``fsdp=8`` counts one eighth of the kernel, an all-reduce its whole operand. They depend only
on shapes and on XLA's partitioner, not on the machine, so one run is the measurement.

The model: Llama with ``hidden=512``, 2 layers, 8 heads, ``intermediate=1536``, vocabulary 4096,
float32, batch 16 x 128 tokens; every attention and MLP projection adapted, at equal trainable
budget: SMoA ``r=16, K=2`` (``sum_k r_k (|C_k| + |R_k|) = 8 (in + out)``), LoRA ``r=8``, HiRA
``r=8``. Meshes: ``fsdp=8``, ``tp=8`` and a mixed ``data=2,fsdp=2,tp=2``.

Run from the repository root: ``python -m benchmarks.collectives`` (``--quick``: a tiny model
on one mesh, to check the script runs; never writes). The script asks JAX for 8 simulated CPU
devices itself unless ``XLA_FLAGS`` already sets a device count.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from typing import Any, Sequence

import numpy as np

from benchmarks import _common

SECTION = "collectives"
MODULE = "benchmarks.collectives"
TARGET = 1.25  # SMoA / LoRA collective bytes at equal budget
KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MESHES = "fsdp=8;tp=8;data=2,fsdp=2,tp=2"
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16}
_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\) -> .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = ")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(body|calls|to_apply|condition|true_computation|false_computation)="
                    r"%([\w.-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=")


def _shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape (``f32[16,512]{1,0}``, or a tuple of them)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in _BYTES:
      total += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
  return total


def _split_instruction(line: str) -> tuple[str, str, str, str, str] | None:
  """``(name, result shape, opcode, operands text, attributes)`` of one HLO instruction line."""
  match = _INSTRUCTION.match(line)
  if match is None:
    return None
  rest = line[match.end():]
  if rest.startswith("("):  # a tuple shape: up to its matching parenthesis
    depth = 0
    for end, char in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0:
        break
    shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  opcode, _, rest = rest.partition("(")
  depth, end = 1, 0
  for end, char in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      break
  return match.group(1), shape, opcode, rest[:end], rest[end + 1:]


def _group_size(attributes: str) -> int | None:
  """Devices in each replica group of a collective (None when the text does not say)."""
  match = _MESH_GROUPS.search(attributes)
  if match:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", match.group(1)))
    return int(np.prod([int(sizes[a]) for a in re.findall(r"'([^']+)'", match.group(2))]))
  match = _LIST_GROUPS.search(attributes)
  if match:
    return len(match.group(1).split(","))
  match = _IOTA_GROUPS.search(attributes)
  if match:
    return int(match.group(1).split(",")[-1])
  return None


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Operand bytes per device of every collective kind in an optimized HLO module's text.

  A collective inside a ``while`` loop counts once per iteration when XLA knows the trip count
  (``known_trip_count``); the dict's ``"unknown-trip-count"`` entry counts the collectives in
  loops whose count it does not know (counted once). Collectives over groups of one device
  move nothing and are not counted.
  """
  computations: dict[str, list[str]] = {}
  order: list[str] = []
  entry = None
  current = None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(1)
      computations[current], entry = [], current if line.startswith("ENTRY") else entry
      order.append(current)
    elif line.startswith("}"):
      current = None
    elif current is not None:
      computations[current].append(line)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  shapes: dict[str, str] = {}
  parsed: dict[str, list[tuple[str, str, str, str, str]]] = {}
  for name, lines in computations.items():
    parsed[name] = [item for item in map(_split_instruction, lines) if item is not None]
    shapes.update({item[0]: item[1] for item in parsed[name]})
  # Callees are printed before their callers, so walking backwards reaches every caller first.
  multiplier: dict[str, int] = collections.defaultdict(int, {entry: 1})
  unknown: set[str] = set()
  for name in reversed(order):
    for _, _, opcode, _, attributes in parsed[name]:
      trip = _TRIP_COUNT.search(attributes)
      callees = [c for kind, c in _CALLS.findall(attributes) if kind != "condition"]
      for branches in _BRANCHES.findall(attributes):
        callees += [c.strip().lstrip("%") for c in branches.split(",") if c.strip()]
      for callee in callees:
        times = int(trip.group(1)) if opcode == "while" and trip else 1
        multiplier[callee] += multiplier[name] * times
        if (opcode == "while" and not trip) or name in unknown:
          unknown.add(callee)
  totals = dict.fromkeys(KINDS, 0)
  totals["unknown-trip-count"] = 0
  for name in order:
    for _, _, opcode, operands, attributes in parsed[name]:
      kind = opcode.removesuffix("-start")
      if kind not in KINDS or _group_size(attributes) == 1:
        continue
      size = sum(_shape_bytes(shapes.get(op.strip().lstrip("%"), ""))
                 for op in operands.split(",") if op.strip())
      totals[kind] += size * multiplier[name]
      if name in unknown:
        totals["unknown-trip-count"] += size
  return totals


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog=f"python -m {MODULE}",
      description="Collective bytes per device of one training step (SMoA, LoRA, HiRA at equal "
                  "budget), read from the compiled HLO on simulated CPU devices.")
  parser.add_argument("--meshes", default=MESHES,
                      help=f"';'-separated mesh specs (default {MESHES!r})")
  parser.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
  parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
  parser.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")
  parser.add_argument("--seq-len", type=int, default=128, help="tokens per example (default 128)")
  parser.add_argument("--quick", action="store_true",
                      help="a tiny model on fsdp=8 only, to check the script runs (never writes)")
  parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
  args = parser.parse_args(argv)
  if args.quick:
    args.meshes, args.hidden, args.batch_size, args.seq_len = "fsdp=8", 64, 8, 16
    args.no_write = True
  return args


def _llama_config(args: argparse.Namespace) -> dict[str, Any]:
  import transformers

  return transformers.LlamaConfig(
      vocab_size=4096 if not args.quick else 256, hidden_size=args.hidden,
      intermediate_size=3 * args.hidden, num_hidden_layers=args.layers, num_attention_heads=8,
      num_key_value_heads=8, max_position_embeddings=max(args.seq_len, 128),
      tie_word_embeddings=False).to_dict()


def methods() -> dict[str, Any]:
  """The three adapters at equal trainable budget (8 (in + out) per kernel)."""
  import smoa_jax

  return {"SMoA r=16 K=2": smoa_jax.SMoAConfig(r=16, num_blocks=2, alpha=32,
                                               target_modules=TARGETS),
          "LoRA r=8": smoa_jax.LoRAConfig(r=8, alpha=16, target_modules=TARGETS),
          "HiRA r=8": smoa_jax.HiRAConfig(r=8, alpha=16, target_modules=TARGETS)}


def measure(config: Any, hf_config: dict[str, Any], mesh: Any, batch_size: int,
            seq_len: int) -> tuple[dict[str, int], int]:
  """``(collective bytes by kind, trainable parameters)`` of one compiled training step."""
  from flax import nnx

  import smoa_jax
  from smoa_jax.parallel import spmd
  from smoa_jax.training import loop

  model = smoa_jax.models.build_model(hf_config, rngs=nnx.Rngs(0))
  spmd.shard_model(model, mesh)
  smoa_jax.apply_adapter(model, config, rngs=nnx.Rngs(1), verbose=False)
  trainable = sum(int(np.prod(v.shape)) for _, v in
                  nnx.to_flat_state(nnx.state(model, smoa_jax.TrainableParam)))
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(0, hf_config["vocab_size"], (batch_size, seq_len),
                                     dtype=np.int32),
           "attention_mask": np.ones((batch_size, seq_len), np.int32)}
  train_config = smoa_jax.TrainConfig(steps=1, batch_size=batch_size, progress=False)
  lowered = loop.lower_train_step(model, smoa_jax.CausalLMTask(), train_config, batch, mesh=mesh)
  return collective_bytes(lowered.compile().as_text()), trainable


def _mib(nbytes: int) -> str:
  return f"{nbytes / 2**20:.2f}"


def render(rows: list[tuple[str, str, dict[str, int], int]], args: argparse.Namespace) -> str:
  """The markdown body: bytes by kind per mesh and method, ratios to LoRA, the target's verdict."""
  lora = {mesh: sum(v for k, v in found.items() if k in KINDS)
          for mesh, method, found, _ in rows if method.startswith("LoRA")}
  table, ratios = [], []
  for mesh, method, found, trainable in rows:
    total = sum(found[k] for k in KINDS)
    ratio = total / lora[mesh] if lora.get(mesh) else float("nan")
    if method.startswith("SMoA"):
      ratios.append(ratio)
    table.append([mesh, method, f"{trainable:,}", *(_mib(found[k]) for k in KINDS), _mib(total),
                  f"{ratio:.2f}x"])
  unknown = sum(found["unknown-trip-count"] for _, _, found, _ in rows)
  met = all(r <= TARGET for r in ratios)
  parts = [
      f"One training step (forward, backward, AdamW) of a random Llama (hidden {args.hidden}, "
      f"{args.layers} layers, batch {args.batch_size} x {args.seq_len} tokens, float32), every "
      "attention and MLP projection adapted at equal trainable budget, compiled for 8 simulated "
      "CPU devices. MiB per device and step: the operand bytes of every collective in the "
      "optimized HLO, loops counted by their trip count.",
      f"Target: SMoA <= {TARGET}x LoRA's collective bytes on every mesh: "
      f"**{'MET' if met else 'MISSED'}** (SMoA/LoRA {min(ratios):.2f}-{max(ratios):.2f}).",
      _common.markdown_table(["mesh", "method", "trainable", *(f"{k} MiB" for k in KINDS),
                              "total MiB", "/ LoRA"], table),
  ]
  if unknown:
    parts.append(f"{_mib(unknown)} MiB sit in loops of unknown trip count (counted once).")
  return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> str:
  """Measure, print, update RESULTS.md unless told not to; return the markdown body."""
  import jax

  import smoa_jax

  args = parse_args(argv)
  load_at_start = _common.load_average()
  hf_config = _llama_config(args)
  rows = []
  for spec in filter(None, (s.strip() for s in args.meshes.split(";"))):
    mesh = smoa_jax.make_mesh(**smoa_jax.parse_mesh(spec))
    for name, config in methods().items():
      found, trainable = measure(config, hf_config, mesh, args.batch_size, args.seq_len)
      rows.append((spec, name, found, trainable))
      print(f"{spec:<22} {name:<14} {_mib(sum(found[k] for k in KINDS)):>9} MiB", flush=True)
  body = render(rows, args)
  _common.publish(SECTION, f"collectives: bytes moved per training step on {jax.device_count()} "
                  "simulated devices", body, module=MODULE,
                  argv=sys.argv[1:] if argv is None else argv, write=not args.no_write,
                  load_at_start=load_at_start)
  return body


if __name__ == "__main__":
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Before JAX starts its backend: the meshes need 8 devices (simulated on the host CPU).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
  main()
