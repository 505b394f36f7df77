"""Stress: 2,000 steps of OnDARE and OnTIES on a small MLP, hyper-parameters from hypothesis.

Each run is one ``lax.scan`` under ``jit``. The real-valued hyper-parameters
are traced arguments, as under ``optax.inject_hyperparams``; the reserve rate
and K fix masks and the state's structure, and are static (the transform
refuses them traced).
"""

from __future__ import annotations

import fractions
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from jax import lax

import omerge_jax

STEPS = 2000
# Few examples, no shrinking: one 2,000-step run costs seconds, and a failing
# example is reported as drawn.
FEW = dict(deadline=None, derandomize=True, database=None, phases=[Phase.generate])
SHAPES = {"w1": (16, 64), "b1": (64,), "w2": (64, 16), "b2": (16,), "w3": (16, 1)}


def _init(key):
  keys = jax.random.split(key, len(SHAPES))
  return {
    name: 0.3 * jax.random.normal(k, shape)
    for (name, shape), k in zip(SHAPES.items(), keys, strict=True)
  }


SFT = _init(jax.random.key(0))
BASE = jax.tree.map(lambda x, noise: x - 0.2 * noise, SFT, _init(jax.random.key(1)))
TAU = omerge_jax.reference_delta(SFT, BASE)
N = sum(math.prod(s) for s in SHAPES.values())


def _forward(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  h = jnp.tanh(h @ params["w2"] + params["b2"])
  return h @ params["w3"]


def _loss(params, step):
  x = jax.random.normal(jax.random.fold_in(jax.random.key(2), step), (32, 16))
  y = jnp.sin(x[:, :1] * 2.0) + 0.5 * x[:, 1:2]
  return jnp.mean((_forward(params, x) - y) ** 2)


def _scan(tx, stats=True):
  """Train from the SFT params: the final params and state, and per-step stats."""

  def body(carry, step):
    params, state = carry
    grads = jax.grad(_loss)(params, step)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    if not stats:
      return (params, state), None
    merge_stats = omerge_jax.merge_stats(state)
    return (params, state), (merge_stats.kept_fraction, merge_stats.merged)

  (params, state), history = lax.scan(body, (SFT, tx.init(SFT)), jnp.arange(STEPS))
  return params, state, history


@functools.partial(jax.jit, static_argnames=("method", "p", "merge_every"))
def _stress_run(hp, method, p, merge_every):
  # The other hyper-parameters are traced, as optax.inject_hyperparams makes them.
  if method == "dare":
    tx = omerge_jax.ondare(
      hp["lr"],
      TAU,
      alpha=hp["alpha"],
      reserve_p=p,
      weight_decay=hp["wd"],
      rescale=True,
      resample_reference=True,
      merge_every=merge_every,
      seed=hp["seed"],
      track_stats=True,
    )
  else:
    tx = omerge_jax.onties(
      hp["lr"],
      TAU,
      alpha=hp["alpha"],
      reserve_p=p,
      weight_decay=hp["wd"],
      sign_election="weighted",
      merge_every=merge_every,
      track_stats=True,
    )
  return _scan(tx)


_HYPER_PARAMETERS = st.fixed_dictionaries(
  {
    "lr": st.floats(1e-4, 3e-2),
    "alpha": st.floats(0.0, 0.3),
    "p": st.floats(0.05, 1.0),
    "wd": st.sampled_from([0.0, 1e-2]),
    "merge_every": st.sampled_from([1, 2, 3, 7]),
    "seed": st.integers(0, 2**31 - 1),
  }
)


def _run(hp, method):
  traced = {
    k: jnp.asarray(v, jnp.int32 if k == "seed" else jnp.float32)
    for k, v in hp.items()
    if k not in ("p", "merge_every")
  }
  params, state, (kept, merged) = _stress_run(traced, method, hp["p"], hp["merge_every"])
  chex.assert_tree_all_finite((params, state))
  steps = np.arange(1, STEPS + 1)
  np.testing.assert_array_equal(np.asarray(merged), steps % hp["merge_every"] == 0)
  assert int(state[2].count) == STEPS
  # Kept fractions of the merge steps (a plain step-K step keeps everything).
  return np.asarray(kept, np.float64)[np.asarray(merged)]


@settings(max_examples=3, **FEW)
@given(hp=_HYPER_PARAMETERS)
def test_ondare_2000_steps(hp):
  kept = _run(hp, "dare")
  # Each entry is kept with probability p, independently: the kept fraction
  # of every merge step is Binomial(N, p) / N.
  p = hp["p"]
  sd = math.sqrt(p * (1 - p) / N)
  assert np.all(np.abs(kept - p) <= 6 * sd + 1e-6), (kept.min(), kept.max(), p)
  assert abs(kept.mean() - p) <= 6 * sd / math.sqrt(kept.size) + 1e-6


@settings(max_examples=3, **FEW)
@given(hp=_HYPER_PARAMETERS)
def test_onties_2000_steps(hp):
  kept = _run(hp, "ties")
  # floor(p n) entries of each leaf (the leaf stays dense when that is 0),
  # exactly: ties at the threshold are broken by position.
  # An oracle apart from the implementation's float64 product: exact arithmetic.
  want = sum(
    (math.floor(fractions.Fraction(hp["p"]) * n) or n)
    for n in (math.prod(s) for s in SHAPES.values())
  )
  np.testing.assert_array_equal(np.round(kept * N), np.full(kept.shape, want))


# ---------------------------------------------------------------------------
# The SPEC 8 identities, after 2,000 steps.


@functools.partial(jax.jit, static_argnames="p")
def _identity_runs(hp, p):
  adam = lambda lr: optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(lr))
  zeros = jax.tree.map(jnp.zeros_like, TAU)
  runs = {
    # OnDARE with alpha = 0, p = 1 is AdamW.
    "ondare_a0_p1": omerge_jax.ondare(
      hp["lr"], TAU, alpha=0.0, reserve_p=1.0, weight_decay=hp["wd"]
    ),
    "adamw": optax.adamw(hp["lr"], weight_decay=hp["wd"]),
    # OnTIES with tau = 0, p = 1 is Adam on (1 - alpha) times the step.
    "onties_tau0_p1": omerge_jax.onties(hp["lr"], zeros, alpha=hp["alpha"], reserve_p=1.0),
    "adam_scaled": adam(hp["lr"] * (1 - hp["alpha"])),
    # merge_every longer than the run is Adam until the merge.
    "ondare_k_long": omerge_jax.ondare(
      hp["lr"], TAU, alpha=hp["alpha"], reserve_p=p, merge_every=STEPS + 1
    ),
    "adam": adam(hp["lr"]),
  }
  finals = {name: _scan(tx, stats=False)[:2] for name, tx in runs.items()}

  # E[OnDARE update | Delta] = (1 - alpha) Delta + alpha F(tau), at the final
  # params of the long run: average the merge of one Adam step over many
  # masks (the mask is a function of the step count).
  params, state = finals["ondare_k_long"]
  delta, _ = runs["adam"].update(jax.grad(_loss)(params, STEPS), finals["adam"][1], params)
  merge = omerge_jax.online_merge(TAU, alpha=hp["alpha"], reserve_p=p, seed=5)
  merge_state = merge.init(params)
  one = lambda count: merge.update(delta, merge_state._replace(count=count))[0]
  mean = jax.tree.map(lambda x: jnp.mean(x, axis=0), lax.map(one, jnp.arange(4000), batch_size=500))
  return finals, delta, merge_state.reference, mean


