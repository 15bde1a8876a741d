"""Spectral analysis of adapters: where SMoA's blocks sit in W, and what a learned dW looks like.

Three questions, each answered by a small host-side function (numpy, float64):

* **How much of W do the spectral blocks hold?** :func:`block_statistics` gives, per block
  ``k``, its size ``|C_k| x |R_k|``, its share of W's entries and its share of W's energy
  ``||W[C_k, R_k]||^2 / ||W||^2``. The ratio of the two shares (``concentration``) is 1 for blocks
  cut at random and larger when the spectral order groups the heavy coordinates together.
* **How high is the rank of a learned update?** :func:`effective_rank` is the entropy effective
  rank ``exp(-sum_i p_i log p_i)``, ``p_i = s_i / sum_j s_j`` (Roy & Vetterli, 2007): between 1
  and the numerical rank, and equal to ``k`` for ``k`` equal singular values. A LoRA update has
  rank <= r; SMoA's Hadamard-modulated blocks can reach ``min(in, out)`` (docs/design.md, section 1).
* **Which of W's singular directions does dW move?** With ``W = P diag(s) Q^T``
  (``s`` descending, ``q = min(in, out)``) and ``C = P^T dW Q``, :func:`direction_energy` returns
  ``E(j) = sum_{a, b < j} C_ab^2 / ||dW||^2``: the share of dW's energy inside the span of W's
  top-``j`` singular directions on both sides, for ``j = 1..q``. The same curve for W itself is
  ``cumsum(s^2) / sum(s^2)``; an update with no preferred direction gives about
  ``(j / in) (j / out)``.

:func:`delta_statistics` applies all of this to every adapter layer of a model, and the
``plot_*`` functions draw the figures of ``smoa-jax inspect --run`` and of the training runs
(matplotlib with the non-interactive Agg backend, so no display is needed).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath
from flax import nnx

from smoa_jax.core.config import AdapterConfig
from smoa_jax.io.files import as_path
from smoa_jax.layers.sites import adapter_layers
from smoa_jax.layers.paths import module_path
from smoa_jax.layers.variables import TrainableParam
from smoa_jax.core.spectral import SpectralBlocks

__all__ = [
    "BlockStatistics", "DeltaStatistics", "block_statistics", "effective_rank", "numerical_rank",
    "direction_energy", "delta_statistics", "plot_delta_analysis", "plot_training_curves",
    "Inspection", "inspect_model",
]

TOP_FRACTION = 0.1  # DeltaStatistics.top_energy: dW's energy in W's top 10% singular directions


def _singular_values(matrix: Any) -> np.ndarray:
  return np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)


def effective_rank(matrix: Any) -> float:
  """Entropy effective rank ``exp(H(p))``, ``p = s / sum(s)`` of a 2-D matrix; 0 for a zero matrix.

  Example: ``effective_rank(np.eye(5)) == 5.0``; a rank-1 matrix gives 1.0.
  """
  s = _singular_values(matrix)
  total = s.sum()
  if total <= 0:
    return 0.0
  p = s[s > 0] / total
  return float(np.exp(-np.sum(p * np.log(p))))


def numerical_rank(matrix: Any, rtol: float | None = None) -> int:
  """Number of singular values above ``rtol * s_max`` (default ``max(shape) * float32 eps``)."""
  array = np.asarray(matrix)
  s = _singular_values(array)
  if s.size == 0 or s[0] <= 0:
    return 0
  rtol = max(array.shape) * np.finfo(np.float32).eps if rtol is None else rtol
  return int(np.sum(s > rtol * s[0]))


def direction_energy(delta: Any, kernel: Any) -> np.ndarray:
  """``E (q,)``: share of ``||delta||^2`` inside the span of W's top-``j`` singular directions.

  ``delta``, ``kernel``: ``(in, out)``. ``E`` is non-decreasing; ``E[q-1]`` is 1 when W is square
  (its singular vectors span everything) and all zeros when ``delta`` is zero.
  """
  w = np.asarray(kernel, np.float64)
  d = np.asarray(delta, np.float64)
  p, _, qt = np.linalg.svd(w, full_matrices=False)  # p: (in, q), qt: (q, out)
  total = float(np.sum(d * d))
  if total <= 0:
    return np.zeros(p.shape[1])
  c2 = np.square(p.T @ d @ qt.T)  # (q, q) energy of dW in W's singular basis
  return np.diagonal(np.cumsum(np.cumsum(c2, axis=0), axis=1)) / total


@dataclasses.dataclass(frozen=True)
class BlockStatistics:
  """How the K spectral blocks of one kernel cut it (see the module docstring).

  Attributes:
    in_sizes, out_sizes: ``|C_k|`` and ``|R_k|``.
    entry_share: per block, its share of the kernel's entries.
    energy_share: per block, its share of ``||W||^2``.
  """

  in_sizes: tuple[int, ...]
  out_sizes: tuple[int, ...]
  entry_share: tuple[float, ...]
  energy_share: tuple[float, ...]

  @property
  def total_entry_share(self) -> float:
    return float(sum(self.entry_share))

  @property
  def total_energy_share(self) -> float:
    return float(sum(self.energy_share))

  @property
  def concentration(self) -> float:
    """In-block energy share over in-block entry share: 1 for random blocks, > 1 if heavier."""
    return self.total_energy_share / max(self.total_entry_share, 1e-30)


def block_statistics(kernel: Any, blocks: SpectralBlocks) -> BlockStatistics:
  """Entry and energy shares of each diagonal block of ``kernel (in, out)`` under ``blocks``."""
  w2 = np.square(np.asarray(kernel, np.float64))
  total = max(float(w2.sum()), 1e-300)
  entries, energies = [], []
  for k in range(blocks.num_blocks):
    rows, cols = blocks.block_indices(k)
    entries.append(len(rows) * len(cols) / w2.size)
    energies.append(float(w2[np.ix_(rows, cols)].sum()) / total)
  return BlockStatistics(tuple(blocks.in_sizes), tuple(blocks.out_sizes), tuple(entries),
                         tuple(energies))


@dataclasses.dataclass(frozen=True)
class DeltaStatistics:
  """The learned update ``dW`` of one adapter layer.

  Attributes:
    path: module path; method: ``smoa`` / ``lora`` / ``hira``; shape: ``(in, out)``.
    r: the adapter's total rank; num_blocks: K (1 for LoRA/HiRA).
    norm_ratio: ``||dW|| / ||W||``.
    effective_rank, numerical_rank: of dW (see :func:`effective_rank`).
    top_energy: ``E`` at the top ``TOP_FRACTION`` of W's singular directions.
    energy: the curve :func:`direction_energy` ``(q,)``; kernel_energy: W's own ``cumsum(s^2)``
      share ``(q,)``.
  """

  path: str
  method: str
  shape: tuple[int, int]
  r: int
  num_blocks: int
  norm_ratio: float
  effective_rank: float
  numerical_rank: int
  top_energy: float
  energy: np.ndarray
  kernel_energy: np.ndarray


def _top_index(q: int) -> int:
  return max(1, math.ceil(TOP_FRACTION * q)) - 1


def delta_statistics(model: Any) -> list[DeltaStatistics]:
  """:class:`DeltaStatistics` of every adapter layer of an NNX ``model``, in tree order."""
  out = []
  for path, layer in adapter_layers(model):
    kernel = np.asarray(layer.base_kernel(), np.float64)
    delta = np.asarray(layer.delta_weight(), np.float64)
    s = _singular_values(kernel)
    kernel_energy = np.cumsum(s * s) / max(float(np.sum(s * s)), 1e-300)
    energy = direction_energy(delta, kernel)
    out.append(DeltaStatistics(
        path=path, method=layer.config.method, shape=tuple(kernel.shape), r=layer.config.r,
        num_blocks=layer.op.num_blocks,
        norm_ratio=float(np.linalg.norm(delta) / max(np.linalg.norm(kernel), 1e-300)),
        effective_rank=effective_rank(delta), numerical_rank=numerical_rank(delta),
        top_energy=float(energy[_top_index(len(energy))]), energy=energy,
        kernel_energy=kernel_energy))
  return out


@dataclasses.dataclass(frozen=True)
class Inspection:
  """What ``smoa-jax inspect`` reports about an adapted model, as plain data.

  Attributes:
    method: the adapter method.
    modules: per adapted module (per trainable kernel for full fine-tuning): ``path``, ``in``,
      ``out``, ``ranks`` (per block), ``trainable`` parameters.
    trainable_params: their sum; lora_params: a rank-r LoRA on the same modules (None for full).
    blocks: per SMoA module, :class:`BlockStatistics` as a dict (with ``path``).
    deltas: per adapter module, :class:`DeltaStatistics` without the curves (when asked for).
    plot: the figure of :func:`plot_delta_analysis`, if one was written.
  """

  method: str
  modules: list[dict[str, Any]]
  trainable_params: int
  lora_params: int | None
  blocks: list[dict[str, Any]]
  deltas: list[dict[str, Any]]
  plot: str | None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def print(self, console: Any) -> None:
    """Rich tables: the match table, trainable parameters vs LoRA, blocks, learned dW."""
    from rich.table import Table

    def table(title: str, columns: Sequence[str], rows: list[Sequence[str]]) -> Table:
      out = Table(title=title)
      for column in columns:
        out.add_column(column, justify="left" if column == "module" else "right")
      for row in rows:
        out.add_row(*row)
      return out

    console.print(table(f"{self.method} adapts {len(self.modules)} modules",
                        ("module", "in x out", "ranks", "trainable"),
                        [(m["path"], f"{m['in']}x{m['out']}", ",".join(map(str, m["ranks"])) or "-",
                          f"{m['trainable']:,}") for m in self.modules]))
    line = f"trainable parameters: {self.trainable_params:,}"
    if self.lora_params:
      line += (f"; LoRA at the same r on the same modules: {self.lora_params:,} "
               f"(ratio {self.trainable_params / self.lora_params:.2f})")
    console.print(line)
    if self.blocks:
      console.print(table(
          "spectral blocks: share of W inside the K diagonal blocks",
          ("module", "blocks |C_k|x|R_k|", "entries", "energy of W", "concentration"),
          [(b["path"], ",".join(f"{i}x{o}" for i, o in zip(b["in_sizes"], b["out_sizes"])),
            f"{b['total_entry_share']:.1%}", f"{b['total_energy_share']:.1%}",
            f"{b['concentration']:.2f}") for b in self.blocks]))
    if self.deltas:
      console.print(table(
          f"learned dW: effective rank, energy in W's top {TOP_FRACTION:.0%} singular directions",
          ("module", "r", "effective rank", "numerical rank", "|dW|/|W|", "top energy"),
          [(d["path"], str(d["r"]), f"{d['effective_rank']:.1f}", str(d["numerical_rank"]),
            f"{d['norm_ratio']:.2e}", f"{d['top_energy']:.1%}") for d in self.deltas]))
    if self.plot:
      console.print(f"plot: {self.plot}")


def inspect_model(model: nnx.Module, config: AdapterConfig, *,
                  plot: str | os.PathLike | None = None) -> Inspection:
  """Collect the :class:`Inspection` of a model carrying adapters of ``config``.

  With ``plot``, the learned updates are analysed too (:func:`delta_statistics`) and
  :func:`plot_delta_analysis` is written there.
  """
  layers = adapter_layers(model)
  if config.trains_base_kernel:
    modules = [{"path": module_path(p), "in": v.shape[0], "out": v.shape[-1], "ranks": [],
                "trainable": int(np.prod(v.shape))}
               for p, v in nnx.iter_graph(model) if isinstance(v, TrainableParam)]
    lora = None
  else:
    modules = [{"path": path, "in": layer.in_features, "out": layer.out_features,
                "ranks": list(layer.op.ranks), "trainable": layer.num_trainable_params}
               for path, layer in layers]
    lora = sum(config.r * (m["in"] + m["out"]) for m in modules)
  blocks = []
  for path, layer in layers:
    if layer.blocks is not None:
      stats = block_statistics(layer.base_kernel(), layer.blocks)
      blocks.append({"path": path, **dataclasses.asdict(stats),
                     "total_entry_share": stats.total_entry_share,
                     "total_energy_share": stats.total_energy_share,
                     "concentration": stats.concentration})
  deltas, written = [], None
  if plot is not None and layers:
    stats = delta_statistics(model)
    deltas = [{k: v for k, v in dataclasses.asdict(s).items()
               if k not in ("energy", "kernel_energy")} for s in stats]
    written = str(plot_delta_analysis(stats, plot))
  return Inspection(config.method, modules, sum(m["trainable"] for m in modules), lora, blocks,
                    deltas, written)


def _module_name(path: str) -> str:
  """``model/layers/3/self_attn/q_proj`` -> ``self_attn/q_proj`` (layer indices dropped)."""
  parts = path.split("/")
  digits = [i for i, p in enumerate(parts) if p.isdigit()]
  return "/".join(parts[digits[-1] + 1:]) if digits else parts[-1]


def _layer_number(path: str) -> int:
  found = re.findall(r"/(\d+)(?:/|$)", path)
  return int(found[-1]) if found else 0


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _save_png(fig: Any, path: str | os.PathLike) -> epath.Path:
  """Write ``fig`` as a PNG to ``path`` (local or object storage) and close it."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120)
  _pyplot().close(fig)
  path = as_path(path)
  path.write_bytes(buffer.getvalue())
  return path


