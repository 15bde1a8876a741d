"""Probes: bad generation requests, through the Python API and through ``smoa-jax generate``.

Every one fails before anything is compiled or written: a specific exception with a message a
user can act on, or exit status 1 (2 for a flag that does not parse) with one
``smoa-jax: error:`` line and no output file.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import transformers

import smoa_jax
from smoa_jax.app import cli
from tests.reliability import probe_cases

CONTEXT = 128  # positions of the tiny chat Llama


@pytest.fixture(scope="module")
def chat_model(chat_llama):
  path = chat_llama
  return path, smoa_jax.from_hf(path), transformers.AutoTokenizer.from_pretrained(path)


def _bert(tmp_path: Path):
  config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=20)
  transformers.BertModel(config).save_pretrained(tmp_path / "bert")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return smoa_jax.from_hf(tmp_path / "bert")


LONG = " ".join(["cat"] * (CONTEXT - 4))  # + <s> + 8 new tokens > 128 positions

API = {
    # name: (call(model, tokenizer, tmp_path), exception, text in the message, situation)
    "empty prompt": (lambda m, t, _: smoa_jax.generate(m, t, ["the cat", "  "], max_new_tokens=4),
                     smoa_jax.DataError, "prompt 1 is empty", "a prompt that is empty or blank"),
    "no prompts": (lambda m, t, _: smoa_jax.generate(m, t, [], max_new_tokens=4),
                   smoa_jax.DataError, "no prompts", "an empty list of prompts"),
    "prompt longer than the context": (
        lambda m, t, _: smoa_jax.generate(m, t, [LONG], max_new_tokens=8), smoa_jax.DataError,
        "needs 133 positions, but the model has 128",
        "a prompt longer than the context (128 positions) minus max_new_tokens"),
    "max_new_tokens of zero": (lambda m, t, _: smoa_jax.generate(m, t, ["a"], max_new_tokens=0),
                               smoa_jax.ConfigError, "max_new_tokens must be an integer >= 1",
                               "`max_new_tokens=0`"),
    "negative temperature": (
        lambda m, t, _: smoa_jax.generate(m, t, ["a"], max_new_tokens=4, temperature=-0.5),
        smoa_jax.ConfigError, "temperature must be >= 0", "`temperature=-0.5`"),
    "top-p of zero": (lambda m, t, _: smoa_jax.generate(m, t, ["a"], max_new_tokens=4,
                                                        temperature=1.0, top_p=0.0),
                      smoa_jax.ConfigError, "top_p must be in (0, 1]", "`top_p=0.0`"),
    "top-p above one": (lambda m, t, _: smoa_jax.generate(m, t, ["a"], max_new_tokens=4,
                                                          temperature=1.0, top_p=1.5),
                        smoa_jax.ConfigError, "top_p must be in (0, 1]", "`top_p=1.5`"),
    "top-k of zero": (lambda m, t, _: smoa_jax.generate(m, t, ["a"], max_new_tokens=4,
                                                        temperature=1.0, top_k=0),
                      smoa_jax.ConfigError, "top_k must be an integer >= 1", "`top_k=0`"),
    "unknown chat role": (
        lambda m, t, _: smoa_jax.generate(m, t, [[{"role": "bot", "content": "hi"}]],
                                          max_new_tokens=4, chat=True),
        smoa_jax.DataError, "unknown role 'bot'", "a chat message with the role 'bot'"),
    "conversation without chat": (
        lambda m, t, _: smoa_jax.generate(m, t, [[{"role": "user", "content": "hi"}]],
                                          max_new_tokens=4),
        smoa_jax.DataError, "with chat=True", "chat messages given without `chat=True`"),
    "no chat template": (
        lambda m, t, _: smoa_jax.generate(m, _without_template(t), ["hi"], max_new_tokens=4,
                                          chat=True),
        smoa_jax.ConfigError, "no chat template", "`chat=True` with a tokenizer without a chat "
        "template"),
    "token id outside the vocabulary": (
        lambda m, t, _: smoa_jax.generate_ids(m, [[1, 2, 10_000]], max_new_tokens=4),
        smoa_jax.DataError, "outside the model's vocabulary", "`generate_ids` with an id beyond "
        "the vocabulary"),
    "model that cannot generate": (
        lambda m, t, tmp: smoa_jax.generate_ids(_bert(tmp), [[1, 2]], max_new_tokens=4),
        smoa_jax.ConfigError, "cannot generate", "a BERT encoder given to `generate_ids`"),
}


def _without_template(tokenizer):
  plain = transformers.AutoTokenizer.from_pretrained(tokenizer.name_or_path)
  plain.chat_template = None
  return plain


@probe_cases("generation", {case: (situation, f"{error.__name__} saying ...{text}...")
                            for case, (_, error, text, situation) in API.items()})
@pytest.mark.parametrize("case", list(API))
def test_bad_requests_raise_one_clear_error(case, chat_model, tmp_path):
  _, model, tokenizer = chat_model
  call, error, text, _ = API[case]
  with pytest.raises(error) as info:
    call(model, tokenizer, tmp_path)
  assert text in str(info.value)


def _prompts(tmp_path: Path, lines: list[str]) -> Path:
  path = tmp_path / "prompts.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return path


CLI = {
    # name: (extra argv (tmp_path) -> list, exit code, text in the error line)
    "max new tokens of zero": (lambda t: ["--prompt", "the cat", "--max-new-tokens", 0], 1,
                               "max_new_tokens"),
    "negative temperature": (lambda t: ["--prompt", "the cat", "--temperature", -1], 1,
                             "temperature"),
    "top-p above one": (lambda t: ["--prompt", "the cat", "--top-p", 2], 1, "top_p"),
    "top-k of zero": (lambda t: ["--prompt", "the cat", "--top-k", 0], 1, "top_k"),
    "empty prompt": (lambda t: ["--prompt", ""], 1, "empty"),
    "prompt longer than the context": (lambda t: ["--prompt", LONG, "--max-new-tokens", 8], 1,
                                       "positions"),
    "unknown chat role": (lambda t: ["--data", _prompts(t, [
        json.dumps({"messages": [{"role": "user", "content": "a cat"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "a cat"}]})])], 1,
        "unknown role 'robot'"),
    "prompts file mixing record kinds": (lambda t: ["--data", _prompts(t, [
        json.dumps({"prompt": "a cat"}),
        json.dumps({"messages": [{"role": "user", "content": "a cat"}]})])], 1,
        "prompts.jsonl:2"),
    "prompts file with a bad line": (lambda t: ["--data", _prompts(t, ['{"prompt": "a"}', "{x"])],
                                     1, "prompts.jsonl:2"),
    "prompt and data together": (lambda t: ["--prompt", "a", "--data", t / "p.jsonl"], 2,
                                 "not allowed with"),
    "neither model nor run": (lambda t: None, 2, "--model or --run"),
}


@probe_cases("cli", {case: (f"`smoa-jax generate` with {case}",
                            f"exit {code}, one line `smoa-jax: error: ...{text}...`, no traceback, "
                            "no output file") for case, (_, code, text) in CLI.items()})
@pytest.mark.parametrize("case", list(CLI))
def test_bad_generate_command_lines(case, chat_model, tmp_path, capsys):
  path, _, _ = chat_model
  build, expected, text = CLI[case]
  extra = build(tmp_path)
  output = tmp_path / "out" / "generations.jsonl"
  argv = (["generate", "--prompt", "a"] if extra is None
          else ["generate", "--model", path, *extra]) + ["--output", output]
  code = cli.main([str(a) for a in argv])
  _, err = capsys.readouterr()
  errors = [line for line in err.splitlines() if line.startswith("smoa-jax: error: ")]
  assert code == expected, err
  assert len(errors) == 1 and text in errors[0], err
  assert "Traceback" not in err
  assert not output.exists() and not (tmp_path / "out").exists()
