"""Every code block of README.md runs here, so the README cannot drift from the code.

* The set-up block: its test command is, character for character, the one ``.ci/run`` runs (CI
  runs it); the main job it starts, ``smoa-jax demo``, runs in tests/app/test_demo.py (``--quick``).
* Python blocks run as written, then the test checks what each one claims (the layer learns; the
  adapter and the merged export reload to the same model). The Hugging Face quickstart gets the
  tiny random word Llama with a chat template of ``tests/conftest.py`` instead of SmolLM2
  (``smoa_jax.assets.fetch_smollm2`` is pointed at it) so that it takes seconds; the generation
  block's greedy ids are checked against a plain loop without a KV cache.
* The command-line block runs every command in order through ``smoa_jax.app.cli.main`` with the same
  substitution and smaller sizes (``--steps 2 --batch-size 4 --seq-len 16``); the asset command
  runs for real when the assets are cached and is replaced by small JSONL files otherwise.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import smoa_jax
from smoa_jax.app import assets, cli
from tests.support.corpus import VERSE
from tests.support.decoding import greedy_without_cache

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.DOTALL)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
BASH = [code for lang, code in BLOCKS if lang == "bash"]


def test_readme_opens_with_the_two_set_up_commands():
  first_lang, first_block = BLOCKS[0]
  assert first_lang == "bash" and README.index("```bash") < README.index("##")
  main_job, tests = first_block.strip().splitlines()
  assert main_job.endswith("smoa-jax demo")
  ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
  assert tests == ci


def test_constraints_file_pins_the_environment_the_readme_names():
  """``constraints.txt`` pins every package exactly (never smoa-jax itself, torch as pyproject
  pins it), and the README tells how to install with it."""
  pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
          if line and not line.startswith("#")]
  assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.]+", pin) for pin in pins), pins
  names = [pin.split("==")[0].lower() for pin in pins]
  assert len(set(names)) == len(names) and "smoa-jax" not in names and "smoa_jax" not in names
  assert "torch==2.13.0" in pins and '"torch==2.13.0"' in (ROOT / "pyproject.toml").read_text()
  assert {"jax", "flax", "transformers", "pytest"} <= set(names)
  assert ".venv/bin/pip install -c constraints.txt -e '.[test]'" in README


def check_one_layer(namespace: dict) -> None:
  """The layer quickstart: 50 Adam steps fit the target better than the frozen layer."""
  linear, x, target = namespace["linear"], namespace["x"], namespace["target"]
  base = float(jnp.mean((linear(x) - target) ** 2))
  assert float(namespace["loss"]) < 0.8 * base  # x0.64-0.66 over seeds 0-4 (every key and Rngs)


def check_hf_quickstart(namespace: dict) -> None:
  """The Hugging Face quickstart trained the adapters, and its saved adapter reloads onto a fresh
  copy of the base model as the same model."""
  model, model_dir, ids = namespace["model"], namespace["model_dir"], namespace["ids"]
  assert all(np.abs(np.asarray(layer.lora_b[...])).max() > 0
             for _, layer in smoa_jax.adapter_layers(model))  # every adapter moved off b = 0
  fresh = smoa_jax.from_hf(model_dir)
  smoa_jax.load_adapter(fresh, "runs/quickstart/adapter")
  np.testing.assert_allclose(np.asarray(fresh(jnp.asarray(ids))),
                             np.asarray(model(jnp.asarray(ids))), atol=1e-5)


def check_generation(namespace: dict) -> None:
  """The generation block: its cached, batched greedy decoding equals a plain loop that runs the
  whole sequence through the model for every new token, without a cache."""
  model, ids = namespace["model"], namespace["ids"]
  cached = smoa_jax.generate_ids(model, ids, max_new_tokens=6, eos_token_ids=[])
  assert cached == greedy_without_cache(model, ids, 6)


def check_named_adapters(namespace: dict) -> None:
  """The named-adapters block: both adapters are on the model again, the PEFT exports are LoRA
  adapters PEFT can read, and the conversion covered every adapted layer."""
  model, report = namespace["model"], namespace["report"]
  assert sorted(smoa_jax.list_adapters(model)) == ["chat", "default"]
  for name in ("chat", "default-as-lora"):
    config = json.loads(Path("adapters", name, "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA", (name, config["peft_type"])
  assert len(report.layers) == len(smoa_jax.adapter_layers(model)) > 0


CHECKS = {"SMoADense.from_linear": check_one_layer,
          "smoa_jax.apply_adapter(model, config": check_hf_quickstart,
          "smoa_jax.generate(": check_generation,
          "smoa_jax.list_adapters(model)": check_named_adapters}


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs(index, chat_llama, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(assets, "fetch_smollm2", lambda: chat_llama)
  namespace = {"__name__": "readme"}
  exec(compile(PYTHON[index], f"README.md python block {index}", "exec"), namespace)
  (check,) = [check for marker, check in CHECKS.items() if marker in PYTHON[index]]
  check(namespace)


def _commands(block: str) -> list[list[str]]:
  joined = block.replace("\\\n", " ")
  return [shlex.split(line.split("#")[0]) for line in joined.splitlines() if line.split("#")[0].strip()]


SMALL = {"--steps": "2", "--batch-size": "4", "--seq-len": "16"}


def _small(argv: list[str], tiny_model: Path) -> list[str]:
  """The same command on the tiny model with small sizes."""
  out = [SMALL.get(prev, arg) for prev, arg in zip([""] + argv[:-1], argv)]
  return [str(tiny_model) if arg.endswith(".cache/smoa-jax/assets/smollm2") else arg for arg in out]


def test_command_line_block_runs(word_llama, tmp_path, monkeypatch, capsys):
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
            "".join(json.dumps({"text": t}) + "\n" for t in VERSE * 4))
      continue
    if argv[1] == "fetch-assets":
      argv = ["smoa-jax", "fetch-assets", "sentiment", "shakespeare", *argv[2:]]
    code = cli.main(_small(argv[1:], word_llama))
    out, err = capsys.readouterr()
    assert code == 0, f"{' '.join(argv)}\n{err}"
  merged = smoa_jax.from_hf(tmp_path / "runs" / "smoa-merged")  # the export: W + dW folded in
  adapted = smoa_jax.from_hf(word_llama)
  smoa_jax.load_adapter(adapted, tmp_path / "runs" / "smoa" / "adapter")
  assert smoa_jax.adapter_layers(adapted) and not smoa_jax.adapter_layers(merged)
  ids = jnp.asarray([[2, 5, 9, 11, 4, 7, 3]])
  np.testing.assert_allclose(np.asarray(merged(ids)), np.asarray(adapted(ids)), atol=1e-5)
