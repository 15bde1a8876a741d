"""A PyTorch SMoA layer (torch layout) written from docs/design.md section 1: the authors' side in tests.

It follows the facts of the authors' layer that the interop depends on, in a plain form of our
own: ``torch_weight (out, in)`` (a GPT-2 ``Conv1D`` weight ``(in, out)`` is transposed:
``fan_in_fan_out``), block order from a float32 ``torch.linalg.svd`` and ``torch.argsort`` (not
stable) of the spectral centroids, ``torch.tensor_split`` into K pieces, ``lora_A[k]``
``nn.Linear(|C_k|, r_k)``, ``lora_B[k]`` ``nn.Linear(r_k, |R_k|)``, ``nn.Identity`` for rank-0
blocks, and a forward that builds the dense ``dW (out, in)`` and adds ``F.linear(dropout(x), dW)``.
Their PEFT files drop the adapter name, so a module's keys are ``<module>.lora_A.<k>.weight``;
:func:`save_authors_directory` writes them under ``base_model.model.`` as their ``save_pretrained``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

PREFIX = "base_model.model."


def spectral_order(vectors: torch.Tensor, singular_values: torch.Tensor) -> torch.Tensor:
  """``vectors (n, q)`` -> coordinates in ascending spectral centroid (``torch.argsort``)."""
  energy = vectors.pow(2) * singular_values.unsqueeze(0).pow(2)
  position = torch.arange(vectors.shape[1], dtype=vectors.dtype)
  centroid = (energy * position.unsqueeze(0)).sum(dim=1) / energy.sum(dim=1).clamp_min(
      torch.finfo(torch.float32).eps)
  return torch.argsort(centroid)


def split(total: int, pieces: int) -> list[int]:
  """Piece sizes: the first ``total % pieces`` pieces one longer (``torch.tensor_split``)."""
  return [len(p) for p in torch.tensor_split(torch.arange(total), pieces)]


class ReferenceSMoALinear(nn.Module):
  """SMoA around a frozen ``nn.Linear`` (or ``Conv1D`` with ``fan_in_fan_out``), torch layout.

  ``weight`` / ``bias`` are the base layer's own Parameters; ``row_order (out,)`` and
  ``col_order (in,)`` are the spectral orders, block k = pieces k of both.
  """

  def __init__(self, base: nn.Module, *, r: int, num_blocks: int, lora_alpha: float,
               branch_ranks: list[int] | None = None, lora_dropout: float = 0.0):
    super().__init__()
    self.fan_in_fan_out = isinstance(base, Conv1D)
    self.weight, self.bias = base.weight, base.bias
    self.weight.requires_grad_(False)
    torch_weight = self.torch_weight().detach().float()
    out_features, in_features = torch_weight.shape
    u, s, vh = torch.linalg.svd(torch_weight, full_matrices=False)
    self.row_order, self.col_order = spectral_order(u, s), spectral_order(vh.T, s)
    self.ranks = branch_ranks if branch_ranks is not None else split(r, num_blocks)
    self.scaling = lora_alpha / r
    self.in_sizes, self.out_sizes = split(in_features, num_blocks), split(out_features, num_blocks)
    self.lora_A = nn.ModuleList(nn.Linear(c, k, bias=False) if k else nn.Identity()
                                for c, k in zip(self.in_sizes, self.ranks))
    self.lora_B = nn.ModuleList(nn.Linear(k, o, bias=False) if k else nn.Identity()
                                for o, k in zip(self.out_sizes, self.ranks))
    self.dropout = nn.Dropout(lora_dropout)

  def torch_weight(self) -> torch.Tensor:
    """The base weight as ``(out, in)``."""
    return self.weight.T if self.fan_in_fan_out else self.weight

  def blocks(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(rows R_k, cols C_k)`` of every block."""
    rows = torch.split(self.row_order, self.out_sizes)
    cols = torch.split(self.col_order, self.in_sizes)
    return list(zip(rows, cols))

  def delta_weight(self) -> torch.Tensor:
    """Dense ``dW (out, in)``: ``scaling (B_k A_k) * W[R_k, C_k]`` on block k, zero elsewhere."""
    w = self.torch_weight().float()
    dw = torch.zeros_like(w)
    for (rows, cols), rank, a, b in zip(self.blocks(), self.ranks, self.lora_A, self.lora_B):
      if rank:
        dw[rows[:, None], cols[None, :]] = (b.weight @ a.weight) * w[rows[:, None], cols[None, :]]
    return self.scaling * dw

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """``x (..., in)`` -> ``x W^T + bias + dropout(x) dW^T`` ``(..., out)``."""
    base = F.linear(x, self.torch_weight(), self.bias)
    return base + F.linear(self.dropout(x), self.delta_weight())


def targeted(name: str, target_modules: list[str] | str) -> bool:
  """PEFT-style matching: a regex string full-matches; a list entry equals or ends the name."""
  if isinstance(target_modules, str):
    return re.fullmatch(target_modules, name) is not None
  return any(name == t or name.endswith("." + t) for t in target_modules)


def inject(model: nn.Module, config: dict[str, Any]) -> dict[str, ReferenceSMoALinear]:
  """Replace the targeted ``nn.Linear`` / ``Conv1D`` modules of ``model`` in place."""
  chosen = [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and targeted(n, config["target_modules"])]
  layers = {}
  for name in chosen:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    layers[name] = ReferenceSMoALinear(
        getattr(parent, child), r=config["r"], num_blocks=config["num_blocks"],
        lora_alpha=config["lora_alpha"], branch_ranks=config.get("branch_ranks"),
        lora_dropout=config.get("lora_dropout", 0.0))
    setattr(parent, child, layers[name])
  return layers


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
  """The factors under their saved names (``base_model.model.<module>.lora_A.<k>.weight``)."""
  return {PREFIX + k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def load_adapter_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
  """Load saved factor tensors; every one must land in a factor of ``model``."""
  state = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
  result = model.load_state_dict(state, strict=False)
  assert not result.unexpected_keys, result.unexpected_keys
  assert not [k for k in result.missing_keys if "lora_" in k], result.missing_keys


def save_authors_directory(model: nn.Module, config: dict[str, Any], path: Path,
                           binary: bool = False) -> None:
  """``adapter_config.json`` (peft_type SMOA) + the factors, as safetensors or a torch ``.bin``."""
  path.mkdir(parents=True, exist_ok=True)
  document = {"peft_type": "SMOA", "task_type": "CAUSAL_LM", "inference_mode": True,
              "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0, **config}
  (path / "adapter_config.json").write_text(json.dumps(document, indent=2, sort_keys=True))
  tensors = adapter_state_dict(model)
  if binary:
    torch.save(tensors, path / "adapter_model.bin")
  else:
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
