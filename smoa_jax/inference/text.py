"""Text-level generation: prompts (or chat conversations) in, new text out.

:func:`generate` tokenizes, calls :func:`~smoa_jax.inference.decode.generate_ids` and decodes
only the new tokens with ``skip_special_tokens=True``::

    model = smoa_jax.from_hf(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    smoa_jax.generate(model, tokenizer, ["What is the capital of France?"], max_new_tokens=32,
                      chat=True)          # -> ['The capital of France is Paris.']

Prompts
    A plain prompt is tokenized as the tokenizer does by default (special tokens such as BOS
    added). With ``chat=True`` a string becomes one user turn, and a conversation (a list of
    ``{"role", "content"}`` messages, roles :data:`ROLES`) is used as it is; either is rendered
    with the tokenizer's chat template and the generation prompt
    (``apply_chat_template(..., add_generation_prompt=True)``) and tokenized without adding
    special tokens again, as Hugging Face does.

Stop and padding ids
    A row stops at any of :func:`stop_token_ids`: the model's ``generation_config.json``
    ``eos_token_id`` (else ``config.json``'s), plus the tokenizer's EOS (chat models end a turn
    with it, e.g. ``<|im_end|>``). Padding uses the tokenizer's pad id, else the first stop id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from flax import nnx

from smoa_jax.errors import ConfigError, DataError
from smoa_jax.inference.decode import generate_ids
from smoa_jax.inference.sampling import SamplingConfig

__all__ = ["ROLES", "generate", "generate_text", "encode_prompts", "chat_messages",
           "stop_token_ids", "pad_token_id"]

ROLES = ("system", "user", "assistant", "tool")

Prompt = str | Sequence[Mapping[str, Any]]


def chat_messages(prompt: Prompt, where: str) -> list[dict[str, str]]:
  """A prompt as chat messages (a string is one user turn); checks roles and contents.

  ``where`` names the prompt in errors (``"prompt 3"``, ``"prompts.jsonl:3"``).
  """
  if isinstance(prompt, str):
    return [{"role": "user", "content": prompt}]
  if not isinstance(prompt, Sequence) or not prompt:
    raise DataError(f"{where}: a conversation must be a non-empty list of {{\"role\", "
                    f"\"content\"}} messages, got {type(prompt).__name__}.")
  messages = []
  for i, message in enumerate(prompt):
    if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
      raise DataError(f"{where}: message {i} must be an object with a string \"content\", got "
                      f"{str(message)[:80]}.")
    if message.get("role") not in ROLES:
      raise DataError(f"{where}: message {i} has the unknown role {message.get('role')!r}; "
                      f"expected one of {', '.join(ROLES)}.")
    messages.append({"role": message["role"], "content": message["content"]})
  return messages


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], *, chat: bool) -> list[list[int]]:
  """Token ids of every prompt (see the module docstring); raises DataError on an empty prompt,
  a conversation without ``chat=True``, bad messages, or a tokenizer without a chat template."""
  if chat and not getattr(tokenizer, "chat_template", None):
    raise ConfigError(f"the tokenizer ({type(tokenizer).__name__}) has no chat template, so "
                      "chat=True cannot render prompts; generate without chat (plain prompts), or "
                      "use a model whose tokenizer_config.json holds a chat_template.")
  encoded = []
  for i, prompt in enumerate(prompts):
    where = f"prompt {i}"
    if isinstance(prompt, str) and not prompt.strip():
      raise DataError(f"{where} is empty; give some text to continue.")
    if not chat:
      if not isinstance(prompt, str):
        raise DataError(f"{where} is a conversation ({type(prompt).__name__}); generate from "
                        "chat messages with chat=True (--chat), or give plain text.")
      encoded.append(list(tokenizer(prompt)["input_ids"]))
      continue
    text = tokenizer.apply_chat_template(chat_messages(prompt, where), tokenize=False,
                                         add_generation_prompt=True)
    encoded.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
  return encoded


def _ids(value: Any) -> list[int]:
  if value is None:
    return []
  return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_token_ids(model: nnx.Module, tokenizer: Any) -> tuple[int, ...]:
  """The ids that end a row: ``generation_config.json``'s ``eos_token_id`` in the model's source
  directory (else ``config.json``'s), plus ``tokenizer.eos_token_id``; sorted, unique."""
  source = getattr(model, "source_dir", None)
  path = Path(source) / "generation_config.json" if source else None
  config = model.hf_config
  if path is not None and path.is_file():
    try:
      config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
      raise ConfigError(f"cannot read {path} ({err}); fix or delete the file.") from err
  return tuple(sorted(set(_ids(config.get("eos_token_id")) + _ids(tokenizer.eos_token_id))))


def pad_token_id(tokenizer: Any, stop_ids: Sequence[int]) -> int:
  """The tokenizer's pad id, else the first stop id, else 0."""
  if tokenizer.pad_token_id is not None:
    return int(tokenizer.pad_token_id)
  return int(stop_ids[0]) if stop_ids else 0


def generate(model: nnx.Module, tokenizer: Any, prompts: Sequence[Prompt] | str, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, chat: bool = False) -> list[str]:
  """Generate a continuation of every prompt; returns only the new text of each.

  Args:
    model: a causal LM of smoa-jax (with or without adapters, any dtype, mesh or layout).
    tokenizer: its Hugging Face tokenizer.
    prompts: texts (a single string counts as one prompt); with ``chat=True`` also
      conversations (lists of ``{"role", "content"}`` messages).
    max_new_tokens: at most this many new tokens per prompt (a prompt stops at EOS).
    temperature, top_k, top_p, seed: 0 = greedy; see :class:`SamplingConfig`.
    chat: render each prompt with the tokenizer's chat template (a string as one user turn)
      and the generation prompt.

  Returns:
    The new text of every prompt, decoded with ``skip_special_tokens=True``, in order.

  Raises:
    ConfigError: bad sampling values, a model that cannot generate, or ``chat=True`` with a
      tokenizer that has no chat template.
    DataError: no prompts, an empty prompt, an unknown chat role, or a prompt longer than the
      model's context minus ``max_new_tokens``.
  """
  config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed)
  return generate_text(model, tokenizer, [prompts] if isinstance(prompts, str) else prompts,
                       config, chat=chat)


def generate_text(model: nnx.Module, tokenizer: Any, prompts: Sequence[Prompt],
                  config: SamplingConfig, *, chat: bool, batch_size: int | None = None,
                  on_token: Callable[[np.ndarray], None] | None = None) -> list[str]:
  """:func:`generate` with a :class:`SamplingConfig`, plus ``batch_size`` and ``on_token`` of
  :func:`~smoa_jax.inference.decode.generate_ids` (every prompt is checked before any runs)."""
  if len(prompts) == 0:
    raise DataError("no prompts to generate from; expected a list of texts.")
  stops = stop_token_ids(model, tokenizer)
  new = generate_ids(model, encode_prompts(tokenizer, prompts, chat=chat),
                     max_new_tokens=config.max_new_tokens, eos_token_ids=stops,
                     pad_token_id=pad_token_id(tokenizer, stops), temperature=config.temperature,
                     top_k=config.top_k, top_p=config.top_p, seed=config.seed,
                     batch_size=batch_size, on_token=on_token)
  return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
