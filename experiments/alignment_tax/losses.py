r"""Language-model and preference losses (DPO, IPO, KTO).

With :math:`\pi` the policy, :math:`\pi_r` the frozen SFT reference and the
log-ratios :math:`h_w = \log\pi(y_w|x) - \log\pi_r(y_w|x)`, :math:`h_l` likewise
for the rejected answer, the implicit reward of an answer is :math:`\beta h`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits, tokens):
  """:math:`\\log p(x_t | x_{<t})` of tokens 1.. of each row: ``[b, t - 1]``."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def sequence_logprob(logits, tokens, mask):
  """:math:`\\sum_t m_t \\log p(x_t | x_{<t})` per row: the log-probability of the masked tokens."""
  return jnp.sum(token_logprobs(logits, tokens) * mask[:, 1:], axis=-1)


def lm_loss(logits, tokens, mask):
  """Mean negative log-likelihood per masked token."""
  return -jnp.sum(sequence_logprob(logits, tokens, mask)) / jnp.maximum(jnp.sum(mask[:, 1:]), 1.0)


def dpo(h_chosen, h_rejected, beta):
  r"""DPO (Rafailov et al., 2023): :math:`-\log\sigma(\beta(h_w - h_l))`, batch mean."""
  return -jnp.mean(jax.nn.log_sigmoid(beta * (h_chosen - h_rejected)))


def ipo(h_chosen, h_rejected, beta):
  r"""IPO (Azar et al., 2023): :math:`(h_w - h_l - \frac{1}{2\beta})^2`, batch mean."""
  return jnp.mean((h_chosen - h_rejected - 1.0 / (2.0 * beta)) ** 2)


def kto(h_chosen, h_rejected, beta):
  r"""KTO (Ethayarajh et al., 2024) with chosen answers desirable, rejected undesirable.

  .. math::
    z_0 = \mathrm{sg}\big(\max(0, \overline{h})\big), \quad
    L = \tfrac12\big(1 - \sigma(\beta(h_w - z_0))\big)
      + \tfrac12\big(1 - \sigma(\beta(z_0 - h_l))\big),

  where the reference point :math:`z_0` (the policy-reference KL) is
  estimated by the batch mean of all log-ratios, without gradient, instead
  of the paper's mismatched pairs (one forward pass fewer).
  """
  z0 = jax.lax.stop_gradient(jnp.maximum(0.0, jnp.mean(jnp.concatenate([h_chosen, h_rejected]))))
  desirable = 1.0 - jax.nn.sigmoid(beta * (h_chosen - z0))
  undesirable = 1.0 - jax.nn.sigmoid(beta * (z0 - h_rejected))
  return jnp.mean(0.5 * desirable + 0.5 * undesirable)


def grpo(logp, ref_logp, mask, advantages, kl):
  r"""GRPO (Shao et al., 2024), on-policy: one update per batch of sampled answers.

  With per-token log-probabilities :math:`\log\pi_t` of the policy (``logp``)
  and :math:`\log\pi_{r,t}` of the reference (``ref_logp``), the answer's
  group-normalised advantage :math:`A` and :math:`d_t = \log\pi_{r,t} - \log\pi_t`:

  .. math::
    L = \frac{1}{B}\sum_i \frac{1}{|o_i|}\sum_{t \in o_i}
      \Big(-\frac{\pi_t}{\mathrm{sg}(\pi_t)} A_i + \kappa\,(e^{d_t} - d_t - 1)\Big),

  the second term the unbiased, non-negative estimate of
  :math:`\mathrm{KL}(\pi \| \pi_r)` that GRPO uses, weighted by ``kl``
  (:math:`\kappa`). The ratio is 1 in value: the policy sampled the batch and
  takes one step on it, so PPO's clip never acts and is left out.

  Args:
    logp, ref_logp: ``[b, t]`` per-token log-probabilities (``ref_logp`` without gradient).
    mask: ``[b, t]``, 1 on the answer's tokens (its EOS included).
    advantages: ``[b]``.
    kl: the KL coefficient :math:`\kappa`.
  """
  d = ref_logp - logp
  per_token = -jnp.exp(logp - jax.lax.stop_gradient(logp)) * advantages[:, None] + kl * (
    jnp.exp(d) - d - 1.0
  )
  return jnp.mean(jnp.sum(per_token * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0))


PREFERENCE_LOSSES = {"dpo": dpo, "ipo": ipo, "kto": kto}


def implicit_reward_stats(h_chosen, h_rejected, beta):
  """Held-out implicit-reward accuracy (chosen beats rejected) and mean margin."""
  margin = beta * (h_chosen - h_rejected)
  return {"implicit_acc": jnp.mean(margin > 0), "implicit_margin": jnp.mean(margin)}
