"""Smoke tests of the model-level benchmarks, so that they cannot rot.

``benchmarks/model_step.py``, ``benchmarks/generate.py``, ``benchmarks/packing.py``,
``benchmarks/quality_real.py``, ``benchmarks/to_lora.py`` and ``benchmarks/instruct_sentiment.py``
run in-process with ``--quick --no-write``: tiny random models (with the real tokenizers and data
for the quality benchmarks), a few steps, one seed. The numbers mean nothing; the tests check that
every code path runs, that the reports hold what they promise, and that nothing is written into
the repository.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import smoa_jax
from smoa_jax.app import assets

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of scripts at the repo root, not installed
  sys.path.insert(0, str(ROOT))

from benchmarks import (_common, generate, instruct_sentiment, model_step, packing, quality_real,
                        to_lora)

# Whole benchmark scripts end to end: minutes each on 2 cores, so run with -m slow.
pytestmark = pytest.mark.slow

QUALITY_ASSETS = all(assets.is_cached(name)
                     for name in ("minilm", "smollm2", "sentiment", "shakespeare"))
# The instruction benchmarks need SmolLM2's tokenizer (its chat template) and the sentiment data.
CHAT_ASSETS = pytest.mark.skipif(
    not all(assets.is_cached(n) for n in ("smollm2", "sentiment")),
    reason="needs the cached SmolLM2 tokenizer and sentiment data; fetch them with "
    "`smoa-jax fetch-assets`")


def _snapshot() -> tuple[str | None, list[str]]:
  """RESULTS.md and the plot folder, to check that a --no-write run leaves them alone."""
  plots = quality_real.PLOT_PATH.parent
  return (_common.RESULTS_PATH.read_text() if _common.RESULTS_PATH.exists() else None,
          sorted(p.name for p in plots.iterdir()) if plots.exists() else [])


def test_model_step_quick_runs_and_does_not_write():
  before = _snapshot()
  # main() raises if the JAX worker imported torch or the PyTorch worker JAX: the process split.
  body = model_step.main(["--quick", "--no-write"])
  for text in ("SMoA K=2 r=4", "LoRA r=4", "HiRA r=4", "LoRA r=2", "full FT", "frozen",
               "authors K=2 r=4 (torch)", "PEFT LoRA r=4 (torch)", "PEFT HiRA r=4 (torch)",
               "torch frozen (torch)", "erged inference", "pred.", "XLA GFLOP", "peak",
               "Equal trainable parameters", "Goal 1", "Goal 2", "Goal 3",
               "two worker processes, one per framework"):
    assert text in body, text
  # The merged model's forward is the base model's very program (what Goal 3 rests on).
  assert "compiled to the very same XLA program" in body
  # Every candidate was timed: a number in each row's step time, none missing.
  rows = [line for line in body.splitlines() if line.startswith("| PEFT ")]
  assert len(rows) == 2 * 2  # PEFT LoRA and HiRA, in the speed and memory tables
  assert _snapshot() == before


def test_generate_quick_runs_and_does_not_write():
  before = _snapshot()
  body = generate.main(["--quick", "--no-write"])
  for text in ("smoa-jax (KV cache, one jitted loop)", "SMoA adapter unmerged",
               "transformers generate", "identical to transformers': yes", "ms / step",
               "XLA bytes accessed", "Decode step at context 40 / 8", "none during the timed"):
    assert text in body, text
  assert _snapshot() == before


def test_cost_model_matches_hand_count():
  # One layer of a Llama with hidden 4, 1 head of dim 4, intermediate 8, vocab 10; T = 1 x 2.
  config = dict(hidden_size=4, intermediate_size=8, vocab_size=10, num_attention_heads=1,
                num_key_value_heads=1, head_dim=4, num_hidden_layers=1)
  f = model_step.flops(config, batch=1, seq=2)
  per_layer = 4 * 4 * 4 + 3 * 4 * 8  # q, k, v, o (4x4) + gate, up, down (4x8)
  attention = 3 * 4 * 1 * 1 * 2 * 2 * 4
  assert f.frozen == 4 * 2 * (per_layer + 4 * 10) + attention
  assert f.adapted == 4 * 2 * (3 * 16 + 2 * 32)  # q, k, v, up, down
  assert f.lora(2) - f.frozen == 6 * 2 * 2 * (3 * 8 + 2 * 12)
  assert f.smoa(2) == f.frozen + f.adapted / 4
  assert f.of(smoa_jax.HiRAConfig(r=2)) == f.of(smoa_jax.FullFineTuneConfig()) == f.smoa(1)
  assert f.authors == f.frozen + 1.5 * f.adapted


@pytest.mark.skipif(not QUALITY_ASSETS, reason="needs the cached tokenizers and data; fetch them "
                    "with `smoa-jax fetch-assets`")
def test_quality_real_quick_runs_and_does_not_write():
  before = _snapshot()
  body = quality_real.main(["--quick", "--no-write"])
  for text in ("**sentiment**", "**shakespeare**", "linear probe", "majority class",
               "pretrained (test)", "SMoA vs LoRA", "E at 10%", "eff. rank of dW"):
    assert text in body, text
  lines = body.splitlines()
  for method in ("SMoA", "LoRA", "HiRA", "full FT"):
    assert sum(line.startswith(f"| {method} |") for line in lines) == 2  # a result per task
    for task in ("sentiment", "shakespeare"):  # and a coverage row per task
      assert sum(line.startswith(f"| {task} | {method} |") for line in lines) == 1
  assert _snapshot() == before


@CHAT_ASSETS
def test_packing_quick_runs_and_does_not_write():
  before = _snapshot()
  body = packing.main(["--quick", "--no-write"])
  assert "| padded |" in body and "| packed |" in body and "Packing gain" in body
  rows = {line.split("|")[1].strip(): line for line in body.splitlines() if line.startswith("| pa")}
  # 64 examples of 45 to 111 tokens: a row each when padded, fewer rows when packed.
  assert "| 64 |" in rows["padded"] and int(rows["packed"].split("|")[2]) < 64
  assert _snapshot() == before


@CHAT_ASSETS
def test_instruct_sentiment_quick_runs_and_does_not_write():
  before = _snapshot()
  body = instruct_sentiment.main(["--quick", "--no-write"])
  lines = body.splitlines()
  for row in ("| base model (zero-shot) |", "| SMoA r=4 K=2 |", "| LoRA r=2 |"):
    assert sum(line.startswith(row) for line in lines) == 1, row
  # Equal budgets: both adapters train the same number of parameters.
  counts = {line.split("|")[2].strip() for line in lines if line.startswith(("| SMoA", "| LoRA"))}
  assert len(counts) == 1 and counts != {"0"}
  assert "Before and after" in body and "4 test reviews" in body
  assert _snapshot() == before


@pytest.mark.skipif(not QUALITY_ASSETS, reason="needs the cached tokenizers and data; fetch them "
                    "with `smoa-jax fetch-assets`")
def test_to_lora_quick_runs_and_does_not_write():
  before = _snapshot()
  body = to_lora.main(["--quick", "--no-write", "--ranks", "2,8"])
  for text in ("**sentiment**", "**shakespeare**", "SMoA (original)", "LoRA rank 2",
               "LoRA rank 8", "majority class", "pretrained", "rel. error (mean)"):
    assert text in body, text
  assert _snapshot() == before