@settings(max_examples=1, **FEW)
@given(
  hp=st.fixed_dictionaries(
    {
      "lr": st.floats(1e-4, 1e-2),
      "alpha": st.floats(1e-3, 0.3),
      "p": st.floats(0.1, 0.9),
      "wd": st.floats(0.0, 0.1),
    }
  )
)
def test_spec_identities_after_2000_steps(hp):
  traced = jax.tree.map(jnp.float32, {k: v for k, v in hp.items() if k != "p"})
  finals, delta, f_tau, mean = _identity_runs(traced, p=hp["p"])
  chex.assert_tree_all_finite(finals)
  # Same arithmetic but for x * 1 + 0 * ref: equal up to rounding carried
  # over 2,000 steps.
  chex.assert_trees_all_close(finals["ondare_a0_p1"][0], finals["adamw"][0], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(
    finals["onties_tau0_p1"][0], finals["adam_scaled"][0], rtol=1e-4, atol=1e-5
  )
  # Not one merge in 2,000 steps: Adam (up to XLA fusing the two programs
  # differently), and the accumulator holds the whole drift from the SFT params.
  chex.assert_trees_all_close(finals["ondare_k_long"][0], finals["adam"][0], rtol=1e-5, atol=1e-6)
  drift = jax.tree.map(lambda a, b: a - b, finals["ondare_k_long"][0], SFT)
  chex.assert_trees_all_close(finals["ondare_k_long"][1][2].accumulator, drift, atol=1e-5)
  alpha, p = np.float32(hp["alpha"]), hp["p"]
  for name in SHAPES:
    d, f, m = (np.asarray(x[name], np.float64) for x in (delta, f_tau, mean))
    want = (1 - alpha) * d + alpha * f
    sd = (1 - alpha) * np.abs(d) * math.sqrt((1 - p) / p / 4000)
    assert np.all(np.abs(m - want) <= 6 * sd + 1e-7), name
