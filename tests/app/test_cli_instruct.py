"""``smoa-jax finetune`` / ``eval`` on instruction data (prompt/completion and chat messages), with
``--packing`` and ``--train-on-prompt``, on a tiny random Llama whose word-level tokenizer has a
small chat template (tests/training/test_instruct.py)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import transformers

from smoa_jax.app import cli
from tests.support.cli import run_cli
from tests.support.corpus import sentences
from tests.support.files import write_jsonl
from tests.support.instruct import CHAT_WORDS, chat, chat_tokenizer

QUESTION = "is this review positive or negative"
ANSWERS = ("negative", "positive")  # label 0, label 1


def chat_rows(count: int, seed: int) -> list[dict]:
  return [chat(f"{QUESTION} {text}", ANSWERS[label]) for text, label in sentences(count, seed)]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
  """A tiny Llama with a chat template, chat train/eval files and a prompt/completion file."""
  root = tmp_path_factory.mktemp("instruct")
  texts = [t for t, _ in sentences(64, seed=0) + sentences(16, seed=1)] + [" ".join(CHAT_WORDS)]
  tokenizer = chat_tokenizer(root / "llama", texts)
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(root / "llama")
  pairs = [{"prompt": f"{QUESTION} {t}", "completion": ANSWERS[y]} for t, y in sentences(16, 2)]
  long = [{"prompt": QUESTION, "completion": " ".join(["great"] * 20)}] * 2
  return {"llama": root / "llama",
          "chat_train": write_jsonl(root / "chat_train.jsonl", chat_rows(64, seed=0)),
          "chat_eval": write_jsonl(root / "chat_eval.jsonl", chat_rows(16, seed=1)),
          "pairs": write_jsonl(root / "pairs.jsonl", pairs + long)}


def finetune(capsys, files, run: Path, data: Path, *extra):
  return run_cli(capsys, "finetune", "--model", files["llama"], "--data", data, "--output", run,
                 "--r", 8, "--batch-size", 8, "--seq-len", 32, "--lr", 1e-2, "--log-every", 5,
                 "--targets", "q_proj,v_proj,up_proj,down_proj", "--no-progress", *extra)


@pytest.fixture(scope="module")
def packed_run(files, tmp_path_factory):
  """A packed chat run long enough to learn the answer format: ``(run, stderr)``."""
  run = tmp_path_factory.mktemp("packed") / "run"
  err = io.StringIO()  # a module-scoped fixture has no capsys
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = cli.main([str(a) for a in (
        "finetune", "--model", files["llama"], "--data", files["chat_train"], "--eval-data",
        files["chat_eval"], "--output", run, "--r", 8, "--batch-size", 4, "--seq-len", 64,
        "--lr", 5e-2, "--steps", 60, "--save-every", 60, "--log-every", 10, "--packing",
        "--targets", "q_proj,v_proj,up_proj,down_proj,lm_head", "--no-progress")])
  assert code == 0, err.getvalue()
  return run, err.getvalue()


def test_packed_chat_run_learns_the_answers_and_records_its_data(packed_run, files, capsys):
  run, err = packed_run
  assert "64 training examples packed into" in err and "sequences of 64 tokens" in err
  config = json.loads((run / "run_config.json").read_text())
  assert config["flags"]["packing"] is True and config["flags"]["train_on_prompt"] is False
  assert config["data"]["train"]["kind"] == "messages"
  assert config["data"]["train"]["examples"] == 64 and config["data"]["train"]["skipped"] == 0
  assert config["data"]["train"]["sequences"] < 40 and config["num_examples"]["train"] == 64

  code, out, err = run_cli(capsys, "eval", "--model", files["llama"], "--data", files["chat_eval"])
  assert code == 0, err
  before = json.loads(out)
  code, out, err = run_cli(capsys, "eval", "--run", run, "--data", files["chat_eval"])
  assert code == 0, err
  after = json.loads(out)
  assert after["num_examples"] == 16 and after["num_skipped"] == 0
  # The answer tokens ("positive"/"negative", then <|end|>) of a random model cost about
  # log(vocab); once learned, the end token is certain and the label at most a coin flip.
  assert before["loss"] > 3.0 and after["loss"] < 1.0


def test_resume_cannot_turn_masking_or_packing_off_or_on(packed_run, capsys):
  run, _ = packed_run
  before = (run / "run_config.json").read_text()
  code, _, err = run_cli(capsys, "finetune", "--output", run, "--resume", "--train-on-prompt")
  assert code == 1 and "--resume cannot change --train-on-prompt True (the run has False)" in err
  assert (run / "run_config.json").read_text() == before


def test_answers_that_cannot_fit_are_skipped_and_counted(files, tmp_path, capsys):
  run = tmp_path / "run"
  code, _, err = finetune(capsys, files, run, files["pairs"], "--steps", 1, "--seq-len", 16,
                          "--train-on-prompt")
  assert code == 0, err
  assert ("2 of 18 training examples were skipped: their answer does not fit in --seq-len 16 "
          "tokens") in err
  assert "7 of 18 training examples had their prompt cut from the left to fit --seq-len 16" in err
  config = json.loads((run / "run_config.json").read_text())
  assert config["data"]["train"] == {"kind": "prompt-completion", "examples": 18, "skipped": 2,
                                     "truncated": 7, "sequences": 16}
  assert config["flags"]["train_on_prompt"] is True and config["num_examples"]["train"] == 16


@pytest.mark.parametrize("rows,message", [
    ([{"text": "the cat"}, {"prompt": "a", "completion": "b"}],
     "mixed.jsonl:2: a prompt-completion record in a file of text records"),
    ([{"prompt": QUESTION, "completion": " ".join(["great"] * 40)}] * 8,
     "all 8 examples were skipped"),
], ids=["mixed_kinds", "all_skipped"])
def test_bad_instruction_files_fail_with_one_line_and_no_run(files, tmp_path, capsys, rows,
                                                             message):
  data = write_jsonl(tmp_path / "mixed.jsonl", rows)
  code, out, err = finetune(capsys, files, tmp_path / "run", data, "--steps", 1)
  assert code == 1 and out == "" and message in err
  assert err.count("\n") == 1 and err.startswith("smoa-jax: error: ")
  assert not (tmp_path / "run").exists()


def test_help_describes_the_record_kinds_and_flags(capsys):
  code, out, _ = run_cli(capsys, "finetune", "--help")
  assert code == 0
  flat = " ".join(out.split())
  for text in ('{"prompt": ..., "completion": ...}', '{"messages": [{"role":', "chat template",
               "--train-on-prompt", "--packing"):
    assert text in flat, text
  code, out, _ = run_cli(capsys, "eval", "--help")
  assert code == 0 and "answer tokens only" in " ".join(out.split())
