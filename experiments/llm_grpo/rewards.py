"""Reward functions for GRPO: a registry of named ones and ``module:function`` hooks.

A reward function has the signature Tunix's GRPO (and TRL's) takes::

    fn(prompts: list[str], completions: list[str], **kwargs) -> list[float]

one reward per completion. The prompts JSONL's other fields (e.g. ``answer``)
arrive as keyword arguments, one value per completion, so a function that
names a field without a default (``fn(prompts, completions, answer,
**kwargs)``) requires it of every row; `required_fields` reads that from the
signature and the command checks the file before any model loads.

Example:

    >>> fn = resolve("exact_answer")
    >>> fn(["2 + 3 ="], ["2 + 3 is 5. #### 5"], answer=["5"])
    [1.0]
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Callable

RewardFn = Callable[..., list]

# Keyword arguments Tunix passes itself, not fields of the prompts file.
TUNIX_KWARGS = ("prompts", "completions", "mode", "trajectory_ids")

_HASHES = re.compile(r"####\s*([^\n]*)")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize(answer: str) -> str:
  """``answer`` without spaces at its ends, ``$``, thousands commas or a final period."""
  return str(answer).strip().replace("$", "").replace(",", "").rstrip(".").strip()


def final_answer(completion: str) -> str | None:
  """The final answer of a completion, as GSM8K and MATH write it.

  In order of precedence: the text after the last ``####`` (to the end of
  its line), else the content of the last ``\\boxed{...}`` (without nested
  braces), else the last number (``-1,234.5`` style); ``None`` if the
  completion has none. The result is `normalize`d.
  """
  for pattern in (_HASHES, _BOXED, _NUMBER):
    found = pattern.findall(completion)
    if found:
      return normalize(found[-1])
  return None


def _same(guess: str, answer: str) -> bool:
  if guess == answer:
    return True
  try:
    return float(guess) == float(answer)  # "7.0" and "7" are the same answer
  except ValueError:
    return False


def exact_answer(prompts, completions, answer, **kwargs) -> list[float]:
  """1.0 where `final_answer` of the completion equals the row's ``answer``, else 0.0.

  ``answer`` is `normalize`d too (a GSM8K answer column holding the whole
  solution ``... #### 72`` is reduced to its `final_answer`); two answers that
  parse as numbers are equal when their values are (``7.0`` == ``7``),
  others when their text is.
  """
  del prompts, kwargs
  rewards = []
  for completion, gold in zip(completions, answer, strict=True):
    guess = final_answer(completion)
    gold = final_answer(str(gold)) if "####" in str(gold) else normalize(gold)
    rewards.append(float(guess is not None and _same(guess, gold)))
  return rewards


REWARDS = {"exact_answer": exact_answer}


def resolve(spec: str) -> RewardFn:
  """The reward function of a ``--reward`` value: a name of `REWARDS` or ``module:function``.

  Raises:
    ValueError: an unknown name, a module that does not import, or a
      function it does not have (or that is not callable).
  """
  if spec in REWARDS:
    return REWARDS[spec]
  if ":" not in spec:
    raise ValueError(f"--reward {spec!r}: not one of {sorted(REWARDS)} and not module:function")
  module_name, _, name = spec.partition(":")
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # any error of the user's module is reported the same way
    raise ValueError(f"--reward {spec!r}: cannot import {module_name}: {e!r}") from e
  fn = getattr(module, name, None)
  if not callable(fn):
    raise ValueError(f"--reward {spec!r}: {module_name} has no function {name!r}")
  return fn


def required_fields(fn: RewardFn) -> set[str]:
  """The prompts-file fields ``fn`` needs: its parameters without a default, but Tunix's own."""
  return {
    name
    for name, param in inspect.signature(fn).parameters.items()
    if param.default is inspect.Parameter.empty
    and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
    and name not in TUNIX_KWARGS
  }
