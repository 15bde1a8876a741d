"""Instruction examples as tokens, with their answer marked: prompt/completion pairs, and chat
conversations rendered with the tokenizer's chat template; truncation that keeps the answer.

Prompt/completion
    ``ids = tokenizer(prompt) + tokenizer(completion, no special tokens) + [EOS]``; the completion
    and its EOS are the answer. The two are tokenized separately, as at generation time (the
    prompt alone, then new tokens), so a completion usually starts with a space (``" positive"``)
    when the prompt does not end with one.

Conversations
    ``apply_chat_template(..., tokenize=False)`` then the tokenizer without special tokens (the
    template writes them), as transformers does. Assistant turn ``k`` is found by rendering
    incrementally: ``messages[:k]`` with ``add_generation_prompt=True`` ends where the assistant's
    text starts, ``messages[:k + 1]`` where its turn ends (the end-of-turn token included, so
    the model learns to stop); the token ids between the two are the answer. This needs a
    prefix-stable template and tokenization (rendering more turns only appends tokens), which is
    checked at every turn: a template that rewrites earlier turns (e.g. drops earlier reasoning)
    is an error that names the record.

Truncation to ``seq_len`` tokens (:func:`fit`)
    Tokens after the last answer token are dropped, then the start is cut (the prompt loses its
    beginning: BOS, a system prompt, earlier turns). The last answer must fit whole with at least
    one token of context before it (its first token is predicted from the one before); otherwise
    the example is skipped, never silently shortened.
"""

from __future__ import annotations

from typing import Any, Sequence

from smoa_jax.errors import DataError

__all__ = ["encode", "encode_pair", "encode_conversation", "fit"]

# One example: token ids and, per token, whether it belongs to an answer.
Example = tuple[list[int], list[bool]]


def encode(records: Any, tokenizer: Any) -> list[Example]:
  """Token ids and answer flags of every example of instruction ``records``
  (:class:`smoa_jax.data.Records` of kind ``"prompt-completion"`` or ``"messages"``); the texts
  are tokenized in one batch."""
  if records.kind == "prompt-completion":
    eos = _eos(tokenizer, records.source)
    prompts = tokenizer([p for p, _ in records.pairs], add_special_tokens=True)["input_ids"]
    answers = tokenizer([c for _, c in records.pairs], add_special_tokens=False)["input_ids"]
    return [encode_pair(p, a, eos) for p, a in zip(prompts, answers)]
  if not getattr(tokenizer, "chat_template", None):
    raise DataError(f"{records.source}: {{\"messages\"}} records need the tokenizer's chat "
                    "template, and this tokenizer has none (no chat_template in "
                    "tokenizer_config.json); write the data as {\"prompt\": ..., \"completion\": "
                    "...} records instead, the prompt formatted as the model expects.")
  renders = [_render(tokenizer, messages, records.where(i))
             for i, messages in enumerate(records.conversations)]
  ids = iter(tokenizer([text for texts in renders for text in texts],
                       add_special_tokens=False)["input_ids"])
  return [_assemble([list(next(ids)) for _ in texts], messages, records.where(i))
          for i, (texts, messages) in enumerate(zip(renders, records.conversations))]


def _eos(tokenizer: Any, source: str) -> int:
  eos = getattr(tokenizer, "eos_token_id", None)
  if eos is None:
    raise DataError(f"{source}: prompt/completion training appends EOS to each completion (so "
                    "the model learns to stop), but the tokenizer has no eos_token; use a "
                    "tokenizer with one.")
  return eos


def encode_pair(prompt_ids: Sequence[int], completion_ids: Sequence[int], eos: int) -> Example:
  """``prompt + completion + [eos]``; the completion and EOS are the answer."""
  answer = list(completion_ids) + [eos]
  return list(prompt_ids) + answer, [False] * len(prompt_ids) + [True] * len(answer)


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]], where: str) -> Example:
  """The conversation rendered by the chat template; assistant turns are the answer.

  Raises:
    DataError: the template refuses the conversation, or is not prefix-stable (see the module
      docstring), or renders an assistant turn as no tokens; the message starts with ``where``.
  """
  texts = _render(tokenizer, messages, where)
  ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
  return _assemble([list(i) for i in ids], messages, where)


def _render(tokenizer: Any, messages: list[dict[str, str]], where: str) -> list[str]:
  """The renderings :func:`_assemble` reads: per assistant turn k, the turns before it with the
  generation prompt, then through turn k; then the whole conversation if it ends otherwise."""
  import jinja2

  def render(count: int, generation: bool) -> str:
    try:
      return tokenizer.apply_chat_template(messages[:count], tokenize=False,
                                           add_generation_prompt=generation)
    except jinja2.TemplateError as err:
      raise DataError(f"{where}: the tokenizer's chat template refused the conversation "
                      f"({err}).") from err

  texts = []
  for k, message in enumerate(messages):
    if message["role"] == "assistant":
      texts += [render(k, True), render(k + 1, False)]
  if messages[-1]["role"] != "assistant":  # turns after the last answer: context, no loss
    texts.append(render(len(messages), False))
  return texts


def _assemble(renders: list[list[int]], messages: list[dict[str, str]], where: str) -> Example:
  """Token ids and answer flags from the tokenized renderings of :func:`_render`, checking that
  each extends the one before."""

  def extend(ids: list[int], longer: list[int], turn: int) -> None:
    if longer[:len(ids)] != ids:
      raise DataError(
          f"{where}: the chat template is not prefix-stable at message {turn}: rendering the "
          "conversation up to it does not start with the tokens of the turns before, so the "
          "assistant tokens cannot be located (the template rewrites earlier turns, or tokens "
          "merge across turns). Write the data as {\"prompt\": ..., \"completion\": ...} records.")

  ids: list[int] = []
  answer: list[bool] = []
  rest = iter(renders)
  for k, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    head, turn = next(rest), next(rest)
    extend(ids, head, k + 1)
    extend(head, turn, k + 1)
    if len(turn) == len(head):
      raise DataError(f"{where}: the chat template renders assistant message {k + 1} as no "
                      "tokens.")
    answer += [False] * (len(head) - len(ids)) + [True] * (len(turn) - len(head))
    ids = turn
  for full in rest:
    extend(ids, full, len(messages))
    answer += [False] * (len(full) - len(ids))
    ids = full
  return ids, answer


def fit(ids: Sequence[int], answer: Sequence[bool],
        seq_len: int) -> tuple[list[int], list[bool], bool] | None:
  """``(ids, answer, truncated)`` cut to at most ``seq_len`` tokens, or None when the last
  answer cannot fit whole with one token of context before it (see the module docstring)."""
  ids, answer = list(ids), list(answer)
  if len(ids) <= seq_len:
    return ids, answer, False
  end = len(answer) - answer[::-1].index(True)
  start = end - 1
  while start > 0 and answer[start - 1]:
    start -= 1
  if end - start >= seq_len:
    return None
  cut = max(0, end - seq_len)
  return ids[cut:end], answer[cut:end], True