def plot_delta_analysis(stats: Sequence[DeltaStatistics], path: str | os.PathLike) -> epath.Path:
  """Two panels: dW's energy over W's singular directions, and dW's effective rank per layer.

  Left: per module name (``q_proj``, ``value``, ...), the mean over layers of
  :func:`direction_energy` against the fraction of W's directions, with W's own spectrum (dashed)
  and the no-preferred-direction reference (dotted). Right: effective rank of each dW by layer,
  with the adapter rank r for comparison. Writes a PNG and returns its path.
  """
  if not stats:
    raise ValueError("plot_delta_analysis needs at least one adapter layer.")
  plt = _pyplot()
  groups: dict[str, list[DeltaStatistics]] = defaultdict(list)
  for item in stats:
    groups[_module_name(item.path)].append(item)
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, (name, items) in enumerate(sorted(groups.items())):
    color = colors[i % len(colors)]
    n_in, n_out = items[0].shape
    q = len(items[0].energy)
    x = np.arange(1, q + 1) / q
    left.plot(x, np.mean([s.energy for s in items if len(s.energy) == q], axis=0), color=color,
              label=f"dW {name}")
    left.plot(x, np.mean([s.kernel_energy for s in items if len(s.energy) == q], axis=0),
              color=color, linestyle="--", alpha=0.6, label=f"W {name}")
    j = np.arange(1, q + 1)
    left.plot(x, (j / n_in) * (j / n_out), color=color, linestyle=":", alpha=0.6,
              label="dotted: no preferred direction" if i == 0 else None)
    right.plot([_layer_number(s.path) for s in items], [s.effective_rank for s in items],
               marker="o", color=color, label=name)
  for r in sorted({s.r for s in stats}):
    right.axhline(r, color="gray", linestyle=":", label=f"adapter rank r={r}")
  left.set(xlabel="fraction of W's singular directions (largest first)",
           ylabel="cumulative share of energy", title="energy over W's singular directions",
           ylim=(0, 1.02))
  right.set(xlabel="layer", ylabel="effective rank of dW", title="effective rank of learned dW")
  right.xaxis.get_major_locator().set_params(integer=True)
  left.legend(fontsize=7)
  right.legend(fontsize=7)
  fig.tight_layout()
  return _save_png(fig, path)


