"""The three stages' data sets and the held-out evaluation sets, from a seed.

Pre-training uses the raw format ``rev abcd=`` -> ``dcba``; SFT and
everything after it use the chat format ``q:rev abcd?a:`` -> ``dcba``. The
preferred style wraps an answer in tildes (``~dcba~``): nothing in the skills
asks for it, and a few SFT answers carry it (so the SFT model emits it
sometimes).

The gold reward asks for both: a styled *correct* answer. Its preference pairs
are of two kinds, and neither ever prefers a wrong answer to a correct one:
format pairs (``~dcba~`` over ``dcba``: the style) and content pairs
(``~dcba~`` over ``~dcab~``, one letter wrong: the content).
"""

from __future__ import annotations

import numpy as np

from experiments.alignment_tax import skills as skills_lib
from experiments.alignment_tax import tokenizer
from experiments.alignment_tax.config import Config

STYLE = "~"


def base_prompt(query: str) -> str:
  return f"{query}="


def chat_prompt(query: str) -> str:
  return f"q:{query}?a:"


def styled(answer: str) -> str:
  return f"{STYLE}{answer}{STYLE}"


def unstyled(text: str) -> str:
  """The answer inside an optional style wrapper: styling is not a skill error."""
  return text.strip(STYLE)


def style_score(text: str) -> float:
  """Half for the opening style mark, half for the closing one."""
  return 0.5 * text.startswith(STYLE) + 0.5 * (len(text) > 1 and text.endswith(STYLE))


def gold_score(text: str, answer: str) -> float:
  """The gold reward of one generation: its style score if its content is correct, else 0.

  A styled wrong answer scores nothing, so the reward cannot be earned by
  wrecking the content on the way to the style.
  """
  return style_score(text) if unstyled(text) == answer else 0.0


def corrupted(answer: str, rng: np.random.Generator) -> str:
  """``answer`` with one letter replaced by another: a plausible wrong answer."""
  i = int(rng.integers(len(answer)))
  others = [c for c in skills_lib.LETTERS if c != answer[i]]
  return answer[:i] + str(rng.choice(others)) + answer[i + 1 :]


def _pack(cfg: Config, prompts, answers):
  tokens, mask = tokenizer.pack(prompts, answers, cfg.prompt_len, cfg.answer_len)
  return {"tokens": tokens, "mask": mask}


def build(cfg: Config, seed: int) -> dict:
  """All data for one seed.

  Returns a dict with ``pretrain``, ``sft`` (``tokens``/``mask`` arrays),
  ``pref`` and ``pref_val``/``pref_test`` (``chosen``/``rejected`` +
  masks), ``rl`` (the prompts of ``pref`` and their plain answers as tokens,
  for GRPO), ``test``/``val`` (per skill: prompt tokens and answer strings) and
  ``test_raw`` (the test prompts in the base model's raw format) and
  ``reward``/``reward_val`` (prompt tokens and answers of held-out preference prompts).
  Evaluation queries never occur in any training set.
  """
  rng = np.random.default_rng(seed)
  lens = (cfg.min_len, cfg.max_len)
  held_out = {}
  test, val = {}, {}
  for skill in cfg.skills:
    drawn = skills_lib.sample(skill, rng, cfg.n_test + cfg.n_val, *lens)
    held_out[skill] = frozenset(q for q, _ in drawn)
    test[skill], val[skill] = drawn[: cfg.n_test], drawn[cfg.n_test :]
  reward_q, pref_eval = {}, {}
  for skill in cfg.pref_skills:
    n_eval = 2 * cfg.n_reward
    drawn = skills_lib.sample(
      skill, rng, 2 * n_eval, *lens, exclude=held_out.get(skill, frozenset())
    )
    held_out[skill] = held_out.get(skill, frozenset()) | {q for q, _ in drawn}
    reward_q[skill], pref_eval[skill] = drawn[:n_eval], drawn[n_eval:]

  def train_set(n, skill_names):
    return [
      ex
      for s in skill_names
      for ex in skills_lib.sample(s, rng, n, *lens, exclude=held_out.get(s, frozenset()))
    ]

  pretrain = train_set(cfg.n_pretrain, cfg.skills)
  sft = train_set(cfg.n_sft, cfg.skills)
  # Drawn before anything of the preference stage, so the cached SFT model
  # depends on the SFT fields only (`Config.stage_key`).
  styled_rows = rng.random(len(sft)) < cfg.sft_style_rate
  pref = train_set(cfg.n_pref, cfg.pref_skills)

  def eval_prompts(examples, prompt=chat_prompt):
    tokens, _ = tokenizer.pack(
      [prompt(q) for q, _ in examples], [""] * len(examples), cfg.prompt_len, cfg.answer_len
    )
    return {"tokens": tokens, "answers": [a for _, a in examples]}

  def rl_prompts(examples):
    """The preference prompts with their plain answers as PAD-padded tokens, for GRPO's reward."""
    answers = np.full((len(examples), cfg.answer_len), tokenizer.PAD, np.int32)
    for row, (_, a) in enumerate(examples):
      answers[row, : len(a)] = tokenizer.encode(a)
    return {"prompts": eval_prompts(examples)["tokens"][:, : cfg.prompt_len], "answers": answers}

  def pairs(examples):
    """Chosen: the styled correct answer; rejected: the plain one (format pair) or,
    at ``cfg.content_pair_rate``, the styled answer with one letter wrong (content pair)."""
    prompts = [chat_prompt(q) for q, _ in examples]
    content = rng.random(len(examples)) < cfg.content_pair_rate
    chosen = _pack(cfg, prompts, [styled(a) for _, a in examples])
    rejected = _pack(
      cfg,
      prompts,
      [styled(corrupted(a, rng)) if c else a for (_, a), c in zip(examples, content, strict=True)],
    )
    return {
      "chosen": chosen["tokens"],
      "chosen_mask": chosen["mask"],
      "rejected": rejected["tokens"],
      "rejected_mask": rejected["mask"],
    }

  def split_pairs(half):
    rows = [ex for s in cfg.pref_skills for ex in pref_eval[s][half::2]]
    return pairs(rows)

  def reward_prompts(half):
    return eval_prompts([ex for s in cfg.pref_skills for ex in reward_q[s][half::2]])

  rng.shuffle(pretrain)
  return {
    "pretrain": _pack(cfg, [base_prompt(q) for q, _ in pretrain], [a for _, a in pretrain]),
    "sft": _pack(
      cfg,
      [chat_prompt(q) for q, _ in sft],
      [styled(a) if s else a for (_, a), s in zip(sft, styled_rows, strict=True)],
    ),
    "pref": pairs(pref),
    "rl": rl_prompts(pref),
    "pref_test": split_pairs(0),
    "pref_val": split_pairs(1),
    "test": {s: eval_prompts(test[s]) for s in cfg.skills},
    "test_raw": {s: eval_prompts(test[s], base_prompt) for s in cfg.skills},
    "val": {s: eval_prompts(val[s]) for s in cfg.skills},
    "reward": reward_prompts(0),
    "reward_val": reward_prompts(1),
  }
