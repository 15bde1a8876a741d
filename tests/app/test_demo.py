"""``smoa-jax demo --quick`` on the real cached assets, and its one-line error without them."""

import json
import subprocess

import pytest

from smoa_jax.app import assets, cli

CACHED = assets.is_cached("minilm") and assets.is_cached("sentiment")


@pytest.mark.skipif(not CACHED, reason="the MiniLM and sentiment assets are not cached; fetch "
                    "them with `smoa-jax fetch-assets minilm sentiment`")
def test_quick_demo_prints_the_table_and_writes_the_plot(tmp_path, capsys):
  assert cli.main(["demo", "--quick", "--output", str(tmp_path / "demo")]) == 0
  out = capsys.readouterr().out
  for text in ("SMoA r=8 K=2", "LoRA r=4", "test acc", "trainable", "36,864"):
    assert text in out
  assert (tmp_path / "demo" / "demo.png").read_bytes()[:4] == b"\x89PNG"
  results = json.loads((tmp_path / "demo" / "results.json").read_text())
  smoa, lora = results["results"]
  assert smoa["trainable_params"] == lora["trainable_params"]  # the same budget
  assert [r["step"] for r in smoa["history"] if r["split"] == "eval"] == [3]


def test_demo_without_assets_says_how_to_fix_it(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "empty-cache"))
  monkeypatch.setattr(assets.subprocess, "run", lambda cmd, **_: subprocess.CompletedProcess(
      cmd, 1, stderr="ERROR: Could not find a version that satisfies the requirement"))
  assert cli.main(["demo", "--output", str(tmp_path / "demo")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and err[0].startswith("smoa-jax: downloading")  # pip's attempt
  assert err[1].startswith("smoa-jax: error: the demo needs the MiniLM encoder")
  assert "smoa-jax fetch-assets" in err[1] and "downloads" in err[1]
  assert not (tmp_path / "demo").exists()
