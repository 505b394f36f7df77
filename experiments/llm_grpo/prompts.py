"""Prompts for GRPO from a JSONL file, as GSM8K-style data sets are distributed.

Each line holds ``prompt`` (a string, or a chat conversation: a list of
``{"role", "content"}`` messages) and the fields the reward functions read,
e.g. ``answer``. Every field but ``prompt`` reaches the reward functions as a
keyword argument (`experiments.llm_grpo.rewards`). The prompt is rendered
with the SFT tokenizer's chat template (`experiments.llm_dpo.data.render_prompt`).
"""

from __future__ import annotations

import pathlib

import numpy as np

from experiments.llm_dpo import data


def read_prompts(path, fields=()) -> list[dict]:
  """Every row of a prompts JSONL file; each must have ``prompt`` and ``fields``.

  Returns:
    One dict a row: ``messages`` (the conversation to answer, a tuple of
    messages) and the row's other fields.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: a line is not a JSON object or misses a field (its line
      number is named), or the file holds no row.
  """
  if not pathlib.Path(path).is_file():
    raise FileNotFoundError(f"--prompts {path}: no such file")
  rows = []
  for _, row in data.jsonl_rows(path, ("prompt", *fields)):
    rows.append({"messages": data.as_messages(row.pop("prompt")), **row})
  if not rows:
    raise ValueError(f"--prompts {path} holds no prompt")
  return rows


def batch(rows) -> dict[str, np.ndarray]:
  """A GRPO input batch: ``prompts`` (rendered text) and every field all ``rows`` share.

  Arrays, as Tunix's learner repeats each over the group of a prompt
  (``np.repeat``); ``rows`` carry their rendered prompt as ``text``.
  """
  shared = set.intersection(*(set(r) for r in rows)) - {"messages", "text"}
  out = {"prompts": np.array([r["text"] for r in rows])}
  for name in sorted(shared):
    out[name] = np.array([r[name] for r in rows], dtype=object)
  return out
