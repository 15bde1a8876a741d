"""The helper scripts under scripts/ run (small settings), so the figures and numbers they make
for the docs can be regenerated."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.subprocess  # each script runs as `python scripts/...`


def _run(*argv: str) -> str:
  proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_plot_spectral_blocks(tmp_path):
  out = tmp_path / "blocks.png"
  _run("scripts/plot_spectral_blocks.py", "--output", str(out), "--num-blocks", "2")
  assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 1000


def test_memory_estimate_of_llama_7b():
  text = _run("scripts/memory_estimate.py", "--mesh", "fsdp=8")
  assert "(8 device(s))" in text and "per device GiB" in text
  assert "parameters: base 6,738,415,616," in text  # Llama-2-7B's published parameter count


@pytest.mark.slow
def test_scan_compile_time():  # compiles the 30-layer SmolLM2 step twice: about two minutes
  text = _run("scripts/scan_compile_time.py", "--batch", "1", "--seq-len", "8", "--steps", "1")
  lines = {line.split()[0]: line for line in text.splitlines()[1:] if line.strip()}
  assert set(lines) == {"unrolled", "scan_layers"}, text
  assert all("compile" in line and "loss" in line for line in lines.values()), text


def _table(text: str) -> list[list[str]]:
  """The markdown rows of a printed table (header and alignment rows dropped)."""
  lines = [line for line in text.splitlines() if line.startswith("| ")]
  return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]
          if not line.startswith("| :") and not line.startswith("| -")]


def test_memory_estimate_projected_table_of_llama_1b():
  text = _run("scripts/memory_estimate.py", "--table", "--models", "Llama 3.2 1B")
  rows = {(r[1], r[2], int(r[3])): [float(v.replace(",", "")) for v in r[4:]]
          for r in _table(text)}
  assert set(rows) == {(d, remat, f) for d in ("float32", "bfloat16") for remat in ("none", "full")
                       for f in (1, 8, 64)}, text
  for (dtype, remat, fsdp), (frozen, trained, act, total) in rows.items():
    one = rows[dtype, remat, 1]
    # fsdp shards the weights (and, less evenly, the factors and AdamW state) but not the
    # activations of the per-device batch.
    assert frozen == pytest.approx(one[0] / fsdp, rel=0.02, abs=2e-3), (dtype, remat, fsdp)
    assert trained <= one[1] + 1e-3 and act == one[2]
    assert total == pytest.approx(frozen + trained + act, abs=3e-3)
    if remat == "full":  # one layer's input kept instead of all its intermediates
      assert act < rows[dtype, "none", fsdp][2] / 4
    if dtype == "bfloat16":  # half the bytes per weight; the adapter state stays float32
      assert frozen == pytest.approx(rows["float32", remat, fsdp][0] / 2, rel=0.01, abs=2e-3)
      assert trained == rows["float32", remat, fsdp][1]
  # Llama 3.2 1B has 1,235,814,400 parameters: float32 on one device.
  assert rows["float32", "none", 1][0] == pytest.approx(1_235_814_400 * 4 / 2**30, abs=2e-3)


def test_memory_estimate_validation_rows_shrink_with_remat():
  rows = {(int(r[0]), r[1]): float(r[4].replace(",", ""))
          for r in _table(_run("scripts/memory_estimate.py", "--validate"))}
  assert len(rows) == 9
  for seq in (512, 1024, 2048):
    assert rows[seq, "full"] < rows[seq, "dots"] < rows[seq, "none"]
  assert rows[2048, "none"] > 2 * rows[1024, "none"]  # the T x T attention term
