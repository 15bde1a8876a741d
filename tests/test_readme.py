"""Every code block of README.md runs here, so the README cannot drift from the code.

* The set-up block: its test command is, character for character, the one ``.ci/run`` runs (CI
  runs it); the main job it starts, ``smoa-jax demo``, runs in tests/app/test_demo.py (``--quick``).
* Python blocks run as written. The Hugging Face quickstart and the generation block get a tiny
  random Llama whose tokenizer has a chat template instead of SmolLM2
  (``smoa_jax.assets.fetch_smollm2`` is pointed at it) so that they take seconds.
* The command-line block runs every command in order through ``smoa_jax.app.cli.main`` with the same
  substitution and smaller sizes (``--steps 2 --batch-size 4 --seq-len 16``); the asset command
  runs for real when the assets are cached and is replaced by small JSONL files otherwise.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

import smoa_jax
from examples.hf_finetune import tiny_llama
from smoa_jax.app import assets
from smoa_jax.app import cli
from tests.hf_helpers import add_chat_template

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.DOTALL)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
BASH = [code for lang, code in BLOCKS if lang == "bash"]
TEXTS = ["To be or not to be that is the question", "Whether tis nobler in the mind to suffer",
         "The slings and arrows of outrageous fortune", "Or to take arms against a sea of troubles"]


def test_readme_opens_with_the_two_set_up_commands():
  first_lang, first_block = BLOCKS[0]
  assert first_lang == "bash" and README.index("```bash") < README.index("##")
  main_job, tests = first_block.strip().splitlines()
  assert main_job.endswith("smoa-jax demo")
  ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
  assert tests == ci


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
  return add_chat_template(tiny_llama(tmp_path_factory.mktemp("tiny"), TEXTS * 2))


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs(index, tiny_model, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(assets, "fetch_smollm2", lambda: tiny_model)
  exec(compile(PYTHON[index], f"README.md python block {index}", "exec"), {"__name__": "readme"})


def _commands(block: str) -> list[list[str]]:
  joined = block.replace("\\\n", " ")
  return [shlex.split(line.split("#")[0]) for line in joined.splitlines() if line.split("#")[0].strip()]


SMALL = {"--steps": "2", "--batch-size": "4", "--seq-len": "16"}


def _small(argv: list[str], tiny_model: Path) -> list[str]:
  """The same command on the tiny model with small sizes."""
  out = [SMALL.get(prev, arg) for prev, arg in zip([""] + argv[:-1], argv)]
  return [str(tiny_model) if arg.endswith(".cache/smoa-jax/assets/smollm2") else arg for arg in out]


def test_command_line_block_runs(tiny_model, tmp_path, monkeypatch, capsys):
  (block,) = [b for b in BASH[1:] if "smoa-jax finetune" in b]
  monkeypatch.chdir(tmp_path)
  cached = all(assets.is_cached(name) for name in ("sentiment", "shakespeare"))
  for argv in _commands(block):
    assert argv[0] == "smoa-jax"
    if argv[1] == "fetch-assets" and not cached:  # no download in the test: same files, small
      data = tmp_path / argv[argv.index("--jsonl") + 1]
      data.mkdir()
      for split in ("train", "validation", "test"):
        (data / f"shakespeare_{split}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 4))
      continue
    if argv[1] == "fetch-assets":
      argv = ["smoa-jax", "fetch-assets", "sentiment", "shakespeare", *argv[2:]]
    code = cli.main(_small(argv[1:], tiny_model))
    out, err = capsys.readouterr()
    assert code == 0, f"{' '.join(argv)}\n{err}"
  assert (tmp_path / "runs" / "smoa-merged" / "config.json").is_file()
  assert smoa_jax.from_hf(tmp_path / "runs" / "smoa-merged") is not None
