r"""One evaluation for every model of the protocol: the reward and the tax, item by item.

Every number comes from the same two programs run on a Tunix model
(`experiments.llm_dpo.models.load`), so the base, SFT and trained models are
measured by identical code:

* ``log_likelihoods``: :math:`\sum_t \log p(y_t \mid x, y_{<t})` of each
  continuation ``y`` after its context ``x`` (one forward pass per padded
  batch; lengths are bucketed so a run compiles a handful of shapes).
* greedy decoding with Tunix's ``Sampler`` (KV cache, temperature 0).

From them, per item (so that two models can be compared item by item):

* multiple choice (MMLU, CommonsenseQA, OpenBookQA, PIQA, SIQA, BoolQ): 1 when
  the right option has the highest log-likelihood, per character of the
  option where the options are texts (``acc_norm`` of lm-evaluation-harness)
  and in total where they are one letter or yes/no (``acc``);
* ASDiv exact match: the greedy answer's ``#### N`` equals the answer;
* perplexity: each text's mean negative log-likelihood per token;
* preference pairs (held-out NQ-open): the log-likelihoods of the chosen and
  the rejected answer (EOS included, as DPO trains them); the DPO reward
  margin against the SFT model is formed by `experiments.real_lm.report`.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.llm_dpo import data as dpo_data
from experiments.real_lm import data

BUCKET = 32  # sequence lengths are padded to a multiple of this
_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def sequence_logps(model, ids, valid, scored):
  """Per row: the summed log-probability of the tokens where ``scored`` is set.

  Args:
    model: a Tunix causal LM.
    ids: ``[batch, length]`` token ids, right-padded.
    valid: where ``ids`` holds a real token (attended to).
    scored: the tokens whose log-probability counts (each given those before it).
  """
  length = ids.shape[1]
  positions = jnp.broadcast_to(jnp.arange(length), ids.shape)
  attention = valid[:, None, :] & jnp.tril(jnp.ones((length, length), bool))[None]
  from tunix.rl import common  # pylint: disable=g-import-not-at-top

  logits, _ = model(ids, positions, None, attention)
  # Tunix's logit[next] - logsumexp(logits), read off the whole logits array
  # (the targets padded, not the logits sliced): XLA fuses the gather and the
  # reductions into it, where a log_softmax of a slice materialises
  # [batch, length, vocab] copies (3 GiB per batch of 16 x 512 at SmolLM2's
  # 49,152 tokens).
  following = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))  # the token each position predicts
  token_logps = common.selective_log_softmax(logits, following)
  return jnp.sum(jnp.where(scored[:, 1:], token_logps[:, :-1], 0.0), axis=1)


class Scorer:
  """Log-likelihoods of continuations under one model, in fixed-size padded batches.

  Args:
    model: a Tunix causal LM.
    tokenizer: its Hugging Face tokenizer.
    batch_size: rows per forward pass (the last batch is padded with empty rows).
    max_length: contexts are cut from the left to fit (the continuation is kept).
  """

  def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int = 512):
    self.model, self.tokenizer = model, tokenizer
    self.batch_size, self.max_length = batch_size, max_length
    self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    self._forward = nnx.jit(sequence_logps)

  def log_likelihoods(self, requests) -> np.ndarray:
    """``requests``: ``(context_ids, continuation_ids)`` pairs -> one float each."""
    rows = []
    for context, continuation in requests:
      context = list(context)[-(self.max_length - len(continuation)) :]
      rows.append((context + list(continuation), len(context)))
    out = np.zeros(len(rows))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for start in range(0, len(order), self.batch_size):
      chunk = order[start : start + self.batch_size]
      length = -(-max(len(rows[i][0]) for i in chunk) // BUCKET) * BUCKET
      ids = np.full((self.batch_size, length), self.pad, np.int32)
      valid = np.zeros((self.batch_size, length), bool)
      scored = np.zeros((self.batch_size, length), bool)
      for row, i in enumerate(chunk):
        tokens, n_context = rows[i]
        ids[row, : len(tokens)] = tokens
        valid[row, : len(tokens)] = True
        scored[row, n_context : len(tokens)] = True
      logps = np.asarray(self._forward(self.model, ids, valid, scored))
      out[chunk] = logps[: len(chunk)]
    return out

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False)


def multiple_choice(scorer: Scorer, items: list[data.Choice]) -> list[int]:
  """1 or 0 per item: whether the right option scores highest (see the module doc)."""
  requests, owners = [], []
  for n, item in enumerate(items):
    context = scorer.encode(item.context)
    for option in item.options:
      requests.append((context, scorer.encode(option)))
      owners.append(n)
  scores = scorer.log_likelihoods(requests)
  correct, at = [], 0
  for item in items:
    s = scores[at : at + len(item.options)]
    if max(len(o) for o in item.options) > 4:  # texts, not letters or yes/no
      s = s / np.array([len(o) for o in item.options])
    correct.append(int(np.argmax(s) == item.answer))
    at += len(item.options)
  return correct


def perplexity_terms(scorer: Scorer, texts: list[str]) -> list[float]:
  """Each text's mean negative log-likelihood per token (its first token is the context)."""
  requests, counts = [], []
  for text in texts:
    ids = scorer.encode(text)[: scorer.max_length]
    requests.append((ids[:1], ids[1:]))
    counts.append(len(ids) - 1)
  return list(-scorer.log_likelihoods(requests) / np.asarray(counts))


