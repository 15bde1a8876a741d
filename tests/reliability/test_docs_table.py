"""docs/reliability.md is generated from the probes; it must match them exactly."""

from pathlib import Path

from tests.reliability.render import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


def test_docs_table_is_current():
  assert DOC.read_text() == render(), (
      "docs/reliability.md is out of date: run `python -m tests.reliability.render > "
      "docs/reliability.md` from the repository root.")
