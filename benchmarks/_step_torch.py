"""The PyTorch worker process of benchmarks/model_step.py (``python -m benchmarks._step_torch``).

Never imports JAX. Commands (:mod:`benchmarks._procs`): ``build`` loads the transformers
``LlamaForCausalLM`` once per candidate and builds its training step (:func:`torch_step`):

* ``authors K={k} r={r}``: every target ``nn.Linear`` replaced by
  :class:`benchmarks.authors_torch.AuthorsSMoALinear`, built from the blocks and factors the JAX
  worker wrote (``<workdir>/K{k}.npz``), so both sides adapt the same model;
* ``PEFT LoRA r={r}`` and ``PEFT HiRA r={r}``: ``peft.get_peft_model`` with ``LoraConfig`` /
  ``HiraConfig`` on the same targets (no dropout, ``lora_alpha = 2 r`` like smoa-jax's LoRA);
* ``torch frozen``: the unmodified model with only the first input-norm weight trainable.

``round`` times one interleaved round; ``memory`` measures each step's memory after timing.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from benchmarks import _procs
from benchmarks.authors_torch import AuthorsSMoALinear, peak_live_bytes


@dataclasses.dataclass
class TorchStep:
  run: Callable[[], Any]
  model: torch.nn.Module
  optimizer: torch.optim.Optimizer
  trainable: int


def torch_step(model: torch.nn.Module, ids: torch.Tensor, learning_rate: float) -> TorchStep:
  """Forward (transformers' shifted cross-entropy) + backward + clip (1.0) + AdamW over the
  parameters that require gradients: the JAX step's work."""
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
  mask = torch.ones_like(ids)
  model.train()

  def run():
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss

  return TorchStep(run, model, optimizer, sum(p.numel() for p in params))


def load(model_dir: str) -> torch.nn.Module:
  """The frozen transformers model (no parameter requires gradients)."""
  import transformers

  model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  return model.requires_grad_(False)


def authors_model(model_dir: str, spec_path: Path) -> torch.nn.Module:
  """Every layer the spec file names replaced by the authors' layer (same blocks, factors)."""
  model = load(model_dir)
  with np.load(spec_path) as arrays:
    specs: dict[str, dict[str, np.ndarray]] = {}
    for key in arrays.files:
      path, field = key.rsplit("/", 1)  # model/layers/3/self_attn/q_proj/lora_A_0
      specs.setdefault(path, {})[field] = arrays[key]
  for path, spec in specs.items():
    parts = path.split("/")
    parent = model.get_submodule(".".join(parts[:-1]))
    linear = getattr(parent, parts[-1])
    setattr(parent, parts[-1], AuthorsSMoALinear.from_spec(linear.weight, linear.bias, spec))
  return model


def peft_model(model_dir: str, method: str, r: int, targets: Sequence[str]) -> torch.nn.Module:
  """PEFT's LoRA or HiRA of rank ``r`` on ``targets`` (PEFT freezes everything else)."""
  import peft

  if method == "LoRA":
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                             target_modules=list(targets))
  else:
    config = peft.HiraConfig(r=r, hira_dropout=0.0, target_modules=list(targets))
  return peft.get_peft_model(load(model_dir), config)


def frozen_model(model_dir: str) -> torch.nn.Module:
  model = load(model_dir)
  model.model.layers[0].input_layernorm.weight.requires_grad_(True)
  return model


def _nbytes(tensors: Any) -> int:
  return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def memory(step: TorchStep) -> dict[str, int]:
  """``resident`` = parameters + buffers (incl. anchor copies) + optimizer state, ``optimizer``
  = the AdamW state, ``step`` = peak live bytes one step creates (gradients cleared first)."""
  optimizer = _nbytes(v for state in step.optimizer.state.values() for v in state.values())
  resident = _nbytes(step.model.parameters()) + _nbytes(step.model.buffers()) + optimizer
  step.optimizer.zero_grad(set_to_none=True)
  return {"resident": resident, "optimizer": optimizer, "step": peak_live_bytes(step.run)}


def build(handlers: dict[str, Callable[..., Any]], *, model_dir: str, workdir: str,
          ids: list[list[int]], r: int, ks: Sequence[int], targets: Sequence[str],
          learning_rate: float, threads: int) -> dict[str, Any]:
  torch.set_num_threads(threads)  # the cores XLA's CPU client uses
  ids_t = torch.tensor(ids, dtype=torch.int64)
  models = {f"authors K={k} r={r}": functools.partial(authors_model, model_dir,
                                                      Path(workdir) / f"K{k}.npz") for k in ks}
  models[f"PEFT LoRA r={r}"] = lambda: peft_model(model_dir, "LoRA", r, targets)
  models[f"PEFT HiRA r={r}"] = lambda: peft_model(model_dir, "HiRA", r, targets)
  models["torch frozen"] = lambda: frozen_model(model_dir)
  steps = {name: torch_step(make(), ids_t, learning_rate) for name, make in models.items()}
  print(f"[torch] built {', '.join(steps)}", file=sys.stderr, flush=True)
  handlers["round"] = _procs.round_handler({name: s.run for name, s in steps.items()})
  handlers["memory"] = lambda: {name: memory(s) for name, s in steps.items()}
  return {name: {"trainable": s.trainable} for name, s in steps.items()}


if __name__ == "__main__":
  _procs.run_worker(build)
