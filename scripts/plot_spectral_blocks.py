"""Draw docs/spectral_blocks.png: what SMoA's spectral blocks are, on a real MiniLM kernel.

Left: |W| in its natural order. Middle: the same kernel with rows and columns sorted by spectral
centroid (``smoa_jax.spectral_blocks``); the K diagonal blocks SMoA trains are outlined. Right:
where dW can be non-zero, back in the natural order. Uses the MiniLM asset when it is cached
(``smoa-jax fetch-assets minilm``), a random low-rank-plus-noise kernel otherwise.

Usage (repository root): ``python scripts/plot_spectral_blocks.py [--output PATH] [--num-blocks K]``
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import smoa_jax  # noqa: E402
from smoa_jax.app import assets  # noqa: E402


def kernel() -> tuple[np.ndarray, str]:
  """A ``(in, out)`` kernel to draw, and its name."""
  if assets.is_cached("minilm"):
    from safetensors.numpy import load_file
    weights = load_file(str(assets.fetch_minilm() / "model.safetensors"))
    return weights["encoder.layer.3.attention.self.query.weight"].T[:128, :128], \
        "MiniLM layer-3 query kernel (first 128 x 128)"
  rng = np.random.default_rng(0)
  w = rng.standard_normal((192, 6)) @ rng.standard_normal((6, 192)) + 0.3 * rng.standard_normal((192, 192))
  return w.astype(np.float32), "random low-rank + noise kernel (192 x 192)"


def main(argv: list[str] | None = None) -> Path:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--output", type=Path, default=Path("docs/spectral_blocks.png"))
  parser.add_argument("--num-blocks", type=int, default=3)
  args = parser.parse_args(argv)
  w, name = kernel()
  blocks = smoa_jax.spectral_blocks(w, args.num_blocks)
  in_perm, out_perm = np.asarray(blocks.in_perm), np.asarray(blocks.out_perm)
  support = np.zeros(w.shape, bool)
  for k in range(blocks.num_blocks):
    rows, cols = blocks.block_indices(k)
    support[np.ix_(rows, cols)] = True
  fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
  scale = np.percentile(np.abs(w), 99)
  axes[0].imshow(np.abs(w), cmap="magma", vmax=scale)
  axes[0].set_title("|W| (in x out), natural order")
  axes[1].imshow(np.abs(w[np.ix_(in_perm, out_perm)]), cmap="magma", vmax=scale)
  axes[1].set_title(f"sorted by spectral centroid, K={blocks.num_blocks} blocks")
  start_in = start_out = 0
  for c, o in zip(blocks.in_sizes, blocks.out_sizes):
    axes[1].add_patch(plt.Rectangle((start_out - 0.5, start_in - 0.5), o, c, fill=False,
                                    edgecolor="cyan", linewidth=2))
    start_in, start_out = start_in + c, start_out + o
  axes[2].imshow(support, cmap="Greys")
  axes[2].set_title("where dW = (alpha/r)(a_k b_k) * W_k lives")
  for ax in axes:
    ax.set_xlabel("output coordinate")
    ax.set_ylabel("input coordinate")
  fig.suptitle(name)
  fig.tight_layout()
  args.output.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  fig.savefig(buffer, dpi=70, format="png")
  plt.close(fig)
  # A 64-colour palette keeps the noise-like heat maps small enough to commit.
  Image.open(buffer).convert("RGB").quantize(64).save(args.output, optimize=True)
  return args.output


if __name__ == "__main__":
  print(main())
