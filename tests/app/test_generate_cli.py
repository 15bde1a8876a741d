"""``smoa-jax generate`` and ``smoa-jax chat`` (smoa_jax/app/commands/{generate,chat}.py) on a tiny
random Llama whose tokenizer has a chat template, and on a finished SMoA run."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import transformers

import smoa_jax
from tests.support.cli import ours_with_adapter, run_cli

NEW = "6"


@pytest.fixture(scope="module")
def chat_dir(chat_llama):
  return chat_llama


@pytest.fixture(scope="module")
def chat_model(chat_dir):
  return smoa_jax.from_hf(chat_dir), transformers.AutoTokenizer.from_pretrained(chat_dir)


def records(text: str) -> list[dict]:
  return [json.loads(line) for line in text.splitlines()]


def test_generate_prompts_to_a_file_and_to_stdout(chat_dir, chat_model, tmp_path, capsys):
  model, tokenizer = chat_model
  prompts = ["the cat sat", "a dog ran on the"]
  expected = smoa_jax.generate(model, tokenizer, prompts, max_new_tokens=int(NEW))
  output = tmp_path / "out" / "generations.jsonl"
  code, out, err = run_cli(capsys, "generate", "--model", chat_dir, "--prompt", *prompts,
                           "--max-new-tokens", NEW, "--batch-size", 1, "--output", output)
  assert code == 0, err
  assert out == "" and "wrote 2 generations" in err
  assert records(output.read_text()) == [{"prompt": p, "generation": g}
                                         for p, g in zip(prompts, expected)]
  assert [p.name for p in output.parent.iterdir()] == ["generations.jsonl"]  # no temporary left
  code, out, _ = run_cli(capsys, "generate", "--model", chat_dir, "--prompt", prompts[0],
                         "--max-new-tokens", NEW, "--chat")
  assert code == 0
  assert records(out) == [{"prompt": prompts[0], "generation": smoa_jax.generate(
      model, tokenizer, prompts[:1], max_new_tokens=int(NEW), chat=True)[0]}]


def test_generate_chat_records_keep_their_fields(chat_dir, chat_model, tmp_path, capsys):
  model, tokenizer = chat_model
  conversations = [[{"role": "user", "content": "a cat"}],
                   [{"role": "system", "content": "the"}, {"role": "user", "content": "a dog"}]]
  data = tmp_path / "prompts.jsonl"
  data.write_text("".join(json.dumps({"messages": c, "id": i}) + "\n"
                          for i, c in enumerate(conversations)))
  code, out, err = run_cli(capsys, "generate", "--model", chat_dir, "--data", data,
                           "--max-new-tokens", NEW, "--temperature", 0.8, "--top-k", 5,
                           "--seed", 3)
  assert code == 0, err
  expected = smoa_jax.generate(model, tokenizer, conversations, max_new_tokens=int(NEW),
                               temperature=0.8, top_k=5, seed=3, chat=True)
  assert records(out) == [{"messages": c, "id": i, "generation": g}
                          for i, (c, g) in enumerate(zip(conversations, expected))]


# Slow: a run's adapter loads through the same flag as named adapters (tested by default below).
@pytest.mark.slow
def test_generate_with_a_runs_adapter(cli_files, cli_lm_run, capsys):
  model = ours_with_adapter(cli_files["llama"], cli_lm_run)
  tokenizer = transformers.AutoTokenizer.from_pretrained(cli_files["llama"])
  code, out, err = run_cli(capsys, "generate", "--run", cli_lm_run, "--prompt", "the cat",
                           "--max-new-tokens", NEW)
  assert code == 0, err
  expected = smoa_jax.generate(model, tokenizer, ["the cat"], max_new_tokens=int(NEW))
  assert records(out) == [{"prompt": "the cat", "generation": expected[0]}]


def test_generate_with_named_adapters_on_one_base(cli_files, cli_lm_run, tmp_path, capsys):
  """``--adapter NAME=DIR`` generates with each adapter in turn on one base model, each as the
  model with that adapter alone would."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(cli_files["llama"])
  loud = ours_with_adapter(cli_files["llama"], cli_lm_run)
  rng = np.random.default_rng(0)
  for _, layer in smoa_jax.adapter_layers(loud):  # dW as large as W: the answers must change
    layer.lora_b[...] = rng.standard_normal(layer.lora_b.shape).astype(np.float32)
  smoa_jax.save_adapter(loud, tmp_path / "loud")
  expected = {name: smoa_jax.generate(model, tokenizer, ["the cat"], max_new_tokens=int(NEW))[0]
              for name, model in (("default", ours_with_adapter(cli_files["llama"], cli_lm_run)),
                                  ("loud", loud))}
  assert expected["default"] != expected["loud"]
  code, out, err = run_cli(capsys, "generate", "--run", cli_lm_run, "--prompt", "the cat",
                           "--max-new-tokens", NEW, "--adapter", f"loud={tmp_path / 'loud'}")
  assert code == 0, err
  assert records(out) == [{"prompt": "the cat", "adapter": name, "generation": text}
                          for name, text in expected.items()]
  code, _, err = run_cli(capsys, "generate", "--run", cli_lm_run, "--prompt", "the cat",
                         "--adapter", f"default={cli_lm_run}")
  assert code == 2 and "--adapter names must differ" in err


def test_chat_streams_answers_and_keeps_the_conversation(chat_dir, chat_model, capsys,
                                                          monkeypatch):
  model, tokenizer = chat_model
  monkeypatch.setattr("sys.stdin", io.StringIO("the cat\na dog\n/reset\na dog\n"))
  code, out, err = run_cli(capsys, "chat", "--model", chat_dir, "--max-new-tokens", NEW,
                           "--system", "the bird")
  assert code == 0, err
  answer = lambda conversation: smoa_jax.generate(model, tokenizer, [conversation],
                                                  max_new_tokens=int(NEW), chat=True)[0]
  system = [{"role": "system", "content": "the bird"}]
  first = answer(system + [{"role": "user", "content": "the cat"}])
  second = answer(system + [{"role": "user", "content": "the cat"},
                            {"role": "assistant", "content": first},
                            {"role": "user", "content": "a dog"}])
  fresh = answer(system + [{"role": "user", "content": "a dog"}])
  assert out.splitlines() == [first, second, fresh]


def test_chat_refuses_a_tokenizer_without_template(cli_files, capsys, monkeypatch):
  monkeypatch.setattr("sys.stdin", io.StringIO("the cat\n"))
  code, _, err = run_cli(capsys, "chat", "--model", cli_files["llama"])
  assert code == 1
  assert err.strip().splitlines() == [
      "smoa-jax: error: the model's tokenizer has no chat template, so there is no way to render "
      "a conversation; use 'smoa-jax generate --prompt' for plain continuation."]


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_help(command, capsys):
  code, out, _ = run_cli(capsys, command, "--help")
  assert code == 0 and out.startswith(f"usage: smoa-jax {command}")
