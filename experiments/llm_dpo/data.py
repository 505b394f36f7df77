"""Preference pairs from a JSONL file in the UltraFeedback-binarized layout.

Each line holds ``prompt``, ``chosen`` and ``rejected``. ``chosen`` and
``rejected`` are either strings (the answers) or chat conversations (lists of
``{"role", "content"}`` messages whose last message is the answer, as in
``HuggingFaceH4/ultrafeedback_binarized``); ``prompt`` is a string or a list
of messages. The prompt is rendered with the SFT tokenizer's chat template
(the model was fine-tuned on it) and the answer is followed by the EOS token.

Batches are tokenized here rather than by Tunix so that the masks are exact
(Tunix derives them from ``ids != pad``, which drops the final EOS when the
pad token is the EOS, as for Llama-3) and no BOS is put before an answer.
"""

from __future__ import annotations

import json
from typing import Iterator, NamedTuple

import jax
import numpy as np


class Pair(NamedTuple):
  messages: tuple  # the conversation before the answer, ({"role", "content"}, ...)
  chosen: str
  rejected: str


def as_messages(prompt) -> tuple:
  """A prompt, a string or a list of ``{"role", "content"}`` messages, as a tuple of messages."""
  messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
  return tuple(dict(m) for m in messages)


def _split(conversation, prompt, where):
  """(messages before the answer, answer) of a string or a conversation."""
  if isinstance(conversation, str):
    return as_messages(prompt), conversation
  if not conversation or conversation[-1].get("role") != "assistant":
    raise ValueError(f"{where}: a conversation must end with an assistant message")
  history = conversation[:-1] or [{"role": "user", "content": prompt}]
  return tuple(history), conversation[-1]["content"]


def jsonl_rows(path, fields):
  """``(where, row)`` of each non-blank line of a JSONL file, ``where`` being ``path:line``.

  Raises:
    ValueError: a line is not a JSON object or misses one of ``fields``
      (its line is named).
  """
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON: {e}") from e
      if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object")
      missing = set(fields) - row.keys()
      if missing:
        raise ValueError(f"{where}: missing field(s) {sorted(missing)}")
      yield where, row


def read_pairs(path) -> list[Pair]:
  """Read every line of a preference JSONL file."""
  pairs = []
  for where, row in jsonl_rows(path, ("prompt", "chosen", "rejected")):
    history, chosen = _split(row["chosen"], row["prompt"], where)
    other, rejected = _split(row["rejected"], row["prompt"], where)
    if [m["content"] for m in history] != [m["content"] for m in other]:
      raise ValueError(f"{where}: chosen and rejected continue different conversations")
    pairs.append(Pair(tuple(dict(m) for m in history), chosen, rejected))
  if not pairs:
    raise ValueError(f"{path} holds no preference pair")
  return pairs


def split(pairs, eval_fraction: float, seed: int):
  """A seeded shuffle, then (train, held-out) with ``eval_fraction`` held out."""
  order = np.random.default_rng(seed).permutation(len(pairs))
  n_eval = int(round(eval_fraction * len(pairs)))
  held = [pairs[i] for i in order[:n_eval]]
  return [pairs[i] for i in order[n_eval:]], held


def render_prompt(tokenizer, messages) -> str:
  """The conversation ``messages`` as the model's prompt text, ready for its answer.

  The tokenizer's chat template with the assistant's turn opened (the SFT
  model was fine-tuned on it); without a template, the messages' contents
  separated by blank lines.
  """
  if getattr(tokenizer, "chat_template", None):
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
  return "\n\n".join(m["content"] for m in messages) + "\n\n"


class Encoder:
  """Token ids of a prompt (left-padded) and of its two answers (right-padded)."""

  def __init__(self, tokenizer, max_prompt_length: int, max_response_length: int):
    self.tokenizer = tokenizer
    self.max_prompt = max_prompt_length
    self.max_response = max_response_length
    self.eos = tokenizer.eos_token_id
    if self.eos is None:
      raise ValueError("the tokenizer has no EOS token")
    self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

  def prompt_ids(self, messages) -> list[int]:
    # The template writes the BOS itself where the model expects one.
    ids = self.tokenizer.encode(render_prompt(self.tokenizer, messages), add_special_tokens=False)
    return ids[-self.max_prompt :]  # keep the end: the question nearest the answer

  def answer_ids(self, text: str) -> list[int]:
    ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.eos]
    return ids[: self.max_response]

  def batch(self, pairs) -> dict[str, np.ndarray]:
    """Tunix's tokenized DPO input (``TrainingInput`` fields) for ``pairs``."""
    n = len(pairs)
    out = {
      "prompt_ids": np.full((n, self.max_prompt), self.pad, np.int32),
      "prompt_mask": np.zeros((n, self.max_prompt), np.int32),
    }
    for name in ("chosen", "rejected"):
      out[f"{name}_ids"] = np.full((n, self.max_response), self.pad, np.int32)
      out[f"{name}_mask"] = np.zeros((n, self.max_response), np.int32)
    for row, pair in enumerate(pairs):
      ids = self.prompt_ids(pair.messages)
      out["prompt_ids"][row, self.max_prompt - len(ids) :] = ids
      out["prompt_mask"][row, self.max_prompt - len(ids) :] = 1
      for name in ("chosen", "rejected"):
        ids = self.answer_ids(getattr(pair, name))
        out[f"{name}_ids"][row, : len(ids)] = ids
        out[f"{name}_mask"][row, : len(ids)] = 1
    return out


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict:
  """Global arrays, batch axis sharded; each process copies only its own rows.

  Every process computes the same (small) token batch, so this is right for
  any mesh layout across hosts.
  """
  return {
    k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
    for k, v in batch.items()
  }


class Batches:
  """Re-iterable, deterministic stream of batches.

  Tunix resumes by skipping the batches already trained on, so the stream
  must be the same on every pass: epoch ``e`` is a permutation seeded by
  ``(seed, e)``; a last incomplete batch is dropped.

  Args:
    rows: the examples (preference pairs, prompts).
    batch_size: number of rows per batch.
    make_batch: ``make_batch(rows) -> batch``, e.g. tokenize and shard
      (see `to_global`).
    seed: shuffle seed; ``None`` keeps the file order (held-out evaluation).
    epochs: number of passes; ``None`` repeats forever.
  """

  def __init__(self, rows, batch_size, make_batch, seed=0, epochs=None):
    if len(rows) < batch_size:
      raise ValueError(f"{len(rows)} rows cannot fill one batch of {batch_size}")
    self.rows, self.batch_size, self.make_batch = rows, batch_size, make_batch
    self.seed, self.epochs = seed, epochs

  def __iter__(self) -> Iterator:
    epoch = 0
    while self.epochs is None or epoch < self.epochs:
      order = np.arange(len(self.rows))
      if self.seed is not None:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
      for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
        yield self.make_batch([self.rows[i] for i in order[start : start + self.batch_size]])
      epoch += 1
