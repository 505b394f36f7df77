r"""GRPO in the testbed: sampled answers, the gold reward on tokens, group advantages.

The programmatic gold reward is what lets this testbed run reinforcement
learning at all: each step samples a group of :math:`G` answers per
preference prompt from the policy, scores them with `gold_reward` (the
style score of a correct answer, `data.gold_score`, computed on the tokens
inside the compiled step), normalises the rewards within each group,

.. math::
  A_i = \frac{r_i - \mathrm{mean}(r_{\mathrm{group}})}{\mathrm{std}(r_{\mathrm{group}}) + \epsilon},

and takes one step of `losses.grpo` with a KL penalty to the SFT model. At
equal budget with the preference losses: a DPO step scores ``pref_batch``
pairs, two answers each; a GRPO step scores ``2 * pref_batch / G`` prompts,
:math:`G` answers each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments.alignment_tax import data as data_lib
from experiments.alignment_tax import losses
from experiments.alignment_tax import model as model_lib
from experiments.alignment_tax import tokenizer

STYLE = tokenizer.encode(data_lib.STYLE)[0]
# Rewards equal within a group give advantages 0, not 0/0.
EPS = 1e-4


def gold_reward(completions, answers):
  """`data.gold_score` of each sampled completion, on tokens: its style score if its content is correct.

  Args:
    completions: ``[b, n]`` sampled tokens (text and EOS, never PAD or BOS:
      `model.sample`); the text is the tokens before the first EOS.
    answers: ``[b, n]`` the plain answers' tokens, PAD-padded.

  Returns:
    ``[b]`` float32 in {0, 0.5, 1}.
  """
  n = completions.shape[1]
  at = jnp.arange(n)
  ends = completions == tokenizer.EOS
  length = jnp.where(jnp.any(ends, axis=1), jnp.argmax(ends, axis=1), n)
  text = at < length[:, None]
  styled = (completions == STYLE) & text
  # The content is the text with its leading and trailing style marks stripped.
  lead = jnp.sum(jnp.cumprod(styled, axis=1), axis=1)
  last = jnp.max(jnp.where(text & ~styled, at, -1), axis=1)
  size = jnp.where(last >= 0, last + 1 - lead, 0)
  content = jnp.take_along_axis(completions, jnp.minimum(lead[:, None] + at, n - 1), axis=1)
  content = jnp.where(at < size[:, None], content, tokenizer.PAD)
  correct = jnp.all(content == answers, axis=1)
  opens = (length > 0) & (completions[:, 0] == STYLE)
  closes = (length > 1) & (
    jnp.take_along_axis(completions, jnp.maximum(length - 1, 0)[:, None], axis=1)[:, 0] == STYLE
  )
  return jnp.where(correct, 0.5 * opens + 0.5 * closes, 0.0)


def advantages(rewards, group: int):
  """Rewards normalised within each group of ``group`` consecutive answers."""
  r = rewards.reshape(-1, group)
  return ((r - r.mean(axis=1, keepdims=True)) / (r.std(axis=1, keepdims=True) + EPS)).reshape(-1)


def answer_mask(completions):
  """1 on each completion's tokens up to and including its first EOS."""
  ends = (completions == tokenizer.EOS).astype(jnp.int32)
  return (jnp.cumsum(ends, axis=1) - ends == 0).astype(jnp.float32)


def rollout(group: int, temperature: float = 1.0, reward=gold_reward):
  """The step's batch of GRPO: ``group`` sampled answers per prompt, scored, with reference log-probabilities.

  ``reward(completions, answers)`` scores the sampled tokens (`gold_reward`).
  Returns ``rollout(policy, reference, batch, key)`` for `training.train`:
  ``batch`` holds ``prompts`` ``[b, prompt_len]`` and ``answers``; the
  result holds ``tokens``, ``mask`` (the answers' tokens), ``advantages``,
  ``ref_logp`` and ``reward``, ``group`` rows per prompt.
  """

  def fn(policy, reference, batch, key):
    prompts = jnp.repeat(batch["prompts"], group, axis=0)
    completions = model_lib.sample(policy, prompts, batch["answers"].shape[1], key, temperature)
    scores = reward(completions, jnp.repeat(batch["answers"], group, axis=0))
    tokens = jnp.concatenate([prompts, completions], axis=1)
    mask = jnp.concatenate(
      [jnp.zeros(prompts.shape, jnp.float32), answer_mask(completions)], axis=1
    )
    ref_logp = losses.token_logprobs(reference(tokens), tokens)
    return {
      "tokens": tokens,
      "mask": mask,
      "advantages": advantages(scores, group),
      "ref_logp": jax.lax.stop_gradient(ref_logp),
      "reward": scores,
    }

  return fn


def objective(kl: float):
  """``loss(model, batch)`` of `losses.grpo` on a batch from `rollout`."""

  def loss(model, batch):
    logp = losses.token_logprobs(model(batch["tokens"]), batch["tokens"])
    return losses.grpo(logp, batch["ref_logp"], batch["mask"][:, 1:], batch["advantages"], kl)

  return loss
