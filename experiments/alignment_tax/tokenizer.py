"""A character tokenizer with its own padding, begin and end tokens.

Padding must be a token of its own: when it shared the id of the end token the
model never learned to stop and every exact match failed.
"""

from __future__ import annotations

import numpy as np

PAD, BOS, EOS = 0, 1, 2
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 :?=~,;"
VOCAB_SIZE = 3 + len(CHARS)
_IDS = {c: i + 3 for i, c in enumerate(CHARS)}


def encode(text: str) -> list[int]:
  """The ids of ``text``, one per character; raises KeyError on a character outside `CHARS`."""
  return [_IDS[c] for c in text]


def decode(ids) -> str:
  """The text of ``ids`` up to the first EOS, skipping PAD and BOS."""
  out = []
  for i in np.asarray(ids).tolist():
    if i == EOS:
      break
    if i >= 3:
      out.append(CHARS[i - 3])
  return "".join(out)


def pack(prompts: list[str], answers: list[str], prompt_len: int, answer_len: int):
  """Left-pad BOS+prompt to ``prompt_len`` and right-pad answer+EOS to ``answer_len``.

  The answer always starts at position ``prompt_len``, so one slice holds
  every answer; positions are counted from the first real token (see
  `model.positions`), so the left padding does not shift them.

  Returns:
    ``(tokens, mask)``: int32 ``[n, prompt_len + answer_len]`` and the float32
    mask of the answer+EOS tokens to score.
  """
  n = len(prompts)
  tokens = np.full((n, prompt_len + answer_len), PAD, np.int32)
  mask = np.zeros((n, prompt_len + answer_len), np.float32)
  for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
    p = [BOS] + encode(prompt)
    a = encode(answer) + [EOS]
    if len(p) > prompt_len or len(a) > answer_len:
      raise ValueError(f"{prompt!r} -> {answer!r} does not fit {prompt_len}+{answer_len}")
    tokens[row, prompt_len - len(p) : prompt_len] = p
    tokens[row, prompt_len : prompt_len + len(a)] = a
    mask[row, prompt_len : prompt_len + len(a)] = 1.0
  return tokens, mask
