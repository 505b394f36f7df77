"""The skills: string tasks with one exact answer, generated from a seed.

They are the benchmarks on which the alignment tax shows: the base model
learns them in pre-training, SFT carries them into the chat format, and a
preference stage that rewards something else can make the model forget them.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

LETTERS = "abcdefgh"


def _word(rng: np.random.Generator, min_len: int, max_len: int) -> str:
  n = int(rng.integers(min_len, max_len + 1))
  return "".join(rng.choice(list(LETTERS), n))


def copy(rng, min_len, max_len):
  s = _word(rng, min_len, max_len)
  return f"copy {s}", s


def reverse(rng, min_len, max_len):
  s = _word(rng, min_len, max_len)
  return f"rev {s}", s[::-1]


def sort(rng, min_len, max_len):
  s = _word(rng, min_len, max_len)
  return f"sort {s}", "".join(sorted(s))


def shift(rng, min_len, max_len):
  """Each letter moved one place on in the alphabet, wrapping: ``shift abh`` -> ``bca``."""
  s = _word(rng, min_len, max_len)
  return f"shift {s}", "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in s)


def rotate(rng, min_len, max_len):
  """The first letter moved to the end: ``rot abcd`` -> ``bcda``."""
  s = _word(rng, min_len, max_len)
  return f"rot {s}", s[1:] + s[0]


def count(rng, min_len, max_len):
  s = _word(rng, min_len, max_len)
  c = str(rng.choice(list(LETTERS[:4])))
  return f"count {c} {s}", str(s.count(c))


def recall(rng, min_len, max_len):
  """Key-value recall: ``get c a3c7b1`` -> ``7``."""
  n = int(rng.integers(max(2, min_len), min(max_len, len(LETTERS)) + 1))
  keys = rng.choice(list(LETTERS), n, replace=False)
  values = rng.integers(0, 10, n)
  k = int(rng.integers(n))
  pairs = "".join(f"{a}{v}" for a, v in zip(keys, values, strict=True))
  return f"get {keys[k]} {pairs}", str(values[k])


def add(rng, min_len, max_len):
  """Two-digit addition: the sketch found it hardly learnable at this scale."""
  del min_len, max_len
  a, b = rng.integers(0, 100, 2)
  return f"add {a} {b}", str(a + b)


SKILLS: dict[str, Callable] = {
  "copy": copy,
  "reverse": reverse,
  "sort": sort,
  "shift": shift,
  "rotate": rotate,
  "count": count,
  "recall": recall,
  "add": add,
}


def sample(
  skill: str,
  rng: np.random.Generator,
  n: int,
  min_len: int,
  max_len: int,
  exclude: frozenset = frozenset(),
) -> list[tuple[str, str]]:
  """``n`` distinct ``(query, answer)`` pairs of ``skill`` whose query is not in ``exclude``."""
  if skill not in SKILLS:
    raise ValueError(f"unknown skill {skill!r}; known: {sorted(SKILLS)}")
  out, seen = [], set(exclude)
  for _ in range(50 * n + 1000):
    query, answer = SKILLS[skill](rng, min_len, max_len)
    if query not in seen:
      seen.add(query)
      out.append((query, answer))
      if len(out) == n:
        return out
  raise ValueError(f"{skill}: cannot draw {n} distinct queries of length {min_len}..{max_len}")
