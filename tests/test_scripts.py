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