def pair_logps(scorer: Scorer, pairs: list[dpo_data.Pair]) -> dict[str, list[float]]:
  """``{"chosen": [...], "rejected": [...]}``: each answer's log-likelihood after its prompt."""
  eos = [scorer.tokenizer.eos_token_id]
  prompts = [scorer.encode(dpo_data.render_prompt(scorer.tokenizer, p.messages)) for p in pairs]
  return {
    name: list(
      scorer.log_likelihoods(
        [
          (prompt, scorer.encode(getattr(p, name)) + eos)
          for prompt, p in zip(prompts, pairs, strict=True)
        ]
      )
    )
    for name in ("chosen", "rejected")
  }


def final_number(completion: str) -> str | None:
  """The number after the completion's first ``####`` (commas dropped), or None."""
  match = _ANSWER.search(completion)
  return match.group(1).replace(",", "") if match else None


def same_number(guess: str | None, answer: str) -> bool:
  if guess is None:
    return False
  try:
    return abs(float(guess) - float(answer)) < 1e-6
  except ValueError:
    return False


def greedy(
  model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 32
) -> list[str]:
  """Greedy completions of ``prompts`` by Tunix's sampler (stops at EOS)."""
  from tunix.generate import sampler as sampler_lib  # pylint: disable=g-import-not-at-top

  config = model.config
  longest = max(len(tokenizer.encode(p)) for p in prompts) + 1
  prompt_length = -(-longest // BUCKET) * BUCKET
  sampler = sampler_lib.Sampler(
    model,
    tokenizer,
    sampler_lib.CacheConfig(
      cache_size=prompt_length + max_new_tokens,
      num_layers=config.num_layers,
      num_kv_heads=config.num_kv_heads,
      head_dim=config.head_dim,
    ),
  )
  out = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start : start + batch_size]
    chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled batch shape
    result = sampler(
      chunk,
      max_generation_steps=max_new_tokens,
      max_prompt_length=prompt_length,
      temperature=0.0,
      eos_tokens=[tokenizer.eos_token_id],
    )
    out.extend(result.text[: len(prompts) - start])
  return out[: len(prompts)]


def asdiv_exact(
  model, tokenizer, problems: list[data.Problem], max_new_tokens: int
) -> tuple[list[int], list[str]]:
  """(1 or 0 per problem, the completions): the ``#### N`` answer is right."""
  prompts = [dpo_data.render_prompt(tokenizer, data.sft_messages(p)) for p in problems]
  completions = greedy(model, tokenizer, prompts, max_new_tokens)
  return (
    [
      int(same_number(final_number(c), p.answer))
      for c, p in zip(completions, problems, strict=True)
    ],
    completions,
  )