def plot_training_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike,
                         *, title: str | None = None) -> epath.Path:
  """Loss (and accuracy, when evaluated) against step for one or more runs, as a PNG.

  ``runs`` maps a label to its metrics records (``metrics.jsonl`` lines or
  ``TrainResult.history``: dicts with ``step``, ``split`` and ``loss``, and ``accuracy`` for
  classification evals). Train loss is solid, eval loss dashed; a second panel shows eval
  accuracy when any run has it.
  """
  plt = _pyplot()
  has_accuracy = any(r.get("split") == "eval" and "accuracy" in r
                     for records in runs.values() for r in records)
  fig, axes = plt.subplots(1, 2 if has_accuracy else 1, figsize=(11 if has_accuracy else 6, 4))
  axes = np.atleast_1d(axes)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, (label, records) in enumerate(runs.items()):
    color = colors[i % len(colors)]
    for split, style in (("train", "-"), ("eval", "--")):
      points = [(r["step"], r["loss"]) for r in records if r.get("split") == split]
      if points:
        axes[0].plot(*zip(*points), style, color=color, marker="o" if split == "eval" else None,
                     markersize=3, label=f"{label} {split}")
    if has_accuracy:
      points = [(r["step"], r["accuracy"]) for r in records
                if r.get("split") == "eval" and "accuracy" in r]
      if points:
        axes[1].plot(*zip(*points), "--", color=color, marker="o", markersize=3, label=label)
  axes[0].set(xlabel="step", ylabel="loss", title="loss")
  axes[0].legend(fontsize=8)
  if has_accuracy:
    axes[1].set(xlabel="step", ylabel="accuracy", title="eval accuracy")
    axes[1].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return _save_png(fig, path)
